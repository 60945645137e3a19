"""Flax NNX model zoo, chosen by name: ``create(name, ...)``, ``available()``."""
from covidmt_jax.models.registry import available, create, register
from covidmt_jax.models import covidmt, covidnet, resnet, unet, vgg, xception  # noqa: F401  (registration)
from covidmt_jax.models.lungs import LungSegmenter, load_lung_segmenter, lung_segmenter

__all__ = ["available", "create", "register", "lung_segmenter", "load_lung_segmenter", "LungSegmenter"]
