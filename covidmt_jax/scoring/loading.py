"""Models of a scoring job: classifiers by kind, the lung segmenter(s), and their content digests.

Classifier kinds are a registry ``kind -> ClassifierKind(load, check)``. A new kind is one
registered function, e.g. for torchxrayvision models::

    def _load_xrv(entry, dtype):            # -> an nnx classifier (features, pool_and_classify)
        ...
    register_classifier_kind("xrv", load=_load_xrv)

The job fingerprints what ``load`` returns (every parameter array,
:func:`covidmt_jax.scoring.job.model_digest`), so a kind needs no hashing code of its own and
replacing a model's files under the same path is noticed on resume.

Lung segmenters are a mapping ``convention name -> LungSegmenter`` resolved from
``config.lungs`` by ONE function, :func:`lung_dirs` (``name -> exported U-Net directory``).
The first entry is the default convention; its IOL fills the ``iol_orig`` / ``iol_trans``
columns, every further entry ``iol_orig_<name>`` / ``iol_trans_<name>`` (see
:func:`covidmt_jax.scoring.rows.row_columns`).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import ml_collections
from flax import nnx

from covidmt_jax import lungs as lung_lib
from covidmt_jax import models
from covidmt_jax import xrv as xrv_lib
from covidmt_jax.config_lib import ConfigError
from covidmt_jax.export import load_model
from covidmt_jax.scoring.config import classifier_entry
from covidmt_jax.weights import load_torch_weights

#: Convention name of a lung segmenter given as an export directory in ``config.lungs``.
DEFAULT_LUNGS = "lungs"


@dataclasses.dataclass(frozen=True)
class Head:
    """How to read the COVID decision from a classifier's ``pool_and_classify`` logits."""
    column: int
    activation: str
    threshold: float
    in_channels: int


@dataclasses.dataclass(frozen=True)
class ClassifierKind:
    """How one ``config.classifiers.<name>.kind`` is loaded.

    load: ``(entry, dtype) -> nnx.Module`` with ``features`` and ``pool_and_classify``.
    check: ``(name, entry) -> None``, raises ``ConfigError`` before anything is loaded.
    """
    load: Callable[[ml_collections.ConfigDict, Any], nnx.Module]
    check: Callable[[str, ml_collections.ConfigDict], None] | None = None


_KINDS: dict[str, ClassifierKind] = {}


def register_classifier_kind(name: str, *, load: Callable, check: Callable | None = None) -> None:
    """Make ``kind=name`` loadable (see the module docstring)."""
    if name in _KINDS:
        raise ValueError(f"classifier kind {name!r} is already registered")
    _KINDS[name] = ClassifierKind(load, check)


def classifier_kinds() -> tuple[str, ...]:
    return tuple(_KINDS)


def _kind(name: str, entry: Mapping[str, Any]) -> ClassifierKind:
    kind = entry.get("kind", "export")
    if kind not in _KINDS:
        raise ConfigError(f"config.classifiers.{name}.kind must be one of {list(_KINDS)}, got {kind!r}")
    return _KINDS[kind]


# ---------------------------------------------------------------------------- built-in kinds
def _load_export(entry: ml_collections.ConfigDict, dtype: Any) -> nnx.Module:
    return load_model(entry.path, dtype=dtype)


def _load_torch(entry: ml_collections.ConfigDict, dtype: Any) -> nnx.Module:
    model = models.create_unfilled(entry.model, num_classes=int(entry.num_classes),
                                   in_channels=int(entry.in_channels), dtype=dtype)
    load_torch_weights(model, entry.path, source=entry.source, strict=True)  # every tensor, or raises
    return models.check_filled(model, str(entry.path))


def _check_torch(name: str, entry: ml_collections.ConfigDict) -> None:
    if not entry.get("model"):
        raise ConfigError(f"config.classifiers.{name}.model (zoo name) is needed for kind='torch'")


