"""covidmt_jax.report on hand-made rows with known answers (no models)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from covidmt_jax import metrics, report
from covidmt_jax.scoring.rows import ROW_COLUMNS, RowStore


def _rows(n_ok=10, model="m"):
    """10 clean pairs: pairs 0, 1 flip (COVID -> non), pair 2 flips (non -> COVID); IOLs with
    three below 0.4 on the original side and one empty heat map; plus one unreadable and one
    empty-lung row."""
    po = np.array([0.9, 0.8, 0.2, 0.7, 0.6, 0.1, 0.3, 0.95, 0.05, 0.55])
    pt = np.array([0.4, 0.3, 0.6, 0.7, 0.6, 0.1, 0.3, 0.95, 0.05, 0.55])
    labels = np.array([1, 1, 0, 1, 0, 0, 0, 1, 0, 1])
    iol_o = np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, np.nan, 1.0])
    iol_t = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.8, 0.9, 0.5, 1.0])
    # lung-mask QC: pairs 0 and 4 flagged on the original, pair 3 on the transmitted image
    qc_o = {0: "components", 4: "fraction;confidence"}
    qc_t = {3: "components"}
    rows = {c: [] for c in ROW_COLUMNS}
    for i in range(n_ok):
        vals = dict(pair_id=f"p{i}", index=i, label=labels[i], model=model, prob_orig=po[i],
                    prob_trans=pt[i], pred_orig=int(po[i] >= .5), pred_trans=int(pt[i] >= .5),
                    flip=int((po[i] >= .5) != (pt[i] >= .5)), iol_orig=iol_o[i], iol_trans=iol_t[i],
                    lung_frac_orig=0.3, lung_frac_trans=0.3, heat_frac_orig=0.2, heat_frac_trans=0.2,
                    orig_h=64, orig_w=64, trans_h=64, trans_w=64, error="",
                    qc_flags_orig=qc_o.get(i, ""), qc_flags_trans=qc_t.get(i, ""))
        for c in ROW_COLUMNS:
            rows[c].append(vals[c])
    for i, err in ((n_ok, "unreadable: x.png: truncated"), (n_ok + 1, "empty lung mask: no lung")):
        for c in ROW_COLUMNS:
            rows[c].append({"pair_id": f"p{i}", "index": i, "label": 1, "model": model,
                            "error": err, "qc_flags_orig": "", "qc_flags_trans": ""}.get(
                                c, np.nan if c.startswith(("prob", "iol", "lung", "heat")) else -1))
    text = ("pair_id", "model", "error", "qc_flags_orig", "qc_flags_trans")
    return {c: np.asarray(v, dtype=object if c in text else float)
            for c, v in rows.items()}, po, pt, labels, iol_o, iol_t


def test_model_summary_known_answers():
    rows, po, pt, labels, iol_o, iol_t = _rows()
    s = report.summarize(rows, ["m"], eta=0.4, n_boot=200)["models"]["m"]
    assert s["n_pairs"] == 12 and s["n_scored"] == 10 and s["n_errors"] == 2
    assert s["errors"] == {"empty lung mask": 1, "unreadable": 1}
    assert s["pi"]["score"] == pytest.approx(30.0) == metrics.pi_score(po, pt)
    assert (s["pi"]["n_flips"], s["pi"]["pos_to_neg"], s["pi"]["neg_to_pos"]) == (3, 2, 1)
    # PI interval: Clopper-Pearson over the 10 scored pairs (3 flips)
    lo, hi = metrics.binomial_ci(3, 10)
    assert (s["pi"]["lo"], s["pi"]["hi"]) == pytest.approx((100 * lo, 100 * hi))
    assert s["pi"]["n"] == 10
    assert s["error_rate"]["score"] == pytest.approx(100 * 2 / 12)
    assert (s["error_rate"]["lo"], s["error_rate"]["hi"]) == pytest.approx(
        tuple(100 * x for x in metrics.binomial_ci(2, 12)))
    o = s["ols"]["original"]
    assert (o["n_used"], o["n_empty"], o["n_out"]) == (9, 1, 3)
    assert o["score"] == pytest.approx(100 * 3 / 9)
    # OLS interval over the 9 non-empty maps only
    assert (o["lo"], o["hi"]) == pytest.approx(tuple(100 * x for x in metrics.binomial_ci(3, 9)))
    # original vs transmitted, paired over the 9 pairs with both maps non-empty: pair 3 is out
    # of the lungs on the transmitted image only (IOL 0.5 -> 0.35)
    p = s["ols_orig_vs_trans"]
    assert (p["n"], p["n_excluded"], p["n11"], p["n10"], p["n01"], p["n00"]) == (9, 1, 3, 0, 1, 5)
    assert p["diff"] == pytest.approx(-100 / 9) and p["p_value"] == 1.0
    t = s["ols"]["transmitted"]
    assert (t["n_used"], t["n_empty"], t["n_out"]) == (10, 0, 4) and t["score"] == pytest.approx(40.0)
    c = s["classification"]
    assert c["original"]["accuracy"] == pytest.approx(metrics.accuracy(labels, po))
    assert c["transmitted"]["roc_auc"] == pytest.approx(metrics.roc_auc(labels, pt))
    # correctness: pairs 0, 1 (label 1) and 2 (label 0) are right on the original only
    assert (s["mcnemar_correct"]["b"], s["mcnemar_correct"]["c"]) == (3, 0)
    assert s["mcnemar_correct"]["p_value"] == pytest.approx(2 / 8)   # exact: 2 * 0.5^3
    acc = s["accuracy_orig_vs_trans"]
    assert (acc["n10"], acc["n01"]) == (3, 0) and acc["diff"] == pytest.approx(30.0)
    assert acc["p_value"] == s["mcnemar_correct"]["p_value"]
    auc = s["roc_auc_orig_vs_trans"]
    assert auc["diff"] == pytest.approx(metrics.roc_auc(labels, po) - metrics.roc_auc(labels, pt))
    assert c["original"]["ci"]["accuracy"] == pytest.approx(list(metrics.binomial_ci(9, 10)))
    # OLS without the flagged images: original drops pairs 0 and 4 (2 of 7 maps out of the
    # lungs), transmitted drops pair 3 (3 of 9)
    wo = s["ols_without_flagged"]
    assert (wo["original"]["n_used"], wo["original"]["n_out"], wo["original"]["n_flagged"]) == (7, 2, 2)
    assert wo["original"]["score"] == pytest.approx(100 * 2 / 7)
    assert (wo["original"]["lo"], wo["original"]["hi"]) == pytest.approx(
        tuple(100 * x for x in metrics.binomial_ci(2, 7)))
    assert (wo["transmitted"]["n_used"], wo["transmitted"]["n_out"]) == (9, 3)
    assert wo["transmitted"]["n_flagged"] == 1


def test_lung_qc_summary_counts_pairs_once():
    rows, *_ = _rows()
    other, *_ = _rows(model="other")
    both = {c: np.concatenate([rows[c], other[c]]) for c in ROW_COLUMNS}
    qc = report.summarize(both, ["m", "other"])["lung_qc"]
    assert qc["original"] == {"n": 10, "flagged": 2, "fraction": 1, "components": 1,
                              "confidence": 1, "disagreement": 0}
    assert qc["transmitted"] == {"n": 10, "flagged": 1, "fraction": 0, "components": 1,
                                 "confidence": 0, "disagreement": 0}
    assert qc["examples"] == [
        {"pair_id": "p0", "original": ["components"], "transmitted": []},
        {"pair_id": "p3", "original": [], "transmitted": ["components"]},
        {"pair_id": "p4", "original": ["fraction", "confidence"], "transmitted": []}]
    # rows without the QC columns (e.g. the study's) have no lung_qc block
    plain = {c: v for c, v in rows.items() if not c.startswith("qc_")}
    s = report.summarize(plain, ["m"])
    assert "lung_qc" not in s and "ols_without_flagged" not in s["models"]["m"]
    with pytest.raises(ValueError, match="unknown lung QC flag"):
        report.summarize({**rows, "qc_flags_orig": np.asarray(["blurry"] * 12, dtype=object)}, ["m"])


def _two_models():
    """Model "m" as in :func:`_rows`; model "other" also flips pair 3 and pair 4 (pair 4 out of
    the lungs on its original) and scores pair 5 with an error."""
    rows, *_ = _rows()
    other, *_ = _rows(model="other")
    other["prob_trans"][3] = 0.1          # 0.7 -> 0.1: a fourth flip
    other["prob_trans"][4] = 0.2          # 0.6 -> 0.2: a fifth flip
    other["iol_orig"][4] = 0.1            # out of the lungs on the original
    other["error"][5] = "unreadable: y.png: truncated"
    return {c: np.concatenate([rows[c], other[c]]) for c in ROW_COLUMNS}


def test_model_comparisons_are_paired_by_pair_id():
    both = _two_models()
    summary = report.summarize(both, ["m", "other"])
    (cmp,) = summary["comparisons"]
    assert cmp["models"] == ["m", "other"] and cmp["n_pairs"] == 9   # pair 5 unscored by "other"
    pi = cmp["pi"]
    # pairs 0, 1, 2 flip under both, 3 and 4 under "other" only
    assert (pi["n"], pi["n11"], pi["n10"], pi["n01"], pi["n00"]) == (9, 3, 0, 2, 4)
    assert pi["diff"] == pytest.approx(-200 / 9)
    assert pi["p_value"] == pytest.approx(0.5)                       # 2 * 0.5^2
    assert (pi["lo"], pi["hi"]) == pytest.approx(
        tuple(100 * x for x in metrics.paired_difference_ci(3, 0, 2, 4)[1:]))
    o = cmp["ols"]["original"]
    # pair 8 has an empty map (both models): excluded; pair 4 out under "other" only
    assert (o["n"], o["n_excluded"], o["n10"], o["n01"]) == (8, 1, 0, 1)
    assert cmp["ols"]["transmitted"]["n_excluded"] == 0
    assert set(cmp["roc_auc"]) == {"original", "transmitted"}
    assert cmp["roc_auc"]["original"]["diff"] == 0.0      # same original probabilities
    # rows stored in a different order give the same comparison
    order = np.random.default_rng(0).permutation(len(both["pair_id"]))
    shuffled = report.summarize({k: v[order] for k, v in both.items()}, ["m", "other"])
    assert shuffled["comparisons"][0]["pi"] == pi
    # strict JSON all through (NaN -> null)
    text = json.dumps(report.jsonable(summary), allow_nan=False)
    assert '"comparisons"' in text and '"intervals"' in text


def test_summary_rejects_duplicate_rows_of_a_pair():
    rows, *_ = _rows()
    dup = {k: np.concatenate([v, v[:1]]) for k, v in rows.items()}
    with pytest.raises(ValueError, match="'m'.*'p0'"):
        report.summarize(dup, ["m"])


def test_summary_accepts_the_old_bootstrap_arguments():
    rows, *_ = _rows()
    a = report.summarize(rows, ["m"], n_boot=50, seed=3)
    b = report.summarize(rows, ["m"])
    assert json.dumps(report.jsonable(a)) == json.dumps(report.jsonable(b))
    assert "Clopper-Pearson" in a["ci"] and "DeLong" in a["intervals"]["roc_auc"]
    w = report.summarize(rows, ["m"], method="wilson")["models"]["m"]["pi"]
    assert (w["lo"], w["hi"]) == pytest.approx(tuple(100 * x for x in metrics.binomial_ci(3, 10, method="wilson")))


def test_summary_without_scored_rows_or_labels():
    rows, *_ = _rows()
    rows["label"] = np.full(len(rows["label"]), -1.0)
    s = report.summarize(rows, ["m"], n_boot=50)["models"]["m"]
    assert "classification" not in s and s["n_labelled"] == 0
    only_errors = {k: v[-2:] for k, v in rows.items()}
    s = report.summarize(only_errors, ["m"], n_boot=50)["models"]["m"]
    assert s["n_scored"] == 0 and "pi" not in s and "ols" not in s


def test_jsonable_turns_nan_into_null():
    out = report.jsonable({"a": float("nan"), "b": np.float32(1.5), "c": (np.int64(2), np.inf),
                           "d": np.array([1.0, np.nan])})
    assert json.dumps(out, allow_nan=False) == '{"a": null, "b": 1.5, "c": [2, null], "d": [1.0, null]}'


def test_write_report_tables_plots_and_gallery(tmp_path):
    rows, *_ = _rows()
    rows2, *_ = _rows(model="other")
    both = {c: np.concatenate([rows[c], rows2[c]]) for c in ROW_COLUMNS}
    summary = report.summarize(both, ["m", "other"], n_boot=50)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    panel = {"pair_id": "p0", "label": 1, "threshold": 0.5,
             "image_orig": rng.random((32, 32)), "image_trans": rng.random((32, 32)),
             "lung_orig": ((xx - 16) ** 2 + (yy - 16) ** 2 < 100).astype(float),
             "lung_trans": ((xx - 16) ** 2 + (yy - 16) ** 2 < 90).astype(float),
             "cam_orig": xx / 31.0, "cam_trans": yy / 31.0, "prob_orig": 0.9, "prob_trans": 0.3,
             "iol_orig": 0.5, "iol_trans": float("nan")}
    gallery = {"m": {"flipped": [panel], "random": [panel, panel]}, "other": {"flipped": [], "random": []}}
    path = report.write_report(tmp_path, summary, both, gallery)
    text = path.read_text()
    assert "| m | 10 | 30.00 [" in text
    assert "33.33 [" in text and "40.00 [" in text  # OLS original / transmitted of model m
    assert "unreadable: 1" in text and "other, flipped: no pairs" in text
    assert "## Model comparisons" in text and "| m − other | PI | 10 | 30.00 | 30.00 | 0.00 [" in text
    assert "Clopper-Pearson" in text and "Newcombe" in text and "DeLong" in text
    assert "## Lung-mask quality control" in text
    assert "| original | 10 | 2 | 1 | 1 | 1 | 0 |" in text
    assert "| m | original | 33.33 [" in text and "28.57 [" in text   # OLS all vs without flagged
    assert "- `p4`: fraction, confidence; –" in text
    for png in ("pi.png", "ols.png", "iol_hist.png", "gallery_m_flipped.png", "gallery_m_random.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert not (tmp_path / "gallery_other_flipped.png").exists()


def test_sweep_report(tmp_path):
    rows, *_ = _rows()
    s = report.summarize(rows, ["m"], n_boot=50)
    report.write_sweep_report(tmp_path, {"qualities": [30, 90], "per_quality": {30: s, 90: s}})
    text = (tmp_path / "report.md").read_text()
    assert text.count("| m |") == 2
    assert (tmp_path / "pi_vs_quality.png").stat().st_size > 1000
    assert (tmp_path / "ols_vs_quality.png").stat().st_size > 1000


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_row_store_round_trip(tmp_path, fmt):
    rows, *_ = _rows()
    store = RowStore(tmp_path, fmt)
    recs = [{c: rows[c][i] for c in ROW_COLUMNS} for i in range(len(rows["pair_id"]))]
    store.append(recs[:5])
    store.append(recs[5:])
    back = store.read()
    assert back["pair_id"].tolist() == rows["pair_id"].tolist()
    np.testing.assert_allclose(back["prob_orig"], rows["prob_orig"].astype(float))
    assert back["error"].tolist() == rows["error"].tolist()
    assert math.isnan(back["iol_orig"][8]) and back["label"][-1] == 1
    assert back["qc_flags_orig"].tolist() == rows["qc_flags_orig"].tolist()
    assert back["qc_flags_orig"][4] == "fraction;confidence" and back["qc_flags_trans"][0] == ""
    store.compact(back)   # the typed columns written back keep the QC cells
    assert store.read()["qc_flags_orig"].tolist() == rows["qc_flags_orig"].tolist()


# ------------------------------------------------------------ patients with several pairs
def _two_model_rows_with_patients(n_patients=40, seed=0):
    """Rows of two models on the same pairs; 1-3 pairs per patient, alike within a patient."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, n_patients)
    patient = np.repeat([f"pt{k}" for k in range(n_patients)], sizes)
    n = len(patient)
    idx = np.repeat(np.arange(n_patients), sizes)
    base = rng.random(n_patients)
    rows = {c: [] for c in ROW_COLUMNS + ("patient",)}
    for m, shift in (("a", 0.0), ("b", 0.15)):
        po = np.clip(base[idx] + rng.normal(0, 0.05, n), 0, 1)
        pt = np.clip(po + rng.normal(shift, 0.1, n), 0, 1)
        iol_o = np.clip(base[idx] + rng.normal(0, 0.1, n), 0, 1)
        iol_t = np.clip(iol_o + rng.normal(0, 0.05, n), 0, 1)
        for i in range(n):
            vals = dict(pair_id=f"f{i}", index=i, label=int(base[idx[i]] > 0.5), model=m,
                        prob_orig=po[i], prob_trans=pt[i], pred_orig=int(po[i] >= .5),
                        pred_trans=int(pt[i] >= .5), flip=int((po[i] >= .5) != (pt[i] >= .5)),
                        iol_orig=iol_o[i], iol_trans=iol_t[i], lung_frac_orig=0.3, lung_frac_trans=0.3,
                        heat_frac_orig=0.2, heat_frac_trans=0.2, orig_h=64, orig_w=64, trans_h=64,
                        trans_w=64, error="", qc_flags_orig="", qc_flags_trans="", patient=patient[i])
            for c in rows:
                rows[c].append(vals[c])
    text = ("pair_id", "model", "error", "qc_flags_orig", "qc_flags_trans", "patient")
    return {c: np.asarray(v, dtype=object if c in text else float) for c, v in rows.items()}


