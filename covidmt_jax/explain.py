"""Grad-CAM family for zoo classifiers: pure, batched, jit-able functions of (model, images, targets).

Semantics equal pytorch-grad-cam (``GradCAM``, ``GradCAMPlusPlus``, ``HiResCAM``, v1.5) with one
target layer, no ``aug_smooth`` and no ``eigen_smooth``:

1. ``A = features(x)[layer]`` ``[B, h, w, C]``; ``y = output(pool_and_classify(A))`` ``[B, N]``
   RAW logits (no sigmoid / softmax); ``G = d y[b, t_b] / d A`` (one ``jax.vjp``; each image's
   gradient depends only on that image because BatchNorm runs on running statistics).
2. Channel weighting (``method``):

   - ``"gradcam"``: ``w_c = mean_{ij} G_ijc``; ``cam = sum_c w_c A_c``.
   - ``"gradcampp"``: ``a_ijc = G^2 / (2 G^2 + (sum_{ij} A_c) G^3 + 1e-6)`` (0 where ``G == 0``),
     ``w_c = sum_{ij} a_ijc relu(G_ijc)``; ``cam = sum_c w_c A_c``.
   - ``"hirescam"``: ``cam = sum_c G_c * A_c`` (element-wise, no spatial averaging).
3. ``cam = relu(cam)``; per image ``cam = (cam - min) / (1e-7 + max(cam - min))``.
4. Bilinear resize to the input size with OpenCV's ``cv2.resize(..., INTER_LINEAR)`` semantics
   (half-pixel centres, source coordinates clamped to the border, no anti-aliasing).
5. Per image min-max normalisation again, ``(r - min) / (1e-7 + max(r - min))`` (pytorch-grad-cam's
   ``aggregate_multi_layers``), giving ``[0, 1]`` maps. A flat CAM (e.g. a constant image, or a
   target whose evidence is all negative) gives all zeros, never NaN.

Targets (column indices into the ``[B, N]`` logits):

- ``None``: the predicted class, ``argmax`` of the logits (pytorch-grad-cam's default). For a
  single-logit (sigmoid) head, ``N == 1``, the predicted decision as pytorch-grad-cam's
  ``BinaryClassifierOutputTarget``: the CAM of ``+logit`` where ``logit >= 0`` (positive) and of
  ``-logit`` otherwise (evidence for the negative decision).
- an ``int``: that column for every image; an int array ``[B]``: one column per image.
- an int array ``[B, K]`` (multi-label / multi-task): a CAM per requested column, ``[B, K, H, W]``.
  Explicit targets always use the raw ``+logit`` of the column; for the negative evidence of a
  sigmoid head pass ``output=lambda z: -z``.

Out-of-range targets raise ``ValueError`` when they are concrete (eager calls); under ``jit`` they
cannot be checked, and JAX clamps the index.

Layers: ``layer=None`` / ``"last_conv"`` (the Grad-CAM layer of every zoo model), any key of
``features(x)`` that is the same array as ``last_conv`` (``"c5"`` on every zoo model), and any
other key of ``features(x)`` when the model exposes ``features_from(layer, act) -> dict`` that
recomputes the later features (at least ``"last_conv"``) from that stage's activation. Anything
else raises ``ValueError``.

Precision: the CAM arithmetic is float32 element-wise work (bfloat16 models are upcast after the
gradient). The model's own convolutions follow JAX's matmul precision; on GPUs that default may
use TF32, so wrap calls in ``jax.default_matmul_precision("highest")`` when comparing to a float32
reference.

Models: any zoo backbone (``features``, ``pool_and_classify``); ``output=`` selects the logit
matrix from ``pool_and_classify``'s result for models whose head returns something else (e.g. a
dict, or one task's columns of COVIDMT's ``[B, n_classification_tasks]``).
"""
from __future__ import annotations

import weakref
from functools import lru_cache
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

