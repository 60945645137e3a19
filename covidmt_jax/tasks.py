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
import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("classification", "box", "segmentation")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: ``name`` (output key), ``kind``, source ``dataset`` and the dataset's
    ``label`` column it learns (e.g. NIH ``"Effusion"``, COVIDx ``"COVID-19"``)."""
    name: str
    kind: str
    dataset: str
    label: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")


PAPER_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("covid", "classification", "covidx", "COVID-19"),
    TaskSpec("box", "box", "rsna", "pneumonia"),
    TaskSpec("infiltration", "classification", "nih", "Infiltration"),
    TaskSpec("effusion", "classification", "nih", "Effusion"),
    TaskSpec("atelectasis", "classification", "nih", "Atelectasis"),
    TaskSpec("nodule", "classification", "nih", "Nodule"),
)
LUNG_TASK = TaskSpec("lungs", "segmentation", "lungs", "lung")
_BY_NAME = {t.name: t for t in PAPER_TASKS + (LUNG_TASK,)}


def paper_tasks(n: int = 6) -> tuple[TaskSpec, ...]:
    """The first ``n`` tasks of the paper's ablation order (COVID, box, Infiltration, ...)."""
    if not 1 <= n <= len(PAPER_TASKS):
        raise ValueError(f"the paper's ablation has 1..{len(PAPER_TASKS)} tasks, got {n}")
    return PAPER_TASKS[:n]


def tasks_from_names(tasks: Sequence[TaskSpec | str | Mapping[str, str]]) -> list[TaskSpec]:
    """Accept ``TaskSpec``s, names of known tasks, or dicts of ``TaskSpec`` fields."""
    out = []
    for t in tasks:
        if isinstance(t, TaskSpec):
            out.append(t)
        elif isinstance(t, str):
            if t not in _BY_NAME:
                raise ValueError(f"unknown task {t!r}; known: {sorted(_BY_NAME)} "
                                 "(or give a dict with name, kind, dataset, label)")
            out.append(_BY_NAME[t])
        else:
            out.append(TaskSpec(**dict(t)))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names: {names}")
    return out


