"""DenseNet-121/169/201, torchvision layout (Huang et al. 2017), also torchxrayvision's DenseNet.

Module names equal torchvision's ``densenet*`` (``features.conv0``, ``features.norm0``,
``features.denseblock1.denselayer1.norm1`` ... ``features.transition1.conv``,
``features.norm5``, ``classifier``), so torchvision state dicts, CheXNet-style DenseNet-121
files and torchxrayvision's ``xrv.models.DenseNet`` state dicts import without a rename table.
Our trunk attribute is ``trunk`` (``features`` is the backbone-interface method); it is renamed
to ``features`` for the weight import.

Layout: conv0 7x7/2 -> norm0 -> ReLU -> max-pool 3x3/2 -> 4 dense blocks (each layer is
BN-ReLU-1x1 conv (``bn_size * growth`` channels) -> BN-ReLU-3x3 conv (``growth`` channels),
its output concatenated to its input) with transitions (BN-ReLU-1x1 conv halving the channels
-> 2x2 average pool) between them -> norm5. torchvision's head is ReLU -> global average pool
-> ``classifier``.

Feature maps (``features(x)``):
- ``c3``: dense block 2 output (stride 8), ``c4``: dense block 3 output (stride 16);
- ``c5`` = ``last_conv``: ReLU(norm5) (stride 32), the map the classifier pools.

Grad-CAM layer. pytorch-grad-cam's documentation picks ``target_layers = [model.features[-1]]``
(``features.norm5``) for DenseNets, and torchxrayvision users hook the same module. Because
torchvision's (and torchxrayvision's) head applies ``F.relu(features, inplace=True)``, the
activations pytorch-grad-cam records are overwritten with their ReLU, while its gradients are
those of the pre-ReLU tensor (zero where the activation is not positive). Our ``last_conv`` is
that ReLU(norm5) map and ``pool_and_classify`` re-applies the (idempotent) ReLU, so the
gradient w.r.t. ``last_conv`` is zero exactly where pytorch-grad-cam's is: our Grad-CAM of a
DenseNet equals theirs (tests/test_densenet.py; the CAM of the pre-ReLU norm5 map differs).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from covidmt_jax.models.base import Backbone
from covidmt_jax.models.layers import batch_norm, conv2d, global_avg_pool, linear, max_pool
from covidmt_jax.models.registry import register


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """``AvgPool2d(2, 2)`` (floor mode) on ``[B, H, W, C] -> [B, H // 2, W // 2, C]``."""
    return nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class DenseLayer(nnx.Module):
    """BN-ReLU-1x1 conv -> BN-ReLU-3x3 conv; ``[B, H, W, C] -> [B, H, W, C + growth]``."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int, *, dtype: Any, rngs: nnx.Rngs):
        mid = bn_size * growth_rate
        self.norm1 = batch_norm(in_ch, dtype=dtype, rngs=rngs)
        self.conv1 = conv2d(in_ch, mid, 1, padding=0, dtype=dtype, rngs=rngs)
        self.norm2 = batch_norm(mid, dtype=dtype, rngs=rngs)
        self.conv2 = conv2d(mid, growth_rate, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv1(nnx.relu(self.norm1(x)))
        y = self.conv2(nnx.relu(self.norm2(y)))
        return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)


class DenseBlock(nnx.Module):
    """``n`` dense layers named ``denselayer1..n``; ``[B, H, W, C] -> [B, H, W, C + n * growth]``."""

    def __init__(self, n_layers: int, in_ch: int, growth_rate: int, bn_size: int, *, dtype: Any,
                 rngs: nnx.Rngs):
        self.n_layers = n_layers
        for i in range(n_layers):
            setattr(self, f"denselayer{i + 1}",
                    DenseLayer(in_ch + i * growth_rate, growth_rate, bn_size, dtype=dtype, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.n_layers):
            x = getattr(self, f"denselayer{i + 1}")(x)
        return x


class Transition(nnx.Module):
    """BN-ReLU-1x1 conv -> 2x2 average pool; ``[B, H, W, C] -> [B, H / 2, W / 2, C_out]``."""

    def __init__(self, in_ch: int, out_ch: int, *, dtype: Any, rngs: nnx.Rngs):
        self.norm = batch_norm(in_ch, dtype=dtype, rngs=rngs)
        self.conv = conv2d(in_ch, out_ch, 1, padding=0, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return avg_pool_2x2(self.conv(nnx.relu(self.norm(x))))


class DenseTrunk(nnx.Module):
    """torchvision's ``DenseNet.features`` (stem, dense blocks, transitions, norm5)."""

    def __init__(self, in_channels: int, growth_rate: int, block_config: Sequence[int],
                 num_init_features: int, bn_size: int, *, dtype: Any, rngs: nnx.Rngs):
        self.n_blocks = len(block_config)
        self.conv0 = conv2d(in_channels, num_init_features, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
        self.norm0 = batch_norm(num_init_features, dtype=dtype, rngs=rngs)
        ch = num_init_features
        block_channels = []
        for i, n in enumerate(block_config):
            setattr(self, f"denseblock{i + 1}",
                    DenseBlock(n, ch, growth_rate, bn_size, dtype=dtype, rngs=rngs))
            ch += n * growth_rate
            block_channels.append(ch)
            if i != len(block_config) - 1:
                setattr(self, f"transition{i + 1}", Transition(ch, ch // 2, dtype=dtype, rngs=rngs))
                ch //= 2
        self.block_channels = tuple(block_channels)
        self.norm5 = batch_norm(ch, dtype=dtype, rngs=rngs)
        self.out_channels = ch

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """``[B, H, W, C] -> {"block1".."block4": dense block outputs, "norm5": the last map}``."""
        x = max_pool(nnx.relu(self.norm0(self.conv0(x))), 3, 2, 1)
        outs = {}
        for i in range(self.n_blocks):
            x = getattr(self, f"denseblock{i + 1}")(x)
            outs[f"block{i + 1}"] = x
            if i != self.n_blocks - 1:
                x = getattr(self, f"transition{i + 1}")(x)
        outs["norm5"] = self.norm5(x)
        return outs


class DenseNet(Backbone):
    """``[B, H, W, in_channels] -> [B, num_classes]``; ``num_classes=0`` drops ``classifier``."""

    torch_sources = ("torchvision",)

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, *, num_classes: int = 1,
                 in_channels: int = 1, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if len(block_config) != 4:
            raise ValueError(f"DenseNet needs 4 dense blocks, got block_config={tuple(block_config)}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.trunk = DenseTrunk(in_channels, growth_rate, block_config, num_init_features, bn_size,
                                dtype=dtype, rngs=rngs)
        ch = self.trunk.out_channels
        self.feature_channels = {"c3": self.trunk.block_channels[1], "c4": self.trunk.block_channels[2],
                                 "c5": ch, "last_conv": ch}
        self.classifier = linear(ch, num_classes, dtype=dtype, rngs=rngs) if num_classes else None

    def torch_renames(self) -> dict[str, str]:
        return {"trunk": "features"}

    def torch_head_prefixes(self) -> tuple[str, ...]:
        return ("classifier.",)

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        t = self.trunk(x)
        last = nnx.relu(t["norm5"])
        return {"c3": t["block2"], "c4": t["block3"], "c5": last, "last_conv": last}

    def pool_and_classify(self, last_conv: jax.Array) -> jax.Array:
        """``[B, h, w, C]`` ReLU(norm5) -> ReLU (idempotent; masks the gradient as torch's in-place
        ReLU does, see the module docstring) -> global average pool -> ``[B, num_classes]``."""
        if self.classifier is None:
            raise ValueError("this DenseNet was built with num_classes=0 (backbone only)")
        return self.classifier(global_avg_pool(nnx.relu(last_conv)))


@register("densenet121")
def densenet121(**kw: Any) -> DenseNet:
    """DenseNet-121 (8.0 M params with 1000 classes): CheXNet's and torchxrayvision's network."""
    return DenseNet(32, (6, 12, 24, 16), 64, **kw)


@register("densenet169")
def densenet169(**kw: Any) -> DenseNet:
    return DenseNet(32, (6, 12, 32, 32), 64, **kw)


@register("densenet201")
def densenet201(**kw: Any) -> DenseNet:
    return DenseNet(32, (6, 12, 48, 32), 64, **kw)
