"""Models chosen by name: ``create(name, ...)`` and ``available()``."""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {}


def register(name: str) -> Callable:
    """Decorator: register a model constructor under ``name``."""

    def deco(fn: Callable[..., nnx.Module]) -> Callable[..., nnx.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def _as_dtype(dtype: Any):
    if isinstance(dtype, str):
        try:
            return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None
    return dtype


def create(name: str, *, num_classes: int = 1, in_channels: int = 1, dtype: Any = jnp.float32,
           rngs: nnx.Rngs | int = 0, **model_specific: Any) -> nnx.Module:
    """Build the zoo model ``name``.

    Args:
      name: one of :func:`available` (e.g. ``"resnet50"``, ``"resnext50_32x4d"``, ``"covidmt"``).
      num_classes: logits of a plain classifier (``0`` keeps only the backbone).
      in_channels: 1 for grey CXRs, 3 for RGB.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters stay float32.
      rngs: an ``nnx.Rngs`` or an integer seed.
      **model_specific: passed to the model's constructor (e.g. ``depth`` for ``unet``,
        ``tasks`` and ``backbone`` for ``covidmt``).

    Returns the model in inference mode (BatchNorm uses running statistics); call
    ``model.train()`` or use ``nnx.view(model, use_running_average=False)`` to train.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels}")
    if not isinstance(rngs, nnx.Rngs):
        rngs = nnx.Rngs(int(rngs))
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels,
                           dtype=_as_dtype(dtype), rngs=rngs, **model_specific)
