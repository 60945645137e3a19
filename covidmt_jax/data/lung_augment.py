"""Augmentation for lung segmenters on diseased and transmitted films, per sample, in numpy.

The target lung mask never changes with the intensity part: the network must learn that
lung under an opacity is still lung. On a grey film in [0, 1] (white = dense):

* **simulated opacities** (:func:`add_opacities`), drawn inside the target lung mask
  (softened by a Gaussian of ``0.03 * side``): a smooth random field (bicubic upsampling
  of a 6 x 6 uniform grid) thresholded into patches, then blended towards a soft-tissue
  level ``T`` (the film's 90th percentile, at least 0.6): ``x + a * field * (T - x)`` where
  ``T > x``. Kinds, one per draw: ground glass (``a`` 0.25-0.5, large patches),
  consolidation (``a`` 0.6-0.95, compact patches) and effusion-like density (a band rising
  from the lung base, 15-45 % of the lung height, with a meniscus: higher laterally,
  ``a`` 0.6-0.95);
* **contrast / gamma / noise / blur**: gamma in [0.6, 1.6], contrast about the mean in
  [0.7, 1.3], a brightness shift of up to 0.1, Gaussian noise of sigma up to 0.03, and a
  Gaussian blur (sigma 0.5-1.2 px) with p = 0.2;
* **messaging-channel JPEG** (p = 0.5): down-scaling by 0.5-1.0 and back (p = 0.3), then
  a JPEG round trip at quality 40-95 with 4:2:0 chroma subsampling of the grey film sent
  as RGB (as :mod:`covidmt_jax.channels` does);
* **geometry**: :func:`covidmt_jax.data.augment.apply_affine` (flip, rotate, zoom,
  translate) moves image and mask together.

:class:`LungAugment` holds the probabilities; :meth:`LungAugment.__call__` applies them
with a ``numpy.random.Generator``, so the result depends only on that generator.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image
from scipy import ndimage

from covidmt_jax.data.augment import apply_affine, random_affine_params

__all__ = ["OPACITY_KINDS", "LungAugment", "add_opacities", "photometric", "jpeg_roundtrip", "smooth_field"]

OPACITY_KINDS = ("ground_glass", "consolidation", "effusion")


def smooth_field(rng: np.random.Generator, hw: tuple[int, int], grid: int = 6) -> np.ndarray:
    """A smooth random field ``[H, W]`` in about [0, 1]: a ``grid x grid`` uniform draw
    upsampled bicubically."""
    g = rng.random((grid, grid)).astype(np.float32)
    return np.asarray(Image.fromarray(g, mode="F").resize((hw[1], hw[0]), Image.BICUBIC), np.float32)


def _soft_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(ndimage.gaussian_filter(mask.astype(np.float32), sigma), 0.0, 1.0)


def add_opacities(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                  kind: str | None = None) -> np.ndarray:
    """Brighten part of the lung like a disease opacity; see the module docstring.

    Args:
      image: float32 ``[H, W]`` grey in [0, 1].
      mask: ``[H, W]`` target lung mask (bool or {0, 1}); opacities stay inside it.
      kind: one of :data:`OPACITY_KINDS`; ``None`` draws one uniformly.

    Returns float32 ``[H, W]`` in [0, 1]; the image unchanged when the mask is empty.
    """
    x = np.asarray(image, np.float32)
    m = np.asarray(mask) > 0
    if x.shape != m.shape:
        raise ValueError(f"add_opacities: image {x.shape} and mask {m.shape} differ")
    if kind is None:
        kind = OPACITY_KINDS[int(rng.integers(len(OPACITY_KINDS)))]
    if kind not in OPACITY_KINDS:
        raise ValueError(f"opacity kind must be one of {OPACITY_KINDS}, got {kind!r}")
    if not m.any():
        return x.copy()
    h, w = x.shape
    level = max(float(np.percentile(x, 90)), 0.6)
    if kind == "effusion":
        rows = np.flatnonzero(m.any(1))
        top, bottom = rows[0], rows[-1]
        height = (bottom - top + 1) * rng.uniform(0.15, 0.45)
        yy = np.arange(h, dtype=np.float32)[:, None]
        xx = np.arange(w, dtype=np.float32)[None, :]
        cols = np.flatnonzero(m.any(0))
        centre = 0.5 * (cols[0] + cols[-1])
        half = max(0.5 * (cols[-1] - cols[0]), 1.0)
        meniscus = 0.35 * height * (np.abs(xx - centre) / half) ** 2  # higher at the sides
        side = rng.integers(3)  # 0 left of the image, 1 right, 2 both
        if side < 2:
            meniscus = np.where((xx < centre) == (side == 0), meniscus, -1e4)
        edge = bottom - height - meniscus
        field = np.clip((yy - edge) / max(0.08 * height, 1.0), 0.0, 1.0)
        alpha = rng.uniform(0.6, 0.95)
    else:
        field = smooth_field(rng, (h, w), grid=4 if kind == "ground_glass" else 7)
        cut = rng.uniform(0.35, 0.65) if kind == "ground_glass" else rng.uniform(0.55, 0.8)
        field = np.clip((field - cut) / 0.12, 0.0, 1.0)
        alpha = rng.uniform(0.25, 0.5) if kind == "ground_glass" else rng.uniform(0.6, 0.95)
    field = field * _soft_mask(m, 0.03 * max(h, w))
    return np.clip(x + alpha * field * np.maximum(level - x, 0.0), 0.0, 1.0).astype(np.float32)


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast, brightness, noise and (p = 0.2) blur; see the module docstring."""
    x = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    x = x ** np.float32(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    mean = float(x.mean())
    x = (x - mean) * np.float32(rng.uniform(0.7, 1.3)) + mean + np.float32(rng.uniform(-0.1, 0.1))
    sigma = rng.uniform(0.0, 0.03)
    x = x + rng.normal(0.0, sigma, x.shape).astype(np.float32)
    if rng.random() < 0.2:
        x = ndimage.gaussian_filter(x, rng.uniform(0.5, 1.2))
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def jpeg_roundtrip(image: np.ndarray, quality: int, *, scale: float = 1.0) -> np.ndarray:
    """``[H, W]`` grey in [0, 1] -> optionally down-scaled by ``scale`` -> RGB JPEG 4:2:0 at
    ``quality`` -> decoded, back to ``[H, W]`` grey."""
    x = np.asarray(image, np.float32)
    h, w = x.shape
    im = Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))
    if scale < 1.0:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=int(quality), subsampling=2)
    out = Image.open(io.BytesIO(buf.getvalue())).convert("L")
    if out.size != (w, h):
        out = out.resize((w, h), Image.BILINEAR)
    return (np.asarray(out, np.float32) / 255.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LungAugment:
    """Probabilities of each part (see the module docstring); all 0 = no augmentation."""
    p_geometric: float = 0.8
    p_opacity: float = 0.5
    p_second_opacity: float = 0.3
    p_photometric: float = 0.8
    p_jpeg: float = 0.5
    p_downscale: float = 0.3

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(image float32 [H, W] in [0, 1], mask [H, W])`` -> augmented pair (mask same dtype)."""
        x = np.asarray(image, np.float32)
        m = np.asarray(mask)
        if rng.random() < self.p_geometric:
            params = random_affine_params(rng, translate=0.08, rotate_deg=10.0, zoom=0.12)
            x, m, _ = apply_affine(x, params, mask=m)
        if rng.random() < self.p_opacity:
            x = add_opacities(x, m, rng)
            if rng.random() < self.p_second_opacity:
                x = add_opacities(x, m, rng)
        if rng.random() < self.p_photometric:
            x = photometric(x, rng)
        if rng.random() < self.p_jpeg:
            scale = rng.uniform(0.5, 1.0) if rng.random() < self.p_downscale else 1.0
            x = jpeg_roundtrip(x, int(rng.integers(40, 96)), scale=scale)
        return x, m
