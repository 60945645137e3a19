"""VGG-19 and VGG-19-BN, torchvision layout (Simonyan & Zisserman 2014).

``features.<i>`` / ``classifier.<i>`` keys of torchvision map onto our ``convs`` / ``bns`` /
``fc*`` lists through ``torch_renames`` (the indices of the ReLU and pooling layers are
skipped exactly as torchvision's ``Sequential`` numbers them).
Stage outputs (after each max-pool): ``c3`` stride 8 (256 ch), ``c4`` 16 (512), ``c5`` 32 (512);
``last_conv`` = ``features[-1]``, the output of the last max-pool, the layer pytorch-grad-cam
uses for VGG. The classifier pools adaptively to 7x7 as torchvision does, so any input
size works (the flatten is done in PyTorch's C, H, W order).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from covidmt_jax.models.base import Backbone
from covidmt_jax.models.layers import adaptive_avg_pool, batch_norm, conv2d, linear, max_pool
from covidmt_jax.models.registry import register

CFG_19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M")


class VGG(Backbone):
    """``[B, H, W, in_channels] -> [B, num_classes]``; ``num_classes=0`` keeps the conv trunk.

    ``hidden``: width of the two hidden dense layers (4096 in torchvision; smaller values
    make cheap test models but do not import ImageNet classifier weights)."""

    torch_sources = ("torchvision",)

    def __init__(self, cfg: Sequence[int | str] = CFG_19, *, batch_norm_: bool = False,
                 num_classes: int = 1, in_channels: int = 1, dropout: float = 0.5,
                 hidden: int = 4096, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.cfg = tuple(cfg)
        convs, bns, renames = [], [], {}
        in_ch, idx = in_channels, 0
        for v in self.cfg:
            if v == "M":
                idx += 1
                continue
            renames[f"convs.{len(convs)}"] = f"features.{idx}"
            convs.append(conv2d(in_ch, int(v), 3, bias=True, dtype=dtype, rngs=rngs))
            idx += 1
            if batch_norm_:
                renames[f"bns.{len(bns)}"] = f"features.{idx}"
                bns.append(batch_norm(int(v), dtype=dtype, rngs=rngs))
                idx += 1
            idx += 1  # ReLU
            in_ch = int(v)
        self.convs = nnx.List(convs)
        self.bns = nnx.List(bns) if batch_norm_ else None
        self._renames = renames
        self.feature_channels = {"c3": 256, "c4": 512, "c5": 512, "last_conv": 512}
        if num_classes:
            self.fc1 = linear(512 * 7 * 7, hidden, dtype=dtype, rngs=rngs)
            self.fc2 = linear(hidden, hidden, dtype=dtype, rngs=rngs)
            self.fc3 = linear(hidden, num_classes, dtype=dtype, rngs=rngs)
            self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
        else:
            self.fc1 = self.fc2 = self.fc3 = self.dropout = None

    def torch_renames(self) -> dict[str, str]:
        return {**self._renames, "fc1": "classifier.0", "fc2": "classifier.3", "fc3": "classifier.6"}

    def torch_head_prefixes(self) -> tuple[str, ...]:
        return ("classifier.6.",)

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        outs, i, n_pool = {}, 0, 0
        for v in self.cfg:
            if v == "M":
                x = max_pool(x, 2, 2)
                n_pool += 1
                if n_pool in (3, 4, 5):
                    outs[f"c{n_pool}"] = x
                continue
            x = self.convs[i](x)
            if self.bns is not None:
                x = self.bns[i](x)
            x = nnx.relu(x)
            i += 1
        outs["last_conv"] = outs["c5"]
        return outs

    def pool_and_classify(self, last_conv: jax.Array) -> jax.Array:
        if self.fc1 is None:
            raise ValueError("this VGG was built with num_classes=0 (backbone only)")
        x = adaptive_avg_pool(last_conv, (7, 7))
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch flattens C, H, W
        x = self.dropout(nnx.relu(self.fc1(x)))
        x = self.dropout(nnx.relu(self.fc2(x)))
        return self.fc3(x)


@register("vgg19")
def vgg19(**kw: Any) -> VGG:
    """VGG-19 (configuration E), one of the paper's Table 2 baselines."""
    return VGG(CFG_19, batch_norm_=False, **kw)


@register("vgg19_bn")
def vgg19_bn(**kw: Any) -> VGG:
    """VGG-19 with BatchNorm after every conv (torchvision ``vgg19_bn``)."""
    return VGG(CFG_19, batch_norm_=True, **kw)
