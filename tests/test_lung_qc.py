"""Lung-mask QC flags fire on crafted bad masks and not on good ones."""
from __future__ import annotations

import numpy as np
import pytest

from covidmt_jax.lung_qc import DEFAULT_THRESHOLDS, QC_FLAGS, QCThresholds, mask_qc, qc_batch, qc_counts


def _lungs(h=128, w=128, *, shrink=0, heart=True, value=0.98):
    """Two lung-shaped ellipses (fields convention, heart gap) as a probability map."""
    yy, xx = np.mgrid[:h, :w]
    p = np.full((h, w), 0.02, np.float32)
    for cx in (0.3 * w, 0.7 * w):
        rx, ry = 0.15 * w - shrink, 0.33 * h - shrink
        p[((xx - cx) / rx) ** 2 + ((yy - 0.5 * h) / ry) ** 2 <= 1] = value
    if not heart:  # anatomical: lungs joined behind the heart, larger
        p[int(0.25 * h):int(0.8 * h), int(0.2 * w):int(0.8 * w)] = np.maximum(
            p[int(0.25 * h):int(0.8 * h), int(0.2 * w):int(0.8 * w)], 0.0)
        for cx in (0.3 * w, 0.7 * w):
            rx, ry = 0.18 * w, 0.37 * h
            p[((xx - cx) / rx) ** 2 + ((yy - 0.52 * h) / ry) ** 2 <= 1] = value
    return p


def test_good_masks_pass_at_any_resolution():
    for size in (64, 128, 300):
        fields, anat = _lungs(size, size), _lungs(size, size, heart=False)
        r = mask_qc(fields, anat)
        assert r["flags"] == [] and not r["flagged"], r
        assert 0.7 < r["convention_dice"] <= 1 and r["fields_inside"] > 0.95
        assert r["n_large_components"] == 2 and DEFAULT_THRESHOLDS.min_fraction < r["lung_frac"]


def test_each_flag_fires_on_its_crafted_bad_mask():
    good = _lungs()
    tiny = _lungs(shrink=17)                         # lungs almost gone
    whole = np.full((128, 128), 0.97, np.float32)   # everything is lung
    one = good.copy(); one[:, 64:] = 0.02           # one lung only
    speckle = good.copy(); speckle[2:12, 2:12] = 0.99; speckle[2:12, 114:124] = 0.99  # extra blobs >= 0.5 %
    unsure = good.copy(); unsure[unsure > 0.5] = 0.55  # lung pixels all near 0.5
    shifted = np.roll(_lungs(heart=False), 40, axis=0)  # anatomical map far from the fields map
    cases = {"fraction": [tiny, whole], "components": [one, speckle, whole], "confidence": [unsure]}
    for flag, maps in cases.items():
        for m in maps:
            r = mask_qc(m)
            assert flag in r["flags"] and r["flagged"], (flag, r)
    r = mask_qc(good, shifted)
    assert r["flags"] == ["disagreement"], r
    # without the other convention there is no disagreement check
    assert np.isnan(mask_qc(good)["convention_dice"])


def test_batch_counts_and_bad_input():
    res = qc_batch([_lungs(), np.zeros((32, 32), np.float32)], [_lungs(heart=False), np.zeros((16, 16), np.float32)])
    counts = qc_counts(res)
    assert counts["n"] == 2 and counts["flagged"] == 1 and counts["fraction"] == 1 and counts["components"] == 1
    assert set(QC_FLAGS) <= set(counts)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_qc(np.full((8, 8), 2.0))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        mask_qc(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="2 maps but 1"):
        qc_batch([_lungs(), _lungs()], [_lungs()])
    with pytest.raises(ValueError, match="min_fraction"):
        QCThresholds(min_fraction=0.7, max_fraction=0.6)
