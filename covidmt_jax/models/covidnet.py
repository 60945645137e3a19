"""A COVID-Net-style network of PEPX modules (Wang, Lin & Wong 2020, Sci. Rep. 10, 19549).

The released COVIDNet-CXR3 / CXR4 networks were machine-generated (generative synthesis)
and exist only as TensorFlow graphs / checkpoints; their exact per-layer widths are not
published as an architecture. This module therefore follows the published *design*, not
their weights: a 7x7 stride-2 stem, then four stages of PEPX modules (projection ->
expansion -> depthwise 3x3 -> projection -> extension) with the paper's long-range
connectivity — every module of a stage reads the sum of the stage input projection and the
outputs of all earlier modules of that stage — and 1x1 stride-2 projections between stages.
BatchNorm follows every conv (an addition so it trains from scratch at the paper's learning
rate). No ImageNet weights exist for it; it trains from scratch.

Stage outputs: ``c3`` (stride 8), ``c4`` (16), ``c5`` = ``last_conv`` (32).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from covidmt_jax.models.base import Backbone
from covidmt_jax.models.layers import PEPX, ConvBN, linear, max_pool
from covidmt_jax.models.registry import register


class PEPXStage(nnx.Module):
    """A densely connected stage: ``[B, H, W, in_ch] -> [B, H/s, W/s, out_ch]``."""

    def __init__(self, in_ch: int, out_ch: int, n_modules: int, stride: int, *, dtype: Any,
                 rngs: nnx.Rngs):
        self.shortcut = ConvBN(in_ch, out_ch, 1, stride=stride, padding=0, act=False,
                               dtype=dtype, rngs=rngs)
        self.pepx = nnx.List(
            [PEPX(in_ch if i == 0 else out_ch, out_ch, stride=stride if i == 0 else 1,
                  dtype=dtype, rngs=rngs) for i in range(n_modules)])

    def __call__(self, x: jax.Array) -> jax.Array:
        total = self.shortcut(x)
        inp = x
        for i, module in enumerate(self.pepx):
            out = module(inp)
            total = total + out
            inp = nnx.relu(total)
        return inp


class COVIDNet(Backbone):
    """``[B, H, W, in_channels] -> [B, num_classes]``."""

    torch_sources: tuple[str, ...] = ()

    def __init__(self, *, num_classes: int = 1, in_channels: int = 1,
                 widths: Sequence[int] = (64, 128, 256, 512),
                 modules_per_stage: Sequence[int] = (3, 4, 6, 3), dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if len(widths) != 4 or len(modules_per_stage) != 4:
            raise ValueError("COVIDNet needs 4 stage widths and 4 module counts")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.stem = ConvBN(in_channels, widths[0], 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
        stages, in_ch = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, modules_per_stage)):
            stages.append(PEPXStage(in_ch, w, n, 1 if i == 0 else 2, dtype=dtype, rngs=rngs))
            in_ch = w
        self.stages = nnx.List(stages)
        self.feature_channels = {"c3": widths[1], "c4": widths[2], "c5": widths[3],
                                 "last_conv": widths[3]}
        self.fc = linear(widths[3], num_classes, dtype=dtype, rngs=rngs) if num_classes else None

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        x = max_pool(self.stem(x), 3, 2, 1)
        outs = {}
        for name, stage in zip(("c2", "c3", "c4", "c5"), self.stages):
            x = stage(x)
            outs[name] = x
        del outs["c2"]
        outs["last_conv"] = outs["c5"]
        return outs



@register("covidnet")
def covidnet(**kw: Any) -> COVIDNet:
    """COVID-Net-style PEPX network (design only; see the module docstring)."""
    return COVIDNet(**kw)