def _check_xrv(name: str, entry: Mapping[str, Any]) -> None:
    """A ``kind="xrv"`` entry before anything is loaded: ``model`` is a torchxrayvision
    architecture or weight-set name, ``task`` one of :data:`covidmt_jax.xrv.PATHOLOGIES`,
    ``path`` given, sigmoid outputs."""
    where = f"config.classifiers.{name}"
    try:
        xrv_lib.parse_name(str(entry.get("model")))
    except ValueError as e:
        raise ConfigError(f"{where}.model (kind='xrv'): {e}") from None
    if entry.get("task") not in xrv_lib.PATHOLOGIES:
        raise ConfigError(f"{where}.task must be the scored torchxrayvision output, one of "
                          f"{list(xrv_lib.PATHOLOGIES)} (e.g. 'Pneumonia'), got {entry.get('task')!r}")
    if not entry.get("path"):
        raise ConfigError(f"{where}.path (the weight file) is needed for kind='xrv'")
    if entry.get("activation", "sigmoid") != "sigmoid":
        raise ConfigError(f"{where}.activation must be 'sigmoid' for kind='xrv' (multi-label outputs)")


register_classifier_kind("export", load=_load_export)
register_classifier_kind("torch", load=_load_torch, check=_check_torch)
# torchxrayvision classifiers (model=ARCH or weight set, path=FILE, task=PATHOLOGY): covidmt_jax.xrv
register_classifier_kind("xrv", load=xrv_lib.load_entry, check=_check_xrv)


# ---------------------------------------------------------------------------- classifiers
def check_classifiers(classifiers: Mapping[str, Mapping[str, Any]]) -> None:
    """Kind checks of every ``config.classifiers`` entry (no file is read)."""
    for name, e in classifiers.items():
        kind = _kind(name, e)
        if kind.check is not None:
            kind.check(name, classifier_entry(**dict(e)))


def load_classifier(name: str, entry: Mapping[str, Any], *, default_threshold: float,
                    dtype: Any = jnp.float32) -> tuple[nnx.Module, Head]:
    """``(model, Head)`` for one ``config.classifiers`` entry (see ``classifier_entry``)."""
    e = classifier_entry(**dict(entry))
    kind = _kind(name, e)
    if kind.check is not None:
        kind.check(name, e)
    try:
        model = kind.load(e, dtype)
    except FileNotFoundError as err:  # a typo in the path: name the key, no traceback
        raise ConfigError(f"config.classifiers.{name}.path: {err}") from err
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
    own = getattr(model, "decision_thresholds", None)  # per-output operating points (xrv's op_threshs)
    if float(e.threshold) >= 0:
        thr = float(e.threshold)
    elif own is not None and math.isfinite(own[column]):
        thr = float(own[column])
    else:
        thr = float(default_threshold)
    return model, Head(column, e.activation, thr, int(getattr(model, "in_channels", 1)))


def load_classifiers(cfg: ml_collections.ConfigDict) -> dict[str, tuple[nnx.Module, Head]]:
    """``{name: (model, Head)}`` of ``config.classifiers`` in config order."""
    dtype = jnp.dtype(cfg.dtype)
    return {name: load_classifier(name, e.to_dict(), default_threshold=cfg.threshold, dtype=dtype)
            for name, e in cfg.classifiers.items()}


# ---------------------------------------------------------------------------- lung segmenters
def lung_dirs(spec: str) -> dict[str, Path]:
    """THE resolver of ``config.lungs``: ``{convention name: exported U-Net directory}``, the
    default convention first. ``""`` is the shipped ``"fields"`` U-Net, a name of
    :data:`covidmt_jax.lungs.SEGMENTERS` that shipped segmenter, ``"both"`` both shipped
    segmenters (fields first, anatomical columns suffixed ``_anatomical``), anything else an export
    directory (convention :data:`DEFAULT_LUNGS`)."""
    if not spec:
        return {"fields": lung_lib.SEGMENTERS["fields"]}
    if spec == "both":  # every shipped convention, the default ("fields") first
        return dict(lung_lib.SEGMENTERS)
    if spec in lung_lib.SEGMENTERS:
        return {spec: lung_lib.SEGMENTERS[spec]}
    return {DEFAULT_LUNGS: Path(spec)}


def load_lungs(spec: str) -> dict[str, lung_lib.LungSegmenter]:
    """``{convention name: LungSegmenter}`` of ``config.lungs`` (:func:`lung_dirs`)."""
    out = {}
    for name, d in lung_dirs(spec).items():
        try:
            out[name] = lung_lib.lung_segmenter(d)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"config.lungs ({name!r}): {err}") from err
    return out


def load_models(cfg: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """``({name: (model, Head)}, {convention: LungSegmenter})`` of a config."""
    return load_classifiers(cfg), load_lungs(cfg.lungs)
