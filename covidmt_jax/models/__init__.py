"""Flax NNX model zoo, chosen by name: ``create(name, ...)``, ``available()``."""
from covidmt_jax.models.registry import available, check_filled, create, create_unfilled, register
from covidmt_jax.models import covidmt, covidnet, densenet, resnet, unet, vgg, xception  # noqa: F401  (registration)

__all__ = ["available", "check_filled", "create", "create_unfilled", "register"]
