"""The out-of-the-box demo end to end at a tiny size, 2 seeds (the real one runs 3 at 96 px)."""
from __future__ import annotations

import csv
import json
import math

import pytest

from covidmt_jax.lungs import SHIPPED_DIR

TINY = ["--seeds", "2", "--size", "64", "--n", "16", "--steps", "2", "--pairs", "8", "--width", "0.25",
        "--gallery", "0"]


def _close(a, b, digits):
    return (a is None and b is None) or (a is not None and b is not None
                                         and abs(a - b) <= 0.5 * 10 ** -digits + 1e-9)


@pytest.mark.skipif(not (SHIPPED_DIR / "model.json").is_file(), reason="no shipped lung U-Net")
def test_demo_runs_seeds_reports_spread_and_resumes(tmp_path):
    from covidmt_jax import demo
    demo.main(["--workdir", str(tmp_path), *TINY])
    report = (tmp_path / "report.md").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    pooled = json.loads((tmp_path / "pooled" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert "## What this run shows (only what holds in every seed)" in report
    assert "## Spread over the 2 seeds: mean [min, max]" in report

    # per-seed figures: the same as each seed's own trainer and scoring summaries
    with open(tmp_path / "seeds.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["seed"], r["model"]) for r in table] == [
        (str(s), m) for s in (0, 1) for m in (demo.BASE, demo.MT)]
    for seed, figs in zip((0, 1), summary["per_seed"]):
        score = json.loads((tmp_path / f"seed_{seed}" / "score" / "summary.json").read_text())
        for name in (demo.BASE, demo.MT):
            s, f = score["models"][name], figs[name]
            assert s["n_pairs"] == 8 and f["n_pairs"] == s["n_scored"]
            assert f["pi"] == pytest.approx(s["pi"]["score"])
            assert f["ols_orig"] == (s["ols"]["original"]["score"])
            assert f["test_auc"] == s["classification"]["original"]["roc_auc"]
            arm = "baseline" if name == demo.BASE else "covidmt"
            train = json.loads((tmp_path / f"seed_{seed}" / f"train_{arm}" / "summary.json").read_text())
            assert f["val_auc"] == train["best"]["value"]
            row = next(r for r in table if r["seed"] == str(seed) and r["model"] == name)
            assert float(row["pi"]) == pytest.approx(f["pi"])
            # the per-seed table of the report shows these figures
            cells = f"| {seed} | {name} | " + " | ".join(
                demo._fmt(math.nan if f[k] is None else f[k], d) for k, (_, d) in demo.FIGURES.items())
            assert cells in report
        assert figs[demo.MT]["box_map"] is not None and figs[demo.BASE]["box_map"] is None

    # the spread: mean, min and max of the per-seed figures, as the report prints them
    for name in (demo.BASE, demo.MT):
        for key, (_, digits) in demo.FIGURES.items():
            vals = [f[name][key] for f in summary["per_seed"] if f[name][key] is not None]
            sp = summary["spread"][name][key]
            assert sp["n"] == len(vals)
            if vals:
                assert _close(sp["mean"], sum(vals) / len(vals), 9)
                assert (sp["min"], sp["max"]) == (min(vals), max(vals))
        line = next(l for l in report.splitlines() if l.startswith("| val. COVID ROC-AUC |"))
        assert demo._range(summary["spread"][demo.BASE]["val_auc"], 3) in line

    # pooled: the scoring report's statistics over both seeds' (distinct) pairs
    assert pooled["n_pairs"] == 16
    for name in (demo.BASE, demo.MT):
        m = pooled["models"][name]
        assert m["pi"]["n_flips"] == sum(f[name]["n_flips"] for f in summary["per_seed"])
        assert m["pi"]["lo"] <= m["pi"]["score"] <= m["pi"]["hi"]
    assert pooled["comparisons"][0]["models"] == [demo.MT, demo.BASE]
    assert (tmp_path / "spread.png").is_file() and (tmp_path / "pooled" / "pi.png").is_file()

    # the plain reading: a direction is claimed only when it holds in both seeds
    for key, label, _, _ in demo.COMPARED:
        d = [f[demo.MT][key] - f[demo.BASE][key] for f in summary["per_seed"]]
        line = next(s for s in summary["findings"] if s.startswith(label + ":"))
        if all(x < 0 for x in d) or all(x > 0 for x in d):
            assert "in every seed (2 of 2" in line
        else:
            assert "no direction holds across the seeds" in line or "not available" in line

    # a re-run resumes (finished seeds are read back, nothing is trained or scored again);
    # other settings in the same workdir are refused
    demo.main(["--workdir", str(tmp_path), *TINY])
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["per_seed"] == summary["per_seed"] and again["findings"] == summary["findings"]
    assert all(t["resumed"] for t in again["timings"]["seeds"].values())
    rows = (tmp_path / "seed_0" / "score" / "rows.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 8
    with pytest.raises(SystemExit):
        demo.main(["--workdir", str(tmp_path), *TINY[:3], "80", *TINY[4:]])


def test_findings_claim_only_what_holds_in_every_seed():
    from covidmt_jax import demo

    def figs(mt_ols, base_ols, auc=0.9):
        r = {k: 50.0 for k in demo.FIGURES}
        return {demo.BASE: {**r, "ols_orig": base_ols, "val_auc": auc, "box_map": math.nan},
                demo.MT: {**r, "ols_orig": mt_ols, "val_auc": auc, "box_map": 0.2}}

    p = {k: 0.01 for k, _, _, _ in demo.COMPARED}
    every = demo.findings([figs(30, 100), figs(45, 98), figs(60, 99)], [p] * 3, None, [0, 1, 2])
    line = next(s for s in every if s.startswith("OLS on original images:"))
    assert "lower for COVIDMT than for the baseline in every seed (3 of 3" in line
    assert "p < 0.05 in 3 of 3 seeds" in line
    mixed = demo.findings([figs(30, 100), figs(45, 98), figs(100, 99, auc=0.55)], [p] * 3, None,
                          [0, 1, 2])
    line = next(s for s in mixed if s.startswith("OLS on original images:"))
    assert "no direction holds across the seeds (COVIDMT lower in 2, higher in 1" in line
    assert any(s.startswith("Caution:") and "seed(s) 2" in s for s in mixed)
    assert any("box task learned in every seed" in s for s in every)


def test_findings_separate_uncalibrated_box_scores_from_missed_boxes():
    from covidmt_jax import demo

    def figs(box_map, ap):
        r = {k: 50.0 for k in demo.FIGURES}
        return {demo.BASE: {**r, "box_map": math.nan, "box_ap50": math.nan},
                demo.MT: {**r, "box_map": box_map, "box_ap50": ap}}

    p = {k: 0.01 for k, _, _, _ in demo.COMPARED}
    found = demo.findings([figs(0.0, 0.5), figs(0.1, 0.7), figs(0.0, 0.6)], [p] * 3, None, [0, 1, 2])
    line = next(s for s in found if "box task" in s)
    assert "RSNA mAP 0 in seed(s) 0, 2" in line and "AP at IoU 0.5 was 0.500–0.700" in line
    assert "found and ranked above the false alarms in every seed" in line
    missed = demo.findings([figs(0.0, 0.005), figs(0.0, 0.006), figs(0.0, 0.0)], [p] * 3, None, [0, 1, 2])
    line = next(s for s in missed if "box task" in s)
    assert "below 0.1 in every seed" in line and "has not learned to find the boxes" in line
    mixed = demo.findings([figs(0.0, 0.05), figs(0.0, 0.6), figs(0.0, 0.3)], [p] * 3, None, [0, 1, 2])
    assert "seeds disagree" in next(s for s in mixed if "box task" in s)


def test_demo_covidmt_arm_gets_the_box_recipe_and_the_baseline_does_not():
    """The demo's box recipe reaches the model and the RSNA-like phantoms its config builds:
    GroupNorm in the box subnets, and consolidations drawn ``BOX_FINDING_STRENGTH`` times denser
    than at strength 1 (the same phantoms otherwise: same boxes, more opacity inside them). The
    baseline arm trains on the COVIDx-like phantoms alone, with no box head."""
    import numpy as np

    from covidmt_jax import demo
    from covidmt_jax.data.sources import SOURCES

    mt = demo.demo_train_config("covidmt", size=64, n=16, shortcut=0.9, width=0.25)
    base = demo.demo_train_config("baseline", size=64, n=16, shortcut=0.9, width=0.25)
    assert mt.model.kwargs.box_head_norm == demo.BOX_HEAD_NORM == "group"
    assert "box_head_norm" not in base.model.kwargs and list(base.data.train) == ["covidx"]
    assert base.data.train.covidx.to_dict() == mt.data.train.covidx.to_dict()
    for split in (mt.data.train, mt.data.val):
        entry = split.rsna
        dense = SOURCES[entry.source](**entry.kwargs)
        faint = SOURCES[entry.source](**{**entry.kwargs, "finding_strength": 1.0})
        gains = []
        for i in range(len(dense)):
            d, f = dense.phantom(i), faint.phantom(i)
            np.testing.assert_array_equal(d.boxes, f.boxes)
            if len(d.boxes):
                inside = d.finding_mask
                gains.append(float((d.image[inside] - f.image[inside]).mean()))
        assert gains and min(gains) > 0, gains
