"""Models chosen by name: ``create(name, ...)`` and ``available()``."""
from __future__ import annotations

from typing import Any, Callable

import jax
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


#: the variables a weight file holds: what :func:`create_unfilled` leaves as shapes only
WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


def create_unfilled(name: str, **kwargs: Any) -> nnx.Module:
    """:func:`create` (same arguments) for a loader that then writes every parameter and
    BatchNorm statistic from a file: those variables hold only their shape and dtype
    (``jax.ShapeDtypeStruct``, from ``nnx.eval_shape``), so no random initialiser is compiled
    or run. Other state (e.g. dropout's RNG key) is computed as :func:`create` would.

    Write each variable with ``var.set_value(array)``, then call :func:`check_filled`.
    """
    build = lambda: create(name, **kwargs)  # noqa: E731
    graphdef, weights, rest = nnx.split(nnx.eval_shape(build), WEIGHTS, ...)
    if jax.tree.leaves(rest):
        # only the non-weight state is returned, so XLA drops the initialisers' work
        rest = jax.jit(lambda: nnx.split(build(), WEIGHTS, ...)[2])()
    return nnx.merge(graphdef, weights, rest)


def check_filled(model: nnx.Module, where: str) -> nnx.Module:
    """Raise ``ValueError`` naming ``where`` and the variables a loader left unwritten in a
    model from :func:`create_unfilled`; returns the model."""
    empty = ["/".join(map(str, path)) for path, var in nnx.to_flat_state(nnx.state(model))
             if isinstance(var.get_value(), jax.ShapeDtypeStruct)]
    if empty:
        raise ValueError(f"{where}: {len(empty)} variable(s) of the model were not loaded: "
                         f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
    return model