METHODS = ("gradcam", "gradcampp", "hirescam")
LAST_CONV = "last_conv"
_NORM_EPS = 1e-7   # pytorch_grad_cam.utils.image.scale_cam_image
_GPP_EPS = 1e-6    # pytorch_grad_cam.grad_cam_plusplus

Targets = None | int | Sequence[int] | Sequence[Sequence[int]] | np.ndarray | jax.Array


# ----------------------------------------------------------------------------- resize / scaling
@lru_cache(maxsize=64)
def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices ``i0, i1`` and weight ``f`` (``out = (1-f) in[i0] + f in[i1]``) of OpenCV's
    INTER_LINEAR along one axis: ``fx = float32((d + 0.5) * (src / dst) - 0.5)``, floored, and
    clamped to ``[0, src - 1]`` with a zero fraction at both borders."""
    scale = 1.0 / (float(dst) / float(src))
    fx = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    f = (fx - sx.astype(np.float32)).astype(np.float32)
    low, high = sx < 0, sx >= src - 1
    f = np.where(low | high, np.float32(0), f)
    sx = np.where(low, 0, np.where(high, src - 1, sx))
    return sx.astype(np.int32), np.minimum(sx + 1, src - 1).astype(np.int32), f


def resize_bilinear(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``[..., h, w] -> [..., H, W]`` as ``cv2.resize(m, (W, H), interpolation=INTER_LINEAR)``
    on float32 maps (horizontal pass, then vertical pass, as OpenCV does)."""
    h, w = maps.shape[-2:]
    H, W = size
    maps = maps.astype(jnp.float32)
    if (h, w) == (H, W):
        return maps
    i0, i1, f = _linear_taps(w, W)
    rows = jnp.take(maps, i0, axis=-1) * (1 - f) + jnp.take(maps, i1, axis=-1) * f
    j0, j1, g = _linear_taps(h, H)
    g = g[:, None]
    return jnp.take(rows, j0, axis=-2) * (1 - g) + jnp.take(rows, j1, axis=-2) * g


def minmax_normalise(maps: jax.Array) -> jax.Array:
    """Per-map ``(m - min) / (1e-7 + max(m - min))`` over the last two axes ``[..., H, W]``
    (pytorch-grad-cam's ``scale_cam_image``); a constant map becomes all zeros."""
    m = maps - jnp.min(maps, axis=(-2, -1), keepdims=True)
    return m / (_NORM_EPS + jnp.max(m, axis=(-2, -1), keepdims=True))


def cam_from_grads(acts: jax.Array, grads: jax.Array, method: str = "gradcam") -> jax.Array:
    """Raw (pre-ReLU, pre-resize) CAM ``[B, h, w]`` from activations and gradients ``[B, h, w, C]``."""
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {METHODS}")
    a = acts.astype(jnp.float32)
    g = grads.astype(jnp.float32)
    if method == "hirescam":
        return jnp.sum(g * a, axis=-1)
    if method == "gradcam":
        weights = jnp.mean(g, axis=(1, 2), keepdims=True)
    else:  # gradcampp, eq. 19 of Chattopadhyay et al. 2018 as in pytorch-grad-cam
        g2 = g * g
        g3 = g2 * g
        sum_a = jnp.sum(a, axis=(1, 2), keepdims=True)
        alpha = g2 / (2 * g2 + sum_a * g3 + _GPP_EPS)
        alpha = jnp.where(g != 0, alpha, 0.0)
        weights = jnp.sum(jnp.maximum(g, 0.0) * alpha, axis=(1, 2), keepdims=True)
    return jnp.sum(weights * a, axis=-1)


