"""Augmentation: boxes and masks stay on the image content, identity/flip exactness, ranges,
intensity shift bounds, determinism."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from covidmt_jax.data import augment as aug

H, W = 64, 64


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _bright_bbox(img: np.ndarray, thr: float = 0.5):
    ys, xs = np.nonzero(img > thr)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def _rect_image(box) -> np.ndarray:
    img = np.zeros((H, W), np.float32)
    x0, y0, x1, y1 = (int(v) for v in box)
    img[y0:y1, x0:x1] = 1.0
    return img


def test_identity_params_give_identity():
    rng = np.random.default_rng(0)
    img = rng.random((H, W), dtype=np.float32)
    mask = rng.random((H, W)) > 0.5
    boxes = np.array([[3, 4, 20, 30], [40, 41, 63, 64]], np.float32)
    out, m, (b, valid) = aug.apply_affine(img, aug.AffineParams(), mask=mask, boxes=boxes)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_allclose(b, boxes, atol=1e-5)
    assert valid.all()
    # ... and the config with all ranges zero leaves the sample untouched
    s = aug.augment_sample({"image": img, "mask": mask, "boxes": boxes}, rng, aug.NO_AUGMENT)
    np.testing.assert_array_equal(s["image"], img)
    np.testing.assert_array_equal(s["mask"], mask)
    np.testing.assert_allclose(s["boxes"], boxes, atol=1e-5)


def test_identity_matrix_through_the_resampler_is_exact():
    # a tiny non-identity path (rotation of 0 with zoom 1 but translate 0) goes through PIL:
    # force it with an exact integer translation and back
    img = np.random.default_rng(1).random((H, W), dtype=np.float32)
    p = aug.AffineParams(tx=4 / W)
    out, _, _ = aug.apply_affine(img, p)
    np.testing.assert_allclose(out[:, 4:], img[:, :-4], atol=1e-6)
    assert np.all(out[:, :4] == 0)


def test_hflip_flips_image_mask_and_boxes_exactly():
    rng = np.random.default_rng(2)
    img = rng.random((H, W + 8), dtype=np.float32)  # non-square on purpose
    mask = rng.random((H, W + 8)) > 0.5
    boxes = np.array([[3, 4, 20, 30], [50, 10, 72, 64]], np.float32)
    out, m, (b, valid) = aug.apply_affine(img, aug.AffineParams(hflip=True), mask=mask, boxes=boxes)
    np.testing.assert_allclose(out, img[:, ::-1], atol=1e-6)
    np.testing.assert_array_equal(m, mask[:, ::-1])
    w = W + 8
    expect = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    np.testing.assert_allclose(b, expect, atol=1e-5)
    assert valid.all()


def test_rotation_direction_and_zoom_about_centre():
    # positive angle = counter-clockwise on screen: a point right of the centre moves up
    m = aug.affine_matrix(aug.AffineParams(angle_deg=90.0), H, W)
    x, y = m @ np.array([W / 2 + 10, H / 2, 1.0])
    assert x == pytest.approx(W / 2, abs=1e-9) and y == pytest.approx(H / 2 - 10, abs=1e-9)
    # zoom 1.1 scales a centred box by 1.1 about the centre
    box = np.array([[22, 22, 42, 42]], np.float32)
    b, valid = aug.transform_boxes(box, aug.affine_matrix(aug.AffineParams(zoom=1.1), H, W), H, W)
    np.testing.assert_allclose(b[0], [32 - 11, 32 - 11, 32 + 11, 32 + 11], atol=1e-4)
    assert valid[0]


@pytest.mark.parametrize("seed", range(12))
def test_augmented_boxes_cover_the_bright_content(seed):
    rng = np.random.default_rng(seed)
    x0, y0 = rng.integers(14, 26, size=2)
    box = np.array([[x0, y0, x0 + rng.integers(12, 24), y0 + rng.integers(10, 22)]], np.float32)
    sample = {"image": _rect_image(box[0]), "boxes": box}
    out = aug.augment_sample(sample, np.random.default_rng(100 + seed), aug.PAPER_AUGMENT)
    assert out["box_valid"][0]
    got = _bright_bbox(out["image"])
    assert _iou(out["boxes"][0], got) > 0.8, (out["boxes"][0], got)


def test_boxes_pushed_out_of_the_image_are_invalidated_and_clipped():
    p = aug.AffineParams(tx=0.1)  # 6.4 px to the right
    boxes = np.array([[60, 30, 63, 34],      # entirely outside after the shift
                      [50, 10, 64, 20],      # (64 - 56.4) / 14 = 54 % left: valid, clipped
                      [58, 40, 64, 50]],     # (64 - 64.4) < 0 -> nothing left
                     np.float32)
    b, valid = aug.transform_boxes(boxes, aug.affine_matrix(p, H, W), H, W, min_area=0.2)
    assert valid.tolist() == [False, True, False]
    np.testing.assert_allclose(b[1], [56.4, 10, 64, 20], atol=1e-4)
    assert (b[:, [0, 2]] <= W).all() and (b[:, [1, 3]] <= H).all() and (b >= 0).all()
    # 20 % rule: 54 % left is not enough at min_area=0.6
    _, valid = aug.transform_boxes(boxes, aug.affine_matrix(p, H, W), H, W, min_area=0.6)
    assert not valid[1]
    # prior validity is kept through augment_sample
    out = aug.augment_sample({"image": np.zeros((H, W), np.float32), "boxes": boxes[1:2],
                              "box_valid": np.array([False])}, np.random.default_rng(0), aug.NO_AUGMENT)
    assert not out["box_valid"][0]


def _disc(cx, cy, r) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W] + 0.5
    return ((xx - cx) ** 2 + ((yy - cy) / 1.4) ** 2) < r ** 2


@pytest.mark.parametrize("seed", range(6))
def test_mask_stays_aligned_with_the_image(seed):
    shape = _disc(30, 34, 12) | _disc(44, 28, 6)
    img = shape.astype(np.float32)
    params = aug.random_affine_params(np.random.default_rng(seed))
    # nearest for both: exactly the same pixels
    out, m, _ = aug.apply_affine(img, params, mask=shape, order=0)
    np.testing.assert_array_equal(out > 0.5, m)
    assert m.sum() > 0.5 * shape.sum()
    # bilinear image: thresholded image and nearest mask differ only on the outline
    out, m, _ = aug.apply_affine(img, params, mask=shape, order=1)
    differ = (out > 0.5) != m
    assert differ.sum() <= 0.06 * m.sum(), differ.sum()


def test_augment_sample_moves_mask_with_image():
    shape = _disc(28, 30, 10)
    s = aug.augment_sample({"image": shape.astype(np.float32), "mask": shape},
                           np.random.default_rng(7), dataclasses.replace(aug.PAPER_AUGMENT, intensity_shift=0.0))
    assert s["mask"].dtype == bool
    inter = np.logical_and(s["image"] > 0.5, s["mask"]).sum()
    assert inter / np.logical_or(s["image"] > 0.5, s["mask"]).sum() > 0.9


def test_random_params_follow_the_configured_ranges():
    rng = np.random.default_rng(3)
    ps = [aug.random_affine_params(rng) for _ in range(2000)]
    ang = np.array([p.angle_deg for p in ps])
    zoom = np.array([p.zoom for p in ps])
    t = np.array([[p.tx, p.ty] for p in ps])
    flips = np.mean([p.hflip for p in ps])
    assert np.abs(ang).max() <= 10 and np.abs(ang).max() > 9.5
    assert zoom.min() >= 0.85 and zoom.max() <= 1.15 and zoom.min() < 0.86 and zoom.max() > 1.14
    assert np.abs(t).max() <= 0.1 and np.abs(t).max() > 0.095
    assert 0.45 < flips < 0.55
    no_flip = aug.random_affine_params(rng, hflip=False, translate=0.0, rotate_deg=0.0, zoom=0.0)
    assert no_flip.is_identity


def test_intensity_shift_is_bounded_and_clipped():
    base = np.full((8, 8), 0.5, np.float32)
    shifts = np.array([aug.intensity_shift(base, np.random.default_rng(i), 0.1)[0, 0] - 0.5 for i in range(500)])
    assert np.abs(shifts).max() <= 0.1 + 1e-6
    assert shifts.min() < -0.09 and shifts.max() > 0.09
    img = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    for i in range(50):
        out = aug.intensity_shift(img, np.random.default_rng(i), 0.1)
        assert out.min() >= 0.0 and out.max() <= 1.0
        d = out - img
        inside = (img > 0.1) & (img < 0.9)  # no clipping there: one constant shift
        assert np.ptp(d[inside]) < 1e-6


def test_augment_is_reproducible_per_generator():
    rng = np.random.default_rng(4)
    sample = {"image": rng.random((H, W), dtype=np.float32), "mask": rng.random((H, W)) > 0.5,
              "boxes": np.array([[10, 10, 30, 40]], np.float32)}
    a = aug.augment_sample(sample, np.random.default_rng(11))
    b = aug.augment_sample(sample, np.random.default_rng(11))
    c = aug.augment_sample(sample, np.random.default_rng(12))
    for k in ("image", "mask", "boxes", "box_valid"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], c["image"])


def test_bad_inputs_and_config():
    with pytest.raises(ValueError, match="2-D"):
        aug.apply_affine(np.zeros((4, 4, 1), np.float32), aug.AffineParams())
    with pytest.raises(ValueError, match="mask shape"):
        aug.apply_affine(np.zeros((4, 4), np.float32), aug.AffineParams(), mask=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="zoom"):
        aug.AugmentConfig(zoom=1.5)
    with pytest.raises(ValueError, match="unknown"):
        aug.AugmentConfig.from_any({"rotate": 5})
    assert aug.AugmentConfig.from_any({"rotate_deg": 5}).rotate_deg == 5
    assert aug.AugmentConfig.from_any(None) == aug.PAPER_AUGMENT
    assert not aug.NO_AUGMENT.enabled and aug.PAPER_AUGMENT.enabled
