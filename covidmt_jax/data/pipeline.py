"""Grain input pipelines: records -> batches of docs/architecture.md.

Per sample (:class:`SampleFn`, runs in grain workers; numpy + Pillow only):

1. decode ``record["image"]`` (a path or encoded bytes) with :func:`data.images.load_grey`
   to grey float32 in [0, 1], resized (antialiased bilinear) to ``image_size`` (an int or
   ``(H, W)``; no aspect-ratio padding: the whole image is stretched, so normalised boxes
   stay valid);
2. boxes from normalised xyxy to pixels of the resized image; lung masks decoded with
   :func:`data.images.load_mask` at ``image_size`` (bilinear, then thresholded);
3. training only: :func:`data.augment.augment_sample` (the paper's affine + intensity
   shift on the [0, 1] image, boxes and mask moved with it);
4. :func:`normalise` ``(x - GREY_MEAN) / GREY_STD``, channel axis added: ``[H, W, 1]``;
5. per-task targets and weights (below), then batching.

Batch of :func:`task_dataset` (``b`` samples of ONE dataset ``D``)::

    {"image":        float32 [b, H, W, 1],
     "labels":       float32 [b, K],     # K = number of classification tasks, in task order
     "label_weight": float32 [b, K],     # 1 in column j iff task j's dataset is D
     "boxes":        float32 [b, M, 4],  # xyxy pixels of the (augmented) image, zero padded
     "box_valid":    float32 [b, M],
     "box_weight":   float32 [b],        # 1 iff D is the box task's dataset
     "mask":         float32 [b, H, W, 1],   # only when a segmentation task is present
     "mask_weight":  float32 [b]}            # (zeros for other datasets: static shapes)

Column ``j`` of ``labels`` holds ``record["labels"][source.label_names.index(task_j.label)]``.
:class:`MixedTrainIterator` concatenates one such batch per dataset the tasks need
(COVIDMT: covidx, rsna, nih; 4 each -> 12), so each task's loss (``tasks.py``) averages over
exactly the samples that carry its label (eq. 5).

Reproducibility: the shuffle order of epoch ``e`` and the augmentation of the sample at
stream position ``i`` come from grain's ``shuffle`` / ``random_map`` (a per-position
``numpy.random.Generator``) seeded from ``SeedSequence([seed, crc32(dataset), shard])``,
and batching happens after the multiprocessing stage, so batches do not depend on the
number of workers. ``get_state()`` / ``set_state()`` restore the exact position; the
mixed iterator is a ``grain.DatasetIterator``, so orbax checkpoints it with grain's
handler: ``ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it))``
(see :func:`checkpoint_save_args` / :func:`checkpoint_restore_args`); storing
``json.dumps(it.get_state())`` works as well.

Epochs: :func:`steps_per_epoch` counts one epoch as one pass over the LARGEST task dataset
(per process shard); the smaller datasets repeat (reshuffled each pass).

Bad records raise the source's :class:`~covidmt_jax.data.records.DataError` naming the file.
With ``on_error="skip"`` they are left out of training batches (replaced by zero-weight
padding in evaluation), each file logged once and listed in a :class:`SkipLog`; the
training iterator's state carries its skip logs, so a resumed run reports the files
skipped before the checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import grain
import numpy as np

from covidmt_jax.data import augment as aug
from covidmt_jax.data import images
from covidmt_jax.data.images import image_hw
from covidmt_jax.data.records import DataError, check_on_error
from covidmt_jax.normalisation import GREY_MEAN, GREY_STD, denormalise, normalise
from covidmt_jax.taskspec import tasks_from_names

_log = logging.getLogger("covidmt_jax.data")

__all__ = [
    "GREY_MEAN",
    "GREY_STD",
    "normalise",
    "denormalise",
    "image_hw",
    "SkipLog",
    "SampleFn",
    "task_dataset",
    "MixedTrainIterator",
    "make_train_iterator",
    "EvalIterator",
    "make_eval_iterator",
    "steps_per_epoch",
    "PairSample",
    "load_pair",
    "checkpoint_save_args",
    "checkpoint_restore_args",
]

# --- errors ----------------------------------------------------------------------------
class SkipLog:
    """Bad records left out under ``on_error="skip"``.

    ``items``: the distinct ``(path, problem)`` pairs in the order first seen; each new path
    is logged ONCE as a warning on the ``covidmt_jax.data`` logger (never silent, and an
    endless training stream that meets the same file every epoch does not repeat it);
    ``occurrences`` counts every encounter. :meth:`restore` reloads ``items`` saved with an
    iterator state without logging them again.
    """

    def __init__(self, name: str = "pipeline"):
        self.name = name
        self.items: list[tuple[str, str]] = []
        self.occurrences = 0
        self._seen: set[str] = set()

    def add(self, path: str, problem: str) -> None:
        self.occurrences += 1
        if path in self._seen:
            return
        self._seen.add(path)
        self.items.append((path, problem))
        _log.warning("%s: skipped unreadable record %s: %s", self.name, path, problem)

    def restore(self, items) -> None:
        """Add ``[(path, problem), ...]`` (e.g. from a checkpoint) without logging them."""
        for path, problem in items:
            if path not in self._seen:
                self._seen.add(path)
                self.items.append((str(path), str(problem)))

    def __len__(self) -> int:
        return len(self.items)

    def report(self, limit: int = 10) -> str:
        if not self.items:
            return f"{self.name}: nothing skipped"
        lines = [f"{self.name}: skipped {len(self.items)} bad record(s):"]
        lines += [f"  {p}: {m}" for p, m in self.items[:limit]]
        if len(self.items) > limit:
            lines.append(f"  ... and {len(self.items) - limit} more")
        return "\n".join(lines)


_SKIP = "__skipped__"
_PAD = "__pad__"


class _SkipFilter:
    """Grain filter (runs in the main process, after ``mp_prefetch``): drops skip markers
    and logs them. Raises when ``limit`` records in a row failed (nothing usable left)."""

    def __init__(self, log: SkipLog, limit: int):
        self.log, self.limit, self._run = log, max(int(limit), 1), 0

    def __call__(self, element: Mapping[str, Any]) -> bool:
        if _SKIP not in element:
            self._run = 0
            return True
        path, problem = element[_SKIP]
        self.log.add(path, problem)
        self._run += 1
        if self._run >= self.limit:
            raise DataError(path, f"{self._run} records in a row failed to load ({self.log.name}); "
                                  "nothing left to train on")
        return False


# --- per-sample transform ------------------------------------------------------------------
def _label_index(label: str, label_names: Sequence[str], source_name: str) -> int:
    names = list(label_names)
    if label in names:
        return names.index(label)
    low = [n.lower() for n in names]
    if label.lower() in low:
        return low.index(label.lower())
    raise ValueError(f"source {source_name!r} has no label {label!r} (its label_names are {tuple(names)})")


@dataclasses.dataclass(frozen=True)
class SampleFn:
    """Record -> sample dict (one sample of a :func:`task_dataset` batch); picklable, numpy
    only. Called as ``fn(record)`` (no augmentation) or ``fn(record, rng)`` (augmented with
    ``rng``, as grain's ``random_map`` does).

    ``columns``: ``(task column, source label index)`` for the classification tasks of this
    dataset; ``num_labels``: K of all tasks; ``box`` / ``seg``: this dataset feeds the box /
    segmentation task; ``with_seg``: batches carry ``mask`` keys at all.
    """
    dataset: str
    source_name: str
    hw: tuple[int, int]
    num_labels: int
    columns: tuple[tuple[int, int], ...] = ()
    box: bool = False
    seg: bool = False
    with_seg: bool = False
    max_boxes: int = 8
    augment: aug.AugmentConfig | None = None
    with_ids: bool = False
    on_error: str = "raise"

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        if _PAD in record:
            return self.pad(record[_PAD])
        try:
            return self._process(record, rng)
        except DataError as e:
            if self.on_error == "skip":
                return {_SKIP: (e.path, e.problem), "id": str(record.get("id", "?"))}
            raise

    def _name(self, record: Mapping[str, Any], key: str) -> str | None:
        """What errors call an in-memory image: ``source[id]:key``; paths name themselves."""
        src = record.get(key)
        if isinstance(src, (bytes, bytearray, memoryview)):
            return f"{self.source_name}[{record.get('id', '?')}]:{key}"
        return None

    def _process(self, record: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        h, w = self.hw
        rid = str(record.get("id", "?"))
        label = self._name(record, "image") or str(record.get("image", rid))
        if "image" not in record:
            raise DataError(f"{self.source_name}[{rid}]", "record has no 'image'")
        img = images.load_grey(record["image"], name=self._name(record, "image"), size=(h, w))
        sample: dict[str, Any] = {"image": img}
        if self.box:
            raw = record.get("boxes")
            if raw is None:
                raise DataError(label, f"record {rid} of the box dataset {self.dataset!r} has no 'boxes'")
            b = np.asarray(raw, np.float32).reshape(-1, 4) * np.array([w, h, w, h], np.float32)
            sample["boxes"] = b
            sample["box_valid"] = np.ones(len(b), bool)
        if self.seg:
            if record.get("mask") is None:
                raise DataError(label, f"record {rid} of the segmentation dataset {self.dataset!r} has no 'mask'")
            sample["mask"] = images.load_mask(record["mask"], name=self._name(record, "mask"), size=(h, w))
        if rng is not None and self.augment is not None and self.augment.enabled:
            sample = aug.augment_sample(sample, rng, self.augment)
        out = self._targets(record, rid, label)
        out["image"] = normalise(sample["image"])[..., None]
        if self.box:
            keep = np.flatnonzero(sample["box_valid"])[: self.max_boxes]
            out["boxes"][: len(keep)] = sample["boxes"][keep]
            out["box_valid"][: len(keep)] = 1.0
        if self.seg:
            out["mask"] = np.asarray(sample["mask"], np.float32)[..., None]
        if self.with_ids:
            out["id"] = rid
        return out

    def _blank(self) -> dict[str, Any]:
        """Zero targets and weights (the shapes every sample of the run shares)."""
        h, w = self.hw
        out = {"labels": np.zeros(self.num_labels, np.float32),
               "label_weight": np.zeros(self.num_labels, np.float32),
               "boxes": np.zeros((self.max_boxes, 4), np.float32),
               "box_valid": np.zeros(self.max_boxes, np.float32),
               "box_weight": np.float32(0.0)}
        if self.with_seg:
            out["mask"] = np.zeros((h, w, 1), np.float32)
            out["mask_weight"] = np.float32(0.0)
        return out

    def _targets(self, record: Mapping[str, Any], rid: str, label: str) -> dict[str, Any]:
        out = self._blank()
        if self.columns:
            raw = record.get("labels")
            if raw is None:
                raise DataError(label, f"record {rid} of {self.dataset!r} has no 'labels'")
            raw = np.asarray(raw, np.float32).reshape(-1)
            for col, idx in self.columns:
                if idx >= len(raw):
                    raise DataError(label, f"record {rid}: 'labels' has {len(raw)} values, label index {idx} missing")
                out["labels"][col], out["label_weight"][col] = raw[idx], 1.0
        out["box_weight"] = np.float32(1.0 if self.box else 0.0)
        if self.with_seg:
            out["mask_weight"] = np.float32(1.0 if self.seg else 0.0)
        return out

    def pad(self, skipped: tuple[str, str] | None = None) -> dict[str, Any]:
        """A zero-weight sample (evaluation padding); ``skipped``: the (path, problem) it
        replaces, if any."""
        h, w = self.hw
        out = self._blank()
        out["image"] = np.zeros((h, w, 1), np.float32)
        out["valid"] = np.float32(0.0)
        out["id"] = None
        out[_SKIP] = tuple(skipped) if skipped is not None else None
        return out


def _collate(elements: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack numeric fields along a new batch axis; ``id`` values become the list ``ids``."""
    out: dict[str, Any] = {}
    for key in elements[0]:
        if key == "id":
            out["ids"] = [e["id"] for e in elements]
        elif key == _SKIP:
            out[_SKIP] = [e.get(_SKIP) for e in elements]
        else:
            out[key] = np.stack([np.asarray(e[key]) for e in elements])
    return out


# --- dataset construction ------------------------------------------------------------------
def _resolve_tasks(tasks) -> list:
    specs = tasks_from_names(tasks)
    if not specs:
        raise ValueError("tasks must not be empty")
    kinds = [t.kind for t in specs]
    for kind in ("box", "segmentation"):
        if kinds.count(kind) > 1:
            raise ValueError(f"at most one {kind} task is supported, got {kinds.count(kind)}")
    return specs


def _sample_fn(source, dataset: str, specs, hw, max_boxes: int, augment_cfg, with_ids: bool,
               on_error: str) -> SampleFn:
    cls = [t for t in specs if t.kind == "classification"]
    if dataset not in {t.dataset for t in specs}:
        raise ValueError(f"no task uses dataset {dataset!r}; tasks' datasets: {sorted({t.dataset for t in specs})}")
    name = str(getattr(source, "name", dataset))
    columns = tuple((j, _label_index(t.label, getattr(source, "label_names", ()), name))
                    for j, t in enumerate(cls) if t.dataset == dataset)
    if int(max_boxes) < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    return SampleFn(dataset=dataset, source_name=name, hw=hw, num_labels=len(cls), columns=columns,
                    box=any(t.kind == "box" and t.dataset == dataset for t in specs),
                    seg=any(t.kind == "segmentation" and t.dataset == dataset for t in specs),
                    with_seg=any(t.kind == "segmentation" for t in specs), max_boxes=int(max_boxes),
                    augment=augment_cfg, with_ids=with_ids, on_error=check_on_error(on_error))


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None and shard_count is None:
        import jax  # lazy: only multi-host callers need it

        return jax.process_index(), jax.process_count()
    if shard_index is None or shard_count is None:
        raise ValueError("give both shard_index and shard_count, or neither (= this JAX process's shard)")
    if not 0 <= int(shard_index) < int(shard_count):
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    return int(shard_index), int(shard_count)


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags (``--grain_enable_multiprocess_worker_profiling``);
    outside an absl app nothing parsed them, so mark them parsed with their defaults (an absl
    app that parses its own command line is unaffected)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _seeds(seed: int, dataset: str, shard_index: int) -> tuple[int, int]:
    """(shuffle seed, augmentation seed), uint32, distinct per dataset and shard."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(dataset.encode()), int(shard_index)])
    a, b = ss.generate_state(2)
    return int(a), int(b)


def task_dataset(source, *, dataset: str, tasks: Sequence, image_size: int | Sequence[int], batch_size: int,
                 train: bool, seed: int, shard_index: int | None = None, shard_count: int | None = None,
                 max_boxes: int = 8, augment_cfg: aug.AugmentConfig | Mapping[str, Any] | None = None,
                 num_workers: int = 0, shuffle: bool = True, repeat: bool = True, drop_remainder: bool = True,
                 read_threads: int = 2, with_ids: bool = False, on_error: str = "raise",
                 skip_log: SkipLog | None = None) -> grain.IterDataset:
    """Grain pipeline of one dataset's batches (see the module docstring for the layout).

    Args:
      source: a source (``__len__``, ``__getitem__ -> Record``, ``label_names``, ``name``).
      dataset: the dataset name the tasks use for it (``TaskSpec.dataset``, e.g. ``"nih"``).
      tasks: TaskSpecs (or names) of the whole run: they fix the label columns.
      image_size: int or ``(H, W)``.
      batch_size: samples per batch.
      train: augment (``augment_cfg``; ``None`` = the paper's) when True.
      seed: pipeline seed (shuffle order per epoch, augmentation per stream position).
      shard_index, shard_count: this process reads records ``shard_index::shard_count``;
        default ``jax.process_index()`` / ``jax.process_count()``.
      max_boxes: M, box slots per sample; the first M boxes still valid after augmentation
        are kept (RSNA images have at most 4).
      augment_cfg: :class:`~covidmt_jax.data.augment.AugmentConfig` or a mapping of its
        fields (``None`` = the paper's ranges; ``augment.NO_AUGMENT`` = off).
      num_workers: grain worker processes (``mp_prefetch``); 0 = in this process.
      shuffle, repeat, drop_remainder: as named (repeat = endless, reshuffled per epoch).
      read_threads: grain read threads per process (``ReadOptions.num_threads``).
      with_ids: add ``"ids"`` (list of record ids) to each batch.
      on_error: ``"raise"`` (DataError naming the file) or ``"skip"`` (left out, logged in
        ``skip_log`` and warned).
    """
    specs = _resolve_tasks(tasks)
    hw = image_hw(image_size)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    cfg = aug.AugmentConfig.from_any(augment_cfg) if train else None
    fn = _sample_fn(source, dataset, specs, hw, max_boxes, cfg, with_ids, on_error)
    index, count = _shard(shard_index, shard_count)
    shuffle_seed, augment_seed = _seeds(seed, dataset, index)

    ds = grain.MapDataset.source(source)
    if count > 1:
        ds = ds[index::count]
    n = len(ds)
    if n == 0:
        raise ValueError(f"no records in shard {index} of {count} of dataset {dataset!r} (source "
                         f"{fn.source_name!r}, {len(source)} records in all)")
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.random_map(fn, seed=augment_seed) if cfg is not None and cfg.enabled else ds.map(fn)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(read_threads),
                                              prefetch_buffer_size=max(2 * int(batch_size), 4)))
    if num_workers:
        _absl_flags_ready()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers),
                                                         per_worker_buffer_size=max(int(batch_size), 1)))
    if fn.on_error == "skip":
        log = skip_log if skip_log is not None else SkipLog(fn.source_name)
        ds = ds.filter(_SkipFilter(log, limit=n))
    # Batching after mp_prefetch: batches are the same whatever the number of workers.
    return ds.batch(int(batch_size), drop_remainder=drop_remainder, batch_fn=_collate)


# --- multi-task mixing ----------------------------------------------------------------------
def _task_datasets(specs) -> list[str]:
    out: list[str] = []
    for t in specs:
        if t.dataset not in out:
            out.append(t.dataset)
    return out


def _per_dataset(value: int | Mapping[str, int], datasets: Sequence[str], what: str) -> dict[str, int]:
    if isinstance(value, Mapping):
        missing = [d for d in datasets if d not in value]
        if missing:
            raise ValueError(f"{what} lacks dataset(s) {missing}")
        out = {d: int(value[d]) for d in datasets}
    else:
        out = {d: int(value) for d in datasets}
    bad = {d: v for d, v in out.items() if v < 1}
    if bad:
        raise ValueError(f"{what} must be >= 1, got {bad}")
    return out


class MixedTrainIterator(grain.DatasetIterator):
    """Endless training iterator: each ``next()`` takes ONE batch from every dataset the
    tasks need (in task order) and concatenates them along the batch axis.

    A ``grain.DatasetIterator``: ``get_state()`` (JSON-serialisable dict) / ``set_state()``
    restore the position of every loader exactly, and orbax saves it with
    ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``.
    Attributes: ``datasets`` (names, concatenation order), ``per_task_batch`` ({dataset:
    b}), ``batch_size`` (total), ``skip_logs`` ({dataset: SkipLog}, ``on_error="skip"``).
    """

    STATE_FORMAT = "covidmt_jax.mixed/1"

    def __init__(self, loaders: Mapping[str, grain.IterDataset], per_task_batch: Mapping[str, int],
                 skip_logs: Mapping[str, SkipLog] | None = None):
        self.datasets = tuple(loaders)
        its = [iter(loaders[d]) for d in self.datasets]
        super().__init__(its)
        self.per_task_batch = dict(per_task_batch)
        self.batch_size = sum(self.per_task_batch[d] for d in self.datasets)
        self.skip_logs = dict(skip_logs or {})

    def __next__(self) -> dict[str, Any]:
        self._assert_not_closed()
        batches = [next(it) for it in self._parents]
        keys = batches[0].keys()
        return {k: np.concatenate([b[k] for b in batches], axis=0) for k in keys}

    def get_state(self) -> dict[str, Any]:
        state = {"format": self.STATE_FORMAT, "datasets": list(self.datasets),
                 "loaders": {d: it.get_state() for d, it in zip(self.datasets, self._parents)}}
        if self.skip_logs:  # what was skipped so far belongs to the position: a resumed run reports it
            state["skipped"] = {d: [list(item) for item in log.items] for d, log in self.skip_logs.items()}
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") != self.STATE_FORMAT:
            raise ValueError(f"not a {self.STATE_FORMAT} iterator state: {str(state)[:200]}")
        if list(state["datasets"]) != list(self.datasets):
            raise ValueError(f"iterator state is for datasets {state['datasets']}, this iterator reads "
                             f"{list(self.datasets)}")
        for d, it in zip(self.datasets, self._parents):
            it.set_state(state["loaders"][d])
        for d, items in state.get("skipped", {}).items():
            if d in self.skip_logs:
                self.skip_logs[d].restore(items)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [item for log in self.skip_logs.values() for item in log.items]

    def skip_report(self) -> str:
        return "\n".join(log.report() for log in self.skip_logs.values()) or "nothing skipped"

    def __str__(self) -> str:
        return f"MixedTrainIterator({self.per_task_batch})"


def make_train_iterator(sources: Mapping[str, Any], tasks: Sequence, *, per_task_batch: int | Mapping[str, int] = 4,
                        image_size: int | Sequence[int], seed: int, num_workers: int = 0,
                        augment_cfg: aug.AugmentConfig | Mapping[str, Any] | None = None,
                        shard_index: int | None = None, shard_count: int | None = None, max_boxes: int = 8,
                        read_threads: int = 2, on_error: str = "raise") -> MixedTrainIterator:
    """The multi-task training iterator (:class:`MixedTrainIterator`).

    Args:
      sources: ``{dataset name: source}``; must hold every ``TaskSpec.dataset`` of ``tasks``
        (extra entries are ignored).
      tasks: TaskSpecs or names, e.g. ``tasks.paper_tasks(6)``.
      per_task_batch: samples per dataset per step (int, or ``{dataset: int}``), per process.
      num_workers: grain worker processes PER DATASET loader.
      Others as :func:`task_dataset` (``train=True``, shuffled, endless).
    """
    specs = _resolve_tasks(tasks)
    datasets = _task_datasets(specs)
    missing = [d for d in datasets if d not in sources]
    if missing:
        raise ValueError(f"no source for dataset(s) {missing} (have {sorted(sources)})")
    sizes = _per_dataset(per_task_batch, datasets, "per_task_batch")
    index, count = _shard(shard_index, shard_count)
    loaders, logs = {}, {}
    for d in datasets:
        logs[d] = SkipLog(str(getattr(sources[d], "name", d)))
        loaders[d] = task_dataset(sources[d], dataset=d, tasks=specs, image_size=image_size, batch_size=sizes[d],
                                  train=True, seed=seed, shard_index=index, shard_count=count,
                                  max_boxes=max_boxes, augment_cfg=augment_cfg, num_workers=num_workers,
                                  read_threads=read_threads, on_error=on_error, skip_log=logs[d])
    return MixedTrainIterator(loaders, sizes, logs if on_error == "skip" else None)


def checkpoint_save_args(iterator: grain.DatasetIterator):
    """Orbax args saving a grain iterator (e.g. :class:`MixedTrainIterator`) with grain's
    handler: ``ocp.args.Composite(state=ocp.args.StandardSave(state),
    data=checkpoint_save_args(it))``. One JSON file per process."""
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: grain.DatasetIterator):
    """Orbax args restoring INTO ``iterator`` (built with the same sources, tasks, seed and
    num_workers); see :func:`checkpoint_save_args`."""
    return grain.checkpoint.CheckpointRestore(iterator)


def steps_per_epoch(sources: Mapping[str, Any] | Sequence[Any], per_task_batch: int | Mapping[str, int] = 4,
                    shard_count: int = 1) -> int:
    """Training steps in one epoch = one pass over the LARGEST dataset's shard:
    ``max_d ceil(ceil(len(d) / shard_count) / per_task_batch[d])``. Smaller datasets repeat
    within the epoch. ``sources``: sources or sizes, as a mapping (by dataset name, needed
    when ``per_task_batch`` is a mapping) or a sequence."""
    if int(shard_count) < 1:
        raise ValueError(f"shard_count must be >= 1, got {shard_count}")
    items = list(sources.items()) if isinstance(sources, Mapping) else list(enumerate(sources))
    if not items:
        raise ValueError("no sources")
    if isinstance(per_task_batch, Mapping):
        sizes = _per_dataset(per_task_batch, [k for k, _ in items], "per_task_batch")
    else:
        sizes = {k: int(per_task_batch) for k, _ in items}
        if int(per_task_batch) < 1:
            raise ValueError(f"per_task_batch must be >= 1, got {per_task_batch}")
    steps = 0
    for k, s in items:
        n = int(s) if isinstance(s, (int, np.integer)) else len(s)
        steps = max(steps, math.ceil(math.ceil(n / int(shard_count)) / sizes[k]))
    return steps


# --- evaluation -------------------------------------------------------------------------------
class _PaddedShard:
    """Records ``indices`` of ``source`` followed by padding markers up to ``total``."""

    def __init__(self, source, indices: np.ndarray, total: int):
        self.source, self.indices, self.total = source, indices, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int):
        i = int(i)
        if i < len(self.indices):
            return self.source[int(self.indices[i])]
        return {_PAD: None}


class EvalIterator:
    """One ordered pass over a source in fixed-size batches (see :func:`make_eval_iterator`).

    Batches are :func:`task_dataset`'s plus ``"ids"`` (list; ``None`` for padding) and
    ``"valid"`` float32 ``[b]`` (0 for padding). ``num_batches``, ``num_records`` and
    ``skip_log`` are attributes. Iterating again starts a new pass.
    """

    def __init__(self, dataset: grain.IterDataset, num_batches: int, num_records: int, skip_log: SkipLog):
        self._dataset = dataset
        self.num_batches, self.num_records, self.skip_log = num_batches, num_records, skip_log

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._dataset:
            for item in batch.pop(_SKIP, ()):
                if item is not None:
                    self.skip_log.add(*item)
            yield batch


def make_eval_iterator(source, *, dataset: str, tasks: Sequence, image_size: int | Sequence[int], batch_size: int,
                       max_boxes: int = 8, shard_index: int | None = 0, shard_count: int | None = 1,
                       read_threads: int = 2, on_error: str = "raise",
                       skip_log: SkipLog | None = None) -> EvalIterator:
    """No augmentation, no shuffle, one pass over ``source`` (this process's shard).

    The last batch is filled with zero-weight samples (black image, ``label_weight``,
    ``box_weight``, ``mask_weight`` and ``valid`` 0, id ``None``) so shapes stay static;
    every shard yields the same number of batches (``ceil(ceil(N / shard_count) /
    batch_size)``), as SPMD evaluation on several hosts needs. ``shard_index`` /
    ``shard_count`` default to the whole source in this process; pass ``None, None`` for
    the JAX process's shard. With ``on_error="skip"`` a bad record becomes a padding sample
    and is logged in ``EvalIterator.skip_log`` (``skip_log``, e.g. one shared by every
    evaluation of a run so each file is logged once; a new one by default).
    """
    specs = _resolve_tasks(tasks)
    hw = image_hw(image_size)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index, count = _shard(shard_index, shard_count)
    fn = _sample_fn(source, dataset, specs, hw, max_boxes, None, True, on_error)
    n = len(source)
    indices = np.arange(index, n, count)
    num_batches = math.ceil(math.ceil(n / count) / int(batch_size)) if n else 0
    padded = _PaddedShard(source, indices, num_batches * int(batch_size))
    ds = grain.MapDataset.source(padded).map(_EvalFn(fn))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(read_threads),
                                              prefetch_buffer_size=max(2 * int(batch_size), 4)))
    ds = ds.batch(int(batch_size), drop_remainder=False, batch_fn=_collate)
    log = skip_log if skip_log is not None else SkipLog(fn.source_name)
    return EvalIterator(ds, num_batches, len(indices), log)


@dataclasses.dataclass(frozen=True)
class _EvalFn:
    """Evaluation transform: every sample has ``valid``; a skipped record becomes padding."""
    fn: SampleFn

    def __call__(self, record):
        out = self.fn(record)
        if _SKIP in out and "image" not in out:
            return self.fn.pad(out[_SKIP])
        out.setdefault("valid", np.float32(1.0))
        out.setdefault(_SKIP, None)
        return out


# --- pairs for scoring --------------------------------------------------------------------------
class PairSample(NamedTuple):
    """Output of :func:`load_pair`: normalised ``[H, W, 1]`` float32 arrays and the sizes
    ``(height, width)`` of the decoded files before resizing."""
    original: np.ndarray
    transmitted: np.ndarray
    original_hw: tuple[int, int]
    transmitted_hw: tuple[int, int]


def _decode_resized(src, name: str | None, hw: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    from PIL import Image

    full = images.load_grey(src, name=name)
    h0, w0 = full.shape
    if (h0, w0) != hw:
        full = np.asarray(Image.fromarray(full).resize((hw[1], hw[0]), Image.BILINEAR), np.float32)
    return np.clip(full, 0.0, 1.0), (h0, w0)


def load_pair(record: Mapping[str, Any], image_size: int | Sequence[int], channel=None) -> PairSample:
    """Decode a pair record (``{"id", "original", ["transmitted"], ...}``) for scoring.

    Both sides are decoded with :func:`data.images.load_grey`, resized to ``image_size``
    (antialiased bilinear), normalised and given a channel axis. When the record has no
    ``"transmitted"`` (or it is None), the original is sent through ``channel`` (a
    :class:`covidmt_jax.channels.Channel` or a preset name such as ``"whatsapp"``); without
    a channel that is a ValueError. Decoding problems raise DataError naming the file.
    """
    hw = image_hw(image_size)
    rid = str(record.get("id", "?"))
    if record.get("original") is None:
        raise DataError(rid, "pair record has no 'original'")

    def name(key, src):  # paths name themselves; bytes are called "<id>:<key>"
        return f"{rid}:{key}" if isinstance(src, (bytes, bytearray, memoryview)) else None

    orig = record["original"]
    trans = record.get("transmitted")
    if trans is None:
        if channel is None:
            raise ValueError(f"pair record {rid} has no 'transmitted' image and no channel was given")
        from covidmt_jax import channels

        ch = channels.get_channel(channel) if isinstance(channel, str) else channel
        trans = ch.transmit(orig, name=name("original", orig))
    a, a_hw = _decode_resized(orig, name("original", orig), hw)
    b, b_hw = _decode_resized(trans, name("transmitted", trans), hw)
    return PairSample(normalise(a)[..., None], normalise(b)[..., None], a_hw, b_hw)