def _masked_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean of ``values [B]`` over samples with ``weight [B] > 0`` (0 when there are none)."""
    return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


class Task(abc.ABC):
    """Base class: ``loss`` (jit-able, on model outputs and a batch) and metrics."""
    kind: ClassVar[str]

    def __init__(self, spec: TaskSpec, column: int | None = None, **options: Any):
        self.spec = spec
        self.name = spec.name
        self.column = column
        self.options = options

    def prepare(self, model: Any, image_hw: tuple[int, int]) -> None:
        """Shape-only set-up before training (e.g. anchors); nothing by default."""

    @abc.abstractmethod
    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, jax.Array],
             model: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(mean loss over the samples carrying this task's label, {name: aux scalar})``."""

    @abc.abstractmethod
    def eval_outputs(self, outputs: Mapping[str, Any], batch: Mapping[str, Any],
                     model: Any = None) -> dict[str, np.ndarray]:
        """Per-batch host values to collect (arrays are concatenated, lists extended)."""

    @abc.abstractmethod
    def summarize(self, collected: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Metrics of the whole evaluation set from the collected values."""


class ClassificationTask(Task):
    """Sigmoid cross-entropy on ``outputs[name]`` logits ``[B]`` vs ``labels[:, column]``,
    averaged over the samples whose ``label_weight[:, column]`` is 1."""
    kind = "classification"

    def loss(self, outputs, batch, model=None):
        logits = outputs[self.name].astype(jnp.float32)
        y = batch["labels"][:, self.column]
        w = batch["label_weight"][:, self.column]
        # numerically stable BCE-with-logits
        per_sample = jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits)))
        return _masked_mean(per_sample, w), {"n": jnp.sum(w)}

    def eval_outputs(self, outputs, batch, model=None):
        w = np.asarray(batch["label_weight"][:, self.column]) > 0
        prob = 1.0 / (1.0 + np.exp(-np.asarray(outputs[self.name], np.float64)))
        return {"prob": prob[w], "label": np.asarray(batch["labels"][:, self.column])[w]}

    def summarize(self, collected):
        from covidmt_jax import metrics
        threshold = float(self.options.get("threshold", 0.5))
        rep = metrics.classification_report(collected["label"], collected["prob"], threshold)
        return {k: float(rep[k]) for k in ("roc_auc", "sensitivity", "specificity", "accuracy")}


def focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25,
               gamma: float = 2.0) -> jax.Array:
    """Element-wise sigmoid focal loss (Lin et al. 2017)."""
    p = jax.nn.sigmoid(logits)
    ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return a_t * ce * (1 - p_t) ** gamma


class BoxTask(Task):
    """RSNA pneumonia boxes, RetinaNet-style.

    Per image of the box dataset: anchors are matched to its boxes (IoU >= 0.5 positive,
    < 0.4 background, in between ignored; each box keeps its best anchor); the loss is
    ``regression + objectness``, where regression is the squared error of the encoded box
    deltas of positive anchors (the paper; ``regression="smooth_l1"`` as an option) and
    objectness is the focal loss over non-ignored anchors, both normalised by the number of
    positives (at least 1). The task loss is their mean over box-dataset images, plus
    ``l2 * sum(w**2)`` over the box-regression subnet's conv kernels (the paper's R(f^bbox)).
    Options: ``regression`` ("squared" | "smooth_l1"), ``l2`` (1e-4), ``image_hw`` (needed
    to build anchors), ``score_threshold`` for evaluation.
    """
    kind = "box"

    def prepare(self, model, image_hw) -> None:
        """Build the anchors for ``image_hw`` once, outside any trace."""
        self._anchors(model, image_hw)

    def _anchors(self, model, image_hw):
        key = tuple(int(s) for s in image_hw)
        cache = self.__dict__.setdefault("_anchor_cache", {})
        if key not in cache:
            cache[key] = jnp.asarray(model.anchors(key))
        return cache[key]

    def loss(self, outputs, batch, model=None):
        out = outputs[self.name]
        anchors = self._anchors(model, batch["image"].shape[1:3])
        from covidmt_jax.models.heads import encode_boxes, match_anchors

        def per_image(reg, obj, boxes, valid):
            matched, label = match_anchors(anchors, boxes, valid)
            pos = (label == 1).astype(jnp.float32)
            care = (label >= 0).astype(jnp.float32)
            n_pos = jnp.maximum(jnp.sum(pos), 1.0)
            target = encode_boxes(boxes[matched], anchors)
            diff = reg - target
            if self.options.get("regression", "squared") == "smooth_l1":
                ad = jnp.abs(diff)
                elem = jnp.where(ad < 1.0 / 9, 0.5 * 9 * ad ** 2, ad - 0.5 / 9)
            else:
                elem = diff ** 2
            reg_loss = jnp.sum(elem.sum(-1) * pos) / n_pos
            obj_loss = jnp.sum(focal_loss(obj, pos) * care) / n_pos
            return reg_loss, obj_loss

        reg_l, obj_l = jax.vmap(per_image)(out["regression"].astype(jnp.float32),
                                           out["objectness"].astype(jnp.float32),
                                           batch["boxes"], batch["box_valid"])
        w = batch["box_weight"]
        reg_m, obj_m = _masked_mean(reg_l, w), _masked_mean(obj_l, w)
        l2 = jnp.float32(0.0)
        coef = float(self.options.get("l2", 1e-4))
        if coef and model is not None:
            subnet = model.box_head.box_subnet
            kernels = [c.kernel[...] for c in subnet.convs] + [subnet.out.kernel[...]]
            l2 = coef * sum(jnp.sum(k.astype(jnp.float32) ** 2) for k in kernels)
        return reg_m + obj_m + l2, {"regression": reg_m, "objectness": obj_m, "l2": l2,
                                    "n": jnp.sum(w)}

    def eval_outputs(self, outputs, batch, model=None):
        from covidmt_jax.models.heads import detect
        out = outputs[self.name]
        anchors = self._anchors(model, batch["image"].shape[1:3])
        det = detect(jnp.asarray(out["regression"]), jnp.asarray(out["objectness"]), anchors,
                     score_threshold=float(self.options.get("score_threshold", 0.3)))
        keep = np.asarray(batch["box_weight"]) > 0
        boxes, scores, valid = (np.asarray(det[k]) for k in ("boxes", "scores", "valid"))
        gt, gt_valid = np.asarray(batch["boxes"]), np.asarray(batch["box_valid"]) > 0
        rows = np.flatnonzero(keep)
        return {"pred_boxes": [boxes[i][valid[i]] for i in rows],
                "pred_scores": [scores[i][valid[i]] for i in rows],
                "gt_boxes": [gt[i][gt_valid[i]] for i in rows]}

    def summarize(self, collected):
        from covidmt_jax import metrics
        return {"map": float(metrics.rsna_map(collected["pred_boxes"], collected["pred_scores"],
                                              collected["gt_boxes"]))}


class SegmentationTask(Task):
    """Lung masks: soft Dice + binary cross-entropy on ``outputs[name]`` logits
    ``[B, H, W, 1]`` vs ``batch["mask"]``; Dice at 0.5 for evaluation."""
    kind = "segmentation"

    def loss(self, outputs, batch, model=None):
        from covidmt_jax.metrics import soft_dice_loss
        logits = outputs[self.name].astype(jnp.float32)
        y = batch["mask"].astype(jnp.float32)
        bce = jnp.mean(jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits))),
                       axis=(1, 2, 3))
        dice = soft_dice_loss(logits[..., 0], y[..., 0])
        w = batch.get("mask_weight", jnp.ones(logits.shape[0], jnp.float32))
        return _masked_mean(bce + dice, w), {"bce": _masked_mean(bce, w), "dice_loss": _masked_mean(dice, w)}

    def eval_outputs(self, outputs, batch, model=None):
        from covidmt_jax.metrics import dice
        prob = 1.0 / (1.0 + np.exp(-np.asarray(outputs[self.name], np.float32)))
        return {"dice": np.asarray(dice(prob[..., 0], np.asarray(batch["mask"])[..., 0] > 0.5))}

    def summarize(self, collected):
        return {"dice": float(np.mean(collected["dice"]))}


TASK_KINDS: dict[str, type[Task]] = {c.kind: c for c in (ClassificationTask, BoxTask, SegmentationTask)}


def build_tasks(specs: Sequence[TaskSpec | str | Mapping[str, str]],
                options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Task]:
    """Task objects for ``specs``; classification tasks get their ``labels`` column in order."""
    options = options or {}
    out, col = [], 0
    for spec in tasks_from_names(specs):
        column = None
        if spec.kind == "classification":
            column, col = col, col + 1
        out.append(TASK_KINDS[spec.kind](spec, column, **dict(options.get(spec.name, {}))))
    return out


def total_loss(tasks: Sequence[Task], outputs: Mapping[str, Any], batch: Mapping[str, jax.Array],
               model: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 5: mean over tasks of each task's mean loss. Returns ``(loss, {task: loss, ...})``."""
    per_task = {}
    aux = {}
    for t in tasks:
        loss, extra = t.loss(outputs, batch, model)
        per_task[t.name] = loss
        aux.update({f"{t.name}/{k}": v for k, v in extra.items()})
    total = sum(per_task.values()) / len(per_task)
    return total, {**{f"{k}/loss": v for k, v in per_task.items()}, **aux}
