"""Read a covidmt TFDS build (:mod:`covidmt_jax.data.tfds_builders`) back as a source.

``TFDSSource("covidmt_covidx", "train", "~/tensorflow_datasets")`` opens the split with
``tfds.data_source`` (ArrayRecord random access: any index, any worker) and yields the same
records as the source the dataset was built from, with images as encoded PNG bytes
(TFDS's image decoding is skipped: the pipeline decodes with
:func:`covidmt_jax.data.images.open_image` like any source's bytes, and no TensorFlow is
needed)::

    {"id": str, "image": PNG bytes [S, S] grey, ["labels": float32 [K]],
     ["boxes": float32 [N, 4] xyxy in [0, 1]], ["mask": PNG bytes, lung = 255],
     "meta": {... the source's meta ..., "source_size": [height, width] before resizing}}

Pair builds yield ``"original"`` and ``"transmitted"`` instead of ``"image"``. ``boxes`` is
present exactly where the source record had boxes. Masks are stored binary, so
``meta["threshold"]`` is 127.

Importing this module does not import TensorFlow Datasets (it is imported when a source is
built); the source is picklable (the reader is reopened lazily in each worker).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from covidmt_jax.data.records import DataError, Source
from covidmt_jax.data.sources import register_source

__all__ = ["TFDSSource", "default_data_dir", "find_build"]


def default_data_dir() -> Path:
    """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (TFDS's own default)."""
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def _versions(config_dir: Path) -> list[Path]:
    return sorted(p for p in config_dir.iterdir() if p.is_dir() and (p / "dataset_info.json").is_file())


def find_build(dataset: str, data_dir: str | os.PathLike | None = None, *,
               config: str | None = None) -> tuple[str, Path]:
    """``(config name, build folder)`` of ``<data_dir>/<dataset>/<config>/<version>``.

    ``dataset`` may be ``"name/config"``. Without a config the only built one is used
    (DataError listing them when there are several, or none).
    """
    if "/" in dataset:
        dataset, cfg = dataset.split("/", 1)
        if config is not None and config != cfg:
            raise ValueError(f"config given twice: {cfg!r} in the name and config={config!r}")
        config = cfg
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    ds_dir = root / dataset
    if not ds_dir.is_dir():
        raise DataError(ds_dir, f"no TFDS dataset {dataset!r} under {root} (build it with "
                                f"python -m covidmt_jax.data.tfds_builders)")
    built = {p.name: v[-1] for p in sorted(ds_dir.iterdir())
             if p.is_dir() and not p.name.startswith(".") and (v := _versions(p))}
    if config is None:
        if len(built) != 1:
            raise DataError(ds_dir, f"{'no built configs' if not built else 'several built configs'} "
                                    f"{sorted(built)}; pass config= or '{dataset}/<config>'")
        config = next(iter(built))
    if config not in built:
        raise DataError(ds_dir / config, f"config {config!r} of {dataset!r} is not built (built: {sorted(built)})")
    return config, built[config]


@register_source("tfds")
class TFDSSource(Source):
    """A split of a covidmt TFDS build as a source (see the module docstring).

    Args:
      dataset: the build's name (``build_tfds(name=...)``), optionally ``"name/config"``.
      split: a split, or any TFDS split expression (``"train[:80%]"``, ``"train+val"``).
      data_dir: TFDS data folder (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      config: e.g. ``"512px"``; default: the only config built.
      name: display name (default ``"tfds:<dataset>/<config>:<split>"``).

    (The dataset argument is not called ``name`` because ``get_source("tfds", ...)`` and
    every other source use ``name=`` for the display name.)

    Attributes: ``label_names``, ``image_size``, ``path`` (the build folder), ``metadata``
    (its ``metadata.json``), ``kind`` (``"image"`` or ``"pairs"``), ``image_keys``.
    """

    def __init__(self, dataset: str, split: str = "train", data_dir: str | os.PathLike | None = None, *,
                 config: str | None = None, name: str | None = None):
        super().__init__(on_error="raise")
        from covidmt_jax.data.tfds_builders import read_build_metadata

        self.config, self.path = find_build(dataset, data_dir, config=config)
        self.dataset = dataset.split("/", 1)[0]
        self.data_dir = self.path.parent.parent.parent
        self.split = str(split)
        self.metadata = read_build_metadata(self.path)
        self.kind = self.metadata["kind"]
        self.image_keys = tuple(self.metadata["image_keys"])
        self.label_names = tuple(self.metadata["label_names"])
        self.has_boxes = bool(self.metadata["has_boxes"])
        self.image_size = int(self.metadata["image_size"])
        self.name = name or f"tfds:{self.dataset}/{self.config}:{self.split}"
        self._indices: np.ndarray | None = None
        self._ds = None
        self._n = len(self._reader())

    # --- reader (reopened lazily after unpickling) -----------------------------------------
    def _reader(self):
        if self._ds is None:
            import tensorflow_datasets as tfds

            decoders = {k: tfds.decode.SkipDecoding() for k in self.image_keys}
            try:
                self._ds = tfds.data_source(f"{self.dataset}/{self.config}", split=self.split,
                                            data_dir=os.fspath(self.data_dir), download=False, decoders=decoders)
            except (KeyError, ValueError) as e:  # unknown split or bad split expression
                raise DataError(self.path, f"cannot open split {self.split!r}: {e}") from e
        return self._ds

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None
        return state

    # --- sequence protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return self._n if self._indices is None else len(self._indices)

    def _index(self, i: int) -> int:
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} records")
        return i if self._indices is None else int(self._indices[i])

    def __getitem__(self, i: int) -> dict:
        j = self._index(i)
        try:
            ex = self._reader()[j]
        except Exception as e:  # array_record / protobuf errors on a damaged file
            raise DataError(self.path, f"{self.split}[{j}]: cannot read the stored example: "
                                       f"{type(e).__name__}: {e}") from e
        return self._record(ex)

    def _record(self, ex: dict) -> dict:
        rec = {"id": _text(ex["id"])}
        for k in self.image_keys:
            rec[k] = bytes(ex[k])
        if self.label_names:
            rec["labels"] = np.asarray(ex["labels"], np.float32).reshape(len(self.label_names))
        if self.has_boxes and bool(ex["has_boxes"]):
            rec["boxes"] = np.asarray(ex["boxes"], np.float32).reshape(-1, 4)
        meta = json.loads(_text(ex["meta"]))
        meta["source_size"] = [int(v) for v in np.asarray(ex["source_size"]).tolist()]
        rec["meta"] = meta
        return rec

    @property
    def ids(self) -> list[str]:
        """Every record's id (reads every stored example: costly on big builds)."""
        return [self[i]["id"] for i in range(len(self))]

    def subset(self, indices: Sequence[int], *, name: str | None = None) -> "TFDSSource":
        """The records ``indices`` (positions in this source) as a new TFDSSource."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        base = np.arange(self._n) if self._indices is None else self._indices
        if idx.size and (idx.min() < -len(base) or idx.max() >= len(base)):
            raise IndexError(f"{self.name}: subset indices out of range for {len(base)} records")
        sub = object.__new__(type(self))
        sub.__dict__.update(self.__getstate__())
        sub._indices = base[idx]
        sub.skipped = list(self.skipped)
        sub.name = name or self.name
        return sub


def _text(v) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8")
    if isinstance(v, np.ndarray):
        return _text(v.item())
    return str(v)