def test_rows_with_patients_get_clustered_intervals_and_tests(tmp_path):
    rows = _two_model_rows_with_patients()
    summary = report.summarize(rows, ["a", "b"], eta=0.4)
    a = rows["model"] == "a"
    pt = rows["patient"][a]
    assert summary["n_patients"] == 40 and summary["models"]["a"]["n_patients"] == 40
    s = summary["models"]["a"]
    flips = (rows["prob_orig"][a] >= 0.5) != (rows["prob_trans"][a] >= 0.5)
    want = metrics.clustered_binomial_ci(flips, pt)
    assert (s["pi"]["score"], s["pi"]["lo"], s["pi"]["hi"]) == pytest.approx(tuple(100 * v for v in want))
    out = rows["iol_orig"][a] < 0.4
    assert (s["ols"]["original"]["lo"], s["ols"]["original"]["hi"]) == pytest.approx(
        tuple(100 * v for v in metrics.clustered_binomial_ci(out, pt)[1:]))
    assert s["classification"]["original"]["ci"]["method"].endswith("clustered (Korn-Graubard)")
    assert s["ols_orig_vs_trans"]["mcnemar"]["method"] == "clustered chi2 (Durkalski)"
    y = rows["label"][a].astype(bool)
    assert s["classification"]["original"]["ci"]["roc_auc"] == pytest.approx(
        list(metrics.roc_auc_ci(y, rows["prob_orig"][a], clusters=pt)[1:]))
    auc = s["roc_auc_orig_vs_trans"]
    assert auc["method"] == "DeLong paired, clustered (Obuchowski)"
    assert (auc["lo"], auc["hi"]) == pytest.approx(
        [metrics.roc_auc_compare(y, rows["prob_orig"][a], rows["prob_trans"][a], clusters=pt)[k]
         for k in ("lo", "hi")])
    c = summary["comparisons"][0]
    assert c["roc_auc"]["transmitted"]["method"] == "DeLong paired, clustered (Obuchowski)"
    assert c["pi"]["n_clusters"] == 40 and c["ols"]["original"]["n_clusters"] == 40
    assert "Korn-Graubard" in summary["intervals"]["proportions"]
    assert "Durkalski" in summary["intervals"]["mcnemar"]
    assert "Obuchowski" in summary["intervals"]["roc_auc"]
    # wider than the film-level interval, which takes the films as independent
    plain = report.summarize({k: v for k, v in rows.items() if k != "patient"}, ["a", "b"], eta=0.4)
    assert "n_patients" not in plain
    p0 = plain["models"]["a"]["pi"]
    assert s["pi"]["lo"] <= p0["lo"] and s["pi"]["hi"] >= p0["hi"] and s["pi"]["hi"] - s["pi"]["lo"] > p0["hi"] - p0["lo"]
    text = report.write_report(tmp_path, summary, rows).read_text()
    assert f"come from 40 patients, some with several pairs" in text and "Durkalski" in text


