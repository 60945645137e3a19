"""Task heads of COVIDMT: classification head, FPN + RetinaNet box head, anchors, decoding, NMS.

Box conventions: boxes are ``xyxy`` in pixels of the network input; anchors are laid out
level by level (P3, P4, P5), then row-major over positions, then the ``A`` anchors of each
position (ratios outer, scales inner), so a head output ``[B, h, w, A * k]`` reshapes to
``[B, h * w * A, k]`` in anchor order. Regression targets use the standard R-CNN encoding
``(dx, dy, dw, dh)`` with unit ``BOX_CODER_WEIGHTS`` (RetinaNet's; Faster R-CNN's 10/10/5/5
would scale the squared-error box loss by ~100 and let it swamp the other tasks' gradients).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from covidmt_jax.models.layers import ConvBN, conv2d, conv_general_dilated, global_avg_pool, linear, resize_to

BOX_CODER_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
#: ``norm`` choices of the box subnets: the paper's RetinaNet head, or GroupNorm in its hidden convs
BOX_HEAD_NORMS = ("none", "group")
_BBOX_CLIP = math.log(1000.0 / 16)


class ClassificationHead(nnx.Module):
    """Transition conv(s) -> global average pooling -> dense: multi-label sigmoid logits.

    ``[B, h, w, in_ch] -> [B, num_outputs]`` raw logits (apply a sigmoid for probabilities).
    """

    def __init__(self, in_ch: int, num_outputs: int, *, transition_channels: Sequence[int] = (256,),
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        convs, c = [], in_ch
        for t in transition_channels:
            convs.append(ConvBN(c, t, 3, dtype=dtype, rngs=rngs))
            c = t
        self.transition = nnx.List(convs)
        self.fc = linear(c, num_outputs, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.transition:
            x = conv(x)
        return self.fc(global_avg_pool(x)).astype(jnp.float32)


class FPN(nnx.Module):
    """Feature pyramid (Lin et al. 2017) over ``c3, c4, c5``: three times lateral conv ->
    add the upsampled coarser level -> smoothing conv. Returns ``[p3, p4, p5]``, each
    ``[B, h_l, w_l, channels]`` at strides 8, 16, 32.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 256, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.lateral = nnx.List([conv2d(c, channels, 1, padding=0, bias=True, dtype=dtype, rngs=rngs)
                                 for c in in_channels])
        self.smooth = nnx.List([conv2d(channels, channels, 3, bias=True, dtype=dtype, rngs=rngs)
                                for _ in in_channels])

    def __call__(self, feats: Sequence[jax.Array]) -> list[jax.Array]:
        outs: list[jax.Array] = []
        top = None
        for i in reversed(range(len(feats))):
            lat = self.lateral[i](feats[i])
            if top is not None:
                lat = lat + resize_to(top, lat.shape[1:3])
            top = lat
            outs.append(self.smooth[i](lat))
        return outs[::-1]


