"""Shared building blocks of every zoo model (NHWC, float32 params, configurable compute dtype).

Naming follows torchvision / timm module names so that `covidmt_jax.weights` can map a
PyTorch ``state_dict`` onto these modules mechanically: a module whose children are named
differently from its PyTorch counterpart declares ``torch_renames()`` (our child path ->
PyTorch child path), e.g. ``Downsample`` maps ``conv -> 0`` and ``bn -> 1``.

BatchNorm layers start in inference mode (running statistics); training code switches them
with ``model.train()`` / ``nnx.view(model, use_running_average=False)``.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any

# torch BatchNorm2d(momentum=0.1) keeps 0.9 of the old running average.
BN_MOMENTUM = 0.9


def torch_padding(kernel_size: int, padding: int | None = None, dilation: int = 1):
    """Explicit symmetric padding as PyTorch's ``padding=p`` (default ``k // 2``)."""
    p = (dilation * (kernel_size - 1)) // 2 if padding is None else padding
    return ((p, p), (p, p))


_NHWC = ("NHWC", "HWIO", "NHWC")


# CPU paths of kxk convs (k > 1). XLA:CPU's convolution kernels are fast for dense forward
# and input-gradient convs, but slow for weight gradients and for grouped convs. Measured on
# 2 Zen 5 cores, batch 12, at the shapes of a 512-px COVIDMT-ResNeXt-50 step, ms for XLA's
# kernel (or the path used before) / the path used now / torch 2.14 (oneDNN) where measured:
#   weight gradients, dense 3x3:  [64,64]x256 (FPN/RetinaNet head)  535 / 210;
#     [128,128]x64  221 / 116;  [128,128]x128 stride 2  135 / 79;  [14,14]x256  9 / 11 (XLA kept);
#   weight gradients, grouped 3x3 (32 groups): 4 ch/group [128,128]  671 (one einsum per tap
#     over the whole batch) / 271;  8 ch/group [64,64]  327 / 137;  32 ch/group [16,16]  89 / 37;
#   forward / input gradient, stride-1 grouped 3x3 with <= 8 channels per group: 4 ch/group
#     [128,128]  156 / 144 (a dense conv with a block-diagonal kernel) -> 38 / 37, torch 20 fwd;
#     8 ch/group [64,64]  133 / 131 -> 25 / 34, torch 12 fwd.
# Weight gradients are matmuls in a loop over batch chunks (:func:`_weight_grad`): one
# chunk's tap slices are alive at a time (the same matmuls over the whole batch at once kept
# all nine [B, H, W, C] slices of every conv alive: +5 GB of temporaries at 512 px).
DW_MIN_PIXELS = 32 * 32  # dense convs with fewer output pixels per image keep XLA's dW kernel
DW_CHUNK_MIN_ROWS = 512  # a dW chunk holds the fewest images with at least this many output pixels
IM2COL_MAX_CHANNELS = 128  # dense dW: one im2col matmul per chunk below this many input channels
DW_GROUP_BLOCK = 32  # grouped dW: one dense matmul per tap per block of this many channels
ELEMENTWISE_MAX_GROUP_CHANNELS = 8  # stride-1 grouped convs this narrow (in and out): one fusion


def _tap_slices(xp: jax.Array, kh: int, kw: int, strides: tuple, ho: int, wo: int):
    """``x_ij`` for each kernel tap ``(i, j)`` in row-major order: the (padded) input pixels
    the tap meets, ``[B, ho, wo, C]``."""
    b, _, _, c = xp.shape
    sh, sw = strides
    for i in range(kh):
        for j in range(kw):
            yield jax.lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                                      (1, sh, sw, 1))


# Grouped convs with at most this many input channels per group (and at most this many
# groups) that cannot take the elementwise path (strided ones) run forward and input gradient
# as ONE dense conv with a block-diagonal kernel on CPU: G times the FLOPs, yet XLA:CPU's dense
# kernel is that much faster than its grouped one (ResNeXt-50 layer1, [12, 56, 56, 128], 32
# groups of 4: fwd+dx 300 ms grouped, 66 ms dense; with 16 channels per group the grouped
# kernel wins again).
DENSE_GROUPED_MAX_CHANNELS = 8
DENSE_GROUPED_MAX_GROUPS = 64


