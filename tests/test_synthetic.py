"""Synthetic CXR phantoms (covidmt_jax.data.synthetic) and their sources."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from covidmt_jax import channels
from covidmt_jax.data import images
from covidmt_jax.data import synthetic as syn
from covidmt_jax.data.sources import SOURCES, get_source
from covidmt_jax.data.sources import synthetic as ssrc

SIZE = 96


def _diff(seed, findings, size=SIZE, **kw):
    """(phantom with findings, image difference to the same chest without them)."""
    with_f = syn.render_phantom(seed, size, findings, **kw)
    without = syn.render_phantom(seed, size, (), **kw)
    np.testing.assert_array_equal(with_f.lung_mask, without.lung_mask)
    return with_f, with_f.image - without.image


# --- contract and reproducibility --------------------------------------------------------------------
def test_contract_and_reproducible():
    a = syn.render_phantom(7, SIZE, ("COVID-19", "Nodule"))
    b = syn.render_phantom(7, SIZE, ("COVID-19", "Nodule"))
    c = syn.render_phantom(8, SIZE, ("COVID-19", "Nodule"))
    assert a.image.dtype == np.float32 and a.image.shape == (SIZE, SIZE)
    assert a.lung_mask.dtype == bool and a.lung_mask.shape == (SIZE, SIZE)
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.lung_mask, b.lung_mask)
    assert np.abs(a.image - c.image).mean() > 0.01
    assert a.labels == {"COVID-19": 1.0, "Pneumonia": 0.0, "Infiltration": 0.0, "Effusion": 0.0,
                        "Atelectasis": 0.0, "Nodule": 1.0, "Normal": 0.0}
    n = syn.render_phantom(np.random.default_rng(3), (64, 80))
    assert n.image.shape == (64, 80) and n.boxes.shape == (0, 4) and n.labels["Normal"] == 1.0
    g1 = syn.render_phantom(np.random.default_rng(5), 48).image
    g2 = syn.render_phantom(np.random.default_rng(5), 48).image
    np.testing.assert_array_equal(g1, g2)
    with pytest.raises(ValueError, match="unknown finding"):
        syn.render_phantom(0, 32, ("Cardiomegaly",))
    with pytest.raises(ValueError, match="at least 16"):
        syn.render_phantom(0, 8)


def test_lung_mask_is_what_was_drawn():
    fracs = []
    for seed in range(6):
        p = syn.render_phantom(seed, 128, noise=0.0)
        m, img = p.lung_mask, p.image
        fracs.append(m.mean())
        # Two lungs, one each side of the midline.
        labels, n = ndimage.label(m)
        assert n == 2
        cols = [np.nonzero(labels == k)[1].mean() for k in (1, 2)]
        assert min(cols) < 64 < max(cols)
        # The lungs are dark: darker than the mediastinum between them.
        rows = np.nonzero(m.any(1))[0]
        band = np.zeros_like(m)
        band[rows[0]:rows[-1] + 1, 60:68] = True
        mediastinum = band & ~m
        assert img[m].mean() < img[mediastinum].mean() - 0.1
        # The mask boundary is an edge of the drawn image: just inside is darker than just outside.
        inner = m & ~ndimage.binary_erosion(m, iterations=3)
        outer = ndimage.binary_dilation(m, iterations=3) & ~m
        assert img[inner].mean() < img[outer].mean() - 0.08
    assert 0.15 < min(fracs) and max(fracs) < 0.40


# --- findings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("finding", syn.FINDINGS)
def test_findings_lie_inside_the_lungs(finding):
    for seed in range(3):
        p, d = _diff(seed, (finding,))
        changed = np.abs(d) > 1e-6
        assert changed.sum() > 5, f"{finding} not drawn (seed {seed})"
        assert not (changed & ~p.lung_mask).any(), f"{finding} drawn outside the lungs (seed {seed})"
        assert not (p.finding_mask & ~p.lung_mask).any()
        assert changed[p.finding_mask].mean() > 0.5
        assert (d >= -1e-6).all()  # opacities: brighter, never darker
        assert p.labels[finding] == 1.0 and p.labels["Normal"] == 0.0


def _centroid(weights):
    r, c = np.indices(weights.shape)
    s = weights.sum()
    return (r * weights).sum() / s, (c * weights).sum() / s


def test_finding_patterns():
    for seed in range(4):
        # COVID-19: peripheral (further from the midline than the average lung pixel) and low.
        p, d = _diff(seed, ("COVID-19",))
        r, c = np.indices(d.shape)
        lung_lat = np.abs(c[p.lung_mask] + 0.5 - SIZE / 2).mean()
        op_lat = (np.abs(c + 0.5 - SIZE / 2) * d).sum() / d.sum()
        assert op_lat > lung_lat
        assert _centroid(d)[0] > _centroid(p.lung_mask.astype(float))[0]
        # Effusion: basal, and fills the lowest lung rows of its side.
        p, d = _diff(seed, ("Effusion",))
        assert _centroid(d)[0] > _centroid(p.lung_mask.astype(float))[0] + 0.1 * SIZE
        low = np.nonzero(p.lung_mask.any(1))[0][-1]
        assert d[low - 1][p.lung_mask[low - 1]].max() > 0.2
        # Nodule: small.
        p, d = _diff(seed, ("Nodule",))
        assert (d > 1e-6).sum() < 0.02 * SIZE * SIZE


def test_pneumonia_boxes_cover_the_opacity():
    n_boxes = 0
    for seed in range(8):
        p, d = _diff(seed, ("Pneumonia",), size=128)
        assert p.boxes.dtype == np.float32 and p.boxes.ndim == 2 and p.boxes.shape[1] == 4
        assert 1 <= len(p.boxes) <= 2
        assert (p.boxes >= 0).all() and (p.boxes <= 1).all()
        assert (p.boxes[:, 2] > p.boxes[:, 0]).all() and (p.boxes[:, 3] > p.boxes[:, 1]).all()
        covered = np.zeros(d.shape, bool)
        for x0, y0, x1, y1 in np.round(p.boxes * 128).astype(int):
            covered[y0:y1, x0:x1] = True
            assert d[y0:y1, x0:x1].max() > 0.1       # each box holds a drawn opacity
        assert covered[d > 0.5 * d.max()].all()     # the dense part of every opacity is boxed
        n_boxes += len(p.boxes)
    assert n_boxes > 8  # some phantoms have two opacities
    assert syn.render_phantom(0, 64, ("COVID-19",)).boxes.shape == (0, 4)


# --- shortcut cues ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", syn.CUE_KINDS)
def test_cue_lies_outside_the_lungs(kind):
    for seed in range(3):
        on = syn.render_phantom(seed, SIZE, ("COVID-19",), syn.Shortcut("COVID-19", 1.0, kind))
        off = syn.render_phantom(seed, SIZE, ("COVID-19",), syn.Shortcut("COVID-19", 0.0, kind))
        plain = syn.render_phantom(seed, SIZE, ("COVID-19",))
        assert on.meta["cue_on"] is True and off.meta["cue_on"] is False
        assert on.cue_mask.sum() > 10
        assert not (on.cue_mask & on.lung_mask).any()
        changed = np.abs(on.image - plain.image) > 1e-6
        assert changed.any() and not (changed & ~on.cue_mask).any()  # only the cue pixels changed
        if kind == "tag":  # the tag is always there; its letter carries the label
            assert off.cue_mask.any() and not (off.cue_mask & off.lung_mask).any()
            assert not np.array_equal(on.cue_mask, off.cue_mask)
        else:
            assert not off.cue_mask.any()
            np.testing.assert_array_equal(off.image, plain.image)


@pytest.mark.parametrize("strength", [1.0, 0.8, 0.5, 0.1])
def test_cue_label_agreement_follows_strength(strength):
    n = 400
    agree = drawn = 0
    for i in range(n):
        positive = i % 2 == 0
        p = syn.render_phantom([11, i], 32, ("COVID-19",) if positive else (),
                               syn.Shortcut("COVID-19", strength, "marker"))
        agree += p.meta["cue_on"] == positive
        drawn += p.cue_mask.any() == p.meta["cue_on"]
    assert drawn == n
    rate = agree / n
    tol = 3.5 * np.sqrt(strength * (1 - strength) / n) + 1e-9
    assert abs(rate - strength) <= tol, (rate, strength)


def test_shortcut_validation():
    with pytest.raises(ValueError, match="strength"):
        syn.Shortcut("COVID-19", 1.5)
    with pytest.raises(ValueError, match="kind"):
        syn.Shortcut("COVID-19", 0.5, "watermark")
    with pytest.raises(ValueError, match="label"):
        syn.Shortcut("Flu", 0.5)


# --- datasets and sources ------------------------------------------------------------------------------
def test_render_dataset_matches_phantom_for():
    ds = syn.render_dataset("nih", 6, 48, seed=2, start=10, prevalence=0.5)
    assert ds["image"].shape == (6, 48, 48) and ds["lung_mask"].shape == (6, 48, 48)
    assert ds["labels"].shape == (6, 5) and ds["label_names"][-1] == "Normal"
    np.testing.assert_array_equal(ds["labels"][:, -1], ds["labels"][:, :4].sum(1) == 0)
    p = syn.phantom_for("nih", 13, size=48, seed=2, prevalence=0.5)
    np.testing.assert_array_equal(ds["image"][3], p.image)
    cov = syn.render_dataset("covidx", 40, 32, seed=0, shortcut_strength=1.0)
    np.testing.assert_array_equal(np.array(cov["cue_on"]), cov["labels"][:, 0] == 1)
    assert 5 < cov["labels"].sum() < 35
    with pytest.raises(ValueError, match="unknown phantom dataset kind"):
        syn.render_dataset("chexpert", 1, 32)


def test_sources_registered_and_records():
    for name in ("synthetic_covidx", "synthetic_nih", "synthetic_rsna", "synthetic_lungs", "synthetic_pairs"):
        assert name in SOURCES
    src = get_source("synthetic_covidx", n=12, size=48, seed=4, shortcut_strength=0.9)
    assert len(src) == 12 and src.label_names == ("COVID-19",)
    rec = src[5]
    assert set(rec) == {"id", "image", "labels", "meta"}
    assert images.sniff_format(rec["image"]) == "png"
    p = src.phantom(5)
    np.testing.assert_allclose(images.load_grey(rec["image"]), p.image, atol=0.5 / 255 + 1e-6)
    assert rec["labels"].dtype == np.float32 and rec["labels"][0] == p.labels["COVID-19"]
    assert rec["meta"]["cue_on"] == p.meta["cue_on"] and rec["meta"]["index"] == 5
    # Deterministic per index across instances; splits differ; negative / bad indices.
    again = ssrc.SyntheticCOVIDx(12, size=48, seed=4, shortcut_strength=0.9)
    assert again[5]["image"] == rec["image"] and src[-7]["id"] == rec["id"]
    assert ssrc.SyntheticCOVIDx(12, size=48, seed=4, split="val")[5]["image"] != rec["image"]
    assert len(set(src.ids)) == 12
    with pytest.raises(IndexError):
        src[12]


def test_nih_rsna_lungs_sources():
    nih = ssrc.SyntheticNIH(30, size=40, prevalence=0.4)
    labels = np.stack([r["labels"] for r in nih])
    assert labels.shape == (30, 5) and labels[:, :4].sum() > 10
    np.testing.assert_array_equal(labels[:, 4], labels[:, :4].sum(1) == 0)
    rsna = ssrc.SyntheticRSNA(30, size=40, positive_fraction=0.5)
    assert rsna.label_names == ("pneumonia",)
    for r in rsna:
        assert r["boxes"].shape[1:] == (4,) and r["boxes"].dtype == np.float32
        assert (len(r["boxes"]) > 0) == (r["labels"][0] == 1)
    lungs = ssrc.SyntheticLungs(4, size=40)
    r = lungs[2]
    assert "labels" not in r and lungs.label_names == ()
    np.testing.assert_array_equal(images.load_mask(r["mask"]), lungs.phantom(2).lung_mask)
    deep = ssrc.SyntheticNIH(2, size=40, bits=16, with_mask=True)[1]
    assert images.open_image(deep["image"]).mode == "F"
    np.testing.assert_allclose(images.load_grey(deep["image"]), deep_phantom := ssrc.SyntheticNIH(
        2, size=40).phantom(1).image, atol=1 / 65535 + 1e-6)
    assert deep_phantom.dtype == np.float32 and images.load_mask(deep["mask"]).any()
    with pytest.raises(ValueError, match="no label"):
        ssrc.SyntheticLungs(2, size=32, shortcut_strength=0.5)


def test_pairs_source():
    pairs = ssrc.SyntheticPairs(6, size=64, channel="jpeg40")
    rec = pairs[3]
    assert set(rec) == {"id", "original", "transmitted", "labels", "meta"}
    assert images.sniff_format(rec["original"]) == "png" and channels.is_jpeg(rec["transmitted"])
    assert abs(channels.estimate_jpeg_quality(rec["transmitted"]) - 40) <= 2
    o, t = images.load_grey(rec["original"]), images.load_grey(rec["transmitted"])
    assert o.shape == t.shape and 0 < np.abs(o - t).mean() < 0.05
    assert "jpeg40" in rec["meta"]["channel"] and pairs.split == "test"
    wa = ssrc.SyntheticPairs(2, size=48, channel=channels.get_channel("whatsapp"), quality=65)
    assert wa.channel.quality == 65 and wa[0]["transmitted"] == wa[0]["transmitted"]


def test_sources_pickle_for_workers():
    import pickle

    for src in (ssrc.SyntheticRSNA(5, size=32, seed=9, shortcut_strength=0.7),
                ssrc.SyntheticPairs(3, size=32, channel="telegram")):
        clone = pickle.loads(pickle.dumps(src))
        a, b = src[np.int64(2)], clone[2]
        assert a["id"] == b["id"] and a["meta"] == b["meta"]
        for key in ("image", "original", "transmitted"):
            if key in a:
                assert a[key] == b[key]