def finalize_cam(raw: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``[..., h, w]`` raw CAM -> ``[..., H, W]`` in ``[0, 1]``: ReLU, normalise, resize, normalise."""
    cam = minmax_normalise(jnp.maximum(raw.astype(jnp.float32), 0.0))
    return minmax_normalise(resize_bilinear(cam, size))


# ----------------------------------------------------------------------------- targets / layers
def _as_logits(y: Any, output: Callable | None) -> jax.Array:
    if output is not None:
        y = output(y)
    if not hasattr(y, "ndim"):
        raise ValueError(f"the classifier output is a {type(y).__name__}, not an array of logits; "
                         "pass output= to select the [B, N] logits")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ValueError(f"logits must be [B, N] (or [B]), got shape {tuple(y.shape)}")
    return y


def _normalise_targets(targets: Targets, batch: int) -> jax.Array | None:
    """``None`` or int targets -> ``None`` / int32 ``[B]`` / ``[B, K]``; checks shapes."""
    if targets is None:
        return None
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        return jnp.full((batch,), int(targets), jnp.int32)
    if not hasattr(targets, "dtype"):
        try:
            targets = np.asarray(targets)
        except ValueError as e:
            raise ValueError(f"targets must be rectangular ([B] or [B, K]): {e}") from None
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.ndim == 0:
        return jnp.full((batch,), targets, jnp.int32)
    if targets.ndim not in (1, 2) or targets.shape[0] != batch:
        raise ValueError(f"targets must be an int, [B] or [B, K] with B = {batch}, "
                         f"got shape {tuple(targets.shape)}")
    return jnp.asarray(targets, jnp.int32)


def _check_target_range(targets: jax.Array, n: int) -> None:
    if isinstance(targets, jax.core.Tracer):
        return
    t = np.asarray(targets)
    if t.size and (t.min() < 0 or t.max() >= n):
        raise ValueError(f"targets must be in [0, {n}) (the model has {n} outputs), "
                         f"got values in [{t.min()}, {t.max()}]")


def _logit_fn(model: nnx.Module, feats: dict, layer: str, output: Callable | None) -> Callable:
    """The function ``activation of layer -> [B, N] logits`` that is differentiated."""
    def head(last_conv):
        return _as_logits(model.pool_and_classify(last_conv), output)

    if layer == LAST_CONV or feats[layer] is feats[LAST_CONV]:
        return head
    if hasattr(model, "features_from"):
        def from_layer(act):
            return head(model.features_from(layer, act)[LAST_CONV])
        return from_layer
    raise ValueError(
        f"Grad-CAM layer {layer!r} is not supported by {type(model).__name__}: supported are "
        f"'last_conv' (and keys aliasing it), or any key of features(x) when the model defines "
        f"features_from(layer, act)")


# ----------------------------------------------------------------------------- the computation
def _cotangent(logits: jax.Array, targets: jax.Array | None, cotangent: Callable | None) -> jax.Array:
    """The weights of the logit columns whose gradient is taken: ``[B, N]`` or ``[B, K, N]``."""
    n_out = logits.shape[1]
    if cotangent is not None:
        cot = jnp.asarray(cotangent(logits))
        if cot.shape != logits.shape:
            raise ValueError(f"cotangent(logits) must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(cot.shape)}")
        return cot.astype(logits.dtype)
    if targets is None:
        if n_out == 1:  # BinaryClassifierOutputTarget(predicted decision)
            return jnp.where(logits >= 0, 1.0, -1.0).astype(logits.dtype)
        return jax.nn.one_hot(jnp.argmax(logits, axis=1), n_out, dtype=logits.dtype)  # argmax
    return jax.nn.one_hot(targets, n_out, dtype=logits.dtype)  # [B, N] or [B, K, N]


def _gradcam_traced(model: nnx.Module, images: jax.Array, targets: jax.Array | None, layer: str,
                    method: str, output: Callable | None, cotangent: Callable | None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(cams, raw, logits)``: the whole computation as one traceable function (checked
    arguments; ``targets`` already normalised)."""
    H, W = images.shape[1:3]
    feats = model.features(images)
    if layer not in feats:
        raise ValueError(f"unknown Grad-CAM layer {layer!r} for {type(model).__name__}; "
                         f"features(x) has {sorted(feats)}")
    act = feats[layer]
    logits, vjp_fn = jax.vjp(_logit_fn(model, feats, layer, output), act)
    cot = _cotangent(logits, targets, cotangent)
    if cot.ndim == 2:
        (grads,) = vjp_fn(cot)
        raw = cam_from_grads(act, grads, method)                          # [B, h, w]
    else:
        (grads,) = jax.vmap(vjp_fn)(jnp.moveaxis(cot, 1, 0))              # [K, B, h, w, C]
        raw = jax.vmap(lambda g: cam_from_grads(act, g, method))(grads)   # [K, B, h, w]
        raw = jnp.moveaxis(raw, 0, 1)                                     # [B, K, h, w]
    return finalize_cam(raw, (H, W)), raw, logits


def _jit_gradcam(graphdef: Any, layer: str, method: str, output: Callable | None,
                 cotangent: Callable | None) -> Callable:
    """A jitted ``f(state, images, targets) -> (cams, raw, logits)`` for one model graph and CAM
    settings (jit keeps one executable per input shape / dtype / target form). The parameters
    are an argument, never captured: a model trained or reloaded later is seen."""
    @jax.jit
    def run(state, images, targets):
        return _gradcam_traced(nnx.merge(graphdef, state), images, targets, layer, method, output,
                               cotangent)
    return run


# model -> {(layer, method, output, cotangent): (graphdef, jitted fn)}. Keyed weakly by the
# model object (a GraphDef may hold dicts and is then unhashable); a hit also needs an equal
# graphdef, so a model whose structure changed is compiled anew. At most _PER_MODEL settings
# per model are kept (a new lambda per call would otherwise grow it without bound).
_COMPILED: "weakref.WeakKeyDictionary[nnx.Module, dict]" = weakref.WeakKeyDictionary()
_PER_MODEL = 8


def _compiled(model: nnx.Module, graphdef: Any, layer: str, method: str,
              output: Callable | None, cotangent: Callable | None) -> Callable:
    entries = _COMPILED.setdefault(model, {})
    key = (layer, method, output, cotangent)
    hit = entries.get(key)
    if hit is not None and hit[0] == graphdef:
        return hit[1]
    fn = _jit_gradcam(graphdef, layer, method, output, cotangent)
    entries.pop(key, None)
    while len(entries) >= _PER_MODEL:
        entries.pop(next(iter(entries)))
    entries[key] = (graphdef, fn)
    return fn


def _is_traced(model: nnx.Module, images: Any) -> bool:
    """Whether the call happens inside a transformation (jit, vmap, grad) of the caller."""
    if isinstance(images, jax.core.Tracer):
        return True
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(nnx.state(model)))


