"""The messaging channel as a training augmentation ("channel in the loop").

With probability ``p`` a training image is sent through a simulated messaging channel before it
reaches the model: its long side is scaled by ``s ~ U(scale)`` (the app's downscaling of a
large film, relative to the training resolution), it is encoded as a baseline JPEG at quality
``q ~ U{quality}`` with 4:2:0 chroma subsampling (what a phone sends,
:class:`covidmt_jax.channels.Channel`) and decoded, then resized back (bilinear) to the
training size. So the model sees the blocking, ringing and blur that the ``whatsapp`` channel
and the JPEG-quality sweep put on the scored films, at random strengths.

The channel acts on the grey image in [0, 1] AFTER the geometric augmentation and the intensity
shift and BEFORE normalisation (:func:`covidmt_jax.data.augment.augment_sample` calls
:func:`channel_augment` when ``AugmentConfig.channel_p > 0``); masks and boxes are unchanged
(the channel does not move pixels). All randomness comes from the ``numpy.random.Generator``
passed in: exactly three draws (apply?, quality, scale) per call, whether or not the channel
is applied, so the draws that follow do not depend on ``p``.

Resolution caveat: the pipeline resizes each film to the training size before augmenting, so
the channel compresses the film at that size (e.g. 256 px) times ``s``, whereas a phone sends
the full film; the JPEG blocks are therefore larger relative to the anatomy than on a real
transmission of a large film. Scoring always transmits the film at its stored size.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from covidmt_jax import channels

__all__ = ["check_channel_options", "channel_augment"]


def check_channel_options(p: float, quality: Sequence[int], scale: Sequence[float]) -> None:
    """Raise ``ValueError`` naming the ``AugmentConfig`` field for impossible options."""
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"AugmentConfig.channel_p must be in [0, 1], got {p!r}")
    q = tuple(quality)
    if len(q) != 2 or any(int(v) != v or not 1 <= v <= 100 for v in q) or q[0] > q[1]:
        raise ValueError(f"AugmentConfig.channel_quality must be (low, high) integers in 1..100 "
                         f"with low <= high, got {quality!r}")
    s = tuple(scale)
    if len(s) != 2 or any(not (math.isfinite(v) and 0.0 < v <= 1.0) for v in s) or s[0] > s[1]:
        raise ValueError(f"AugmentConfig.channel_scale must be (low, high) in (0, 1] with "
                         f"low <= high, got {scale!r}")


def channel_augment(image: np.ndarray, rng: np.random.Generator, *, p: float,
                    quality: Sequence[int] = (30, 95), scale: Sequence[float] = (0.5, 1.0)) -> np.ndarray:
    """One random channel round trip of a grey image (see the module docstring).

    Args:
      image: float ``[H, W]`` grey in [0, 1].
      rng: the sample's generator (three draws are always taken).
      p: probability that the channel is applied.
      quality: inclusive range of the JPEG quality.
      scale: range of the long-side scale factor before encoding.

    Returns:
      float32 ``[H, W]`` in [0, 1] (the input, as float32, when the channel is not applied).
    """
    check_channel_options(p, quality, scale)
    x = np.asarray(image, np.float32)
    if x.ndim != 2:
        raise ValueError(f"channel_augment expects a grey image [H, W], got shape {x.shape}")
    apply = rng.uniform() < p
    q = int(rng.integers(int(quality[0]), int(quality[1]) + 1))
    s = float(rng.uniform(float(scale[0]), float(scale[1])))
    if not apply:
        return x
    long_side = max(x.shape)
    side = max(8, int(round(long_side * s)))
    channel = channels.jpeg(q, max_side=side if side < long_side else None)
    return channel.transmit_array(x, keep_size=True).astype(np.float32)
