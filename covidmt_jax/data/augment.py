"""The paper's training augmentation, per sample, in numpy (runs inside grain workers).

Antony et al. augment with: translate +-10 % (x and y), rotate +-10 degrees, horizontal
flip, zoom +-15 % and an intensity shift of +-10 %. Here:

* one 2x3 affine about the image centre carries the geometric part: horizontal flip
  (p = 0.5), then rotation by ``angle`` in [-10, 10] degrees and isotropic scale ``zoom`` in
  [0.85, 1.15] (``> 1`` magnifies) about the centre, then a translation of ``tx * W`` and
  ``ty * H`` with ``tx, ty`` in [-0.1, 0.1];
* the image is resampled bilinearly, the mask with nearest neighbour, pixels that come
  from outside the input are 0 (black, the radiograph background);
* boxes (xyxy, pixels) are moved with the image: the four corners are transformed, the
  enclosing axis-aligned box is clipped to the image and a box keeps ``valid = True`` only
  if at least ``min_box_area`` (20 %) of the enclosing box's area is still inside;
* the intensity shift adds one value drawn uniformly in +-``max_shift`` (0.1 = 10 % of the
  [0, 1] grey scale's dynamic range) to every pixel of the grey image in [0, 1] and clips
  back to [0, 1]. It acts BEFORE normalisation (``data.pipeline.normalise``).

Coordinates are continuous pixel coordinates: pixel ``(i, j)`` covers ``[j, j + 1] x
[i, i + 1]`` (x right, y down), its centre is ``(j + 0.5, i + 0.5)``; a box ``[x0, y0,
x1, y1]`` in pixels of an ``H x W`` image lies in ``[0, W] x [0, H]``. This is Pillow's
convention, whose ``Image.transform(AFFINE)`` does the resampling (about 2 ms for a
512 x 512 float image, ~3x faster than ``scipy.ndimage.affine_transform``).

All randomness comes from the ``numpy.random.Generator`` passed in (grain's
``random_map`` hands one per record, derived from the pipeline seed and the record's
position), so the result depends only on that generator.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
from PIL import Image

from covidmt_jax.data.channel_augment import channel_augment, check_channel_options

__all__ = [
    "AffineParams",
    "AugmentConfig",
    "PAPER_AUGMENT",
    "NO_AUGMENT",
    "random_affine_params",
    "affine_matrix",
    "apply_affine",
    "transform_boxes",
    "intensity_shift",
    "augment_sample",
]


@dataclasses.dataclass(frozen=True)
class AffineParams:
    """One draw of the geometric augmentation.

    Attributes:
      angle_deg: rotation in degrees (positive = counter-clockwise as displayed, i.e. with y
        pointing down the image).
      zoom: isotropic scale about the centre (``> 1`` magnifies).
      tx, ty: translation as a fraction of the width / height (positive = right / down).
      hflip: mirror left-right (applied first, about the vertical centre line).
    """
    angle_deg: float = 0.0
    zoom: float = 1.0
    tx: float = 0.0
    ty: float = 0.0
    hflip: bool = False

    @property
    def is_identity(self) -> bool:
        return self.angle_deg == 0.0 and self.zoom == 1.0 and self.tx == 0.0 and self.ty == 0.0 and not self.hflip


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the augmentation (defaults: the paper's).

    ``translate`` (fraction of size), ``rotate_deg``, ``zoom`` (scale in ``[1 - zoom,
    1 + zoom]``), ``hflip`` (flip with probability 0.5), ``intensity_shift`` (fraction of
    the [0, 1] range), ``min_box_area`` (fraction of a transformed box that must stay in the
    image for it to stay valid). All zero / False = no augmentation.
    """
    translate: float = 0.1
    rotate_deg: float = 10.0
    zoom: float = 0.15
    hflip: bool = True
    intensity_shift: float = 0.1
    min_box_area: float = 0.2
    #: the messaging channel as augmentation (:mod:`covidmt_jax.data.channel_augment`):
    #: probability, JPEG-quality range, long-side scale range; ``channel_p = 0`` = off
    channel_p: float = 0.0
    channel_quality: tuple = (30, 95)
    channel_scale: tuple = (0.5, 1.0)

    def __post_init__(self):
        check_channel_options(self.channel_p, self.channel_quality, self.channel_scale)
        object.__setattr__(self, "channel_quality", tuple(int(v) for v in self.channel_quality))
        object.__setattr__(self, "channel_scale", tuple(float(v) for v in self.channel_scale))
        for f in ("translate", "rotate_deg", "zoom", "intensity_shift"):
            v = getattr(self, f)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"AugmentConfig.{f} must be a finite number >= 0, got {v!r}")
        if self.zoom >= 1:
            raise ValueError(f"AugmentConfig.zoom must be < 1 (scale in [1 - zoom, 1 + zoom]), got {self.zoom}")
        if not 0 <= self.min_box_area <= 1:
            raise ValueError(f"AugmentConfig.min_box_area must be in [0, 1], got {self.min_box_area}")

    @property
    def geometric(self) -> bool:
        return bool(self.translate or self.rotate_deg or self.zoom or self.hflip)

    @property
    def enabled(self) -> bool:
        return self.geometric or bool(self.intensity_shift) or bool(self.channel_p)

    @classmethod
    def from_any(cls, cfg: "AugmentConfig | Mapping[str, Any] | None") -> "AugmentConfig":
        """``None`` -> the paper's config; a mapping -> fields overriding the paper's."""
        if cfg is None:
            return PAPER_AUGMENT
        if isinstance(cfg, AugmentConfig):
            return cfg
        if isinstance(cfg, Mapping):
            unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"unknown augmentation option(s) {sorted(unknown)}")
            return dataclasses.replace(PAPER_AUGMENT, **dict(cfg))
        raise TypeError(f"augment_cfg must be an AugmentConfig, a mapping or None, got {type(cfg).__name__}")