def block_diagonal_kernel(w: jax.Array, groups: int) -> jax.Array:
    """Grouped HWIO kernel ``[kh, kw, cin/G, cout]`` -> dense ``[kh, kw, cin, cout]`` whose
    off-diagonal group blocks are zero (same conv, one group)."""
    kh, kw, cg, cout = w.shape
    wg = w.reshape(kh, kw, cg, groups, cout // groups)
    full = jnp.einsum("hwigo,gG->hwGigo", wg, jnp.eye(groups, dtype=w.dtype))
    return full.reshape(kh, kw, groups * cg, cout)


def _xla_conv(x, w, strides, padding, groups):
    """XLA's conv, or for narrow groups the equal dense conv with a block-diagonal kernel."""
    if 1 < groups <= DENSE_GROUPED_MAX_GROUPS and w.shape[2] <= DENSE_GROUPED_MAX_CHANNELS:
        w, groups = block_diagonal_kernel(w, groups), 1
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                        feature_group_count=groups)


def _takes_elementwise_path(w_shape: tuple, strides: tuple, groups: int) -> bool:
    cg, cout = w_shape[2], w_shape[3]
    return (groups > 1 and tuple(strides) == (1, 1) and cg <= ELEMENTWISE_MAX_GROUP_CHANNELS
            and cout // groups <= ELEMENTWISE_MAX_GROUP_CHANNELS)


def elementwise_grouped_conv(x: jax.Array, w: jax.Array, padding: tuple, groups: int) -> jax.Array:
    """Stride-1 grouped conv ``[B, H, W, C] * [kh, kw, C/G, Cout] -> [B, H', W', Cout]`` as ONE
    XLA loop fusion: ``y[..., g, o] = sum_{i, j, k} x_pad[.., h+i, w+j, g, k] * w[i, j, k, g, o]``
    (``kh * kw * C/G`` multiply-adds per output; float32 accumulation). With a few channels
    per group this is 4-5x faster on CPU than any convolution kernel XLA has for it."""
    kh, kw, cg, cout = w.shape
    co = cout // groups
    acc = jnp.promote_types(x.dtype, jnp.float32)
    zero = jnp.zeros((), x.dtype)
    xp = jax.lax.pad(x, zero, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    b, hp, wp, _ = xp.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    xg = xp.reshape(b, hp, wp, groups, cg).astype(acc)
    wg = w.reshape(kh, kw, cg, groups, co).astype(acc)
    y = None
    for i in range(kh):
        for j in range(kw):
            x_ij = xg[:, i:i + ho, j:j + wo]
            for k in range(cg):
                term = x_ij[..., k:k + 1] * wg[i, j, k]  # [B, ho, wo, G, 1] * [G, co]
                y = term if y is None else y + term
    return y.reshape(b, ho, wo, cout).astype(x.dtype)


def _input_grad_elementwise(dy: jax.Array, w: jax.Array, padding: tuple, groups: int) -> jax.Array:
    """Input gradient of :func:`elementwise_grouped_conv`: the same conv of ``dy`` with the
    flipped kernel whose in- and out-channels are swapped within each group."""
    kh, kw, cg, cout = w.shape
    co = cout // groups
    wt = w[::-1, ::-1].reshape(kh, kw, cg, groups, co).transpose(0, 1, 4, 3, 2).reshape(kh, kw, co, groups * cg)
    wt = jax.lax.optimization_barrier(wt)  # fused into the big loop, the transpose doubled its time
    pad_t = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), padding))
    return elementwise_grouped_conv(dy, wt, pad_t, groups)


def _batch_chunk(batch: int, pixels: int) -> int:
    """Images per weight-gradient chunk: the fewest (dividing ``batch``) with at least
    :data:`DW_CHUNK_MIN_ROWS` output pixels."""
    return next((c for c in range(1, batch + 1) if batch % c == 0 and c * pixels >= DW_CHUNK_MIN_ROWS), batch)


def _group_block(cin: int, cg: int) -> int:
    """Channels per dense block of the grouped dW: the largest multiple of ``cg`` that divides
    ``cin`` and is at most ``max(cg, DW_GROUP_BLOCK)``."""
    return max(s for s in range(cg, max(cg, DW_GROUP_BLOCK) + 1, cg) if cin % s == 0)


