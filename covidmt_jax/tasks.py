"""Tasks: what each task reads from a batch, its loss and its metrics — one class per kind.

The paper's six tasks (SPEC.md, Table 3), in the ablation's order:

| task          | dataset | kind           | loss (class below)                                    |
|---------------|---------|----------------|-------------------------------------------------------|
| covid         | covidx  | classification | sigmoid cross-entropy (:class:`ClassificationTask`)   |
| box           | rsna    | box            | squared error + focal objectness + L2 (:class:`BoxTask`) |
| infiltration  | nih     | classification | sigmoid cross-entropy                                 |
| effusion      | nih     | classification | sigmoid cross-entropy                                 |
| atelectasis   | nih     | classification | sigmoid cross-entropy                                 |
| nodule        | nih     | classification | sigmoid cross-entropy                                 |

Total loss (eq. 5): the mean over tasks of each task's mean loss over the samples that carry
its label (:func:`total_loss`). Batches follow docs/architecture.md: ``labels`` /
``label_weight`` ``[B, K]`` (columns = classification tasks in config order), ``boxes``
``[B, M, 4]`` pixels xyxy, ``box_valid [B, M]``, ``box_weight [B]``, ``mask [B, H, W, 1]``.
"""
from __future__ import annotations

import abc
import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from covidmt_jax import metrics
from covidmt_jax.errors import ConfigError
from covidmt_jax.models.heads import detect, encode_boxes, match_anchors
from covidmt_jax.taskspec import (KINDS, LUNG_TASK, PAPER_TASKS, TaskSpec, paper_tasks,  # noqa: F401
                                  tasks_from_names)


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Element-wise binary cross-entropy of sigmoid ``logits`` against ``targets`` in [0, 1],
    in the numerically stable form ``softplus(z) - z y`` (any shape). Its gradient is
    ``sigmoid(z) - y`` everywhere; the form ``max(z, 0) - z y + log(1 + exp(-|z|))`` has the
    same value but JAX differentiates ``max`` and ``|z|`` at ``z = 0`` to a wrong gradient
    (``-y`` instead of ``0.5 - y``)."""
    return jax.nn.softplus(logits) - logits * targets


def _masked_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean of ``values [B]`` over samples with ``weight [B] > 0`` (0 when there are none)."""
    return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _choice(*allowed: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"one of {list(allowed)}"


def _in_range(lo: float, hi: float = math.inf) -> Callable[[Any], str | None]:
    def check(v):
        try:
            ok = lo <= float(v) <= hi
        except (TypeError, ValueError):
            ok = False
        return None if ok else f"a number in [{lo:g}, {hi:g}]"
    return check


class Task(abc.ABC):
    """Base class: ``loss`` (jit-able, on model outputs and a batch) and metrics.

    ``OPTIONS``: ``{option: (default, check)}``, the loss and metric options this kind takes
    (``config.task_options.<task>``); an unknown option or a bad value is a
    :class:`~covidmt_jax.errors.ConfigError` naming the task, the option and the choices.
    ``self.options`` holds every option, defaults filled in. ``METRICS``: the names of the
    metrics :meth:`summarize` returns, in its order (the trainer checks ``eval.best_metric``
    against them before compiling anything)."""
    kind: ClassVar[str]
    METRICS: ClassVar[tuple[str, ...]]
    OPTIONS: ClassVar[dict[str, tuple[Any, Callable[[Any], str | None]]]] = {}

    def __init__(self, spec: TaskSpec, column: int | None = None, **options: Any):
        self.spec = spec
        self.name = spec.name
        self.column = column
        self.options = self.check_options(spec.name, options)

    @classmethod
    def check_options(cls, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` with the defaults filled in; ConfigError on an unknown key or bad value."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ConfigError(f"config.task_options.{name}: unknown option(s) {unknown} for a {cls.kind} "
                              f"task; known: {sorted(cls.OPTIONS) or 'none'}")
        out = {}
        for key, (default, check) in cls.OPTIONS.items():
            value = options.get(key, default)
            problem = check(value)
            if problem:
                raise ConfigError(f"config.task_options.{name}.{key}={value!r}: must be {problem}")
            out[key] = value
        return out

    @abc.abstractmethod
    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, jax.Array],
             weight_norm: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(mean loss over the samples carrying this task's label, {name: aux scalar})``.

        ``weight_norm``: the model's ``task_weight_norms()[name]`` (a sum of squared weights
        this task regularises), or None when the model has none for it."""

    @abc.abstractmethod
    def eval_outputs(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Per-batch host values to collect (arrays are concatenated, lists extended)."""

    @abc.abstractmethod
    def summarize(self, collected: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Metrics of the whole evaluation set from the collected values."""


class ClassificationTask(Task):
    """Sigmoid cross-entropy on ``outputs[name]`` logits ``[B]`` vs ``labels[:, column]``,
    averaged over the samples whose ``label_weight[:, column]`` is 1. Option: ``threshold``
    (0.5; the probability at or above which sensitivity/specificity/accuracy count a positive)."""
    kind = "classification"
    OPTIONS = {"threshold": (0.5, _in_range(0.0, 1.0))}
    METRICS = ("roc_auc", "sensitivity", "specificity", "accuracy")

    def loss(self, outputs, batch, weight_norm=None):
        logits = outputs[self.name].astype(jnp.float32)
        y = batch["labels"][:, self.column]
        w = batch["label_weight"][:, self.column]
        return _masked_mean(bce_with_logits(logits, y), w), {"n": jnp.sum(w)}

    def eval_outputs(self, outputs, batch):
        w = np.asarray(batch["label_weight"][:, self.column]) > 0
        prob = 1.0 / (1.0 + np.exp(-np.asarray(outputs[self.name], np.float64)))
        return {"prob": prob[w], "label": np.asarray(batch["labels"][:, self.column])[w]}

    def summarize(self, collected):
        threshold = float(self.options["threshold"])
        rep = metrics.classification_report(collected["label"], collected["prob"], threshold)
        return {k: float(rep[k]) for k in self.METRICS}


def focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25,
               gamma: float = 2.0) -> jax.Array:
    """Element-wise sigmoid focal loss (Lin et al. 2017):
    ``alpha_t * BCE(logits, targets) * (1 - p_t) ** gamma``. ``gamma = 0`` is alpha-weighted
    BCE. ``targets`` are 0 or 1. ``1 - p_t`` is computed as ``sigmoid(-logit)`` for positives
    and ``sigmoid(logit)`` for negatives, so it does not round to 0 at saturated logits, and the
    power's base is kept above 1e-30: the gradient stays finite for every ``gamma >= 0``
    (``x ** gamma`` has an infinite or NaN derivative at 0 for ``gamma < 1``)."""
    one_minus_pt = jax.nn.sigmoid(jnp.where(targets > 0.5, -logits, logits))
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    modulator = 1.0 if gamma == 0 else jnp.maximum(one_minus_pt, 1e-30) ** gamma
    return a_t * bce_with_logits(logits, targets) * modulator


class BoxTask(Task):
    """RSNA pneumonia boxes, RetinaNet-style.

    Per image of the box dataset: anchors are matched to its boxes (IoU >= 0.5 positive,
    < 0.4 background, in between ignored; each box keeps its best anchor); the loss is
    ``regression + objectness``, where regression is the squared error of the encoded box
    deltas of positive anchors (the paper; ``regression="smooth_l1"`` as an option) and
    objectness is the focal loss over non-ignored anchors, both normalised by the number of
    positives (at least 1). The task loss is their mean over box-dataset images, plus
    ``l2 * weight_norm``, the model's sum of squared box-regression kernels (the paper's
    R(f^bbox), ``COVIDMT.task_weight_norms()``).

    ``anchors``: ``[N_anchors, 4]`` xyxy pixels matching the box head's output at the
    training image size (``COVIDMT.anchors((H, W))``; :func:`build_tasks` passes them).
    Options (``OPTIONS``): ``regression`` ("squared" | "smooth_l1"), ``l2`` (1e-4),
    ``focal_alpha`` (0.25) and ``focal_gamma`` (2.0) of the objectness focal loss,
    ``score_threshold`` (0.3; evaluation: the RSNA mAP counts the detections at or above it).

    Evaluation metrics: ``map`` — the RSNA challenge metric (:func:`covidmt_jax.metrics.rsna_map`)
    of the detections scoring >= ``score_threshold``; ``ap50`` — the threshold-free average
    precision at IoU 0.5 (:func:`covidmt_jax.metrics.detection_ap`) of all detections (up to
    10 per image after NMS). Early in training the objectness scores are not yet calibrated:
    boxes can be found and ranked first (``ap50`` > 0) while no score reaches the threshold
    (``map`` 0).
    """
    kind = "box"
    OPTIONS = {"regression": ("squared", _choice("squared", "smooth_l1")),
               "l2": (1e-4, _in_range(0.0)),
               "focal_alpha": (0.25, _in_range(0.0, 1.0)),
               "focal_gamma": (2.0, _in_range(0.0)),
               "score_threshold": (0.3, _in_range(0.0, 1.0))}
    METRICS = ("map", "ap50")

    def __init__(self, spec: TaskSpec, column: int | None = None, *, anchors: Any = None,
                 **options: Any):
        super().__init__(spec, column, **options)
        self.anchors = None if anchors is None else np.asarray(anchors, np.float32)
        if self.anchors is not None and (self.anchors.ndim != 2 or self.anchors.shape[1] != 4):
            raise ValueError(f"task {self.name!r}: anchors must be [N, 4] xyxy, got {self.anchors.shape}")

    def _anchors_for(self, n_out: int) -> jax.Array:
        """The anchors as a jax array, checked against the head's ``n_out`` anchors."""
        if self.anchors is None:
            raise ValueError(f"task {self.name!r}: built without anchors; use build_tasks(specs, "
                             "options, anchors=model.anchors((H, W))) with the training image size")
        if self.anchors.shape[0] != n_out:
            raise ValueError(f"task {self.name!r}: the box head outputs {n_out} anchors but the task "
                             f"holds {self.anchors.shape[0]} (anchors built for another image size?)")
        return jnp.asarray(self.anchors)

    def loss(self, outputs, batch, weight_norm=None):
        out = outputs[self.name]
        anchors = self._anchors_for(out["objectness"].shape[1])

        def per_image(reg, obj, boxes, valid):
            matched, label = match_anchors(anchors, boxes, valid)
            pos = (label == 1).astype(jnp.float32)
            care = (label >= 0).astype(jnp.float32)
            n_pos = jnp.maximum(jnp.sum(pos), 1.0)
            target = encode_boxes(boxes[matched], anchors)
            diff = reg - target
            if self.options["regression"] == "smooth_l1":
                ad = jnp.abs(diff)
                elem = jnp.where(ad < 1.0 / 9, 0.5 * 9 * ad ** 2, ad - 0.5 / 9)
            else:
                elem = diff ** 2
            reg_loss = jnp.sum(elem.sum(-1) * pos) / n_pos
            obj_loss = jnp.sum(focal_loss(obj, pos, float(self.options["focal_alpha"]),
                                          float(self.options["focal_gamma"])) * care) / n_pos
            return reg_loss, obj_loss

        reg_l, obj_l = jax.vmap(per_image)(out["regression"].astype(jnp.float32),
                                           out["objectness"].astype(jnp.float32),
                                           batch["boxes"], batch["box_valid"])
        w = batch["box_weight"]
        reg_m, obj_m = _masked_mean(reg_l, w), _masked_mean(obj_l, w)
        coef = float(self.options["l2"])
        l2 = coef * weight_norm if coef and weight_norm is not None else jnp.float32(0.0)
        return reg_m + obj_m + l2, {"regression": reg_m, "objectness": obj_m, "l2": l2,
                                    "n": jnp.sum(w)}

    def eval_outputs(self, outputs, batch):
        out = outputs[self.name]
        anchors = self._anchors_for(np.shape(out["objectness"])[1])
        # every detection (NMS keeps the same boxes whatever the floor): summarize cuts at
        # score_threshold for the RSNA mAP and ranks them all for the AP
        det = detect(jnp.asarray(out["regression"]), jnp.asarray(out["objectness"]), anchors,
                     score_threshold=0.0)
        keep = np.asarray(batch["box_weight"]) > 0
        boxes, scores, valid = (np.asarray(det[k]) for k in ("boxes", "scores", "valid"))
        gt, gt_valid = np.asarray(batch["boxes"]), np.asarray(batch["box_valid"]) > 0
        rows = np.flatnonzero(keep)
        return {"pred_boxes": [boxes[i][valid[i]] for i in rows],
                "pred_scores": [scores[i][valid[i]] for i in rows],
                "gt_boxes": [gt[i][gt_valid[i]] for i in rows]}

    def summarize(self, collected):
        t = float(self.options["score_threshold"])
        above = [np.asarray(s) >= t for s in collected["pred_scores"]]
        return {"map": float(metrics.rsna_map([b[k] for b, k in zip(collected["pred_boxes"], above)],
                                              [s[k] for s, k in zip(collected["pred_scores"], above)],
                                              collected["gt_boxes"])),
                "ap50": metrics.detection_ap(collected["pred_boxes"], collected["pred_scores"],
                                             collected["gt_boxes"], 0.5)}


class SegmentationTask(Task):
    """Lung masks: soft Dice + binary cross-entropy on ``outputs[name]`` logits
    ``[B, H, W, 1]`` vs ``batch["mask"]``; Dice at 0.5 for evaluation."""
    kind = "segmentation"
    METRICS = ("dice",)

    def loss(self, outputs, batch, weight_norm=None):
        logits = outputs[self.name].astype(jnp.float32)
        y = batch["mask"].astype(jnp.float32)
        bce = jnp.mean(bce_with_logits(logits, y), axis=(1, 2, 3))
        dice = metrics.soft_dice_loss(logits[..., 0], y[..., 0])
        w = batch.get("mask_weight", jnp.ones(logits.shape[0], jnp.float32))
        return _masked_mean(bce + dice, w), {"bce": _masked_mean(bce, w), "dice_loss": _masked_mean(dice, w)}

    def eval_outputs(self, outputs, batch):
        prob = 1.0 / (1.0 + np.exp(-np.asarray(outputs[self.name], np.float32)))
        return {"dice": np.asarray(metrics.dice(prob[..., 0], np.asarray(batch["mask"])[..., 0] > 0.5))}

    def summarize(self, collected):
        return {"dice": float(np.mean(collected["dice"]))}


TASK_KINDS: dict[str, type[Task]] = {c.kind: c for c in (ClassificationTask, BoxTask, SegmentationTask)}


def check_task_options(specs: Sequence[TaskSpec | str | Mapping[str, str]],
                       options: Mapping[str, Mapping[str, Any]]) -> None:
    """ConfigError unless every ``options`` entry names a task (of ``specs``, or a known task
    left out of this run, as in the task-count ablation) and holds only options of its kind
    with valid values (``Task.OPTIONS``). The trainer calls it before loading any data."""
    kinds = {**{t.name: t.kind for t in PAPER_TASKS + (LUNG_TASK,)},
             **{t.name: t.kind for t in tasks_from_names(specs)}}
    for name, opts in options.items():
        if name not in kinds:
            raise ConfigError(f"config.task_options.{name}: no task of that name; tasks: {sorted(kinds)}")
        TASK_KINDS[kinds[name]].check_options(name, dict(opts))


def build_tasks(specs: Sequence[TaskSpec | str | Mapping[str, str]],
                options: Mapping[str, Mapping[str, Any]] | None = None, *,
                anchors: Any = None) -> list[Task]:
    """Task objects for ``specs``; classification tasks get their ``labels`` column in order.

    ``anchors``: ``[N, 4]`` for the box task, computed once from the model at the training
    image size (``model.anchors((H, W))``; needed only when a box task is present)."""
    options = options or {}
    specs = tasks_from_names(specs)
    check_task_options(specs, options)
    out, col = [], 0
    for spec in specs:
        column, extra = None, {}
        if spec.kind == "classification":
            column, col = col, col + 1
        if spec.kind == "box":
            extra["anchors"] = anchors
        out.append(TASK_KINDS[spec.kind](spec, column, **dict(options.get(spec.name, {})), **extra))
    return out


def total_loss(tasks: Sequence[Task], outputs: Mapping[str, Any], batch: Mapping[str, jax.Array],
               weight_norms: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 5: mean over tasks of each task's mean loss. ``weight_norms``: the model's
    ``task_weight_norms()`` (``{task: sum of squared weights}``, for the box task's L2 term).
    Returns ``(loss, {task/loss: ..., task/aux: ...})``."""
    weight_norms = weight_norms or {}
    per_task = {}
    aux = {}
    for t in tasks:
        loss, extra = t.loss(outputs, batch, weight_norms.get(t.name))
        per_task[t.name] = loss
        aux.update({f"{t.name}/{k}": v for k, v in extra.items()})
    total = sum(per_task.values()) / len(per_task)
    return total, {**{f"{k}/loss": v for k, v in per_task.items()}, **aux}
