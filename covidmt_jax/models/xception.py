"""Xception (Chollet 2017) in timm's ``legacy_xception`` layout, so its weights import.

Entry flow: conv1 (3x3/2, no padding) -> conv2 (3x3, no padding) -> blocks 1-3 (stride 2);
middle flow: blocks 4-11 (728 ch); exit flow: block 12 (stride 2) -> separable conv3 (1536)
-> separable conv4 (2048) -> global average pool -> fc.
Our ``seps`` / ``bns`` lists inside a block map to timm's ``rep.<i>`` indices (ReLU and
max-pool positions skipped as timm's ``Sequential`` numbers them).
Stage outputs: ``c3`` = block2 (stride 8, 256 ch), ``c4`` = block11 (16, 728),
``c5`` = ``last_conv`` = act4 (32, 2048), the Grad-CAM layer.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from covidmt_jax.models.base import Backbone
from covidmt_jax.models.layers import (SeparableConv2d, batch_norm, conv2d,
                                       linear, max_pool)
from covidmt_jax.models.registry import register


class XceptionBlock(nnx.Module):
    """``reps`` x (ReLU -> separable 3x3 -> BN), optional 3x3/``stride`` max-pool, plus skip."""

    def __init__(self, in_ch: int, out_ch: int, reps: int, stride: int = 1, *,
                 start_with_relu: bool = True, grow_first: bool = True, dtype: Any, rngs: nnx.Rngs):
        if out_ch != in_ch or stride != 1:
            self.skip = conv2d(in_ch, out_ch, 1, stride=stride, padding=0, dtype=dtype, rngs=rngs)
            self.skipbn = batch_norm(out_ch, dtype=dtype, rngs=rngs)
        else:
            self.skip = self.skipbn = None
        seps, bns, renames = [], [], {}
        for i in range(reps):
            if grow_first:
                inc, outc = (in_ch if i == 0 else out_ch), out_ch
            else:
                inc, outc = in_ch, (in_ch if i < reps - 1 else out_ch)
            # timm numbers rep as [ReLU, Sep, BN] * reps, minus the first ReLU when
            # start_with_relu is False.
            base = 3 * i - (0 if start_with_relu else 1)
            renames[f"seps.{i}"] = f"rep.{base + 1}"
            renames[f"bns.{i}"] = f"rep.{base + 2}"
            seps.append(SeparableConv2d(inc, outc, 3, padding=1, dtype=dtype, rngs=rngs))
            bns.append(batch_norm(outc, dtype=dtype, rngs=rngs))
        self.seps, self.bns = nnx.List(seps), nnx.List(bns)
        self._renames = renames
        self.start_with_relu = start_with_relu
        self.stride = stride

    def torch_renames(self) -> dict[str, str]:
        return self._renames

    def __call__(self, inp: jax.Array) -> jax.Array:
        x = inp
        for i, (sep, bn) in enumerate(zip(self.seps, self.bns)):
            if i > 0 or self.start_with_relu:
                x = nnx.relu(x)
            x = bn(sep(x))
        if self.stride != 1:
            x = max_pool(x, 3, self.stride, 1)
        skip = inp if self.skip is None else self.skipbn(self.skip(inp))
        return x + skip


class Xception(Backbone):
    """``[B, H, W, in_channels] -> [B, num_classes]`` (inputs of at least 71 px)."""

    torch_sources = ("timm",)

    def __init__(self, *, num_classes: int = 1, in_channels: int = 1, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.in_channels = in_channels
        kw = dict(dtype=dtype, rngs=rngs)
        self.conv1 = conv2d(in_channels, 32, 3, stride=2, padding=0, **kw)
        self.bn1 = batch_norm(32, **kw)
        self.conv2 = conv2d(32, 64, 3, padding=0, **kw)
        self.bn2 = batch_norm(64, **kw)
        specs = [(64, 128, 2, 2, False, True), (128, 256, 2, 2, True, True),
                 (256, 728, 2, 2, True, True)] + [(728, 728, 3, 1, True, True)] * 8 + [
                     (728, 1024, 2, 2, True, False)]
        self.blocks = nnx.List([XceptionBlock(i, o, r, s, start_with_relu=sr, grow_first=gf, **kw)
                                for i, o, r, s, sr, gf in specs])
        self.conv3 = SeparableConv2d(1024, 1536, 3, padding=1, **kw)
        self.bn3 = batch_norm(1536, **kw)
        self.conv4 = SeparableConv2d(1536, 2048, 3, padding=1, **kw)
        self.bn4 = batch_norm(2048, **kw)
        self.feature_channels = {"c3": 256, "c4": 728, "c5": 2048, "last_conv": 2048}
        self.fc = linear(2048, num_classes, **kw) if num_classes else None

    def torch_renames(self) -> dict[str, str]:
        return {f"blocks.{i}": f"block{i + 1}" for i in range(12)}

    def torch_head_prefixes(self) -> tuple[str, ...]:
        return ("fc.",)

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        outs = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == 1:
                outs["c3"] = x
            elif i == 10:
                outs["c4"] = x
        x = nnx.relu(self.bn3(self.conv3(x)))
        x = nnx.relu(self.bn4(self.conv4(x)))
        outs["c5"] = outs["last_conv"] = x
        return outs



@register("xception")
def xception(**kw: Any) -> Xception:
    """XceptionNet, one of the paper's Table 2 baselines (timm ``legacy_xception`` weights)."""
    return Xception(**kw)
