"""U-Net (Ronneberger, Fischer & Brox 2015) for lung masks: one sigmoid output channel.

Encoder: ``depth`` levels of (3x3 conv -> [BN] -> ReLU) x 2 then 2x2 max-pool, channels
``base_width * 2**level``; a bottleneck double conv; decoder: 2x2 transposed conv (stride 2),
concatenation with the encoder's skip, double conv; a final 1x1 conv to one logit channel.
Unlike the 2015 paper (unpadded convs, cropped skips) convs are padded ("same"), so the mask
has the input's size; inputs must be multiples of ``2**depth`` (``lung_masks`` pads).
``[B, H, W, in_channels] -> [B, H, W, 1]`` logits; ``predict`` gives probabilities.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from covidmt_jax.models.layers import batch_norm, conv2d, conv_general_dilated, max_pool
from covidmt_jax.models.registry import register


class DoubleConv(nnx.Module):
    """(3x3 conv -> [BN] -> ReLU) x 2: ``[B, H, W, in_ch] -> [B, H, W, out_ch]``."""

    def __init__(self, in_ch: int, out_ch: int, *, use_bn: bool, dtype: Any, rngs: nnx.Rngs):
        self.conv1 = conv2d(in_ch, out_ch, 3, bias=not use_bn, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(out_ch, dtype=dtype, rngs=rngs) if use_bn else None
        self.conv2 = conv2d(out_ch, out_ch, 3, bias=not use_bn, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(out_ch, dtype=dtype, rngs=rngs) if use_bn else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv1(x)
        x = nnx.relu(x if self.bn1 is None else self.bn1(x))
        x = self.conv2(x)
        return nnx.relu(x if self.bn2 is None else self.bn2(x))


class UNet(nnx.Module):
    """Lung-segmentation U-Net; see the module docstring."""

    def __init__(self, *, num_classes: int = 1, in_channels: int = 1, depth: int = 4,
                 base_width: int = 64, batch_norm: bool = True, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if depth < 1:
            raise ValueError(f"U-Net depth must be >= 1, got {depth}")
        self.in_channels = in_channels
        self.num_classes = num_classes or 1
        self.depth = depth
        widths = [base_width * 2 ** i for i in range(depth + 1)]
        kw = dict(use_bn=batch_norm, dtype=dtype, rngs=rngs)
        self.down = nnx.List([DoubleConv(in_channels if i == 0 else widths[i - 1], widths[i], **kw)
                              for i in range(depth)])
        self.bottleneck = DoubleConv(widths[depth - 1], widths[depth], **kw)
        self.up = nnx.List([
            nnx.ConvTranspose(widths[i + 1], widths[i], (2, 2), strides=(2, 2), padding="VALID",
                              dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            for i in reversed(range(depth))])
        self.dec = nnx.List([DoubleConv(2 * widths[i], widths[i], **kw) for i in reversed(range(depth))])
        self.head = nnx.Conv(widths[0], self.num_classes, (1, 1), dtype=dtype, param_dtype=jnp.float32,
                             conv_general_dilated=conv_general_dilated, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, 1]`` mask logits (float32)."""
        m = 2 ** self.depth
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"UNet expects [B, H, W, {self.in_channels}], got {tuple(x.shape)}")
        if x.shape[1] % m or x.shape[2] % m:
            raise ValueError(f"UNet of depth {self.depth} needs H and W divisible by {m}, "
                             f"got {x.shape[1]}x{x.shape[2]} (pad the image first)")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = max_pool(x, 2, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(jnp.concatenate([up(x), skip], axis=-1))
        return self.head(x).astype(jnp.float32)

    def predict(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W]`` lung probabilities."""
        return jax.nn.sigmoid(self(x))[..., 0]


def widen_tensor(path: tuple, value: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator,
                 noise: float = 0.1) -> np.ndarray:
    """One tensor of a U-Net widened to ``shape`` so that the wider network computes the same
    function (Net2WiderNet, Chen, Goodfellow & Shlens 2016): every channel of the narrow net
    becomes ``k`` identical channels (``k`` = the width factor).

    - vectors (bias, BatchNorm scale/bias/mean/var) ``[C] -> [k C]``: tiled;
    - conv and transposed-conv kernels ``[kh, kw, Cin, Cout]``: output channels tiled; input
      channels tiled and divided by ``k`` (each input now arrives ``k`` times), per input
      segment (a decoder's first conv reads ``concat(upsampled, skip)``: two segments). The
      ``k`` copies of an input weight get noise that sums to zero over the copies, so the
      function is unchanged while the copies' gradients differ (identical copies would stay
      identical under training). ``noise``: its std as a fraction of the kernel's std.

    Channel ``j`` of a widened layer copies channel ``j mod C`` of the narrow one. The 1x1
    head's single output is broadcast to every class, as when a one-output export starts a
    multi-output net. Raises ``ValueError`` naming the tensor when ``shape`` is not a
    whole-number widening of ``value``'s.
    """
    name = "/".join(map(str, path))
    v = np.asarray(value, np.float32)
    if v.ndim != len(shape) or any(n % o for o, n in zip(v.shape, shape)):
        raise ValueError(f"{name}: shape {v.shape} cannot be widened to {tuple(shape)}")
    if v.ndim == 1:
        return np.tile(v, shape[0] // v.shape[0])
    if v.ndim != 4 or v.shape[:2] != tuple(shape[:2]):
        raise ValueError(f"{name}: shape {v.shape} cannot be widened to {tuple(shape)}")
    kin = shape[2] // v.shape[2]
    if kin > 1:
        segments = 2 if path[0] == "dec" and path[-2] == "conv1" else 1
        if v.shape[2] % segments:
            raise ValueError(f"{name}: {v.shape[2]} input channels do not split into {segments} segments")
        std = float(v.std()) * noise
        parts = []
        for seg in np.split(v, segments, axis=2):  # [kh, kw, c, Cout]
            copies = np.repeat(seg[:, :, None] / kin, kin, axis=2)  # [kh, kw, k, c, Cout]
            eps = rng.normal(0.0, std / kin, copies.shape).astype(np.float32)
            copies = copies + (eps - np.mean(eps, axis=2, keepdims=True))
            parts.append(copies.reshape(seg.shape[:2] + (kin * seg.shape[2], seg.shape[3])))
        v = np.concatenate(parts, axis=2)
    return np.tile(v, (1, 1, 1, shape[3] // v.shape[3]))


@register("unet")
def unet(**kw: Any) -> UNet:
    """U-Net for lung masks (``depth``, ``base_width``, ``batch_norm`` configurable)."""
    return UNet(**kw)