class RetinaSubnet(nnx.Module):
    """Four (3x3 conv -> ReLU) then a final 3x3 conv to ``A * out_per_anchor`` channels,
    shared over pyramid levels. ``[B, h, w, C] -> [B, h * w * A, out_per_anchor]``.
    Kernels ~ N(0, (0.01 * sqrt(256 / C))**2) (RetinaNet's N(0, 0.01) at C = 256), biases 0
    except the final conv's (``prior_bias``). ``norm="group"`` puts GroupNorm (``min(32, C // 4)``
    groups, shared over levels like the convs) between each hidden conv and its ReLU, as in
    torchvision's RetinaNet v2 head: conv -> GroupNorm -> ReLU.
    """

    def __init__(self, channels: int, num_anchors: int, out_per_anchor: int, *, n_convs: int = 4,
                 prior_bias: float = 0.0, norm: str = "none", dtype: Any = jnp.float32, rngs: nnx.Rngs):
        # RetinaNet's N(0, 0.01) kernels give each 3x3 conv a gain of 0.01 * sqrt(9 * 256) ~ 0.48
        # at its 256 channels; a narrower head keeps that gain (std 0.01 * sqrt(256 / channels)),
        # else the signal through the five convs shrinks like (0.01 * sqrt(9 C)) ** 5 (1e-4 at
        # 32 channels) and the head starts learning only after a long plateau whose end moves
        # with floating-point order. At 256 channels (the paper's head) this is N(0, 0.01).
        init = nnx.initializers.normal(0.01 * math.sqrt(256 / channels))
        self.convs = nnx.List([nnx.Conv(channels, channels, (3, 3), padding=((1, 1), (1, 1)),
                                        kernel_init=init, dtype=dtype, param_dtype=jnp.float32,
                                        conv_general_dilated=conv_general_dilated, rngs=rngs)
                                for _ in range(n_convs)])
        if norm not in BOX_HEAD_NORMS:
            raise ValueError(f"RetinaSubnet norm must be one of {BOX_HEAD_NORMS}, got {norm!r}")
        self.norms = nnx.List([nnx.GroupNorm(channels, num_groups=min(32, channels // 4), epsilon=1e-5,
                                             dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
                               for _ in range(n_convs)] if norm == "group" else [])
        self.out = nnx.Conv(channels, num_anchors * out_per_anchor, (3, 3), padding=((1, 1), (1, 1)),
                            kernel_init=init, bias_init=nnx.initializers.constant(prior_bias),
                            dtype=dtype, param_dtype=jnp.float32,
                            conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.out_per_anchor = out_per_anchor

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms:
                x = self.norms[i](x)
            x = nnx.relu(x)
        x = self.out(x)
        return x.reshape(x.shape[0], -1, self.out_per_anchor).astype(jnp.float32)


class BoxHead(nnx.Module):
    """RSNA box head: FPN, a box-regression subnet and an objectness subnet.

    ``{"c3", "c4", "c5"} -> {"regression": [B, N_anchors, 4], "objectness": [B, N_anchors]}``.
    ``norm``: "none" (the paper's RetinaNet subnets) or "group" (GroupNorm in both subnets'
    hidden convs; keeps long trainings from scratch from stalling, see the README's demo notes).
    """

    def __init__(self, in_channels: Sequence[int], *, channels: int = 256, num_anchors: int = 9,
                 prior_prob: float = 0.01, norm: str = "none", dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.fpn = FPN(in_channels, channels, dtype=dtype, rngs=rngs)
        self.box_subnet = RetinaSubnet(channels, num_anchors, 4, norm=norm, dtype=dtype, rngs=rngs)
        self.objectness_subnet = RetinaSubnet(channels, num_anchors, 1,
                                              prior_bias=-math.log((1 - prior_prob) / prior_prob),
                                              norm=norm, dtype=dtype, rngs=rngs)

    def regression_weight_norm(self) -> jax.Array:
        """Sum of squared conv kernels of the box-regression subnet (float32 scalar)."""
        kernels = [c.kernel[...] for c in self.box_subnet.convs] + [self.box_subnet.out.kernel[...]]
        return sum(jnp.sum(k.astype(jnp.float32) ** 2) for k in kernels)

    def __call__(self, feats: dict[str, jax.Array]) -> dict[str, jax.Array]:
        levels = self.fpn([feats["c3"], feats["c4"], feats["c5"]])
        reg = jnp.concatenate([self.box_subnet(p) for p in levels], axis=1)
        obj = jnp.concatenate([self.objectness_subnet(p) for p in levels], axis=1)
        return {"regression": reg, "objectness": obj[..., 0]}


# --------------------------------------------------------------------------- anchors & boxes

def level_shapes(image_hw: Sequence[int], strides: Sequence[int] = (8, 16, 32)) -> list[tuple[int, int]]:
    """Feature-map sizes of the pyramid levels for an input ``image_hw`` (ceil division,
    as the backbones' padded stride-2 convs produce)."""
    return [(-(-image_hw[0] // s), -(-image_hw[1] // s)) for s in strides]


def make_anchors(image_hw: Sequence[int], *, strides: Sequence[int] = (8, 16, 32),
                 sizes: Sequence[float] = (32.0, 64.0, 128.0),
                 ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
                 level_hw: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """Anchors ``[N, 4]`` xyxy in input pixels: per level ``len(ratios) * len(scales)`` anchors
    centred on each feature-map cell (ratio = height / width). ``level_hw`` overrides the
    feature-map sizes (pass the head's actual sizes when a backbone rounds differently)."""
    level_hw = level_hw or level_shapes(image_hw, strides)
    out = []
    for (h, w), stride, size in zip(level_hw, strides, sizes):
        base = []
        for r in ratios:
            for s in scales:
                area = (size * s) ** 2
                bw = math.sqrt(area / r)
                bh = bw * r
                base.append((-bw / 2, -bh / 2, bw / 2, bh / 2))
        base = np.asarray(base, np.float32)  # [A, 4]
        cy, cx = np.meshgrid((np.arange(h) + 0.5) * stride, (np.arange(w) + 0.5) * stride, indexing="ij")
        centres = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
        out.append((centres + base[None]).reshape(-1, 4))
    return np.concatenate(out, axis=0).astype(np.float32)


def num_anchors_per_position(ratios: Sequence[float] = (0.5, 1.0, 2.0),
                             scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))) -> int:
    return len(ratios) * len(scales)


def _centre_size(boxes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """xyxy ``[..., 4]`` -> (centre x, centre y, width, height)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_boxes(boxes: jax.Array, anchors: jax.Array) -> jax.Array:
    """Regression targets ``[..., 4]`` of ``boxes`` w.r.t. ``anchors`` (both xyxy)."""
    wx, wy, ww, wh = BOX_CODER_WEIGHTS
    ax, ay, aw, ah = _centre_size(anchors)
    bw = jnp.maximum(boxes[..., 2] - boxes[..., 0], 1e-3)
    bh = jnp.maximum(boxes[..., 3] - boxes[..., 1], 1e-3)
    bx = boxes[..., 0] + 0.5 * bw
    by = boxes[..., 1] + 0.5 * bh
    return jnp.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah,
                      ww * jnp.log(bw / aw), wh * jnp.log(bh / ah)], axis=-1)


def decode_boxes(deltas: jax.Array, anchors: jax.Array) -> jax.Array:
    """Inverse of :func:`encode_boxes`: ``[..., 4]`` deltas -> xyxy boxes in input pixels."""
    wx, wy, ww, wh = BOX_CODER_WEIGHTS
    ax, ay, aw, ah = _centre_size(anchors)
    cx = deltas[..., 0] / wx * aw + ax
    cy = deltas[..., 1] / wy * ah + ay
    w = jnp.exp(jnp.minimum(deltas[..., 2] / ww, _BBOX_CLIP)) * aw
    h = jnp.exp(jnp.minimum(deltas[..., 3] / wh, _BBOX_CLIP)) * ah
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def pairwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """IoU ``[N, M]`` of xyxy boxes ``a [N, 4]`` and ``b [M, 4]`` (0 where the union is empty)."""
    area_a = jnp.clip(a[:, 2] - a[:, 0], 0) * jnp.clip(a[:, 3] - a[:, 1], 0)
    area_b = jnp.clip(b[:, 2] - b[:, 0], 0) * jnp.clip(b[:, 3] - b[:, 1], 0)
    lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
    rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = jnp.clip(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def match_anchors(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array, *,
                  pos_iou: float = 0.5, neg_iou: float = 0.4) -> tuple[jax.Array, jax.Array]:
    """RetinaNet anchor assignment for one image.

    Args: ``anchors [N, 4]``, ``gt_boxes [M, 4]`` xyxy, ``gt_valid [M]`` (padding = 0).
    Returns ``(matched_gt [N] int, label [N])`` with label 1 (IoU >= pos_iou, or the best
    anchor of a ground-truth box), 0 (max IoU < neg_iou, background) or -1 (ignored).
    """
    iou = pairwise_iou(anchors, gt_boxes)  # [N, M]
    iou = jnp.where(gt_valid[None, :] > 0, iou, -1.0)
    best_gt = jnp.argmax(iou, axis=1)
    best_iou = jnp.max(iou, axis=1)
    label = jnp.where(best_iou >= pos_iou, 1, jnp.where(best_iou < neg_iou, 0, -1))
    # low-quality matches: each valid GT keeps its best anchor(s) as positives
    gt_best = jnp.max(iou, axis=0)  # [M]
    is_best = (iou == gt_best[None, :]) & (gt_valid[None, :] > 0) & (gt_best[None, :] > 0)
    forced = jnp.any(is_best, axis=1)
    forced_gt = jnp.argmax(is_best, axis=1)
    label = jnp.where(forced, 1, label)
    matched = jnp.where(forced, forced_gt, best_gt)
    return matched, label


def nms(boxes: jax.Array, scores: jax.Array, *, iou_threshold: float = 0.5,
        max_output: int = 10, score_threshold: float = -jnp.inf) -> tuple[jax.Array, jax.Array]:
    """Greedy non-maximum suppression with static shapes (jit-able).

    ``boxes [N, 4]``, ``scores [N]`` -> ``(indices [max_output], valid [max_output])``: indices
    into the inputs in descending score order; ``valid`` is False for padding slots.
    """
    n = boxes.shape[0]
    order = jnp.argsort(-scores)
    b = boxes[order]
    s = scores[order]
    iou = pairwise_iou(b, b)
    keep0 = s > score_threshold
    idx = jnp.arange(n)

    def body(i, keep):
        suppress = keep[i] & (iou[i] > iou_threshold) & (idx > i)
        return keep & ~suppress

    keep = jax.lax.fori_loop(0, n, body, keep0)
    rank = jnp.where(keep, idx, n + idx)  # kept first, in score order
    sel = jnp.argsort(rank)[:max_output]
    valid = keep[sel]
    return order[sel], valid


def detect(regression: jax.Array, objectness: jax.Array, anchors: jax.Array, *,
           score_threshold: float = 0.05, iou_threshold: float = 0.5, pre_nms_topk: int = 1000,
           max_detections: int = 10) -> dict[str, jax.Array]:
    """Decode a box head's output into detections (batched, jit-able).

    ``regression [B, N, 4]``, ``objectness [B, N]`` logits, ``anchors [N, 4]`` ->
    ``{"boxes": [B, K, 4], "scores": [B, K], "valid": [B, K]}`` with K = ``max_detections``.
    """
    k = min(pre_nms_topk, anchors.shape[0])

    def one(reg, obj):
        probs = jax.nn.sigmoid(obj)
        top_scores, top_idx = jax.lax.top_k(probs, k)
        boxes = decode_boxes(reg[top_idx], anchors[top_idx])
        sel, valid = nms(boxes, top_scores, iou_threshold=iou_threshold, max_output=max_detections,
                         score_threshold=score_threshold)
        return boxes[sel], jnp.where(valid, top_scores[sel], 0.0), valid

    boxes, scores, valid = jax.vmap(one)(regression, objectness)
    return {"boxes": boxes, "scores": scores, "valid": valid}