def _weight_grad(x: jax.Array, dy: jax.Array, w_shape: tuple, strides: tuple, padding: tuple,
                 groups: int) -> jax.Array:
    """Weight gradient ``[kh, kw, C/G, Cout]`` of a conv of ``x [B, H, W, C]`` with output
    cotangent ``dy [B, ho, wo, Cout]``, as matmuls in a ``lax.scan`` over batch chunks.

    ``dW[i, j] = sum over pixels of x_ij^T dy`` (``x_ij`` from :func:`_tap_slices`). Per chunk:
    dense convs with narrow inputs take one im2col matmul ``[rows, kh*kw*C]^T @ [rows, Cout]``,
    wider ones one matmul per tap; grouped convs one matmul per tap per block of
    :func:`_group_block` channels, keeping the diagonal group blocks (XLA:CPU lowers a grouped
    dW to an lhs-dilated convolution ~100x slower than the dense case, and a per-group batched
    matmul with 4-8 channels runs far below the dense matmul's speed).
    """
    kh, kw, cg, cout = w_shape
    b, ho, wo, _ = dy.shape
    cin = x.shape[-1]
    cb = _batch_chunk(b, ho * wo)
    chunks = (x.reshape(b // cb, cb, *x.shape[1:]), dy.reshape(b // cb, cb * ho * wo, cout))
    rows_t = (((0,), (0,)), ((), ()))  # A^T B over the pixel axis
    f32 = jnp.float32
    block = _group_block(cin, cg) if groups > 1 else cin
    nblk, gpb, cog = cin // block, block // cg, cout // groups

    def chunk_grad(xc, dc):  # [cb, H, W, C], [rows, Cout] -> [kh*kw, ...]
        xp = jnp.pad(xc, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
        taps = [t.reshape(-1, cin) for t in _tap_slices(xp, kh, kw, strides, ho, wo)]
        if groups == 1 and cin < IM2COL_MAX_CHANNELS:
            cols = jnp.concatenate(taps, axis=1)
            return jax.lax.dot_general(cols, dc, rows_t, preferred_element_type=f32).reshape(kh * kw, cin, cout)
        if groups == 1:
            return jnp.stack([jax.lax.dot_general(t, dc, rows_t, preferred_element_type=f32) for t in taps])
        dblk = dc.reshape(-1, nblk, gpb * cog)
        per_tap = []
        for t in taps:
            full = jnp.einsum("nsi,nso->sio", t.reshape(-1, nblk, block), dblk, preferred_element_type=f32)
            full = full.reshape(nblk, gpb, cg, gpb, cog)
            per_tap.append(jnp.einsum("sgigo->sgio", full).reshape(groups, cg, cog))  # diagonal blocks
        return jnp.stack(per_tap)

    out_shape = (kh * kw, cin, cout) if groups == 1 else (kh * kw, groups, cg, cog)
    dw, _ = jax.lax.scan(lambda acc, xd: (acc + chunk_grad(*xd), None), jnp.zeros(out_shape, f32), chunks)
    if groups > 1:
        dw = dw.reshape(kh, kw, groups, cg, cog).transpose(0, 1, 3, 2, 4)
    return dw.reshape(w_shape)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_conv(x: jax.Array, w: jax.Array, strides: tuple, padding: tuple, groups: int) -> jax.Array:
    if _takes_elementwise_path(w.shape, strides, groups):
        return elementwise_grouped_conv(x, w, padding, groups)
    return _xla_conv(x, w, strides, padding, groups)


def _cpu_conv_fwd(x, w, strides, padding, groups):
    return _cpu_conv(x, w, strides, padding, groups), (x, w)


def _cpu_conv_bwd(strides, padding, groups, res, dy):
    """Input gradient from the forward path's transpose; weight gradient from
    :func:`_weight_grad`, except for dense convs with small outputs (XLA's kernel wins)."""
    x, w = res
    _, ho, wo, _ = dy.shape
    if groups == 1 and ho * wo < DW_MIN_PIXELS:
        _, vjp = jax.vjp(lambda x_, w_: _xla_conv(x_, w_, strides, padding, groups), x, w)
        return vjp(dy)
    if _takes_elementwise_path(w.shape, strides, groups):
        dx = _input_grad_elementwise(dy, w, padding, groups)
    else:
        _, vjp_x = jax.vjp(lambda x_: _xla_conv(x_, w, strides, padding, groups), x)
        (dx,) = vjp_x(dy)
    return dx, _weight_grad(x, dy, w.shape, strides, padding, groups).astype(w.dtype)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _pointwise_conv(x: jax.Array, w: jax.Array, strides: tuple, precision=None) -> jax.Array:
    """An unpadded 1x1 conv as one matmul: ``x[:, ::sh, ::sw]`` as ``[B*H'*W', Cin] @ w [Cin, Cout]``.

    On XLA:CPU this beats the convolution kernel 2-10x in each of forward, input gradient and
    weight gradient (all three become matmuls; 36 of ResNet-50's 53 convs are 1x1).
    """
    sh, sw = strides
    if (sh, sw) != (1, 1):
        x = x[:, ::sh, ::sw, :]
    b, h, wd, cin = x.shape
    y = jnp.dot(x.reshape(b * h * wd, cin), w.reshape(cin, w.shape[-1]), precision=precision)
    return y.reshape(b, h, wd, w.shape[-1])


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` with CPU-fast paths; every conv of the zoo goes through it.

    On the CPU backend, for convs with explicit NHWC/HWIO/NHWC dimension numbers and no
    dilation: unpadded 1x1 convs run as one matmul (:func:`_pointwise_conv`); stride-1 grouped
    convs with <= 8 channels per group run as one elementwise fusion
    (:func:`elementwise_grouped_conv`), strided ones as block-diagonal dense convs
    (:func:`_xla_conv`); grouped convs and dense convs with >= 32x32 outputs take their weight
    gradients from matmuls in a loop over batch chunks (:func:`_weight_grad`).
    All are tested equal to lax's outputs and gradients (tests/test_models.py). Other backends
    (GPU/TPU have fast conv kernels), other layouts (``dimension_numbers=None`` means lax's
    NCHW) and dilated convs go straight to lax.
    """
    nhwc = False
    if dimension_numbers is not None and lhs.ndim == 4:
        dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        nhwc = (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    simple = (jax.default_backend() == "cpu" and nhwc and not isinstance(padding, str)
              and all(d in (None, 1) for d in (lhs_dilation or (1,)))
              and all(d in (None, 1) for d in (rhs_dilation or (1,)))
              and kwargs.get("preferred_element_type") is None and kwargs.get("out_sharding") is None)
    if simple:
        pad = tuple((int(lo), int(hi)) for lo, hi in padding)
        strides = tuple(int(s) for s in window_strides)
        if rhs.shape[:2] == (1, 1) and feature_group_count == 1 and all(p == (0, 0) for p in pad):
            return _pointwise_conv(lhs, rhs, strides, precision)
        if precision is None:
            return _cpu_conv(lhs, rhs, strides, pad, int(feature_group_count))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)


def conv2d(in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
           padding: int | None = None, groups: int = 1, bias: bool = False,
           dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
    """A PyTorch-equivalent ``Conv2d`` (explicit padding, so strided convs match exactly).

    Kernel ``[kh, kw, in_ch // groups, out_ch]``; He-normal (fan-out) init as torchvision.
    """
    return nnx.Conv(in_ch, out_ch, (kernel_size, kernel_size), strides=stride,
                    padding=torch_padding(kernel_size, padding), feature_group_count=groups,
                    use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    conv_general_dilated=conv_general_dilated,
                    rngs=rngs)


def batch_norm(ch: int, *, dtype: Dtype = jnp.float32, eps: float = 1e-5,
               rngs: nnx.Rngs) -> nnx.BatchNorm:
    """``BatchNorm2d`` with PyTorch's defaults (eps 1e-5, momentum 0.1), inference mode."""
    return nnx.BatchNorm(ch, use_running_average=True, momentum=BN_MOMENTUM, epsilon=eps,
                         dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def linear(in_f: int, out_f: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_f, out_f, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def max_pool(x: jax.Array, kernel_size: int, stride: int, padding: int = 0) -> jax.Array:
    """``MaxPool2d(k, s, p)`` on ``[B, H, W, C]`` (padding with -inf, floor mode)."""
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    # a Python scalar init lets JAX recognise the max monoid (differentiable reduce_window_max)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel_size, kernel_size, 1),
                                 (1, stride, stride, 1), pads)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, C]``, averaged in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def _adaptive_bins(n_in: int, n_out: int) -> np.ndarray:
    """Averaging matrix ``[n_out, n_in]`` of PyTorch's adaptive pooling bins."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """``AdaptiveAvgPool2d(out_hw)`` on ``[B, H, W, C]`` -> ``[B, oh, ow, C]`` (exact bins)."""
    _, h, w, _ = x.shape
    mh = jnp.asarray(_adaptive_bins(h, out_hw[0]), x.dtype)
    mw = jnp.asarray(_adaptive_bins(w, out_hw[1]), x.dtype)
    return jnp.einsum("ih,jw,bhwc->bijc", mh, mw, x)


class ConvBN(nnx.Module):
    """Conv -> BatchNorm (-> ReLU when ``act``). ``[B, H, W, in_ch] -> [B, H', W', out_ch]``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
                 padding: int | None = None, groups: int = 1, act: bool = True,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv = conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                           groups=groups, dtype=dtype, rngs=rngs)
        self.bn = batch_norm(out_ch, dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn(self.conv(x))
        return nnx.relu(x) if self.act else x


class Downsample(ConvBN):
    """torchvision's ``downsample = Sequential(conv1x1, BatchNorm)`` of a residual block."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, dtype: Dtype, rngs: nnx.Rngs):
        super().__init__(in_ch, out_ch, 1, stride=stride, padding=0, act=False,
                         dtype=dtype, rngs=rngs)

    def torch_renames(self) -> dict[str, str]:
        return {"conv": "0", "bn": "1"}


class BasicBlock(nnx.Module):
    """ResNet-18/34 block: 3x3 -> 3x3 with identity or projection shortcut."""
    expansion = 1

    def __init__(self, in_ch: int, planes: int, *, stride: int = 1, groups: int = 1,
                 base_width: int = 64, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = conv2d(in_ch, planes, 3, stride=stride, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(planes, dtype=dtype, rngs=rngs)
        self.conv2 = conv2d(planes, planes, 3, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(planes, dtype=dtype, rngs=rngs)
        needs_proj = stride != 1 or in_ch != planes
        self.downsample = Downsample(in_ch, planes, stride, dtype=dtype, rngs=rngs) if needs_proj else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """ResNet-50 / ResNeXt bottleneck (torchvision v1.5: stride on the 3x3 conv).

    ``width = planes * base_width / 64 * groups``; 1x1 -> grouped 3x3 -> 1x1 (x4 channels).
    """
    expansion = 4

    def __init__(self, in_ch: int, planes: int, *, stride: int = 1, groups: int = 1,
                 base_width: int = 64, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        width = int(planes * (base_width / 64.0)) * groups
        out_ch = planes * self.expansion
        self.conv1 = conv2d(in_ch, width, 1, padding=0, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv2 = conv2d(width, width, 3, stride=stride, groups=groups, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv3 = conv2d(width, out_ch, 1, padding=0, dtype=dtype, rngs=rngs)
        self.bn3 = batch_norm(out_ch, dtype=dtype, rngs=rngs)
        needs_proj = stride != 1 or in_ch != out_ch
        self.downsample = Downsample(in_ch, out_ch, stride, dtype=dtype, rngs=rngs) if needs_proj else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return nnx.relu(y + shortcut)


class SeparableConv2d(nnx.Module):
    """Depthwise kxk (``conv1``) then pointwise 1x1 (``pointwise``), no bias (timm naming)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | None = None, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv1 = conv2d(in_ch, in_ch, kernel_size, stride=stride, padding=padding,
                            groups=in_ch, dtype=dtype, rngs=rngs)
        self.pointwise = conv2d(in_ch, out_ch, 1, padding=0, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.pointwise(self.conv1(x))


class PEPX(nnx.Module):
    """COVID-Net's projection-expansion-projection-extension module (Wang, Lin & Wong 2020).

    1x1 first-stage projection -> 1x1 expansion -> 3x3 depthwise (carries the stride) ->
    1x1 second-stage projection -> 1x1 extension. Each conv is followed by BatchNorm and
    all but the last by ReLU (the published design has no BatchNorm; we add it so the
    network trains from scratch at the paper's learning rate).
    ``[B, H, W, in_ch] -> [B, H / stride, W / stride, out_ch]``.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, proj_ratio: float = 0.5,
                 expand_ratio: float = 2.0, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        proj = max(8, int(in_ch * proj_ratio))
        expanded = max(8, int(proj * expand_ratio))
        proj2 = max(8, int(out_ch * proj_ratio))
        self.project1 = ConvBN(in_ch, proj, 1, padding=0, dtype=dtype, rngs=rngs)
        self.expand = ConvBN(proj, expanded, 1, padding=0, dtype=dtype, rngs=rngs)
        self.depthwise = ConvBN(expanded, expanded, 3, stride=stride, groups=expanded,
                                dtype=dtype, rngs=rngs)
        self.project2 = ConvBN(expanded, proj2, 1, padding=0, dtype=dtype, rngs=rngs)
        self.extend = ConvBN(proj2, out_ch, 1, padding=0, act=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.extend(self.project2(self.depthwise(self.expand(self.project1(x)))))


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """``[B, H, W, C] -> [B, H * f, W * f, C]`` nearest-neighbour."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def resize_to(x: jax.Array, hw: Sequence[int]) -> jax.Array:
    """Nearest resize of ``[B, H, W, C]`` to ``hw`` (FPN top-down path on odd sizes)."""
    if tuple(x.shape[1:3]) == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], hw[0], hw[1], x.shape[3]), method="nearest")
