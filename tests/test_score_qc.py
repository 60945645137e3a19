"""Lung-mask QC in the scoring job: the step's device-side counts + host components give exactly
``lung_qc.mask_qc``; rows carry the flags per side; summary and report count them and give OLS
without the flagged images.

Models: the tiny exports of ``tests/test_score.py`` (64 px; a random depth-2 U-Net whose head
bias puts about half of the pixels in the lungs, so its masks are mostly flagged).
"""
from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covidmt_jax import lung_qc, metrics
from covidmt_jax.lung_qc import QC_FLAGS, mask_qc, qc_counts
from covidmt_jax.lungs import lung_segmenter
from covidmt_jax.scoring import job, loading, step
from covidmt_jax.scoring.rows import QC_COLUMNS, RowStore
from test_lung_qc import _lungs
from test_score import S, _cfg, exported  # noqa: F401  (module-scoped fixture)


def _same(a: dict, b: dict) -> None:
    """Two mask_qc results are equal (NaN == NaN)."""
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], float) and np.isnan(a[k]):
            assert np.isnan(b[k]), (k, a, b)
        else:
            assert a[k] == b[k], (k, a, b)


def _device_qc(probs, anatomical=None):
    """The step's QC (jitted device half + host half) of ``[N, H, W]`` maps."""
    probs = jnp.asarray(np.stack(probs))
    if anatomical is None:
        out = jax.jit(step.lung_qc_outputs)(probs)
    else:
        out = jax.jit(step.lung_qc_outputs)(probs, probs >= 0.5, jnp.asarray(np.stack(anatomical)) >= 0.5)
    return step.qc_results(jax.tree.map(np.asarray, out))


def test_device_qc_equals_mask_qc_on_crafted_maps():
    good = _lungs(64, 64)
    blob = np.full((64, 64), 0.02, np.float32)
    blob[16:48, 16:48] = 0.97                                   # one square "lung"
    unsure = good.copy()
    unsure[unsure > 0.5] = 0.5                                   # every lung pixel at 0.5
    tiny = _lungs(64, 64, shrink=8)
    maps = [good, blob, unsure, tiny, np.zeros((64, 64), np.float32)]
    got = _device_qc(maps)
    expected_flags = [[], ["components"], ["confidence"], ["fraction"], ["fraction", "components"]]
    for p, g, flags in zip(maps, got, expected_flags):
        _same(g, mask_qc(p))
        assert g["flags"] == flags, g
    # with both conventions: a good anatomical map agrees, one shifted far away disagrees
    anat = _lungs(64, 64, heart=False)
    shifted = np.roll(anat, 20, axis=0)
    got = _device_qc([good, good, blob], [anat, shifted, anat])
    for p, o, g in zip([good, good, blob], [anat, shifted, anat], got):
        _same(g, mask_qc(p, o))
    assert [g["flags"] for g in got] == [[], ["disagreement"], ["components", "disagreement"]]
    assert 0.7 < got[0]["convention_dice"] < 1 and got[0]["fields_inside"] > 0.95


def test_scorer_qc_equals_mask_qc_of_its_lung_maps(exported):  # noqa: F811
    """Through the fused step of the Scorer with two conventions (the shipped fields and
    anatomical U-Nets): each image's QC is mask_qc of its returned lung probability maps."""
    from covidmt_jax.data.pipeline import load_pair
    from covidmt_jax.data.sources import get_source
    cfg = _cfg(exported)
    classifiers = loading.load_classifiers(cfg)
    lungs = {"fields": lung_segmenter("fields"), "anatomical": lung_segmenter("anatomical")}
    src = get_source("synthetic_pairs", n=3, size=S)
    xo = np.stack([load_pair(src[i], S).original for i in range(3)])
    xt = np.stack([load_pair(src[i], S).transmitted for i in range(3)])
    scorer = step.Scorer(classifiers, lungs, S, 4)
    for maps in (False, True):
        o, t = scorer(xo, xt, return_maps=maps)
        assert "lung_mask" not in o and len(o["qc"]) == 3 and len(t["qc"]) == 3
    for side in (o, t):
        for k in range(3):
            ref = mask_qc(side["lung_prob"][k], side["lung_prob_anatomical"][k])
            _same(side["qc"][k], ref)
            assert not np.isnan(ref["convention_dice"])


