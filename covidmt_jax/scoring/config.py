"""The scoring job's configuration: defaults of every key, one classifier entry, validation.

Layout (``base_config()``)::

    classifiers.<name>   one entry per model (classifier_entry: kind, path, task, ...)
    lungs                lung segmenter: "" = the shipped "fields" U-Net, a name of
                         covidmt_jax.lungs.SEGMENTERS, or an exported U-Net directory
    pairs.source, pairs.kwargs, pairs.channel, pairs.quality, pairs.qualities, pairs.limit,
    pairs.label, pairs.max_aspect_diff, pairs.patients (files naming each pair's patient:
    covidmt_jax.scoring.patients)
    image_size, batch_size, num_workers, dtype
    cam.method, cam.cam_threshold, eta, threshold, seed (the random gallery pairs)
    gallery.flipped, gallery.random, gallery.qc_flagged (pairs with a flagged lung mask),
    lung_qc.*            the lung-mask QC thresholds (fields of covidmt_jax.lung_qc.QCThresholds,
                         defaults justified there), e.g. --config.lung_qc.max_fraction=0.7
    output.format, log_every, progress

Kind-specific checks of a classifier entry (e.g. ``kind="torch"`` needs ``model``) live with the
kind in :mod:`covidmt_jax.scoring.loading`.
"""
from __future__ import annotations

from typing import Any, Mapping

import dataclasses

import ml_collections

from covidmt_jax import lung_qc
from covidmt_jax.config_lib import ConfigError
from covidmt_jax.explain import METHODS

PAIR_SOURCES = ("wacxr", "pairs", "folder", "synthetic_pairs")
ACTIVATIONS = ("sigmoid", "softmax")
FORMATS = ("csv", "parquet")
DTYPES = ("float32", "bfloat16", "float16")


