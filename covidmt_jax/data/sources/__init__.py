"""Dataset sources: each reads one dataset in its published layout and yields records
(see :mod:`covidmt_jax.data.records`).

``SOURCES`` maps a source name to its class; modules add themselves with the
:func:`register_source` decorator::

    @register_source("covidx")
    class COVIDxSource(Source): ...

``get_source(name, **kwargs)`` builds one by name (for configs and CLIs).
"""
from __future__ import annotations

from typing import Callable, TypeVar

SOURCES: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_source(name: str) -> Callable[[T], T]:
    """Class decorator that registers a source class under ``name`` (unique)."""

    def deco(cls: T) -> T:
        if name in SOURCES and SOURCES[name] is not cls:
            raise ValueError(f"source name {name!r} already registered by {SOURCES[name].__qualname__}")
        SOURCES[name] = cls
        return cls

    return deco


def get_source(name: str, **kwargs):
    """Instantiate the source registered as ``name`` with ``kwargs``."""
    try:
        cls = SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown source {name!r}; available: {sorted(SOURCES)}") from None
    return cls(**kwargs)


__all__ = ["SOURCES", "register_source", "get_source"]

# The modules register their classes on import (they only need numpy and Pillow).
from covidmt_jax.data.sources import covidx, folder, lungs, nih, rsna, wacxr  # noqa: E402,F401

from covidmt_jax.data.sources import synthetic  # noqa: E402,F401  (synthetic_* phantom sources)

from covidmt_jax.data.sources import tfds_source  # noqa: E402,F401  ("tfds": TFDS builds, tfds imported lazily)

from covidmt_jax.data.sources import study  # noqa: E402,F401  (study_covid, study_tb: the real-film study's sets)