def _check_run(summary, rows, tmp_path):
    """Summary and report of a finished run against its rows (one model: a row per pair)."""
    for c in QC_COLUMNS:
        assert c in rows and rows[c].dtype == object
    ok = rows["error"] == ""
    flags = {side: [f.split(";") if f else [] for f in rows[col][ok]]
             for side, col in (("original", "qc_flags_orig"), ("transmitted", "qc_flags_trans"))}
    for side, fl in flags.items():
        assert all(set(f) <= set(QC_FLAGS) for f in fl)
        expected = qc_counts([{"flags": f, "flagged": bool(f)} for f in fl])
        assert {k: summary["lung_qc"][side][k] for k in expected} == expected
    # OLS without the flagged images = OLS recomputed by hand from the rows
    s = summary["models"]["resnet18"]
    for side, key in (("original", "iol_orig"), ("transmitted", "iol_trans")):
        keep = np.asarray([not f for f in flags[side]], bool)
        iol = rows[key][ok][keep]
        wo = s["ols_without_flagged"][side]
        assert wo["n_flagged"] == int((~keep).sum())
        if not len(iol):
            assert wo["n_used"] == 0 and np.isnan(wo["score"])
            continue
        ref, ci = metrics.ols_counts(iol, 0.4), metrics.ols_score_ci(iol, 0.4)
        assert (wo["n_used"], wo["n_out"]) == (ref["n_used"], ref["n_out"])
        assert wo["score"] == pytest.approx(ref["score"], nan_ok=True)
        assert (wo["lo"], wo["hi"]) == pytest.approx((ci[1], ci[2]), nan_ok=True)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["lung_qc"]["original"] == summary["lung_qc"]["original"]
    text = (tmp_path / "report.md").read_text()
    assert "## Lung-mask quality control" in text and "OLS % without flagged" in text
    return flags


