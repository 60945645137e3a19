"""Exceptions shared across layers (standard library only)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and why. The CLIs print
    it as one line and exit 2 (``covidmt_jax.cli``). Re-exported by ``config_lib``."""
