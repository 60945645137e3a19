"""TFDS builders: any source (COVIDx, NIH, RSNA, WaCXR pairs, lung masks, image folders,
synthetic phantoms) written once as an ArrayRecord dataset of resized, encoded images.

One generic builder class, parameterised by the sources it reads, replaces a builder per
dataset: :func:`build_tfds` takes ``{split: Source}``, resizes every image ONCE to
``image_size`` x ``image_size``, stores it PNG-encoded and returns the dataset folder
``<data_dir>/<name>/<config>/1.0.0``. :class:`~covidmt_jax.data.sources.tfds_source.TFDSSource`
(registered source ``"tfds"``) reads it back with ``tfds.data_source`` (random access, so
grain can read any index in any worker) as records the pipeline consumes like any source's.

No TensorFlow: TFDS serialises examples with its own protobuf copies and writes ArrayRecord
(or Parquet) without TensorFlow *as long as image features receive encoded bytes or file
paths, never numpy arrays* (arrays go through ``tf.image.encode_png``). Every image here is
encoded with :func:`covidmt_jax.data.images.encode_png` before it reaches TFDS, and reading
back skips TFDS's image decoding (``tfds.decode.SkipDecoding``), so builds and reads work in
an environment without TensorFlow (the tests check ``tensorflow`` is never imported).

Stored example (features of every build; ``S`` = ``image_size``)::

    id           Text                     the source record's id
    image        Image [S, S, 1] PNG      grey, 8-bit (uint8) or 16-bit (bits=16, uint16)
    source_size  int32 [2]                (height, width) of the image before resizing
    labels       float32 [K]              when the source has label_names (K > 0)
    boxes        float32 [N, 4]           xyxy normalised to [0, 1] (when boxes are present)
    has_boxes    bool                     False where a record carries no box annotation
    mask         Image [S, S, 1] PNG      lung mask, 0 / 255 (lung sets, with_mask phantoms)
    meta         Text (JSON)              the record's meta dict (+ "threshold": 127 for masks)

Pair sources (WaCXR, folder pairs, synthetic pairs) store ``original`` and ``transmitted``
(both ``Image [S, S, 1]``) instead of ``image``; ``source_size`` is the original's and
``meta["transmitted_size"]`` the transmitted file's (height, width).

Resizing choice: SQUARE, ``S x S``, aspect ratio not kept. The models take square inputs and
the published pipelines (COVID-Net, the paper's torchvision ``Resize((H, W))``) squash chest
X-rays to a square, so a square build at the training size makes the pipeline's resize a
no-op and decoding the only per-sample cost; boxes are normalised, so they stay valid under
any per-axis scaling, and ``source_size`` keeps what is needed to restore the aspect ratio.
Images are decoded with the project's one decoder (:func:`~covidmt_jax.data.images.load_grey`:
RGB -> ITU-R 601 grey, >8-bit data in full precision) and resized with PIL's antialiased
bilinear filter on the float image (what ``load_grey(size=...)`` does); masks with
:func:`~covidmt_jax.data.images.load_mask` (grey resize, then the source's threshold) and
stored binary. ``bits=16`` keeps 16-bit precision for 12/16-bit sources (DICOM, 16-bit PNG);
8 bits is the default (COVIDx, NIH and RSNA's PNG/DICOM releases are 8-bit). Transmitted
images of pairs are decoded and resized like originals: their compression artefacts survive
as pixels, their JPEG bytes do not (keep the files for ``channels.estimate_jpeg_quality``).

Examples keep the source order (``disable_shuffling``): index ``i`` of a split is record
``i`` of its source (minus skipped ones); grain shuffles at read time.

Command line (``manual_dir`` layouts are those of the sources)::

    python -m covidmt_jax.data.tfds_builders --dataset covidx --manual_dir /data/covidx \\
        --data_dir ~/tensorflow_datasets --image_size 512

``--dataset`` and its ``--manual_dir`` layout:

* ``covidx`` — a COVIDx build (:meth:`COVIDxSource.from_root`): label files
  ``[labels/]train_COVIDx<V>.txt`` and ``[labels/]test_COVIDx<V>.txt`` (``--covidx_version``,
  default 3) with images in ``train/`` and ``test/``. Splits ``train`` and ``test``. Stored
  without COVID-19 upsampling (balance at read time).
* ``nih`` — the ChestX-ray14 release (:class:`NIHSource`): ``Data_Entry_2017[_v2020].csv[.gz]``,
  ``train_val_list.txt``, ``test_list.txt``, images under ``images*/`` (official or Kaggle
  nesting), optional ``BBox_List_2017.csv`` (boxes stored when present). Splits ``train``
  (= train_val) and ``test``; one ``train`` split of all images when the lists are absent.
* ``rsna`` — ``stage_2_train_labels.csv`` (or ``.zip``), optional
  ``stage_2_detailed_class_info.csv``, and ``<patientId>.dcm|.png|.jpg`` anywhere below
  (``stage_2_train_images/``) (:class:`RSNASource`). Split ``train``.
* ``wacxr`` — ``covid_binary_test/{0_NON_COVID,1_COVID-19}/NAME`` and
  ``covid_binary_test_whatsapp/{...}/NAME`` (:class:`WaCXRSource`). Split ``test``.
* ``lungs`` — a lung-mask set in any :class:`LungMaskSource` layout (Montgomery
  ``CXR_png/`` + ``ManualMask/{left,right}Mask/``, ``images/`` + ``masks/`` as
  ``lungs_mc_sz_512``, or ``NAME_mask.png`` side by side). Split ``train``.
* ``folder`` — any image folder (:class:`ImageFolderSource`; ``--labels_from_subfolders``
  takes classes from first-level folders). Split ``train``.
* ``synthetic`` — no ``manual_dir``: ``--kind covidx|nih|rsna|lungs|pairs`` phantoms rendered
  at ``image_size``; ``--num_examples`` train records and ``--num_eval`` val and test records
  (pairs: ``--num_eval`` test records only).

``--val_fraction F`` carves a patient-disjoint ``val`` split out of ``train`` (covidx, nih,
rsna, lungs, folder; patient = ``meta["patient_id"]`` when present, else the record id).
``--on_error skip`` skips unreadable images, lists them at the end and stores the list in
the build's ``metadata.json`` (``"skipped"``).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import re
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils
from PIL import Image

from covidmt_jax.data import images
from covidmt_jax.data.records import DataError, Source, check_on_error, patient_holdout

__all__ = ["FORMAT", "FORMAT_VERSION", "FILE_FORMATS", "IMAGE_KEYS", "CXRConfig", "CXRBuilder", "Schema",
           "infer_schema", "encode_record", "build_tfds", "default_config_name", "read_build_metadata",
           "source_description", "main"]

#: Written to metadata.json so readers can tell a covidmt build from another TFDS dataset.
FORMAT = "covidmt_cxr"
FORMAT_VERSION = 1
FILE_FORMATS = ("array_record", "parquet")
#: Record keys that hold images, in storage order.
IMAGE_KEYS = ("image", "original", "transmitted", "mask")
DATASET_VERSION = "1.0.0"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_CONFIG = re.compile(r"^[A-Za-z0-9][\w+\-.]*$")


# --- schema ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Schema:
    """What a build stores: ``kind`` ``"image"`` or ``"pairs"``, the image keys (see
    :data:`IMAGE_KEYS`), the label columns and whether boxes are stored."""

    kind: str
    image_keys: tuple[str, ...]
    label_names: tuple[str, ...]
    has_boxes: bool

    @property
    def primary(self) -> str:
        """The image whose size is ``source_size`` (``"image"`` or ``"original"``)."""
        return self.image_keys[0]


def infer_schema(splits: Mapping[str, Sequence], *, with_boxes: bool | None = None) -> Schema:
    """The schema of a build from the first record of each split.

    ``with_boxes``: None = store boxes when a first record has them; True / False forces it
    (NIH's boxes exist for few images: pass True when a bbox file was read). Label names must
    be the same for every split's source.
    """
    if not splits:
        raise ValueError("no splits to build")
    label_names, keys, boxes = None, set(), False
    for split, src in splits.items():
        names = tuple(getattr(src, "label_names", ()))
        if label_names is None:
            label_names = names
        elif names != label_names:
            raise ValueError(f"split {split!r}: label_names {names} differ from another split's {label_names}")
        if len(src) == 0:
            continue
        first = src[0]
        keys |= {k for k in IMAGE_KEYS if k in first}
        boxes |= "boxes" in first
    if "image" in keys and ("original" in keys or "transmitted" in keys):
        raise ValueError("splits mix single-image records ('image') and pair records ('original'/'transmitted')")
    if "original" in keys or "transmitted" in keys:
        kind, image_keys = "pairs", ("original", "transmitted")
    elif "image" in keys:
        kind, image_keys = "image", ("image",)
    else:
        raise ValueError("no records with 'image' or 'original'/'transmitted' in any split (empty sources?)")
    if "mask" in keys:
        image_keys += ("mask",)
    return Schema(kind, image_keys, label_names or (), boxes if with_boxes is None else bool(with_boxes))


def _features(schema: Schema, image_size: int, bits: int) -> "tfds.features.FeaturesDict":
    s = int(image_size)
    grey = np.uint16 if bits == 16 else np.uint8
    feats: dict[str, Any] = {"id": tfds.features.Text(doc="record id of the source")}
    for k in schema.image_keys:
        dtype = np.uint8 if k == "mask" else grey
        feats[k] = tfds.features.Image(shape=(s, s, 1), dtype=dtype, encoding_format="png",
                                       doc="lung mask, 0/255" if k == "mask" else "grey image, PNG")
    feats["source_size"] = tfds.features.Tensor(shape=(2,), dtype=np.int32,
                                                doc=f"(height, width) of {schema.primary!r} before resizing")
    if schema.label_names:
        feats["labels"] = tfds.features.Tensor(shape=(len(schema.label_names),), dtype=np.float32,
                                               doc=f"multi-hot {list(schema.label_names)}")
    if schema.has_boxes:
        feats["boxes"] = tfds.features.Tensor(shape=(None, 4), dtype=np.float32, doc="xyxy in [0, 1]")
        feats["has_boxes"] = tfds.features.Tensor(shape=(), dtype=np.bool_, doc="record carries box annotation")
    feats["meta"] = tfds.features.Text(doc="JSON of the record's meta dict")
    return tfds.features.FeaturesDict(feats)


# --- encoding one record -------------------------------------------------------------------
def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (os.PathLike, Path)):
        return os.fspath(x)
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    return str(x)


def meta_json(meta: Mapping) -> str:
    """JSON text of a meta dict (numpy values, paths and sets converted)."""
    return json.dumps(dict(meta), default=_json_default, sort_keys=True)


def _label(src: Any, fallback: str) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else fallback


def _resize(grey: np.ndarray, size: int) -> np.ndarray:
    """[H, W] float32 in [0, 1] -> [size, size] (PIL antialiased bilinear, as load_grey)."""
    if grey.shape == (size, size):
        return grey
    out = Image.fromarray(grey).resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def encode_record(rec: Mapping, schema: Schema, *, image_size: int, bits: int = 8,
                  where: str = "<record>") -> dict:
    """One source record -> the TFDS example dict (all images PNG bytes, see module doc).

    ``where`` names the record in errors when its images are bytes (e.g. ``"src:id"``).
    Raises :class:`DataError` naming the file (or ``where``) for unreadable images, and
    for records that do not fit ``schema``.
    """
    rid = rec.get("id")
    if not isinstance(rid, str) or not rid:
        raise DataError(where, f"record id must be a non-empty string, got {rid!r}")
    ex: dict[str, Any] = {"id": rid}
    meta = dict(rec.get("meta") or {})
    for k in schema.image_keys:
        if k not in rec:
            raise DataError(where, f"record lacks {k!r} (the build stores {list(schema.image_keys)})")
        src = rec[k]
        name = _label(src, f"{where}[{k}]")
        if k == "mask":
            thr = float(meta.get("threshold", 127))
            mask = images.load_mask(src, name=name, threshold=thr, size=image_size)
            ex[k] = images.encode_png(mask)
            meta["threshold"] = 127
            continue
        grey = images.load_grey(src, name=name)
        if k == schema.primary:
            ex["source_size"] = np.array(grey.shape, np.int32)
        elif k == "transmitted":
            meta["transmitted_size"] = list(grey.shape)
        ex[k] = images.encode_png(_resize(grey, image_size), bits=bits)
    for k in ("image", "original", "transmitted", "mask"):
        if k in rec and k not in schema.image_keys:
            raise DataError(where, f"record has {k!r} but the build stores only {list(schema.image_keys)} "
                                   f"(decided by the first record of each split)")
    if schema.label_names:
        labels = np.asarray(rec.get("labels", ()), np.float32)
        if labels.shape != (len(schema.label_names),) or not np.isfinite(labels).all():
            raise DataError(where, f"labels must be finite float32 [{len(schema.label_names)}] "
                                   f"({list(schema.label_names)}), got {labels.tolist()}")
        ex["labels"] = labels
    if "boxes" in rec and not schema.has_boxes:
        raise DataError(where, "record has boxes but the build stores none (pass with_boxes=True)")
    if schema.has_boxes:
        has = "boxes" in rec
        b = np.asarray(rec["boxes"], np.float32).reshape(-1, 4) if has else np.zeros((0, 4), np.float32)
        ok = np.isfinite(b).all() and (b >= 0).all() and (b <= 1).all() and \
            (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        if not ok:
            raise DataError(where, f"boxes must be xyxy normalised to [0, 1], got {b.tolist()}")
        ex["boxes"], ex["has_boxes"] = b, has
    ex["meta"] = meta_json(meta)
    return ex


# --- the builder -------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class CXRConfig(tfds.core.BuilderConfig):
    """Builder config: the image size and bit depth, and what each split was read from
    (``sources``: ``{split: source_description(...)}``)."""

    image_size: int = 512
    bits: int = 8
    sources: dict = dataclasses.field(default_factory=dict)


def source_description(src: Source) -> dict:
    """JSON-able summary of a source: class, name, length, label names, root paths."""
    desc = {"class": f"{type(src).__module__}.{type(src).__qualname__}", "name": getattr(src, "name", ""),
            "len": len(src), "label_names": list(getattr(src, "label_names", ()))}
    for attr in ("root", "label_file", "labels_file", "data_entry", "image_dir", "original_dir",
                 "transmitted_dir", "options"):
        v = getattr(src, attr, None)
        if v is not None:
            desc[attr] = json.loads(json.dumps(v, default=_json_default))
    return desc


def default_config_name(image_size: int, bits: int = 8) -> str:
    """``"512px"`` (``"512px_16bit"`` for 16-bit builds)."""
    return f"{int(image_size)}px" + ("_16bit" if bits == 16 else "")


def _ordered_map(fn: Callable[[int], Any], items: Sequence[int], workers: int) -> Iterator[Any]:
    """``map(fn, items)`` in order, on ``workers`` threads with a bounded window (Pillow and
    zlib release the GIL while decoding, resizing and encoding)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = 4 * workers
    with cf.ThreadPoolExecutor(workers) as pool:
        pending: list[cf.Future] = []
        it = iter(items)
        for x in it:
            pending.append(pool.submit(fn, x))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


class CXRBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Generic builder of a covidmt dataset from ``{split: Source}``.

    Not registered with TFDS: :func:`build_tfds` makes a subclass named after the dataset
    (the build's config its only ``BUILDER_CONFIGS``); reading goes through TFDS's read-only
    builder (``tfds.data_source("<name>/<config>", data_dir=...)``), which needs no code. Construct with ``splits``, ``config`` (a
    :class:`CXRConfig`), ``data_dir``, ``file_format``, and optionally ``schema``,
    ``on_error`` and ``num_workers``.
    """

    VERSION = tfds.core.Version(DATASET_VERSION)

    # tfds 4.9.x's own ``code_path`` touches ``importlib_resources`` (a dependency only
    # below Python 3.9) for builders defined in a package: point it at this file instead.
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    RELEASE_NOTES = {DATASET_VERSION: "covidmt_cxr format 1: square resized grey PNGs, labels, boxes, masks, pairs."}

    def __init__(self, *, splits: Mapping[str, Source], config: CXRConfig, schema: Schema | None = None,
                 on_error: str = "raise", num_workers: int = 1, **kwargs):
        self._splits = dict(splits)
        self._schema = schema or infer_schema(self._splits)
        self._on_error = check_on_error(on_error)
        self._num_workers = max(1, int(num_workers))
        self.skipped: dict[str, list[tuple[str, str]]] = {}
        super().__init__(config=config, **kwargs)

    def _metadata(self) -> dict:
        cfg = self.builder_config
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self._schema.kind,
                "image_keys": list(self._schema.image_keys), "label_names": list(self._schema.label_names),
                "has_boxes": self._schema.has_boxes, "image_size": cfg.image_size, "resize": "square",
                "bits": cfg.bits, "sources": cfg.sources, "skipped": {k: [list(x) for x in v]
                                                                      for k, v in self.skipped.items()}}

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=(f"covidmt_jax {self._schema.kind} dataset: grey images resized to "
                         f"{cfg.image_size}x{cfg.image_size} ({cfg.bits}-bit PNG); labels "
                         f"{list(self._schema.label_names)}; read with covidmt_jax TFDSSource."),
            features=_features(self._schema, cfg.image_size, cfg.bits),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(self._metadata()),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split: str):
        src = self._splits[split]
        cfg = self.builder_config
        skipped = self.skipped.setdefault(split, [])
        where = getattr(src, "name", type(src).__name__)

        def one(i: int):
            try:
                rec = src[i]
                return encode_record(rec, self._schema, image_size=cfg.image_size, bits=cfg.bits,
                                     where=f"{where}:{rec.get('id', i)}")
            except DataError as e:
                if self._on_error == "raise":
                    raise
                return e

        written = 0
        for i, ex in zip(range(len(src)), _ordered_map(one, range(len(src)), self._num_workers)):
            if isinstance(ex, DataError):
                skipped.append((ex.path, ex.problem))
                continue
            written += 1
            yield i, ex
        if not written:
            path, problem = skipped[0] if skipped else (where, "no records")
            raise DataError(where, f"split {split!r}: all {len(src)} record(s) were bad, e.g. {path}: {problem}")
        # tfds writes metadata.json after generating every split: record what was skipped.
        self.info.metadata.update(self._metadata())


def _builder_class(name: str, config: CXRConfig) -> type:
    """A fresh CXRBuilder subclass whose TFDS ``name`` is ``name`` and whose only config is
    ``config`` (never registered with TFDS; one per build, so configs never clash)."""
    cname = "".join(p.capitalize() for p in name.split("_") if p) or "Dataset"
    return types.new_class(cname, (CXRBuilder,), {"skip_registration": True},
                           lambda ns: ns.update(name=name, BUILDER_CONFIGS=[config], __module__=__name__))


def build_tfds(source: Source | None = None, *, name: str, data_dir: str | os.PathLike,
               image_size: int = 512, splits: Mapping[str, Source] | None = None,
               file_format: str = "array_record", bits: int = 8, config_name: str | None = None,
               with_boxes: bool | None = None, on_error: str = "raise", num_workers: int = 1,
               overwrite: bool = False) -> Path:
    """Build a TFDS dataset from sources; returns its folder ``<data_dir>/<name>/<config>/1.0.0``.

    Args:
      source: one source, stored as split ``"train"`` (or pass ``splits``).
      name: dataset name (lower snake case, e.g. ``"covidmt_covidx"``).
      data_dir: TFDS data folder (e.g. ``~/tensorflow_datasets``).
      image_size: side ``S`` of the stored square images (see module doc: resizing choice).
      splits: ``{split name: source}`` (e.g. ``{"train": ..., "val": ..., "test": ...}``).
      file_format: ``"array_record"`` (random access for grain) or ``"parquet"``.
      bits: 8 or 16 (PNG depth of the grey images; masks are always 8-bit).
      config_name: default :func:`default_config_name` (``"512px"``).
      with_boxes: see :func:`infer_schema`.
      on_error: ``"raise"`` (a bad image stops the build with a DataError naming the file) or
        ``"skip"`` (bad records are left out, warned about and listed in ``metadata.json``).
      num_workers: threads decoding / resizing / encoding.
      overwrite: rebuild when the dataset already exists (FileExistsError otherwise).

    Read back with ``TFDSSource(name, split, data_dir)`` or
    ``tfds.data_source(f"{name}/{config}", split=..., data_dir=...)``.
    """
    if (source is None) == (splits is None):
        raise ValueError("pass exactly one of source= and splits=")
    splits = {"train": source} if splits is None else dict(splits)
    for split in splits:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(split)):
            raise ValueError(f"invalid split name {split!r} (letters, digits, _ and - only)")
    if not _NAME.match(name):
        raise ValueError(f"dataset name must be lower snake case ([a-z][a-z0-9_]*), got {name!r}")
    if int(image_size) != image_size or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits!r}")
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS} (both written without TensorFlow), "
                         f"got {file_format!r}")
    check_on_error(on_error)
    config_name = config_name or default_config_name(image_size, bits)
    if not _CONFIG.match(config_name):
        raise ValueError(f"invalid config name {config_name!r}")
    empty = [k for k, v in splits.items() if len(v) == 0]
    if empty:
        raise ValueError(f"split(s) {empty} have no records (TFDS cannot write an empty split)")
    schema = infer_schema(splits, with_boxes=with_boxes)
    config = CXRConfig(name=config_name, description=f"{image_size}x{image_size} grey, {bits}-bit PNG",
                       image_size=int(image_size), bits=bits,
                       sources={k: source_description(v) for k, v in splits.items()})
    data_dir = Path(data_dir).expanduser()
    builder = _builder_class(name, config)(splits=splits, config=config, schema=schema, on_error=on_error,
                                   num_workers=num_workers, data_dir=os.fspath(data_dir),
                                   file_format=file_format)
    path = Path(builder.data_path)
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if (path / "dataset_info.json").exists():
        if not overwrite:
            raise FileExistsError(f"{path}: dataset already built; pass overwrite=True (--overwrite) to rebuild")
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    dl = tfds.download.DownloadConfig(download_mode=mode, try_download_gcs=False,
                                      compute_stats=tfds.download.ComputeStatsMode.SKIP)
    with tempfile.TemporaryDirectory(prefix="covidmt_tfds_dl_") as tmp:
        builder.download_and_prepare(download_dir=tmp, download_config=dl)
    n_skipped = sum(len(v) for v in builder.skipped.values())
    if n_skipped:
        lines = [f"  {p}: {msg}" for v in builder.skipped.values() for p, msg in v[:10]]
        warnings.warn(f"{name}: skipped {n_skipped} bad record(s) (listed in {path / 'metadata.json'}):\n"
                      + "\n".join(lines), stacklevel=2)
    return path


def read_build_metadata(path: str | os.PathLike) -> dict:
    """``metadata.json`` of a build folder (DataError if it is not a covidmt build)."""
    f = Path(path) / "metadata.json"
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise DataError(f, "not found: not a covidmt_jax TFDS build (or built by an older TFDS)") from None
    except (OSError, ValueError) as e:
        raise DataError(f, f"unreadable build metadata: {e}") from e
    if meta.get("format") != FORMAT:
        raise DataError(f, f"not a covidmt_jax build (format {meta.get('format')!r}, expected {FORMAT!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise DataError(f, f"format version {meta['format_version']} is newer than this reader's {FORMAT_VERSION}")
    return meta


# --- command line ------------------------------------------------------------------------
def _holdout(src: Source, fraction: float, seed: int) -> dict[str, Source]:
    if not fraction:
        return {"train": src}
    patients = []
    for i in range(len(src)):
        r = src[i]
        patients.append(str((r.get("meta") or {}).get("patient_id", r["id"])))
    keep, held = patient_holdout(patients, fraction, seed=seed)
    return {"train": src.subset(keep, name=f"{src.name}:train"), "val": src.subset(held, name=f"{src.name}:val")}


def _cli_splits(args) -> tuple[dict[str, Source], dict]:
    """{split: source} for the CLI's dataset, and extra build_tfds kwargs."""
    from covidmt_jax.data import sources as S

    ds, root, extra = args.dataset, args.manual_dir, {}
    if ds == "synthetic":
        n, ne = args.num_examples, args.num_eval if args.num_eval is not None else max(1, args.num_examples // 5)
        kw = dict(size=args.image_size, seed=args.seed)
        if args.kind == "pairs":
            return {"test": S.get_source("synthetic_pairs", n=ne, **kw)}, extra
        src = f"synthetic_{args.kind}"
        return {"train": S.get_source(src, n=n, split="train", **kw),
                "val": S.get_source(src, n=ne, split="val", **kw),
                "test": S.get_source(src, n=ne, split="test", **kw)}, extra
    if root is None:
        raise ValueError(f"--manual_dir is required for --dataset {ds}")
    root = Path(root).expanduser()
    common = dict(on_error=args.on_error)
    if ds == "covidx":
        from covidmt_jax.data.sources.covidx import COVIDxSource
        out = _holdout(COVIDxSource.from_root(root, version=args.covidx_version, split="train", **common),
                       args.val_fraction, args.seed)
        stem = f"test_COVIDx{args.covidx_version}.txt"
        if (root / stem).is_file() or (root / "labels" / stem).is_file():  # else train (and val) only
            out["test"] = COVIDxSource.from_root(root, version=args.covidx_version, split="test", **common)
        return out, extra
    if ds == "nih":
        bbox = next((root / n for n in ("BBox_List_2017.csv", "BBox_List_2017.csv.gz") if (root / n).is_file()), None)
        extra["with_boxes"] = bbox is not None
        has_lists = (root / "train_val_list.txt").is_file() and (root / "test_list.txt").is_file()
        if has_lists:
            out = _holdout(S.get_source("nih", root=root, split="train_val", bbox_file=bbox, **common),
                           args.val_fraction, args.seed)
            out["test"] = S.get_source("nih", root=root, split="test", bbox_file=bbox, **common)
            return out, extra
        return _holdout(S.get_source("nih", root=root, bbox_file=bbox, **common), args.val_fraction, args.seed), extra
    if ds == "rsna":
        labels = next((root / n for n in ("stage_2_train_labels.csv", "stage_2_train_labels.csv.zip",
                                          "stage_2_train_labels.zip") if (root / n).is_file()), None)
        if labels is None:
            raise DataError(root / "stage_2_train_labels.csv", "RSNA label file not found")
        info = root / "stage_2_detailed_class_info.csv"
        src = S.get_source("rsna", labels=labels, image_dir=root, class_info=info if info.is_file() else None, **common)
        return _holdout(src, args.val_fraction, args.seed), extra
    if ds == "wacxr":
        return {"test": S.get_source("wacxr", root=root, **common)}, extra
    if ds == "lungs":
        return _holdout(S.get_source("lungs", root=root, **common), args.val_fraction, args.seed), extra
    if ds == "folder":
        src = S.get_source("folder", root=root, labels_from_subfolders=args.labels_from_subfolders, **common)
        return _holdout(src, args.val_fraction, args.seed), extra
    raise ValueError(f"unknown --dataset {ds!r}")


DATASETS = ("covidx", "nih", "rsna", "wacxr", "lungs", "folder", "synthetic")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m covidmt_jax.data.tfds_builders",
                                description="Build a covidmt_jax TFDS (ArrayRecord) dataset; see the module "
                                            "docstring for each dataset's --manual_dir layout.")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--manual_dir", help="the dataset's own files (not needed for synthetic)")
    p.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    p.add_argument("--name", help="dataset name (default covidmt_<dataset>[_<kind>])")
    p.add_argument("--image_size", type=int, default=512)
    p.add_argument("--bits", type=int, default=8, choices=(8, 16))
    p.add_argument("--file_format", default="array_record", choices=FILE_FORMATS)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--on_error", default="raise", choices=("raise", "skip"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--val_fraction", type=float, default=0.0, help="patient-disjoint val split from train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--covidx_version", default="3")
    p.add_argument("--labels_from_subfolders", action="store_true", help="folder: classes from sub-folders")
    p.add_argument("--kind", default="covidx", choices=("covidx", "nih", "rsna", "lungs", "pairs"),
                   help="synthetic: which phantom set")
    p.add_argument("--num_examples", type=int, default=1000, help="synthetic: train records")
    p.add_argument("--num_eval", type=int, default=None, help="synthetic: val and test records (default n/5)")
    args = p.parse_args(argv)
    name = args.name or f"covidmt_{args.dataset}" + (f"_{args.kind}" if args.dataset == "synthetic" else "")
    try:
        splits, extra = _cli_splits(args)
        path = build_tfds(splits=splits, name=name, data_dir=args.data_dir, image_size=args.image_size,
                          bits=args.bits, file_format=args.file_format, on_error=args.on_error,
                          num_workers=args.num_workers, overwrite=args.overwrite, **extra)
    except (DataError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = read_build_metadata(path)
    info = json.loads((path / "dataset_info.json").read_text())
    counts = {s["name"]: int(sum(int(x) for x in s.get("shardLengths", []))) for s in info.get("splits", [])}
    print(f"built {name}/{path.parent.name} at {path}")
    for split, n in counts.items():
        print(f"  {split}: {n} examples" + (f" ({len(meta['skipped'].get(split, []))} skipped)"
                                            if meta["skipped"].get(split) else ""))
    print(f"read with: TFDSSource({name!r}, split='train', data_dir={str(Path(args.data_dir).expanduser())!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
