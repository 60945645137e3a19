r"""Score classifiers on (original, transmitted) pairs: PI, IOL / OLS, accuracy, with reports.

    python -m covidmt_jax.score --config configs/score_demo.py:model=runs/demo/export/best \
        --workdir runs/score_demo

Re-running with the same ``--workdir`` resumes: pairs whose rows are already in the row file are
skipped and never written twice. Overrides work as in training
(``--config.batch_size=16 --config.pairs.limit=200``); unknown keys fail before anything runs.

The job, in order:

1. Pairs from ``config.pairs`` (WaCXR, two parallel folders, an image folder sent through a
   messaging-channel preset on the fly, or synthetic phantoms); each side is decoded, resized
   to ``image_size`` x ``image_size`` (aspect NOT kept, as in training) and normalised by
   :func:`covidmt_jax.data.pipeline.load_pair` in a thread pool that prefetches ahead of the
   device.
2. ONE jitted step per batch for all classifiers (:func:`make_score_step`): originals and
   transmitted images are concatenated to ``[2B, S, S, 1]`` (B padded to a multiple of the
   device count, sharded over the mesh's ``data`` axis); the lung U-Net runs once per image;
   per classifier: features -> COVID logit -> probability -> Grad-CAM of the predicted decision
   -> :func:`covidmt_jax.metrics.iol` against the lung mask. Only per-image scalars leave the
   device.
3. Rows (one per pair and classifier, :data:`ROW_COLUMNS`) are appended to
   ``WORKDIR/rows.csv`` (or ``WORKDIR/rows.parquet/part-*.parquet``) and flushed after every
   batch.
4. ``summary.json``, ``report.md``, PNG plots and overlay galleries (:mod:`covidmt_jax.report`);
   gallery CAMs and masks are recomputed for the selected pairs only, so memory stays flat in
   the number of pairs.

Definitions (../shared/SPEC.md):

- prob = sigmoid of the COVID logit (``activation="sigmoid"``, multi-label heads; COVIDMT's
  ``covid`` task column) or its softmax probability (``activation="softmax"``, e.g. a 3-class
  COVID-Net head); decision = ``prob >= threshold``.
- Grad-CAM target = the predicted decision. Sigmoid heads follow pytorch-grad-cam's
  ``BinaryClassifierOutputTarget`` (as :func:`covidmt_jax.explain.gradcam` with one logit): the
  CAM of ``+logit`` for a positive decision, of ``-logit`` for a negative one. Softmax heads:
  the COVID column when positive, otherwise the highest-scoring other class.
- IOL is computed at the MODEL INPUT resolution (``image_size``): the CAM is upsampled to it
  and the lung probabilities are predicted at the U-Net's own input size and resized
  (bilinear) to it. Heat map H = ``cam >= cam.cam_threshold`` on the per-image min-max
  normalised CAM; lungs L = ``prob >= 0.5``; an empty H gives IOL = NaN (``metrics.iol``),
  counted as an empty heat map and excluded from OLS.

Errors become rows, never crashes: an unreadable side (``DataError``), original and
transmitted images whose aspect ratios differ by more than ``pairs.max_aspect_diff`` (a
mismatched pair; the apps keep the aspect ratio), an empty lung mask on either side, or a
non-finite output set the ``error`` column. Every score in the summary is computed on the rows
without an error (the same pairs for PI, OLS and accuracy); the errors are counted by kind.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from covidmt_jax import metrics, parallel
from covidmt_jax.config_lib import ConfigError
from covidmt_jax.explain import LAST_CONV, METHODS, cam_from_grads, finalize_cam, resize_bilinear

log = logging.getLogger("covidmt_jax.score")

ROW_COLUMNS = ("pair_id", "index", "label", "model", "prob_orig", "prob_trans", "pred_orig",
               "pred_trans", "flip", "iol_orig", "iol_trans", "lung_frac_orig", "lung_frac_trans",
               "heat_frac_orig", "heat_frac_trans", "orig_h", "orig_w", "trans_h", "trans_w",
               "error")
_FLOAT_COLUMNS = ("prob_orig", "prob_trans", "iol_orig", "iol_trans", "lung_frac_orig",
                  "lung_frac_trans", "heat_frac_orig", "heat_frac_trans")
_INT_COLUMNS = ("index", "label", "pred_orig", "pred_trans", "flip", "orig_h", "orig_w",
                "trans_h", "trans_w")
_STR_COLUMNS = ("pair_id", "model", "error")

PAIR_SOURCES = ("wacxr", "pairs", "folder", "synthetic_pairs")
KINDS = ("export", "torch")
ACTIVATIONS = ("sigmoid", "softmax")
FORMATS = ("csv", "parquet")
# Error kinds (the text before the first ":" of the error column).
ERR_UNREADABLE = "unreadable"
ERR_SIZE = "size mismatch"
ERR_LUNGS = "empty lung mask"
ERR_NONFINITE = "non-finite output"


# ============================================================================ configuration
def classifier_entry(kind: str = "export", path: str = "", **kw: Any) -> ml_collections.ConfigDict:
    """One entry of ``config.classifiers`` (keyed by the model's display name).

    Keys:
      kind: ``"export"`` (a directory written by ``export.save_model``, e.g. a training run's
        ``WORKDIR/export/best``) or ``"torch"`` (torchvision / timm weights).
      path: the export directory, or the ``.pth`` / ``.safetensors`` file.
      model: (torch) zoo name, e.g. ``"resnet50"``; num_classes: (torch) outputs of its head;
      source: (torch) ``"torchvision"`` or ``"timm"``; in_channels: (torch) 1 (grey stem:
        RGB kernels summed) or 3.
      task: COVIDMT's task name of the COVID output (``"covid"``); covid_index: the COVID
        logit's column for plain classifiers.
      activation: ``"sigmoid"`` or ``"softmax"``.
      threshold: this model's decision threshold; ``-1`` = ``config.threshold``.
    """
    e = ml_collections.ConfigDict({
        "kind": kind, "path": str(path), "model": "", "num_classes": 1, "source": "torchvision",
        "in_channels": 1, "task": "covid", "covid_index": 0, "activation": "sigmoid",
        "threshold": -1.0})
    for k, v in kw.items():
        if k not in e:
            raise ConfigError(f"classifier entry: unknown key {k!r}; known: {sorted(e.keys())}")
        e[k] = v
    return e


def base_config() -> ml_collections.ConfigDict:
    """Defaults of every key the scoring job reads (see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.classifiers = ml_collections.ConfigDict()
    c.lungs = ""                     # U-Net export dir; "" = the shipped lungs.lung_segmenter()
    c.pairs = ml_collections.ConfigDict({
        "source": "synthetic_pairs",  # wacxr | pairs | folder | synthetic_pairs
        "kwargs": {},                 # keyword arguments of the source
        "channel": "",                # folder only: preset sent through on the fly
        "quality": 0,                 # JPEG quality override of the channel (0 = preset's)
        "qualities": (),              # a JPEG-quality sweep: one job per quality
        "limit": -1,                  # score the first N pairs (-1 = all)
        "label": "",                  # label column of the COVID ground truth ("" = auto)
        "max_aspect_diff": 0.02,      # relative aspect-ratio difference of a mismatched pair
    })
    c.image_size = 512
    c.batch_size = 8
    c.num_workers = 4
    c.dtype = "float32"
    c.cam = ml_collections.ConfigDict({"method": "gradcam", "cam_threshold": 0.5})
    c.eta = 0.4
    c.threshold = 0.5
    c.n_boot = 2000
    c.seed = 0
    c.gallery = ml_collections.ConfigDict({"flipped": 8, "random": 8})
    c.output = ml_collections.ConfigDict({"format": "csv"})
    c.log_every = 20
    c.progress = True
    return c


def synthetic_config(models: Mapping[str, str], *, size: int = 128, n: int = 200, lungs: str = "",
                     channel: str = "whatsapp", quality: int = 0, gallery: int = 6,
                     **pair_kwargs: Any) -> ml_collections.ConfigDict:
    """Score exported ``{name: dir}`` models on synthetic phantom pairs sent through
    ``channel`` (``configs/score_demo.py`` and the demo use it; ``pair_kwargs`` go to the
    ``synthetic_pairs`` source, e.g. ``shortcut_strength``, ``seed``, ``split``)."""
    c = base_config()
    c.classifiers = {name: classifier_entry("export", str(path)) for name, path in models.items()}
    c.lungs = lungs
    c.pairs.source = "synthetic_pairs"
    c.pairs.kwargs = {"n": int(n), "size": int(size), "seed": 0, "channel": channel, **pair_kwargs}
    c.pairs.quality = int(quality)
    c.image_size = int(size)
    c.batch_size = 16
    c.num_workers = 2
    c.n_boot = 1000
    c.gallery.flipped = gallery
    c.gallery.random = gallery
    c.log_every = 5
    return c


def _check_keys(section: Mapping, reference: Mapping, where: str) -> None:
    unknown = sorted(set(section.keys()) - set(reference.keys()))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(reference.keys())}")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Fail on unknown keys and impossible values before anything expensive happens."""
    ref = base_config()
    _check_keys(cfg, ref, "config")
    for sec in ("pairs", "cam", "gallery", "output"):
        if sec in cfg:
            _check_keys(cfg[sec], ref[sec], f"config.{sec}")
    if not cfg.classifiers:
        raise ConfigError("config.classifiers is empty: add e.g. "
                          "classifiers={'resnet50': score.classifier_entry('export', DIR)}")
    ref_entry = classifier_entry()
    for name, e in cfg.classifiers.items():
        _check_keys(e, ref_entry, f"config.classifiers.{name}")
        if e.get("kind", "export") not in KINDS:
            raise ConfigError(f"config.classifiers.{name}.kind must be one of {KINDS}, got {e.kind!r}")
        if not e.get("path"):
            raise ConfigError(f"config.classifiers.{name}.path is empty")
        if e.get("activation", "sigmoid") not in ACTIVATIONS:
            raise ConfigError(f"config.classifiers.{name}.activation must be one of {ACTIVATIONS}")
        if e.get("kind") == "torch" and not e.get("model"):
            raise ConfigError(f"config.classifiers.{name}.model (zoo name) is needed for kind='torch'")
    p = cfg.pairs
    if p.source not in PAIR_SOURCES:
        raise ConfigError(f"config.pairs.source must be one of {PAIR_SOURCES}, got {p.source!r}")
    if p.source == "folder" and not p.channel:
        raise ConfigError("config.pairs.channel: an image folder needs a channel preset "
                          "(e.g. 'whatsapp') to make the transmitted side")
    if p.qualities and p.source in ("wacxr", "pairs"):
        raise ConfigError("config.pairs.qualities: a quality sweep needs on-the-fly transmission "
                          "(source 'folder' or 'synthetic_pairs')")
    for q in tuple(p.qualities) + ((p.quality,) if p.quality else ()):
        if int(q) != q or not 1 <= q <= 100:
            raise ConfigError(f"config.pairs: JPEG quality must be an integer in 1..100, got {q!r}")
    if cfg.cam.method not in METHODS:
        raise ConfigError(f"config.cam.method must be one of {METHODS}, got {cfg.cam.method!r}")
    for key in ("threshold", "eta"):
        if not 0 <= float(cfg[key]) <= 1:
            raise ConfigError(f"config.{key} must be in [0, 1], got {cfg[key]}")
    if not 0 < float(cfg.cam.cam_threshold) <= 1:
        raise ConfigError(f"config.cam.cam_threshold must be in (0, 1], got {cfg.cam.cam_threshold}")
    if cfg.output.format not in FORMATS:
        raise ConfigError(f"config.output.format must be one of {FORMATS}, got {cfg.output.format!r}")
    if int(cfg.image_size) < 8 or int(cfg.batch_size) < 1 or int(cfg.n_boot) < 1:
        raise ConfigError("config.image_size must be >= 8, batch_size >= 1 and n_boot >= 1")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")


def fingerprint(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings that determine a row's values: a resumed run must use the same ones."""
    p = cfg.pairs
    return json.loads(json.dumps({
        "classifiers": cfg.classifiers.to_dict(), "lungs": cfg.lungs, "source": p.source,
        "kwargs": p.kwargs.to_dict() if hasattr(p.kwargs, "to_dict") else dict(p.kwargs),
        "channel": p.channel, "quality": p.quality, "label": p.label,
        "max_aspect_diff": p.max_aspect_diff, "image_size": cfg.image_size, "dtype": cfg.dtype,
        "cam": cfg.cam.to_dict(), "threshold": cfg.threshold}, default=str))


# ============================================================================ models
@dataclasses.dataclass(frozen=True)
class Head:
    """How to read the COVID decision from a classifier's ``pool_and_classify`` logits."""
    column: int
    activation: str
    threshold: float
    in_channels: int


def load_classifier(name: str, entry: Mapping[str, Any], *, default_threshold: float,
                    dtype: Any = jnp.float32) -> tuple[nnx.Module, Head]:
    """``(model, Head)`` for one ``config.classifiers`` entry (see :func:`classifier_entry`)."""
    from covidmt_jax import models
    e = classifier_entry(**dict(entry))
    if e.kind == "export":
        from covidmt_jax.export import load_model
        model = load_model(e.path, dtype=dtype)
    else:
        from covidmt_jax.weights import load_torch_weights
        model = models.create(e.model, num_classes=int(e.num_classes), in_channels=int(e.in_channels),
                              dtype=dtype)
        load_torch_weights(model, e.path, source=e.source, strict=True)
    tasks = getattr(model, "classification_tasks", None)
    if tasks is not None:
        if e.task not in tasks:
            raise ConfigError(f"classifier {name!r} ({e.path}): no task {e.task!r}; its "
                              f"classification tasks are {list(tasks)}")
        column = tasks.index(e.task)
    else:
        column = int(e.covid_index)
    n_out = int(getattr(model, "num_classes", 0) or 0)
    if not 0 <= column < max(n_out, 1):
        raise ConfigError(f"classifier {name!r}: COVID column {column} is outside its {n_out} outputs")
    if e.activation == "softmax" and n_out < 2:
        raise ConfigError(f"classifier {name!r}: activation 'softmax' needs >= 2 outputs, got {n_out}")
    thr = float(e.threshold) if float(e.threshold) >= 0 else float(default_threshold)
    return model, Head(column, e.activation, thr, int(getattr(model, "in_channels", 1)))


def load_lungs(lungs: str):
    """The lung segmenter: the shipped one for ``""``, else an exported U-Net directory."""
    from covidmt_jax import lungs as lung_models
    return lung_models.lung_segmenter(lungs or None)


# ============================================================================ the fused step
def _decision(logits: jax.Array, head: Head) -> tuple[jax.Array, jax.Array]:
    """``[B, N]`` logits -> (COVID probability ``[B]``, Grad-CAM cotangent ``[B, N]``)."""
    logits = logits.astype(jnp.float32)
    n = logits.shape[1]
    c = head.column
    if head.activation == "sigmoid":
        prob = jax.nn.sigmoid(logits[:, c])
        sign = jnp.where(prob >= head.threshold, 1.0, -1.0)
        return prob, jax.nn.one_hot(jnp.full(prob.shape, c), n) * sign[:, None]
    prob = jax.nn.softmax(logits, axis=1)[:, c]
    other = jnp.argmax(jnp.where(jnp.arange(n) == c, -jnp.inf, logits), axis=1)
    target = jnp.where(prob >= head.threshold, c, other)
    return prob, jax.nn.one_hot(target, n)


def classifier_cams(model: nnx.Module, x: jax.Array, head: Head, method: str = "gradcam"
                    ) -> tuple[jax.Array, jax.Array]:
    """``[B, H, W, 1]`` normalised grey images -> (COVID prob ``[B]``, CAM ``[B, H, W]`` in [0, 1])
    of the predicted decision (module docstring), built from explain's ``cam_from_grads`` and
    ``finalize_cam``. Grey images are replicated for 3-channel models."""
    if head.in_channels == 3 and x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    act = model.features(x)[LAST_CONV]
    logits, vjp_fn = jax.vjp(lambda a: model.pool_and_classify(a), act)
    if logits.ndim == 1:
        logits = logits[:, None]
        vjp_1d = vjp_fn
        vjp_fn = lambda g: vjp_1d(g[:, 0])  # noqa: E731
    prob, cot = _decision(logits, head)
    (grads,) = vjp_fn(cot.astype(logits.dtype))
    cams = finalize_cam(cam_from_grads(act, grads, method), x.shape[1:3])
    return prob, cams


def lung_probabilities(unet: nnx.Module, x: jax.Array, lung_size: int) -> jax.Array:
    """``[B, S, S, 1]`` normalised images -> ``[B, S, S]`` lung probabilities: the U-Net runs at
    its own input size ``lung_size`` (bilinear resize in and out when it differs from S)."""
    hw = x.shape[1:3]
    xi = x[..., 0]
    if hw != (lung_size, lung_size):
        xi = resize_bilinear(xi, (lung_size, lung_size))
    in_ch = getattr(unet, "in_channels", 1)
    xi = jnp.repeat(xi[..., None], in_ch, axis=-1)
    probs = jax.nn.sigmoid(unet(xi).astype(jnp.float32))[..., 0]
    return resize_bilinear(probs, hw) if hw != (lung_size, lung_size) else probs


def make_score_step(graphdefs: Mapping[str, Any], heads: Mapping[str, Head], lung_graphdef: Any,
                    lung_size: int, *, method: str = "gradcam", cam_threshold: float = 0.5,
                    return_maps: bool = False) -> Callable:
    """The fused per-batch function (not yet jitted; see :func:`compiled_step`).

    ``step(states, lung_state, x)`` with ``x`` ``[N, S, S, 1]`` (originals and transmitted
    images together) returns ``{"lung_frac": [N], name: {"prob", "iol", "heat_frac": [N]}}``;
    with ``return_maps`` also ``"lung_prob"`` ``[N, S, S]`` and ``name: {"cam": [N, S, S]}``.
    The lung masks are computed once and shared by all classifiers.
    """
    names = tuple(graphdefs)

    def step(states, lung_state, x):
        lung = lung_probabilities(nnx.merge(lung_graphdef, lung_state), x, lung_size)
        lungs = lung >= 0.5
        out: dict[str, Any] = {"lung_frac": jnp.mean(lungs, axis=(1, 2), dtype=jnp.float32)}
        if return_maps:
            out["lung_prob"] = lung
        for name in names:
            model = nnx.merge(graphdefs[name], states[name])
            prob, cams = classifier_cams(model, x, heads[name], method)
            res = {"prob": prob, "iol": metrics.iol(cams, lungs, cam_threshold),
                   "heat_frac": jnp.mean(cams >= cam_threshold, axis=(1, 2), dtype=jnp.float32)}
            if return_maps:
                res["cam"] = cams
            out[name] = res
        return out

    return step


def compiled_step(graphdefs: Mapping[str, Any], heads: Mapping[str, Head], lung_graphdef: Any,
                  lung_size: int, mesh, *, method: str = "gradcam", cam_threshold: float = 0.5,
                  return_maps: bool = False) -> Callable:
    """:func:`make_score_step` under ``jax.jit`` with explicit shardings: states replicated,
    images and outputs split over the mesh's ``data`` axis."""
    step = make_score_step(graphdefs, heads, lung_graphdef, lung_size, method=method,
                           cam_threshold=cam_threshold, return_maps=return_maps)
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return jax.jit(step, in_shardings=(rep, rep, data), out_shardings=data)


class Scorer:
    """Classifiers + lung U-Net on a mesh; ``scorer(originals, transmitted)`` -> numpy outputs.

    ``originals`` / ``transmitted``: normalised ``[b, S, S, 1]`` host arrays (this process's
    share of the global batch; ``b`` is padded to the step's fixed local batch). Returns per
    side ``{"lung_frac": [b], name: {"prob", "iol", "heat_frac"}}`` (``return_maps`` adds CAMs
    and lung probabilities).
    """

    def __init__(self, classifiers: Mapping[str, tuple[nnx.Module, Head]], lungs, image_size: int,
                 batch_size: int, *, method: str = "gradcam", cam_threshold: float = 0.5,
                 mesh=None):
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        n_data = self.mesh.shape[parallel.DATA]
        per_process = max(1, n_data // jax.process_count())
        self.local_batch = int(math.ceil(batch_size / per_process) * per_process)
        self.image_size = int(image_size)
        self.heads = {n: h for n, (_, h) in classifiers.items()}
        graphdefs, states = {}, {}
        for n, (model, _) in classifiers.items():
            graphdefs[n], states[n] = nnx.split(model)
        lung_model = lungs.model
        self.lung_size = int(lungs.input_size)
        depth = int(getattr(lung_model, "depth", 0))
        if self.lung_size % (2 ** depth):
            raise ConfigError(f"lung U-Net input size {self.lung_size} is not a multiple of "
                              f"2**depth = {2 ** depth}")
        lung_graphdef, lung_state = nnx.split(lung_model)
        rep = parallel.replicated(self.mesh)
        self.states = jax.device_put(states, rep)
        self.lung_state = jax.device_put(lung_state, rep)
        self.sharding = parallel.data_sharding(self.mesh)
        self._steps = {
            maps: compiled_step(graphdefs, self.heads, lung_graphdef, self.lung_size, self.mesh,
                                method=method, cam_threshold=float(cam_threshold), return_maps=maps)
            for maps in (False, True)}

    def __call__(self, originals: np.ndarray, transmitted: np.ndarray, *,
                 return_maps: bool = False) -> tuple[dict, dict]:
        b = len(originals)
        if b > self.local_batch or len(transmitted) != b:
            raise ValueError(f"Scorer: got {b} originals / {len(transmitted)} transmitted for a "
                             f"local batch of {self.local_batch}")
        pad = self.local_batch - b
        if pad:
            z = np.zeros((pad, *originals.shape[1:]), np.float32)
            originals, transmitted = np.concatenate([originals, z]), np.concatenate([transmitted, z])
        x = np.concatenate([originals, transmitted]).astype(np.float32)
        xg = jax.make_array_from_process_local_data(self.sharding, x)
        out = self._steps[bool(return_maps)](self.states, self.lung_state, xg)
        out = _to_host(out)
        lb = self.local_batch
        orig = jax.tree.map(lambda a: a[:b], jax.tree.map(lambda a: a[:lb], out))
        trans = jax.tree.map(lambda a: a[:b], jax.tree.map(lambda a: a[lb:2 * lb], out))
        return orig, trans


def _to_host(tree):
    """This process's rows of every data-sharded output, as numpy."""
    def local(a):
        shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
        seen, parts = set(), []
        for s in shards:
            start = s.index[0].start or 0
            if start not in seen:
                seen.add(start)
                parts.append(np.asarray(s.data))
        return np.concatenate(parts)
    return jax.tree.map(local, tree)


# ============================================================================ pairs
def build_source(pairs_cfg: ml_collections.ConfigDict, quality: int = 0):
    """The pair source of ``config.pairs`` (``quality`` overrides the channel's JPEG quality)."""
    from covidmt_jax.data.sources import get_source
    kwargs = pairs_cfg.kwargs.to_dict() if hasattr(pairs_cfg.kwargs, "to_dict") else dict(pairs_cfg.kwargs)
    q = int(quality or pairs_cfg.quality or 0)
    if pairs_cfg.source == "synthetic_pairs" and q:
        kwargs["quality"] = q
    return get_source(pairs_cfg.source, **kwargs)


def source_channel(pairs_cfg: ml_collections.ConfigDict, quality: int = 0):
    """The channel applied on the fly (``folder`` sources), else None."""
    if pairs_cfg.source != "folder":
        return None
    from covidmt_jax import channels
    q = int(quality or pairs_cfg.quality or 0)
    return channels.get_channel(pairs_cfg.channel, **({"quality": q} if q else {}))


def label_column(source, label: str) -> int | None:
    """Column of ``record["labels"]`` holding the COVID ground truth; None = unlabelled."""
    names = tuple(getattr(source, "label_names", ()) or ())
    if label:
        if label not in names:
            raise ConfigError(f"config.pairs.label {label!r} is not a label of {source.name} {names}")
        return names.index(label)
    if len(names) == 1:
        return 0
    for cand in ("COVID-19", "1_COVID-19", "positive", "covid"):
        if cand in names:
            return names.index(cand)
    return None


@dataclasses.dataclass
class Loaded:
    """One pair after decoding: normalised ``[S, S, 1]`` arrays, or ``error``."""
    index: int
    pair_id: str
    label: int
    original: np.ndarray | None = None
    transmitted: np.ndarray | None = None
    orig_hw: tuple[int, int] = (0, 0)
    trans_hw: tuple[int, int] = (0, 0)
    error: str = ""


def load_one(source, index: int, pair_id: str, image_size: int, channel, label_col: int | None,
             max_aspect_diff: float) -> Loaded:
    """Decode pair ``index`` of ``source``; problems become ``Loaded.error`` (never raise for
    data problems)."""
    from covidmt_jax.data.pipeline import load_pair
    from covidmt_jax.data.records import DataError
    out = Loaded(index, pair_id, -1)
    try:
        rec = source[index]
        if "original" not in rec and "image" in rec:
            rec = {**rec, "original": rec["image"]}
        labels = rec.get("labels")
        if label_col is not None and labels is not None and len(labels) > label_col:
            out.label = int(round(float(labels[label_col])))
        s = load_pair(rec, image_size, channel=channel)
    except (DataError, OSError, ValueError) as e:
        out.error = f"{ERR_UNREADABLE}: {e}"
        return out
    out.orig_hw, out.trans_hw = tuple(s.original_hw), tuple(s.transmitted_hw)
    if max_aspect_diff > 0:
        ar_o = out.orig_hw[1] / out.orig_hw[0]
        ar_t = out.trans_hw[1] / out.trans_hw[0]
        diff = abs(ar_o - ar_t) / ar_o
        if diff > max_aspect_diff:
            out.error = (f"{ERR_SIZE}: original {out.orig_hw[0]}x{out.orig_hw[1]} vs transmitted "
                         f"{out.trans_hw[0]}x{out.trans_hw[1]} (aspect ratios differ by "
                         f"{100 * diff:.1f} %)")
            return out
    out.original, out.transmitted = s.original, s.transmitted
    return out


def prefetch_batches(load: Callable[[int, str], Loaded], items: Sequence[tuple[int, str]],
                     batch_sizes: int | Sequence[int], num_workers: int,
                     prefetch: int = 2) -> Iterator[list[Loaded]]:
    """Batches of :class:`Loaded` in order, decoded by a thread pool ``prefetch`` batches ahead
    (Pillow and the JPEG codec release the GIL). Memory: ``(prefetch + 1)`` batches of pairs.

    ``batch_sizes``: one size for all batches, or the size of each batch in turn (a batch of
    size 0 is yielded as an empty list)."""
    if isinstance(batch_sizes, int):
        batch_sizes = [min(batch_sizes, len(items) - i) for i in range(0, len(items), batch_sizes)]
    bounds = np.cumsum([0, *batch_sizes])
    if bounds[-1] != len(items):
        raise ValueError(f"batch sizes sum to {bounds[-1]}, not the {len(items)} items")
    chunks = [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(max(1, int(num_workers))) as pool:
        pending = []
        for chunk in chunks[:prefetch + 1]:
            pending.append([pool.submit(load, i, pid) for i, pid in chunk])
        nxt = prefetch + 1
        while pending:
            futures = pending.pop(0)
            if nxt < len(chunks):
                pending.append([pool.submit(load, i, pid) for i, pid in chunks[nxt]])
                nxt += 1
            yield [f.result() for f in futures]


# ============================================================================ rows on disk
def _na(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return ""
    return str(v)


class RowStore:
    """Per-pair rows in ``WORKDIR/rows.csv`` or ``WORKDIR/rows.parquet/part-NNNNNN.parquet``.

    ``append`` writes one batch and flushes it to disk (CSV: flush + fsync; Parquet: one part
    file per batch, written to a temporary name and renamed). A CSV whose last line was cut by a
    crash is truncated to its last complete line when the store is opened.
    """

    def __init__(self, workdir: str | os.PathLike, fmt: str = "csv"):
        if fmt not in FORMATS:
            raise ValueError(f"row format must be one of {FORMATS}, got {fmt!r}")
        self.fmt = fmt
        self.path = Path(workdir) / ("rows.csv" if fmt == "csv" else "rows.parquet")
        if fmt == "csv" and self.path.is_file():
            self._repair_csv()

    def _repair_csv(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: dropping an incomplete last line (interrupted run)", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def read(self) -> dict[str, np.ndarray]:
        """All rows as columns (``ROW_COLUMNS``; numbers as float / int arrays, NaN = missing)."""
        cols: dict[str, list] = {c: [] for c in ROW_COLUMNS}
        if self.fmt == "csv":
            if self.path.is_file():
                with open(self.path, newline="") as f:
                    reader = csv.DictReader(f)
                    if reader.fieldnames and tuple(reader.fieldnames) != ROW_COLUMNS:
                        raise ValueError(f"{self.path}: columns {reader.fieldnames} are not the "
                                         f"scoring job's {list(ROW_COLUMNS)}")
                    for r in reader:
                        for c in ROW_COLUMNS:
                            cols[c].append(r[c])
        elif self.path.is_dir() and any(self.path.glob("part-*.parquet")):
            import pyarrow.parquet as pq
            table = pq.read_table(sorted(str(p) for p in self.path.glob("part-*.parquet")))
            d = table.to_pydict()
            for c in ROW_COLUMNS:
                cols[c] = d[c]
        return _typed(cols)

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        if self.fmt == "csv":
            new = not self.path.is_file() or self.path.stat().st_size == 0
            with open(self.path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(ROW_COLUMNS)
                for r in rows:
                    w.writerow([_na(r.get(c)) for c in ROW_COLUMNS])
                f.flush()
                os.fsync(f.fileno())
            return
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.path.mkdir(parents=True, exist_ok=True)
        n = len(list(self.path.glob("part-*.parquet")))
        typed = _typed({c: [r.get(c) for r in rows] for c in ROW_COLUMNS})
        table = pa.table({c: typed[c] for c in ROW_COLUMNS})
        tmp = self.path / f".part-{n:06d}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.path / f"part-{n:06d}.parquet")


def _typed(cols: Mapping[str, list]) -> dict[str, np.ndarray]:
    out = {}
    for c in ROW_COLUMNS:
        v = cols[c]
        if c in _STR_COLUMNS:
            out[c] = np.asarray(["" if x is None else str(x) for x in v], dtype=object)
        elif c in _FLOAT_COLUMNS:
            out[c] = np.asarray([np.nan if x in ("", None) else float(x) for x in v], np.float64)
        else:
            out[c] = np.asarray([-1 if x in ("", None) else int(float(x)) for x in v], np.int64)
    return out


def pair_rows(item: Loaded, names: Sequence[str], heads: Mapping[str, Head],
              orig: Mapping | None, trans: Mapping | None, k: int) -> list[dict[str, Any]]:
    """Rows of one pair (one per classifier) from the step's outputs at position ``k``."""
    rows = []
    for name in names:
        r: dict[str, Any] = {"pair_id": item.pair_id, "index": item.index, "label": item.label,
                             "model": name, "orig_h": item.orig_hw[0], "orig_w": item.orig_hw[1],
                             "trans_h": item.trans_hw[0], "trans_w": item.trans_hw[1],
                             "error": item.error}
        if orig is not None and not item.error:
            thr = heads[name].threshold
            for side, o in (("orig", orig), ("trans", trans)):
                r[f"prob_{side}"] = float(o[name]["prob"][k])
                r[f"iol_{side}"] = float(o[name]["iol"][k])
                r[f"heat_frac_{side}"] = float(o[name]["heat_frac"][k])
                r[f"lung_frac_{side}"] = float(o["lung_frac"][k])
            if not (np.isfinite(r["prob_orig"]) and np.isfinite(r["prob_trans"])):
                r["error"] = f"{ERR_NONFINITE}: probability is NaN or Inf"
            else:
                r["pred_orig"] = int(r["prob_orig"] >= thr)
                r["pred_trans"] = int(r["prob_trans"] >= thr)
                r["flip"] = int(r["pred_orig"] != r["pred_trans"])
            empty = [s for s, key in (("original", "lung_frac_orig"), ("transmitted", "lung_frac_trans"))
                     if not r[key] > 0]
            if empty and not r["error"]:
                r["error"] = f"{ERR_LUNGS}: no lung pixel on the {' and '.join(empty)} image"
        rows.append(r)
    return rows


# ============================================================================ the job
def _hms(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _write_json(path: Path, obj: Any) -> None:
    from covidmt_jax.report import jsonable
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False))
    os.replace(tmp, path)


def _check_fingerprint(workdir: Path, cfg: ml_collections.ConfigDict) -> None:
    fp = fingerprint(cfg)
    path = workdir / "job.json"
    if path.is_file():
        old = json.loads(path.read_text()).get("fingerprint")
        if old != fp:
            diff = sorted(k for k in set(fp) | set(old or {}) if (old or {}).get(k) != fp.get(k))
            raise ConfigError(f"{workdir} holds rows of a different job (settings {diff} differ); "
                              "use a new --workdir or restore those settings")
    else:
        _write_json(path, {"fingerprint": fp,
                           "digest": hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()})


def load_models(cfg: ml_collections.ConfigDict) -> tuple[dict, Any]:
    """``({name: (model, Head)}, lung segmenter)`` of a config."""
    from covidmt_jax.models.registry import _as_dtype
    dtype = _as_dtype(cfg.dtype)
    classifiers = {name: load_classifier(name, e.to_dict(), default_threshold=cfg.threshold, dtype=dtype)
                   for name, e in cfg.classifiers.items()}
    return classifiers, load_lungs(cfg.lungs)


def score_pairs(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, quality: int = 0,
                models: tuple[dict, Any] | None = None, mesh=None) -> dict[str, Any]:
    """Run (or resume) one scoring job into ``workdir``; returns the summary."""
    from covidmt_jax import report
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(workdir, _with_quality(cfg, quality))
    classifiers, lungs = models if models is not None else load_models(cfg)
    names = list(classifiers)
    scorer = Scorer(classifiers, lungs, cfg.image_size, cfg.batch_size, method=cfg.cam.method,
                    cam_threshold=cfg.cam.cam_threshold, mesh=mesh)
    source = build_source(cfg.pairs, quality)
    channel = source_channel(cfg.pairs, quality)
    label_col = label_column(source, cfg.pairs.label)
    ids = list(source.ids)
    n = len(ids) if cfg.pairs.limit < 0 else min(int(cfg.pairs.limit), len(ids))
    store = RowStore(workdir, cfg.output.format)
    existing = store.read()
    done = set(zip(existing["pair_id"].tolist(), existing["model"].tolist()))
    todo = [(i, ids[i]) for i in range(n) if any((ids[i], m) not in done for m in names)]
    log.info("%s: %d pairs, %d already scored, %d to score, %d classifier(s) %s, %d device(s)",
             source.name, n, n - len(todo), len(todo), len(names), names, jax.device_count())

    # Each process loads its share of every global batch (one process: all of it).
    global_b = scorer.local_batch * jax.process_count()
    p = jax.process_index()

    def load(i: int, pid: str) -> Loaded:
        return load_one(source, i, pid, cfg.image_size, channel, label_col, cfg.pairs.max_aspect_diff)

    bar = _progress(len(todo), cfg.progress)
    start = time.time()
    n_done = 0
    # this process decodes only its own slice of every global batch
    lb = scorer.local_batch
    sizes = [min(global_b, len(todo) - s0) for s0 in range(0, len(todo), global_b)]
    mine_items = [it for s0 in range(0, len(todo), global_b)
                  for it in todo[s0:s0 + global_b][p * lb:(p + 1) * lb]]
    mine_counts = [len(todo[s0:s0 + global_b][p * lb:(p + 1) * lb]) for s0 in range(0, len(todo), global_b)]
    batches = prefetch_batches(load, mine_items, mine_counts, cfg.num_workers)
    for bi, (mine, n_batch) in enumerate(zip(batches, sizes)):
        good = [it for it in mine if not it.error]
        orig = trans = None
        s = scorer.image_size
        xo = np.stack([it.original for it in good]) if good else np.zeros((0, s, s, 1), np.float32)
        xt = np.stack([it.transmitted for it in good]) if good else np.zeros((0, s, s, 1), np.float32)
        orig, trans = scorer(xo, xt)  # always called: every process runs every step
        rows, k = [], 0
        for it in mine:
            if it.error:
                rows.extend(pair_rows(it, names, scorer.heads, None, None, 0))
            else:
                rows.extend(pair_rows(it, names, scorer.heads, orig, trans, k))
                k += 1
        rows = [r for r in rows if (r["pair_id"], r["model"]) not in done]
        if p == 0:
            store.append(rows)
        n_done += n_batch
        bar.update(n_batch)
        if cfg.log_every and ((bi + 1) % cfg.log_every == 0 or n_done == len(todo)):
            rate = n_done / max(time.time() - start, 1e-9)
            log.info("scored %d/%d pairs  %.2f pairs/s  ETA %s", n_done, len(todo), rate,
                     _hms((len(todo) - n_done) / max(rate, 1e-9)))
    bar.close()
    wall = time.time() - start
    if p != 0:
        return {}
    rows = store.read()
    keep = np.isin(rows["model"], names)
    rows = {c: v[keep] for c, v in rows.items()}
    summary = report.summarize(rows, names, eta=cfg.eta, n_boot=cfg.n_boot, seed=cfg.seed,
                               thresholds={m: classifiers[m][1].threshold for m in names})
    summary["job"] = {"source": source.name, "n_pairs_selected": n, "scored_this_run": len(todo),
                      "wall_s": wall, "pairs_per_s": len(todo) / wall if wall > 0 and todo else None,
                      "image_size": int(cfg.image_size), "cam_method": cfg.cam.method,
                      "cam_threshold": float(cfg.cam.cam_threshold), "eta": float(cfg.eta),
                      "channel": channel.describe() if channel is not None else
                      getattr(getattr(source, "channel", None), "describe", lambda: "")(),
                      "quality": int(quality or cfg.pairs.quality or 0) or None,
                      "devices": jax.device_count(), "rows": str(store.path),
                      # files the source itself rejected while listing (on_error="skip")
                      "source_skipped": len(getattr(source, "skipped", ()) or ()),
                      "source_skipped_examples": [f"{a}: {b}" for a, b in
                                                  list(getattr(source, "skipped", ()) or ())[:5]]}
    gallery = gallery_maps(cfg, scorer, source, channel, label_col, rows, names)
    report.write_report(workdir, summary, rows, gallery)
    _write_json(workdir / "summary.json", summary)
    log.info("wrote %s, %s", workdir / "summary.json", workdir / "report.md")
    return summary


def gallery_maps(cfg, scorer: Scorer, source, channel, label_col, rows: Mapping[str, np.ndarray],
                 names: Sequence[str]) -> dict[str, dict[str, list[dict]]]:
    """For each model, ``{"flipped": [...], "random": [...]}`` panels (images, CAMs, lung
    probabilities, probabilities) of the first ``gallery.flipped`` flipped pairs and a seeded
    random sample of ``gallery.random`` scored pairs, recomputed for those pairs only."""
    sel: dict[str, dict[str, list[int]]] = {}
    rng = np.random.default_rng(cfg.seed)
    for m in names:
        r = rows["model"] == m
        ok = r & (rows["error"] == "")
        flipped = np.sort(rows["index"][ok & (rows["flip"] == 1)])[:int(cfg.gallery.flipped)]
        pool = np.sort(rows["index"][ok])
        k = min(int(cfg.gallery.random), len(pool))
        rand = np.sort(rng.choice(pool, size=k, replace=False)) if k else np.zeros(0, np.int64)
        sel[m] = {"flipped": flipped.tolist(), "random": rand.tolist()}
    wanted = sorted({i for s in sel.values() for v in s.values() for i in v})
    if not wanted:
        return {m: {"flipped": [], "random": []} for m in names}
    ids = dict(zip(rows["index"].tolist(), rows["pair_id"].tolist()))
    panels: dict[int, dict] = {}
    b = scorer.local_batch
    from covidmt_jax.data.pipeline import denormalise
    for start in range(0, len(wanted), b):
        items = [load_one(source, i, ids[i], cfg.image_size, channel, label_col, 0.0)
                 for i in wanted[start:start + b]]
        items = [it for it in items if not it.error]
        if not items:
            continue
        o, t = scorer(np.stack([it.original for it in items]),
                      np.stack([it.transmitted for it in items]), return_maps=True)
        for k, it in enumerate(items):
            panels[it.index] = {
                "pair_id": it.pair_id, "label": it.label,
                "image_orig": np.clip(denormalise(it.original[..., 0]), 0, 1),
                "image_trans": np.clip(denormalise(it.transmitted[..., 0]), 0, 1),
                "lung_orig": o["lung_prob"][k], "lung_trans": t["lung_prob"][k],
                **{f"{m}/{key}_{side}": d[m][key][k] for m in names for key in ("cam", "prob", "iol")
                   for side, d in (("orig", o), ("trans", t))}}
    out = {}
    for m in names:
        out[m] = {}
        for kind, idx in sel[m].items():
            out[m][kind] = [{"pair_id": panels[i]["pair_id"], "label": panels[i]["label"],
                             "image_orig": panels[i]["image_orig"], "image_trans": panels[i]["image_trans"],
                             "lung_orig": panels[i]["lung_orig"], "lung_trans": panels[i]["lung_trans"],
                             **{f"{key}_{side}": panels[i][f"{m}/{key}_{side}"]
                                for key in ("cam", "prob", "iol") for side in ("orig", "trans")},
                             "threshold": scorer.heads[m].threshold}
                            for i in idx if i in panels]
    return out


def _with_quality(cfg: ml_collections.ConfigDict, quality: int) -> ml_collections.ConfigDict:
    if not quality:
        return cfg
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.pairs.quality = int(quality)
    c.pairs.qualities = ()
    return c


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled or jax.process_index() != 0:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, unit="pair", desc="scoring", file=sys.stderr, mininterval=1.0,
                smoothing=0.1)


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """The scoring job (and the JPEG-quality sweep when ``pairs.qualities`` is set)."""
    validate(cfg)
    parallel.maybe_initialize_distributed()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    if not cfg.pairs.qualities:
        return score_pairs(cfg, workdir)
    from covidmt_jax import report
    mesh = parallel.make_mesh()
    loaded = load_models(cfg)
    per_quality = {}
    for q in sorted(int(q) for q in cfg.pairs.qualities):
        log.info("quality sweep: JPEG quality %d", q)
        per_quality[q] = score_pairs(cfg, workdir / f"q{q:03d}", quality=q, models=loaded, mesh=mesh)
    if jax.process_index() != 0:
        return {}
    sweep = {"qualities": sorted(per_quality), "per_quality": per_quality}
    report.write_sweep_report(workdir, sweep)
    _write_json(workdir / "summary.json", sweep)
    return sweep


def main(argv=None) -> None:
    if argv is None:  # a command line (not an in-process call): tune glibc malloc for XLA:CPU
        from covidmt_jax.cpu_malloc import reexec_for_cpu
        reexec_for_cpu(sys.argv[1:], module="covidmt_jax.score")
    from absl import app, flags
    from ml_collections import config_flags

    flags_ = flags.FLAGS
    # config_flags finds the --config.* overrides in sys.argv unless told otherwise.
    config_flags.DEFINE_config_file("config", None, "configs/score_<x>.py[:arg]", lock_config=True,
                                    sys_argv=list(argv) if argv is not None else None)
    flags.DEFINE_string("workdir", None, "output directory (re-use it to resume)")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(_):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            stream=sys.stdout, force=True)
        try:
            run(flags_.config, flags_.workdir)
        except ConfigError as e:
            raise app.UsageError(f"bad config: {e}") from None

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