def test_rows_without_a_patient_count_as_patients_of_their_own():
    p = report.patients({"patient": np.asarray(["a", "", None, float("nan"), "a"], dtype=object)})
    assert p[0] == p[4] == "a" and len(set(p.tolist())) == 4


def test_rows_with_one_pair_per_patient_keep_the_exact_intervals():
    rows = _two_model_rows_with_patients()
    rows = dict(rows, patient=np.asarray([f"x{i}" for i in range(len(rows["pair_id"]))], dtype=object))
    with_pt = report.summarize(rows, ["a", "b"], eta=0.4)
    plain = report.summarize({k: v for k, v in rows.items() if k != "patient"}, ["a", "b"], eta=0.4)
    assert with_pt.pop("n_patients") == len(rows["pair_id"])
    for m in ("a", "b"):
        assert with_pt["models"][m].pop("n_patients") == len(rows["pair_id"]) // 2
    assert json.dumps(report.jsonable(with_pt), sort_keys=True) == json.dumps(report.jsonable(plain), sort_keys=True)


# ------------------------------------------------------------ OLS under two lung definitions
def test_ols_by_convention_side_by_side(tmp_path):
    rows, po, pt, labels, iol_o, iol_t = _rows()
    # a larger (anatomical) lung mask holds more of each heat map: higher IOL, lower OLS
    rows["iol_orig_anatomical"] = np.where(np.isnan(iol_o.tolist() + [np.nan, np.nan]), np.nan,
                                           np.clip(rows["iol_orig"] + 0.25, 0, 1))
    rows["iol_trans_anatomical"] = np.clip(rows["iol_trans"] + 0.25, 0, 1)
    s = report.summarize(rows, ["m"], eta=0.4, conventions=["fields", "anatomical"])
    m = s["models"]["m"]
    assert list(m["ols_by_convention"]) == ["fields", "anatomical"]
    assert m["ols_by_convention"]["fields"] == m["ols"]
    ok = rows["error"] == ""
    for side, key in (("original", "iol_orig_anatomical"), ("transmitted", "iol_trans_anatomical")):
        got = m["ols_by_convention"]["anatomical"][side]
        assert got["score"] == pytest.approx(metrics.ols_score(rows[key][ok], 0.4))
        d = m["ols_convention_difference"]["anatomical"][side]
        first = rows[key.replace("_anatomical", "")][ok]
        want = metrics.ols_paired_comparison(first, rows[key][ok], 0.4)
        assert d["diff"] == pytest.approx(want["diff"]) and d["p_value"] == pytest.approx(want["p_value"])
    assert m["ols_by_convention"]["anatomical"]["original"]["score"] < m["ols"]["original"]["score"]
    text = report.write_report(tmp_path, s, rows).read_text()
    assert "### OLS by lung definition" in text and "| m | fields − anatomical | original |" in text
    # rows of one convention: no such block
    assert "ols_by_convention" not in report.summarize(_rows()[0], ["m"])["models"]["m"]


def test_plots_mark_a_missing_score_instead_of_drawing_zero(tmp_path):
    v, err = report._errbars([{"score": 12.0, "lo": 10.0, "hi": 15.0}, None, {"score": None}])
    assert v[0] == 12.0 and np.isnan(v[1]) and np.isnan(v[2])
    assert err[:, 0].tolist() == [2.0, 3.0] and err[:, 1:].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    summary = {"eta": 0.4, "models": {"m": {"pi": {"score": 3.0, "lo": 1.0, "hi": 6.0},
                                            "ols": {"original": {"score": None, "lo": None, "hi": None},
                                                    "transmitted": {"score": 40.0, "lo": 30.0, "hi": 50.0}}}}}
    report.plot_ols(summary, tmp_path / "ols.png")
    report.plot_pi(summary, tmp_path / "pi.png")
    assert (tmp_path / "ols.png").stat().st_size > 0 and (tmp_path / "pi.png").stat().st_size > 0
