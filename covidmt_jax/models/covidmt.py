"""COVIDMT: one base network shared by all tasks, plus task heads (Antony et al. 2023, Fig. 5).

Tasks come from configuration (``TaskSpec``s), not code: classification tasks are grouped by
their source dataset and each group gets one :class:`ClassificationHead` whose outputs are
that group's tasks (NIH's four findings share one head; COVIDx's COVID-19 task has its own);
a ``box`` task adds the FPN + RetinaNet :class:`BoxHead` (RSNA pneumonia boxes;
``box_head_norm="group"`` adds GroupNorm to its subnets, default "none" as in the paper).

Output of ``model(x)`` for ``x [B, H, W, C]``::

    {"<classification task>": logits [B], ...,
     "<box task>": {"regression": [B, N_anchors, 4], "objectness": [B, N_anchors]}}

Grad-CAM uses the shared interface: ``features(x)["last_conv"]`` is the base network's last
conv stage and ``pool_and_classify(last_conv)`` returns ``[B, n_classification_tasks]`` logits
in ``classification_tasks`` order.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from covidmt_jax.models.base import Backbone
from covidmt_jax.models.heads import BoxHead, ClassificationHead, make_anchors
from covidmt_jax.models.registry import create, register
from covidmt_jax.taskspec import PAPER_TASKS, TaskSpec, tasks_from_names


class COVIDMT(Backbone):
    """Multi-task network; see the module docstring."""

    def __init__(self, *, tasks: Sequence[TaskSpec | str | dict] = PAPER_TASKS,
                 backbone: str = "resnext50_32x4d", in_channels: int = 1,
                 transition_channels: Sequence[int] = (256,), fpn_channels: int = 256,
                 anchor_sizes: Sequence[float] = (32.0, 64.0, 128.0), box_head_norm: str = "none",
                 num_classes: int = 0, dtype: Any = jnp.float32, rngs: nnx.Rngs,
                 **backbone_kwargs: Any):
        del num_classes  # outputs are defined by the tasks
        self.tasks = tuple(tasks_from_names(tasks))
        if not self.tasks:
            raise ValueError("COVIDMT needs at least one task")
        self.in_channels = in_channels
        self.backbone = create(backbone, num_classes=0, in_channels=in_channels, dtype=dtype,
                               rngs=rngs, **backbone_kwargs)
        self.backbone_name = backbone
        self.feature_channels = dict(self.backbone.feature_channels)
        self.classification_tasks = tuple(t.name for t in self.tasks if t.kind == "classification")
        groups: dict[str, list[str]] = {}
        for t in self.tasks:
            if t.kind == "classification":
                groups.setdefault(t.dataset, []).append(t.name)
        self.groups = {g: tuple(names) for g, names in groups.items()}
        self.heads = nnx.Dict({g: ClassificationHead(self.feature_channels["last_conv"], len(names),
                                                     transition_channels=transition_channels,
                                                     dtype=dtype, rngs=rngs)
                               for g, names in self.groups.items()})
        box_tasks = [t.name for t in self.tasks if t.kind == "box"]
        if len(box_tasks) > 1:
            raise ValueError(f"COVIDMT supports one box task, got {box_tasks}")
        self.box_task = box_tasks[0] if box_tasks else None
        self.anchor_sizes = tuple(anchor_sizes)
        self.box_head = (BoxHead([self.feature_channels[k] for k in ("c3", "c4", "c5")],
                                 channels=fpn_channels, norm=box_head_norm, dtype=dtype, rngs=rngs)
                         if self.box_task else None)
        self.num_classes = len(self.classification_tasks)

    def torch_import_target(self) -> nnx.Module:
        """ImageNet weights go into the shared base network."""
        return self.backbone

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        return self.backbone.features(x)

    def pool_and_classify(self, last_conv: jax.Array) -> jax.Array:
        """``[B, h, w, C] -> [B, n_classification_tasks]`` logits (``classification_tasks`` order)."""
        if not self.classification_tasks:
            raise ValueError("this COVIDMT has no classification task")
        per_group = {g: self.heads[g](last_conv) for g in self.groups}
        cols = {name: per_group[g][:, j] for g, names in self.groups.items() for j, name in enumerate(names)}
        return jnp.stack([cols[n] for n in self.classification_tasks], axis=1)

    def __call__(self, x: jax.Array) -> dict[str, Any]:
        self._check_input(x)
        feats = self.features(x)
        out: dict[str, Any] = {}
        if self.classification_tasks:
            logits = self.pool_and_classify(feats["last_conv"])
            out.update({n: logits[:, i] for i, n in enumerate(self.classification_tasks)})
        if self.box_head is not None:
            out[self.box_task] = self.box_head(feats)
        return out

    def task_weight_norms(self) -> dict[str, jax.Array]:
        """``{box task: sum of squared box-regression kernels}`` (the paper's R(f^bbox), which
        ``tasks.BoxTask`` scales by its ``l2`` option); empty without a box task."""
        if self.box_head is None:
            return {}
        return {self.box_task: self.box_head.regression_weight_norm()}

    def anchors(self, image_hw: Sequence[int]) -> np.ndarray:
        """Anchors ``[N_anchors, 4]`` matching the box head's output for inputs of ``image_hw``."""
        graphdef, state = nnx.split(self.backbone)  # trace a copy: no state is touched
        shapes = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x), state,
                                jax.ShapeDtypeStruct((1, *image_hw, self.in_channels), jnp.float32))
        level_hw = [tuple(shapes[k].shape[1:3]) for k in ("c3", "c4", "c5")]
        strides = [image_hw[0] / h for h, _ in level_hw]
        return make_anchors(image_hw, strides=strides, sizes=self.anchor_sizes, level_hw=level_hw)


@register("covidmt")
def covidmt(**kw: Any) -> COVIDMT:
    """COVIDMT (``tasks=``, ``backbone=`` e.g. ``"resnext50_32x4d"`` or ``"resnet50"``)."""
    return COVIDMT(**kw)
