"""The one backbone/classifier interface every zoo model implements.

Callers (COVIDMT heads, Grad-CAM, the FPN, the trainer) use only this interface:

- ``features(x) -> {"c3", "c4", "c5", "last_conv"}``: stage outputs ``[B, h, w, C]`` at
  strides 8 / 16 / 32 and the Grad-CAM layer (the last convolutional feature map).
- ``feature_channels``: channels of each of those keys.
- ``pool_and_classify(last_conv) -> [B, num_outputs]`` logits computed from the Grad-CAM
  layer alone, so a CAM is one ``jax.vjp`` of this function.
- ``pooled(x) -> [B, C]`` global-average-pooled ``last_conv``.
- ``__call__(x) -> [B, num_classes]`` logits.

Inputs are ``[B, H, W, C]`` float images (C = ``in_channels``), already normalised.
"""
from __future__ import annotations

import jax
from flax import nnx

from covidmt_jax.models.layers import global_avg_pool

FEATURE_KEYS = ("c3", "c4", "c5", "last_conv")


class Backbone(nnx.Module):
    """Mixin of the shared interface; subclasses define ``features`` and ``pool_and_classify``."""

    feature_channels: dict[str, int]
    num_classes: int
    in_channels: int

    def features(self, x: jax.Array) -> dict[str, jax.Array]:  # pragma: no cover - abstract
        """``{"c3", "c4", "c5", "last_conv"}`` feature maps; every zoo backbone overrides it."""
        raise NotImplementedError(f"{type(self).__name__} must define features()")

    def pool_and_classify(self, last_conv: jax.Array) -> jax.Array:
        """Default head: global average pooling -> ``self.fc`` (``[B, h, w, C] -> [B, K]``)."""
        if getattr(self, "fc", None) is None:
            raise ValueError(f"this {type(self).__name__} was built with num_classes=0 (backbone only)")
        return self.fc(global_avg_pool(last_conv))

    def pooled(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, feature_channels['last_conv']]``."""
        return global_avg_pool(self.features(x)["last_conv"])

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, in_channels] -> [B, num_classes]`` logits."""
        self._check_input(x)
        return self.pool_and_classify(self.features(x)["last_conv"])

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects images [B, H, W, {self.in_channels}] (NHWC), "
                f"got shape {tuple(x.shape)}")
