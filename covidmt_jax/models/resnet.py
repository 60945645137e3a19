"""ResNet-18/34/50/101 and ResNeXt-50 (32x4d), torchvision layout (He et al. 2016; Xie et al. 2017).

Module names equal torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``fc``), so
torchvision and timm ``state_dict`` files import without a rename table.
Stage outputs: ``c3 = layer2`` (stride 8), ``c4 = layer3`` (16), ``c5 = last_conv = layer4`` (32).
"""
from __future__ import annotations

from typing import Any, Sequence, Type

import jax
import jax.numpy as jnp
from flax import nnx

from covidmt_jax.models.base import Backbone
from covidmt_jax.models.layers import (BasicBlock, Bottleneck, batch_norm, conv2d,
                                       linear, max_pool)
from covidmt_jax.models.registry import register


class ResNet(Backbone):
    """``[B, H, W, in_channels] -> [B, num_classes]``; ``num_classes=0`` drops ``fc``.

    ``stage_widths``: the planes of layer1-4 (torchvision: 64, 128, 256, 512; the stem has
    ``stage_widths[0]`` channels). Narrower widths, e.g. ``(8, 16, 32, 64)``, give the same
    graph with far fewer parameters, for tests and quick runs; torchvision/timm weights fit
    only the default widths.
    """

    def __init__(self, block: Type[BasicBlock] | Type[Bottleneck], layers: Sequence[int], *,
                 num_classes: int = 1, in_channels: int = 1, groups: int = 1,
                 width_per_group: int = 64, stage_widths: Sequence[int] = (64, 128, 256, 512),
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        stage_widths = tuple(int(w) for w in stage_widths)
        if len(stage_widths) != 4 or min(stage_widths) < 1:
            raise ValueError(f"stage_widths must be 4 positive channel counts, got {stage_widths}")
        if block is Bottleneck and any(w * width_per_group < 64 for w in stage_widths):
            raise ValueError(f"stage_widths {stage_widths}: with width_per_group={width_per_group} "
                             f"every stage needs >= {-(-64 // width_per_group)} planes")
        self.num_classes = num_classes
        self.in_channels = in_channels
        stem = stage_widths[0]
        self.conv1 = conv2d(in_channels, stem, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(stem, dtype=dtype, rngs=rngs)
        in_ch = stem
        stages = []
        for i, (planes, n_blocks) in enumerate(zip(stage_widths, layers)):
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_ch, planes, stride=2 if (j == 0 and i > 0) else 1,
                                    groups=groups, base_width=width_per_group, dtype=dtype, rngs=rngs))
                in_ch = planes * block.expansion
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        e = block.expansion
        c3, c4, c5 = (w * e for w in stage_widths[1:])
        self.feature_channels = {"c3": c3, "c4": c4, "c5": c5, "last_conv": c5}
        self.fc = linear(c5, num_classes, dtype=dtype, rngs=rngs) if num_classes else None

    torch_sources = ("torchvision", "timm")

    def torch_head_prefixes(self) -> tuple[str, ...]:
        return ("fc.",)

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = max_pool(x, 3, 2, 1)
        outs = {}
        for name, stage in (("c2", self.layer1), ("c3", self.layer2), ("c4", self.layer3),
                            ("c5", self.layer4)):
            for blk in stage:
                x = blk(x)
            outs[name] = x
        del outs["c2"]
        outs["last_conv"] = outs["c5"]
        return outs



@register("resnet18")
def resnet18(**kw: Any) -> ResNet:
    """ResNet-18 (11.7 M params with 1000 classes): small, for fast tests and the demo."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kw)


@register("resnet34")
def resnet34(**kw: Any) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), **kw)


@register("resnet50")
def resnet50(**kw: Any) -> ResNet:
    """ResNet-50, the paper's first base network."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kw)


@register("resnet101")
def resnet101(**kw: Any) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), **kw)


@register("resnext50_32x4d")
def resnext50_32x4d(**kw: Any) -> ResNet:
    """ResNeXt-50 32x4d, the paper's second base network (32 groups of width 4)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4, **kw)