def _folder_pairs(root):
    """4 labelled pairs of synthetic films; pair p1's transmitted and pair p2's original image
    have their right half blacked out (as a lead shield or a cropped upload leaves it): the
    shipped U-Nets then find one lung, and the mask is flagged for its components."""
    from covidmt_jax.data import images
    from covidmt_jax.data.sources import get_source
    src = get_source("synthetic_pairs", n=4, size=S, channel="whatsapp", quality=20)
    for i in range(4):
        rec = src[i]
        cls = "1_COVID-19" if rec["labels"][0] else "0_NON_COVID"
        for side, key in (("orig", "original"), ("trans", "transmitted")):
            data = rec[key]
            if (i, side) in ((1, "trans"), (2, "orig")):
                grey = images.load_grey(data)
                grey[:, grey.shape[1] // 2:] = 0.0
                data = images.encode_png(grey)
            (root / side / cls).mkdir(parents=True, exist_ok=True)
            (root / side / cls / f"p{i}.png").write_bytes(data)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_scoring_run_with_both_conventions_carries_qc(exported, tmp_path, fmt):  # noqa: F811
    """lungs="both" (the shipped fields and anatomical U-Nets) on 4 folder pairs, two of them
    with one half-blacked film: rows, summary, report and gallery carry the QC; resume keeps it."""
    _folder_pairs(tmp_path / "data")
    cfg = _cfg(exported)
    cfg.lungs = "both"
    cfg.pairs.source = "pairs"
    cfg.pairs.kwargs = {"original_dir": str(tmp_path / "data" / "orig"),
                        "transmitted_dir": str(tmp_path / "data" / "trans"),
                        "labels_from_subfolders": True}
    cfg.output.format = fmt
    cfg.gallery.flipped = cfg.gallery.random = 0
    cfg.gallery.qc_flagged = 2
    work = tmp_path / "out"
    loaded = loading.load_models(cfg)
    summary = job.score_pairs(cfg, work, models=loaded)
    rows = RowStore(work, fmt, job.row_columns(["fields", "anatomical"])).read()
    flags = _check_run(summary, rows, work)
    by_id = {pid.split("/")[-1]: i for i, pid in enumerate(rows["pair_id"][rows["error"] == ""])}
    assert set(by_id) == {"p0.png", "p1.png", "p2.png", "p3.png"}
    # the half-blacked films are flagged, ordinary originals are not (a transmitted film at quality
    # 20 and 64 px may be)
    assert flags["transmitted"][by_id["p1.png"]] and flags["original"][by_id["p2.png"]]
    assert not flags["original"][by_id["p0.png"]] and not flags["original"][by_id["p3.png"]]
    qc = summary["lung_qc"]
    assert qc["disagreement_checked"] is True and qc["convention"] == "fields"
    assert qc["thresholds"]["max_fraction"] == 0.62
    assert qc["original"]["n"] == 4 and qc["original"]["flagged"] >= 1 and qc["transmitted"]["flagged"] >= 1
    assert {e["pair_id"].split("/")[-1] for e in qc["examples"]} >= {"p1.png", "p2.png"}
    wo = summary["models"]["resnet18"]["ols_without_flagged"]
    assert wo["transmitted"]["n_flagged"] >= 1 and wo["transmitted"]["n_total"] <= 3
    text = (work / "report.md").read_text()
    assert "p1.png`" in text and "p2.png`" in text
    assert (work / "gallery_resnet18_qc_flagged.png").stat().st_size > 1000
    if fmt == "csv":
        with open(work / "rows.csv", newline="") as f:
            assert set(QC_COLUMNS) <= set(next(csv.reader(f)))
    # resume: nothing to re-score, the QC cells survive the compaction
    again = job.score_pairs(cfg, work, models=loaded)
    assert again["job"]["scored_this_run"] == 0 and again["lung_qc"] == summary["lung_qc"]


def test_scoring_run_on_synthetic_pairs_one_convention(exported, tmp_path):  # noqa: F811
    """The synthetic config with the tiny random U-Net (its masks mostly flagged, possibly all:
    OLS without flagged then has no image); one convention: no disagreement check."""
    cfg = _cfg(exported, n=4)
    cfg.gallery.flipped = cfg.gallery.random = 0
    cfg.gallery.qc_flagged = 1
    summary = job.score_pairs(cfg, tmp_path, models=loading.load_models(cfg))
    rows = RowStore(tmp_path, "csv", job.row_columns(["lungs"])).read()
    flags = _check_run(summary, rows, tmp_path)
    assert summary["lung_qc"]["disagreement_checked"] is False
    assert not any("disagreement" in f for fl in flags.values() for f in fl)


def test_rows_of_the_previous_format_are_refused(exported, tmp_path):  # noqa: F811
    """A workdir written before the QC columns (fingerprint version 2) is refused with the
    version named, not mixed with new rows."""
    cfg = _cfg(exported, n=2)
    cfg.gallery.flipped = cfg.gallery.random = cfg.gallery.qc_flagged = 0
    loaded = loading.load_models(cfg)
    job.score_pairs(cfg, tmp_path, models=loaded)
    path = tmp_path / "job.json"
    old = json.loads(path.read_text())
    old["fingerprint"]["version"] = 2
    del old["fingerprint"]["settings"]["lung_qc"]
    path.write_text(json.dumps(old))
    with pytest.raises(job.ConfigError, match="fingerprint version 2 -> 3"):
        job.score_pairs(cfg, tmp_path, models=loaded)


def test_qc_thresholds_come_from_the_config(exported, tmp_path):  # noqa: F811
    """``config.lung_qc`` sets the thresholds: impossible or unknown values are refused with
    the key named; a strict lung-fraction range flags every film (the random U-Net puts about
    half of the pixels in the lungs); the summary records the thresholds used; and a rerun
    with other thresholds is refused as another job (the flags in the rows would differ)."""
    from covidmt_jax.config_lib import ConfigError
    from covidmt_jax.scoring.config import qc_thresholds, validate
    cfg = _cfg(exported, n=3)
    assert qc_thresholds(cfg) == lung_qc.DEFAULT_THRESHOLDS
    for key, bad in (("max_fraction", 1.5), ("uncertain_band", (0.6, 0.9)), ("n_components", 0)):
        broken = _cfg(exported, n=3)
        broken.lung_qc[key] = bad
        with pytest.raises(ConfigError, match=f"config.lung_qc: .*{key}"):
            validate(broken)
    broken = _cfg(exported, n=3)
    broken.lung_qc.max_fraktion = 0.5
    with pytest.raises(ConfigError, match="config.lung_qc: unknown key.*max_fraktion"):
        validate(broken)
    cfg.lung_qc.min_fraction, cfg.lung_qc.max_fraction = 0.0, 0.01
    cfg.gallery.flipped = cfg.gallery.random = cfg.gallery.qc_flagged = 0
    loaded = loading.load_models(cfg)
    summary = job.score_pairs(cfg, tmp_path, models=loaded)
    rows = RowStore(tmp_path, "csv", job.row_columns(["lungs"])).read()
    flags = _check_run(summary, rows, tmp_path)
    assert summary["lung_qc"]["thresholds"]["max_fraction"] == 0.01
    assert all("fraction" in f for side in flags.values() for f in side), flags
    assert summary["lung_qc"]["original"]["flagged"] == summary["lung_qc"]["original"]["n"] == 3
    default = _cfg(exported, n=3)
    with pytest.raises(ConfigError, match="different job.*lung_qc"):
        job.score_pairs(default, tmp_path, models=loaded)
