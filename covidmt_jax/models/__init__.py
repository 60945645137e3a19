"""Flax NNX model zoo, chosen by name: ``create(name, ...)``, ``available()``."""
from covidmt_jax.models.registry import available, create, register
from covidmt_jax.models import resnet  # noqa: F401  (registers resnet*, resnext*)

__all__ = ["available", "create", "register"]