# ----------------------------------------------------------------------------- public API
def gradcam(model: nnx.Module, images: jax.Array, targets: Targets = None, layer: str | None = None,
            *, method: str = "gradcam", output: Callable | None = None,
            cotangent: Callable | None = None, return_raw: bool = False,
            return_logits: bool = False) -> jax.Array | tuple[jax.Array, ...]:
    """Class activation maps of ``model`` on ``images``.

    Args:
      model: a zoo classifier in inference mode (``features``, ``pool_and_classify``).
      images: ``[B, H, W, C]`` normalised images (C = ``model.in_channels``).
      targets: ``None`` (predicted class), an int, int ``[B]`` or int ``[B, K]`` (see module doc).
      layer: key of ``model.features(x)``; ``None`` means ``"last_conv"``.
      method: ``"gradcam"``, ``"gradcampp"`` or ``"hirescam"``.
      output: optional ``f(pool_and_classify(...)) -> [B, N]`` logits selector.
      cotangent: optional pure ``f(logits [B, N]) -> [B, N]``: the weight of every logit column
        in the differentiated score, per image, computed from the logits themselves (e.g. the
        scoring job's "CAM of the predicted decision at this model's threshold": ``+1`` / ``-1``
        on the COVID column). Replaces ``targets`` (give one or the other).
      return_raw: also return the raw CAM before ReLU, normalisation and resizing.
      return_logits: also return the ``[B, N]`` logits (after ``output``).

    Returns float32 ``[B, H, W]`` (``[B, K, H, W]`` for ``[B, K]`` targets) in ``[0, 1]``; with
    ``return_raw`` / ``return_logits`` a tuple ``(cams, [raw], [logits])``, raw ``[B, h, w]`` /
    ``[B, K, h, w]`` at the layer's resolution (the channel-weighted sum, pre-ReLU).

    Called on concrete arrays, the whole computation runs as one compiled program, cached per
    model graph (``nnx.split``), layer, method, ``output`` / ``cotangent`` function and input
    shape / dtype; the parameters are passed on every call, so later weight updates are seen.
    Pass the same ``output`` / ``cotangent`` function object to reuse a compiled program (a
    new lambda per call compiles anew). Inside ``jax.jit`` / ``vmap`` it is traced inline.
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {METHODS}")
    in_ch = getattr(model, "in_channels", None)
    if images.ndim != 4 or (in_ch is not None and images.shape[-1] != in_ch):
        raise ValueError(f"gradcam expects images [B, H, W, {in_ch or 'C'}] (NHWC), "
                         f"got shape {tuple(images.shape)}")
    if cotangent is not None and targets is not None:
        raise ValueError("give targets or cotangent, not both")
    layer = LAST_CONV if layer is None else layer
    t = _normalise_targets(targets, images.shape[0])
    if _is_traced(model, images):
        cams, raw, logits = _gradcam_traced(model, images, t, layer, method, output, cotangent)
    else:
        graphdef, state = nnx.split(model)
        cams, raw, logits = _compiled(model, graphdef, layer, method, output, cotangent)(
            state, jnp.asarray(images), t)
    if t is not None:
        _check_target_range(t, logits.shape[1])
    extra = ((raw,) if return_raw else ()) + ((logits,) if return_logits else ())
    return (cams, *extra) if extra else cams


def gradcampp(model: nnx.Module, images: jax.Array, targets: Targets = None,
              layer: str | None = None, **kw: Any):
    """Grad-CAM++: :func:`gradcam` with ``method="gradcampp"``."""
    return gradcam(model, images, targets, layer, method="gradcampp", **kw)


def hirescam(model: nnx.Module, images: jax.Array, targets: Targets = None,
             layer: str | None = None, **kw: Any):
    """HiResCAM: :func:`gradcam` with ``method="hirescam"``."""
    return gradcam(model, images, targets, layer, method="hirescam", **kw)


def make_cam_fn(model: nnx.Module, *, method: str = "gradcam", layer: str | None = None,
                output: Callable | None = None, return_raw: bool = False) -> Callable:
    """A jitted ``fn(images [B, H, W, C], targets=None) -> cams`` for ``model`` (the program
    :func:`gradcam` itself compiles and caches; this form skips the per-call ``nnx.split``).

    The model is split once into graph and state (``nnx.split``); every call re-reads the model's
    current state (so weights loaded or trained later are used) and runs one compiled program per
    input shape / target form (``None``, ``[B]``, ``[B, K]``; an int target is passed as ``[B]``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {METHODS}")
    layer = LAST_CONV if layer is None else layer
    graphdef, _ = nnx.split(model)
    run = _jit_gradcam(graphdef, layer, method, output, None)

    def cam_fn(images: jax.Array, targets: Targets = None):
        images = jnp.asarray(images)
        t = _normalise_targets(targets, images.shape[0] if images.ndim else 0)
        if t is not None:
            n_out = getattr(model, "num_classes", None)
            if output is None and n_out:
                _check_target_range(t, n_out)
        cams, raw, _ = run(nnx.state(model), images, t)
        return (cams, raw) if return_raw else cams

    return cam_fn