def classifier_entry(kind: str = "export", path: str = "", **kw: Any) -> ml_collections.ConfigDict:
    """One entry of ``config.classifiers`` (keyed by the model's display name).

    Keys:
      kind: a registered classifier kind (:func:`covidmt_jax.scoring.loading.classifier_kinds`):
        ``"export"`` (a directory written by ``export.save_model``, e.g. a training run's
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
    c.lungs = ""                     # "" = the shipped "fields" U-Net; a lungs.SEGMENTERS name; an export dir
    c.pairs = ml_collections.ConfigDict({
        "source": "synthetic_pairs",  # wacxr | pairs | folder | synthetic_pairs
        "kwargs": {},                 # keyword arguments of the source
        "channel": "",                # folder only: preset sent through on the fly
        "quality": 0,                 # JPEG quality override of the channel (0 = preset's)
        "qualities": (),              # a JPEG-quality sweep: one job per quality
        "limit": -1,                  # score the first N pairs (-1 = all)
        "label": "",                  # label column of the COVID ground truth ("" = auto)
        "max_aspect_diff": 0.02,      # relative aspect-ratio difference of a mismatched pair
        "patients": "",               # COVIDx label / CSV files naming each pair's patient ("" = none)
    })
    c.image_size = 512
    c.batch_size = 8
    c.num_workers = 4
    c.dtype = "float32"
    c.cam = ml_collections.ConfigDict({"method": "gradcam", "cam_threshold": 0.5})
    c.eta = 0.4
    c.threshold = 0.5
    c.seed = 0
    c.gallery = ml_collections.ConfigDict({"flipped": 8, "random": 8, "qc_flagged": 8})
    c.lung_qc = ml_collections.ConfigDict(dataclasses.asdict(lung_qc.DEFAULT_THRESHOLDS))
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
    c.gallery.flipped = gallery
    c.gallery.random = gallery
    c.gallery.qc_flagged = gallery
    c.log_every = 5
    return c


def _check_keys(section: Mapping, reference: Mapping, where: str) -> None:
    unknown = sorted(set(section.keys()) - set(reference.keys()))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(reference.keys())}")


def _one_of(value: Any, choices: tuple, key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Fail on unknown keys and impossible values before anything expensive happens."""
    ref = base_config()
    _check_keys(cfg, ref, "config")
    for sec in ("pairs", "cam", "gallery", "output", "lung_qc"):
        if sec in cfg:
            _check_keys(cfg[sec], ref[sec], f"config.{sec}")
    if not cfg.classifiers:
        raise ConfigError("config.classifiers is empty: add e.g. classifiers="
                          "{'resnet50': scoring.config.classifier_entry('export', DIR)}")
    ref_entry = classifier_entry()
    for name, e in cfg.classifiers.items():
        _check_keys(e, ref_entry, f"config.classifiers.{name}")
        if not e.get("path"):
            raise ConfigError(f"config.classifiers.{name}.path is empty")
        _one_of(e.get("activation", "sigmoid"), ACTIVATIONS, f"config.classifiers.{name}.activation")
    p = cfg.pairs
    _one_of(p.source, PAIR_SOURCES, "config.pairs.source")
    if p.source == "folder" and not p.channel:
        raise ConfigError("config.pairs.channel: an image folder needs a channel preset "
                          "(e.g. 'whatsapp') to make the transmitted side")
    if p.qualities and p.source in ("wacxr", "pairs"):
        raise ConfigError("config.pairs.qualities: a quality sweep needs on-the-fly transmission "
                          "(source 'folder' or 'synthetic_pairs')")
    for q in tuple(p.qualities) + ((p.quality,) if p.quality else ()):
        if int(q) != q or not 1 <= q <= 100:
            raise ConfigError(f"config.pairs: JPEG quality must be an integer in 1..100, got {q!r}")
    _one_of(cfg.cam.method, METHODS, "config.cam.method")
    for key in ("threshold", "eta"):
        if not 0 <= float(cfg[key]) <= 1:
            raise ConfigError(f"config.{key} must be in [0, 1], got {cfg[key]}")
    if not 0 < float(cfg.cam.cam_threshold) <= 1:
        raise ConfigError(f"config.cam.cam_threshold must be in (0, 1], got {cfg.cam.cam_threshold}")
    _one_of(cfg.output.format, FORMATS, "config.output.format")
    for key, low in (("image_size", 8), ("batch_size", 1)):
        if int(cfg[key]) < low:
            raise ConfigError(f"config.{key} must be >= {low}, got {cfg[key]}")
    _one_of(cfg.dtype, DTYPES, "config.dtype")
    for key in ("flipped", "random", "qc_flagged"):
        v = cfg.gallery.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 0:
            raise ConfigError(f"config.gallery.{key} must be an integer >= 0 (pairs shown in the "
                              f"report's gallery; 0 = none), got {v!r}")
    qc_thresholds(cfg)


def qc_thresholds(cfg: ml_collections.ConfigDict) -> lung_qc.QCThresholds:
    """The lung-mask QC thresholds of ``cfg.lung_qc`` (the defaults where the section or a
    key is absent, e.g. a config written before the section existed); :class:`ConfigError`
    naming the key when a value is impossible."""
    given = dict(cfg.lung_qc.to_dict()) if "lung_qc" in cfg else {}
    known = {f.name for f in dataclasses.fields(lung_qc.QCThresholds)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"config.lung_qc: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        values = {k: (tuple(float(x) for x in v) if k == "uncertain_band" else
                      int(v) if k == "n_components" else float(v)) for k, v in given.items()}
        if "uncertain_band" in values and len(values["uncertain_band"]) != 2:
            raise ValueError(f"uncertain_band must be (lo, hi), got {given['uncertain_band']}")
        return lung_qc.QCThresholds(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.lung_qc: {e}") from None


def with_quality(cfg: ml_collections.ConfigDict, quality: int) -> ml_collections.ConfigDict:
    """``cfg`` for one point of a JPEG-quality sweep (``quality`` 0: ``cfg`` itself)."""
    if not quality:
        return cfg
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.pairs.quality = int(quality)
    c.pairs.qualities = ()
    return c