PAPER_AUGMENT = AugmentConfig()
NO_AUGMENT = AugmentConfig(translate=0.0, rotate_deg=0.0, zoom=0.0, hflip=False, intensity_shift=0.0)


def random_affine_params(rng: np.random.Generator, *, translate: float = 0.1, rotate_deg: float = 10.0,
                         zoom: float = 0.15, hflip: bool = True) -> AffineParams:
    """Draw :class:`AffineParams`: each range uniform, the flip with probability 0.5.

    Five values are always drawn (in the order angle, zoom, tx, ty, flip) so the generator
    advances the same way whatever the ranges.
    """
    u = rng.uniform(-1.0, 1.0, size=4)
    flip = rng.random() < 0.5
    return AffineParams(angle_deg=float(u[0] * rotate_deg), zoom=float(1.0 + u[1] * zoom),
                        tx=float(u[2] * translate), ty=float(u[3] * translate), hflip=bool(hflip and flip))


def affine_matrix(params: AffineParams, height: int, width: int) -> np.ndarray:
    """Forward map float64 ``[2, 3]``: input pixel coordinates (x, y) -> output coordinates.

    ``out = R(angle) * zoom * (F(in) - c) + c + (tx * W, ty * H)`` with ``c = (W/2, H/2)``
    and ``F`` the optional mirror ``x -> W - x``.
    """
    cx, cy = width / 2.0, height / 2.0
    flip = np.array([[-1.0, 0.0, float(width)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) if params.hflip else np.eye(3)
    a = math.radians(params.angle_deg)
    c, s = math.cos(a) * params.zoom, math.sin(a) * params.zoom
    # y points down, so a visually counter-clockwise rotation is [[c, s], [-s, c]].
    rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    to_c = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    back = np.array([[1.0, 0.0, cx + params.tx * width], [0.0, 1.0, cy + params.ty * height], [0.0, 0.0, 1.0]])
    return (back @ rot @ to_c @ flip)[:2]


def _inverse(m: np.ndarray) -> np.ndarray:
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def _warp(x: np.ndarray, inv: np.ndarray, resample: int) -> np.ndarray:
    """Resample a 2-D array through the inverse map ``inv`` (output -> input coordinates)."""
    h, w = x.shape
    if x.dtype == np.uint8:
        im = Image.fromarray(x)
    else:
        im = Image.fromarray(np.ascontiguousarray(x, dtype=np.float32))
    coeffs = tuple(float(v) for v in inv.reshape(-1))
    out = im.transform((w, h), Image.AFFINE, coeffs, resample=resample)
    return np.asarray(out)


def transform_boxes(boxes: np.ndarray, m: np.ndarray, height: int, width: int, *,
                    min_area: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Move xyxy pixel boxes ``[N, 4]`` with the forward affine ``m [2, 3]``.

    Returns ``(boxes float32 [N, 4], valid bool [N])``: the enclosing axis-aligned box of
    the four transformed corners, clipped to ``[0, W] x [0, H]``; ``valid`` is False when
    less than ``min_area`` of the enclosing box's area lies inside the image (or the input
    box is empty).
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(b):
        return np.zeros((0, 4), np.float32), np.zeros((0,), bool)
    x0, y0, x1, y1 = b.T
    corners = np.stack([np.stack([x0, y0], -1), np.stack([x1, y0], -1),
                        np.stack([x0, y1], -1), np.stack([x1, y1], -1)], 1)  # [N, 4, 2]
    moved = corners @ m[:, :2].T + m[:, 2]
    lo, hi = moved.min(1), moved.max(1)
    area = np.prod(hi - lo, -1)
    clo = np.clip(lo, 0.0, [width, height])
    chi = np.clip(hi, 0.0, [width, height])
    kept = np.prod(np.maximum(chi - clo, 0.0), -1)
    src_area = np.maximum(x1 - x0, 0.0) * np.maximum(y1 - y0, 0.0)
    valid = (src_area > 0) & (kept > 0) & (kept >= min_area * np.maximum(area, 1e-12))
    return np.concatenate([clo, chi], -1).astype(np.float32), valid


def apply_affine(image: np.ndarray, params: AffineParams, *, mask: np.ndarray | None = None,
                 boxes: np.ndarray | None = None, order: int = 1,
                 min_box_area: float = 0.2) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    """Apply one geometric augmentation to an image and what goes with it.

    Args:
      image: float32 ``[H, W]`` (grey in [0, 1]).
      params: see :class:`AffineParams`.
      mask: optional ``[H, W]`` (bool, or float: resampled nearest, same dtype returned).
      boxes: optional float ``[N, 4]`` xyxy in pixels.
      order: image interpolation, 1 = bilinear, 0 = nearest.
      min_box_area: see :func:`transform_boxes`.

    Returns:
      ``(image float32 [H, W], mask [H, W] | None, (boxes float32 [N, 4], valid bool [N]) |
      None)``. Identity params return the inputs' values unchanged (copies).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"apply_affine expects a 2-D image [H, W], got shape {image.shape}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order}")
    h, w = image.shape
    if mask is not None and np.shape(mask) != (h, w):
        raise ValueError(f"mask shape {np.shape(mask)} differs from the image's {(h, w)}")
    m = affine_matrix(params, h, w)
    box_out = None
    if boxes is not None:
        box_out = transform_boxes(boxes, m, h, w, min_area=min_box_area)
    if params.is_identity:
        mask_out = None if mask is None else np.array(mask, copy=True)
        return np.array(image, np.float32, copy=True), mask_out, box_out
    inv = _inverse(m)
    out = _warp(image.astype(np.float32, copy=False), inv, Image.BILINEAR if order == 1 else Image.NEAREST)
    mask_out = None
    if mask is not None:
        mk = np.asarray(mask)
        if mk.dtype == bool:
            mask_out = _warp(mk.astype(np.uint8), inv, Image.NEAREST) > 0
        else:
            mask_out = _warp(mk.astype(np.float32), inv, Image.NEAREST).astype(mk.dtype)
    return np.array(out, np.float32), mask_out, box_out


def intensity_shift(image: np.ndarray, rng: np.random.Generator, max_shift: float = 0.1) -> np.ndarray:
    """``clip(image + u, 0, 1)`` with ``u ~ U(-max_shift, max_shift)``: a brightness shift of up
    to ``max_shift`` of the [0, 1] grey range, applied to the grey image BEFORE normalisation.
    One value is always drawn from ``rng``."""
    u = rng.uniform(-1.0, 1.0) * max_shift
    return np.clip(np.asarray(image, np.float32) + np.float32(u), 0.0, 1.0)


def augment_sample(sample: Mapping[str, Any], rng: np.random.Generator,
                   cfg: AugmentConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Augment one sample consistently.

    ``sample``: ``{"image": float32 [H, W] in [0, 1], ["mask": [H, W]], ["boxes": float
    [N, 4] xyxy pixels, "box_valid": [N] (optional, default all valid)], ...}``; other keys
    are passed through. Returns a new dict with the transformed ``image``, ``mask``,
    ``boxes`` and ``box_valid`` (bool ``[N]``: input validity AND still-inside test).
    ``cfg``: :class:`AugmentConfig` (``None`` = the paper's).
    """
    cfg = AugmentConfig.from_any(cfg)
    out = dict(sample)
    params = random_affine_params(rng, translate=cfg.translate, rotate_deg=cfg.rotate_deg, zoom=cfg.zoom,
                                  hflip=cfg.hflip)
    boxes = sample.get("boxes")
    image, mask, moved = apply_affine(sample["image"], params, mask=sample.get("mask"), boxes=boxes,
                                      min_box_area=cfg.min_box_area)
    out["image"] = intensity_shift(image, rng, cfg.intensity_shift) if cfg.intensity_shift else image
    if cfg.channel_p:
        out["image"] = channel_augment(out["image"], rng, p=cfg.channel_p, quality=cfg.channel_quality,
                                       scale=cfg.channel_scale)
    if mask is not None:
        out["mask"] = mask
    if moved is not None:
        b, valid = moved
        prior = sample.get("box_valid")
        if prior is not None:
            valid = valid & (np.asarray(prior) > 0)
        out["boxes"], out["box_valid"] = b, valid
    return out
