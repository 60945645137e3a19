"""Pixel normalisation shared by the data pipeline, the lung segmenter and scoring.

Dependency-free apart from numpy (no JAX, no grain, nothing else from the package), so
any layer may import it. The grey statistics are the means of torchvision's ImageNet RGB
means and stds, so a grey model with summed RGB kernels sees what an RGB model sees on the
grey image replicated to three channels.
"""
from __future__ import annotations

import numpy as np

__all__ = ["RGB_MEAN", "RGB_STD", "GREY_MEAN", "GREY_STD", "normalise", "denormalise"]

#: torchvision's ImageNet per-channel statistics (R, G, B) of images in [0, 1].
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
#: Their means, rounded as the references round them: 0.449 and 0.226.
GREY_MEAN = 0.449
GREY_STD = 0.226


def _is_host(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, float, int))


def normalise(x):
    """``(x - GREY_MEAN) / GREY_STD`` for a grey image in [0, 1], any shape (numpy or jax
    arrays; numpy results are float32)."""
    if _is_host(x):
        return ((np.asarray(x, np.float32) - np.float32(GREY_MEAN)) / np.float32(GREY_STD)).astype(np.float32)
    return (x - GREY_MEAN) / GREY_STD


def denormalise(x):
    """Inverse of :func:`normalise`: back to the [0, 1] grey scale (not clipped)."""
    if _is_host(x):
        return (np.asarray(x, np.float32) * np.float32(GREY_STD) + np.float32(GREY_MEAN)).astype(np.float32)
    return x * GREY_STD + GREY_MEAN
