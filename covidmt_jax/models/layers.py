"""Shared building blocks of every zoo model (NHWC, float32 params, configurable compute dtype).

Naming follows torchvision / timm module names so that `covidmt_jax.weights` can map a
PyTorch ``state_dict`` onto these modules mechanically: a module whose children are named
differently from its PyTorch counterpart declares ``torch_renames()`` (our child path ->
PyTorch child path), e.g. ``Downsample`` maps ``conv -> 0`` and ``bn -> 1``.

BatchNorm layers start in inference mode (running statistics); training code switches them
with ``model.train()`` / ``nnx.view(model, use_running_average=False)``.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from covidmt_jax.models import cpu_conv

Dtype = Any

# torch BatchNorm2d(momentum=0.1) keeps 0.9 of the old running average.
BN_MOMENTUM = 0.9


def torch_padding(kernel_size: int, padding: int | None = None, dilation: int = 1):
    """Explicit symmetric padding as PyTorch's ``padding=p`` (default ``k // 2``)."""
    p = (dilation * (kernel_size - 1)) // 2 if padding is None else padding
    return ((p, p), (p, p))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` (same arguments); every conv of the zoo goes through it.

    On the CPU backend, with the switch of :mod:`covidmt_jax.models.cpu_conv` on (environment
    variable ``COVIDMT_CPU_CONV``, config key ``model.cpu_conv_kernels``; on by default), NHWC
    convs without dilation take that module's kernels (1x1 convs as matmuls, elementwise
    grouped convs, chunked matmul weight gradients). Otherwise, and on every
    other backend, this is plain ``lax.conv_general_dilated``.
    """
    if cpu_conv.handles(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, kwargs):
        return cpu_conv.conv(lhs, rhs, window_strides, padding, feature_group_count, precision)
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
