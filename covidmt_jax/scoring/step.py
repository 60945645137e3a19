"""The fused scoring step: lung masks once per image, then per classifier probability,
Grad-CAM of the predicted decision and IOL, in ONE jitted program per batch.

Definitions (SPEC.md):

- prob = sigmoid of the COVID logit (``activation="sigmoid"``) or its softmax probability
  (``"softmax"``); decision = ``prob >= threshold``.
- Grad-CAM target = the predicted decision, given to :func:`covidmt_jax.explain.gradcam` as its
  ``cotangent`` hook (:func:`decision_cotangent`). Sigmoid heads follow pytorch-grad-cam's
  ``BinaryClassifierOutputTarget``: the CAM of ``+logit`` for a positive decision, of
  ``-logit`` for a negative one. Softmax heads: the COVID column when positive, otherwise the
  highest-scoring other class.
- IOL at the MODEL INPUT resolution: lung probabilities are predicted at the U-Net's own input
  size and resized (bilinear) to it; H = ``cam >= cam_threshold``, L = ``prob >= 0.5``
  (:func:`covidmt_jax.metrics.iol`; an empty H gives NaN).

Several lung conventions (``{name: LungSegmenter}``, the first the default) give per-convention
outputs with the suffix of :func:`covidmt_jax.scoring.rows.convention_suffix`: ``lung_frac``,
``iol`` for the default, ``lung_frac_<name>``, ``iol_<name>`` for the others.

Lung-mask QC (:mod:`covidmt_jax.lung_qc`) of the default convention's map, every image: the
step counts pixels on the device (:func:`lung_qc_outputs`: lung, uncertain-band and "lung-ish"
pixels, and with both the ``fields`` and ``anatomical`` conventions their overlap) and returns
the boolean mask; the host counts its large connected components and applies the flag decision
(:func:`qc_results`), which gives exactly :func:`covidmt_jax.lung_qc.mask_qc` of the same map.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from covidmt_jax import explain, metrics, parallel
from covidmt_jax import lung_qc
from covidmt_jax.config_lib import ConfigError
from covidmt_jax.lungs import LungSegmenter
from covidmt_jax.scoring.loading import DEFAULT_LUNGS, Head
from covidmt_jax.scoring.rows import convention_suffix


def covid_probability(logits: jax.Array, head: Head) -> jax.Array:
    """``[B, N]`` logits -> COVID probability ``[B]`` (float32)."""
    logits = logits.astype(jnp.float32)
    if head.activation == "sigmoid":
        return jax.nn.sigmoid(logits[:, head.column])
    return jax.nn.softmax(logits, axis=1)[:, head.column]


def decision_cotangent(logits: jax.Array, head: Head) -> jax.Array:
    """``[B, N]`` logits -> ``[B, N]`` Grad-CAM cotangent of the predicted decision (module doc)."""
    logits = logits.astype(jnp.float32)
    n, c = logits.shape[1], head.column
    prob = covid_probability(logits, head)
    if head.activation == "sigmoid":
        sign = jnp.where(prob >= head.threshold, 1.0, -1.0)
        return jax.nn.one_hot(jnp.full(prob.shape, c), n) * sign[:, None]
    other = jnp.argmax(jnp.where(jnp.arange(n) == c, -jnp.inf, logits), axis=1)
    return jax.nn.one_hot(jnp.where(prob >= head.threshold, c, other), n)


def classifier_cams(model: nnx.Module, x: jax.Array, head: Head, method: str = "gradcam"
                    ) -> tuple[jax.Array, jax.Array]:
    """``[B, H, W, 1]`` normalised grey images -> (COVID prob ``[B]``, CAM ``[B, H, W]`` in
    [0, 1]) of the predicted decision. Grey images are replicated for 3-channel models."""
    if head.in_channels == 3 and x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    cams, logits = explain.gradcam(model, x, method=method, return_logits=True,
                                   cotangent=functools.partial(decision_cotangent, head=head))
    return covid_probability(logits, head), cams


def lung_probabilities(unet: nnx.Module, x: jax.Array, lung_size: int) -> jax.Array:
    """``[B, S, S, 1]`` normalised images -> ``[B, S, S]`` lung probabilities: the U-Net runs at
    its own input size ``lung_size`` (bilinear resize in and out when it differs from S)."""
    hw = x.shape[1:3]
    xi = x[..., 0]
    if hw != (lung_size, lung_size):
        xi = explain.resize_bilinear(xi, (lung_size, lung_size))
    in_ch = getattr(unet, "in_channels", 1)
    xi = jnp.repeat(xi[..., None], in_ch, axis=-1)
    probs = jax.nn.sigmoid(unet(xi).astype(jnp.float32))[..., 0]
    return explain.resize_bilinear(probs, hw) if hw != (lung_size, lung_size) else probs


def qc_convention_pair(conventions: tuple[str, ...]) -> tuple[str, str] | None:
    """Output suffixes ``(fields, anatomical)`` of the two conventions the ``disagreement`` flag
    compares, or None when the job does not run both."""
    if "fields" in conventions and "anatomical" in conventions:
        return tuple(convention_suffix(conventions.index(c), c) for c in ("fields", "anatomical"))
    return None


def lung_qc_outputs(prob: jax.Array, fields: jax.Array | None = None,
                    anatomical: jax.Array | None = None,
                    thresholds: lung_qc.QCThresholds = lung_qc.DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """Device half of the lung-mask QC (jittable): ``prob [N, H, W]`` the default convention's
    probabilities, ``fields`` / ``anatomical`` ``[N, H, W]`` boolean masks of the two
    conventions (both or neither). Returns ``{"qc_counts": lung_qc.map_counts ([N] int32 each),
    "lung_mask": [N, H, W] bool}`` plus ``"qc_conventions"`` (:func:`lung_qc.convention_counts`)
    with the two masks."""
    out = {"qc_counts": lung_qc.map_counts(prob, thresholds, xp=jnp), "lung_mask": prob >= 0.5}
    if fields is not None:
        out["qc_conventions"] = lung_qc.convention_counts(fields, anatomical, xp=jnp)
    return out


def qc_results(out: Mapping[str, Any], thresholds: lung_qc.QCThresholds = lung_qc.DEFAULT_THRESHOLDS
               ) -> list[dict[str, Any]]:
    """Host half: :func:`lung_qc_outputs` (as numpy, ``N`` images) -> one
    :func:`covidmt_jax.lung_qc.mask_qc`-style result per image (components counted here)."""
    mask = np.asarray(out["lung_mask"], bool)
    conv = out.get("qc_conventions")
    size = int(mask.shape[1] * mask.shape[2])
    return [lung_qc.qc_result({k: v[i] for k, v in out["qc_counts"].items()}, size,
                              lung_qc.large_components(mask[i], thresholds),
                              None if conv is None else {k: v[i] for k, v in conv.items()},
                              thresholds=thresholds)
            for i in range(len(mask))]


def make_score_step(graphdefs: Mapping[str, Any], heads: Mapping[str, Head],
                    lung_graphdefs: Mapping[str, tuple[Any, int]], *, method: str = "gradcam",
                    cam_threshold: float = 0.5, return_maps: bool = False,
                    qc_thresholds: lung_qc.QCThresholds = lung_qc.DEFAULT_THRESHOLDS) -> Callable:
    """The fused per-batch function (not yet jitted; see :func:`compiled_step`).

    ``step(states, lung_states, x)`` with ``x`` ``[N, S, S, 1]`` (originals and transmitted
    images together) returns ``{"lung_frac": [N], name: {"prob", "iol", "heat_frac": [N]}}``
    plus ``lung_frac_<c>`` / ``iol_<c>`` for every further lung convention ``c``, and the QC
    outputs of the default convention (:func:`lung_qc_outputs`: ``"qc_counts"``,
    ``"lung_mask"`` ``[N, S, S]`` bool, ``"qc_conventions"`` with fields and anatomical); with
    ``return_maps`` also ``"lung_prob[_<c>]"`` ``[N, S, S]`` and ``name: {"cam": [N, S, S]}``.
    ``lung_graphdefs``: ``{convention: (graphdef, U-Net input size)}``. Lung masks are computed
    once per convention and shared by all classifiers.
    """
    names = tuple(graphdefs)
    conventions = tuple(lung_graphdefs)
    qc_pair = qc_convention_pair(conventions)

    def step(states, lung_states, x):
        out: dict[str, Any] = {}
        masks = {}
        for i, conv in enumerate(conventions):
            sfx = convention_suffix(i, conv)
            graphdef, size = lung_graphdefs[conv]
            lung = lung_probabilities(nnx.merge(graphdef, lung_states[conv]), x, size)
            masks[sfx] = lung >= 0.5
            out[f"lung_frac{sfx}"] = jnp.mean(masks[sfx], axis=(1, 2), dtype=jnp.float32)
            if i == 0:
                default_prob = lung
            if return_maps:
                out[f"lung_prob{sfx}"] = lung
        out.update(lung_qc_outputs(default_prob, *(masks[s] for s in qc_pair or ()),
                                   thresholds=qc_thresholds))
        for name in names:
            model = nnx.merge(graphdefs[name], states[name])
            prob, cams = classifier_cams(model, x, heads[name], method)
            res = {"prob": prob,
                   "heat_frac": jnp.mean(cams >= cam_threshold, axis=(1, 2), dtype=jnp.float32)}
            for sfx, mask in masks.items():
                res[f"iol{sfx}"] = metrics.iol(cams, mask, cam_threshold)
            if return_maps:
                res["cam"] = cams
            out[name] = res
        return out

    return step


def compiled_step(graphdefs: Mapping[str, Any], heads: Mapping[str, Head],
                  lung_graphdefs: Mapping[str, tuple[Any, int]], mesh, *, method: str = "gradcam",
                  cam_threshold: float = 0.5, return_maps: bool = False,
                  qc_thresholds: lung_qc.QCThresholds = lung_qc.DEFAULT_THRESHOLDS) -> Callable:
    """:func:`make_score_step` under ``jax.jit`` with explicit shardings: states replicated,
    images and outputs split over the mesh's ``data`` axis; several processes compile it,
    then start its first run together (:class:`parallel.CompiledTogether`)."""
    step = make_score_step(graphdefs, heads, lung_graphdefs, method=method,
                           cam_threshold=cam_threshold, return_maps=return_maps,
                           qc_thresholds=qc_thresholds)
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return parallel.CompiledTogether(jax.jit(step, in_shardings=(rep, rep, data), out_shardings=data),
                                     "score step" + (" with maps" if return_maps else ""))


class Scorer:
    """Classifiers + lung U-Net(s) on a mesh; ``scorer(originals, transmitted)`` -> numpy outputs.

    ``classifiers``: ``{name: (model, Head)}``; ``lungs``: ``{convention: LungSegmenter}`` (the
    first is the default) or one ``LungSegmenter``. ``originals`` / ``transmitted``: normalised
    ``[b, S, S, 1]`` host arrays (this process's share of the global batch; ``b`` is padded to
    the step's fixed local batch). Returns per side ``{"lung_frac": [b], "qc": [b results of
    :func:`qc_results`], name: {"prob", "iol", "heat_frac"}}`` (see :func:`make_score_step`;
    ``return_maps`` adds CAMs and lung probabilities).
    """

    def __init__(self, classifiers: Mapping[str, tuple[nnx.Module, Head]],
                 lungs: Mapping[str, LungSegmenter] | LungSegmenter, image_size: int,
                 batch_size: int, *, method: str = "gradcam", cam_threshold: float = 0.5,
                 mesh=None, qc_thresholds: lung_qc.QCThresholds = lung_qc.DEFAULT_THRESHOLDS):
        if isinstance(lungs, LungSegmenter):
            lungs = {DEFAULT_LUNGS: lungs}
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        n_data = self.mesh.shape[parallel.DATA]
        per_process = max(1, n_data // jax.process_count())
        self.local_batch = int(math.ceil(batch_size / per_process) * per_process)
        self.image_size = int(image_size)
        self.heads = {n: h for n, (_, h) in classifiers.items()}
        self.conventions = tuple(lungs)
        self.qc_thresholds = qc_thresholds
        graphdefs, states = {}, {}
        for n, (model, _) in classifiers.items():
            graphdefs[n], states[n] = nnx.split(model)
        lung_graphdefs, lung_states = {}, {}
        for conv, seg in lungs.items():
            size = int(seg.input_size)
            depth = int(getattr(seg.model, "depth", 0))
            if size % (2 ** depth):
                raise ConfigError(f"lung U-Net {conv!r}: input size {size} is not a multiple of "
                                  f"2**depth = {2 ** depth}")
            graphdef, lung_states[conv] = nnx.split(seg.model)
            lung_graphdefs[conv] = (graphdef, size)
        rep = parallel.replicated(self.mesh)
        self.states = parallel.put_global(states, rep, "classifier weights")
        self.lung_states = parallel.put_global(lung_states, rep, "lung segmenter weights")
        self.sharding = parallel.data_sharding(self.mesh)
        self._steps = {
            maps: compiled_step(graphdefs, self.heads, lung_graphdefs, self.mesh, method=method,
                                cam_threshold=float(cam_threshold), return_maps=maps,
                                qc_thresholds=qc_thresholds)
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
        out = parallel.local_rows(self._steps[bool(return_maps)](self.states, self.lung_states, xg))
        lb = self.local_batch
        sides = []
        for lo in (0, lb):
            side = jax.tree.map(lambda a, lo=lo: a[lo:lo + b], out)
            side["qc"] = qc_results(side, self.qc_thresholds)
            for key in ("qc_counts", "qc_conventions", "lung_mask"):
                side.pop(key, None)
            sides.append(side)
        return sides[0], sides[1]
