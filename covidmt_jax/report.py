"""Summaries and reports of a scoring job (:mod:`covidmt_jax.scoring`).

- :func:`summarize` — per-model scores from the per-pair rows: PI with its exact binomial
  (Clopper-Pearson) 95 % interval, the flip directions and McNemar's test on them, OLS on
  originals and on transmitted images with their intervals and the number of empty heat maps,
  OLS original vs transmitted (paired), accuracy / sensitivity / specificity (binomial
  intervals) and ROC-AUC (DeLong) on each side, McNemar's test on the paired correctness, the
  error rate, and error counts by kind; plus paired comparisons of every two models on the
  pairs both scored (:func:`compare_models`: PI and OLS differences with Newcombe intervals
  and exact McNemar p, ROC-AUC differences with DeLong). Every score uses the rows of that
  model without an error; NaN (undefined, e.g. no positive label) is written as ``null`` in
  ``summary.json`` (:func:`jsonable`). With the lung-mask QC columns: the QC counts per side
  (:func:`lung_qc_summary`) and, per model, OLS also without the images whose mask is flagged.
- :func:`write_report` — ``report.md`` (paper-style tables: PI like Table 2, OLS original vs
  transmitted like Figs. 4 / 7) and PNG plots (``pi.png``, ``ols.png``, ``iol_hist.png``) and
  overlay galleries ``gallery_<model>_{flipped,random}.png`` (original beside transmitted:
  image, Grad-CAM overlay, lung contour, probability and decision; like Figs. 2 and 9).
- :func:`write_sweep_report` — PI and OLS against JPEG quality for a quality sweep.

Plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from covidmt_jax import metrics
from covidmt_jax.lung_qc import QC_FLAGS, parse_flags, qc_counts

__all__ = ["summarize", "model_summary", "compare_models", "interval_methods", "jsonable",
           "lung_qc_summary", "write_report", "write_sweep_report", "gallery_figure"]

#: Row columns of the lung-mask QC flags per side (:data:`covidmt_jax.scoring.rows.QC_COLUMNS`).
QC_SIDES = (("original", "qc_flags_orig"), ("transmitted", "qc_flags_trans"))
#: Flagged pairs listed in ``summary.json["lung_qc"]["examples"]`` and ``report.md``.
QC_EXAMPLES = 8
#: Optional row column: the pair's patient (films of one patient are not independent; rows
#: that carry it get patient-clustered intervals and tests where a patient has several pairs).
PATIENT_COLUMN = "patient"
#: IOL columns of a further lung convention: ``iol_orig_<name>``, ``iol_trans_<name>``
#: (:func:`covidmt_jax.scoring.rows.row_columns`); the plain ``iol_*`` are the first's.
_CONVENTION_IOL = re.compile(r"iol_orig_([a-z][a-z0-9]*)$")


# ============================================================================ numbers
def jsonable(obj: Any) -> Any:
    """Plain-JSON version of ``obj``: numpy scalars / arrays to Python, NaN / Inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def _ci(t: tuple[float, float, float]) -> dict[str, float]:
    return {"score": t[0], "lo": t[1], "hi": t[2]}


def error_kind(error: str) -> str:
    """The kind of an ``error`` cell: the text before its first ``":"``."""
    return error.split(":", 1)[0].strip()


def interval_methods(alpha: float = 0.05, method: str = "clopper-pearson", *,
                     clustered: bool = False) -> dict[str, str]:
    """What each interval and test in a summary is (written to ``summary.json["intervals"]``);
    ``clustered``: the rows carry patients and some patient has several pairs."""
    level = f"{100 * (1 - alpha):g} %"
    name = {"clopper-pearson": "Clopper-Pearson exact", "wilson": "Wilson score"}[method]
    if clustered:
        return {
            "level": level,
            "proportions": f"{name} binomial {level} interval on the effective sample size of "
                           "the patient-clustered rate (Korn-Graubard; several pairs of one patient "
                           "are not independent)",
            "denominators": "PI: the scored pairs; OLS: the images with a non-empty heat map; "
                            "accuracy: the labelled pairs; sensitivity / specificity: their "
                            "positives / negatives; error rate: all rows of the model",
            "roc_auc": f"DeLong {level} interval (normal, clipped to [0, 1]) with Obuchowski's "
                       "variance for patient clusters",
            "paired_difference": f"Newcombe hybrid score {level} interval widened by the square "
                                 "root of the design effect of the patient clusters, in percentage points",
            "mcnemar": "clustered McNemar (Durkalski 2003): (sum_k (b_k - c_k))^2 / sum_k (b_k - c_k)^2 "
                       "over patients k, chi-square with 1 degree of freedom",
            "roc_auc_difference": f"DeLong paired test, normal {level} interval, with Obuchowski's "
                                  "covariance for patient clusters"}
    return {
        "level": level,
        "proportions": f"{name} binomial {level} interval",
        "denominators": "PI: the scored pairs; OLS: the images with a non-empty heat map "
                        "(n_used; the empty ones are counted in n_empty); accuracy: the labelled "
                        "pairs; sensitivity / specificity: their positives / negatives; error "
                        "rate: all rows of the model",
        "roc_auc": f"DeLong {level} interval (normal, clipped to [0, 1])",
        "paired_difference": f"Newcombe hybrid score {level} interval for the difference of "
                             "paired proportions, in percentage points",
        "mcnemar": "exact two-sided McNemar, p = min(1, 2 P[Binom(b + c, 1/2) <= min(b, c)])",
        "roc_auc_difference": f"DeLong paired test, normal {level} interval"}


def patients(rows: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """``[N]`` patient labels of the rows, or None without a :data:`PATIENT_COLUMN`; a row
    without a patient ("", None or NaN) counts as a patient of its own."""
    if PATIENT_COLUMN not in rows:
        return None
    p = np.asarray(rows[PATIENT_COLUMN], dtype=object)
    return np.asarray([f"\0row{i}" if v is None or v == "" or (isinstance(v, float) and math.isnan(v))
                       else str(v) for i, v in enumerate(p)], dtype=object)


def further_conventions(rows: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the lung conventions after the first that the rows hold IOL for."""
    return sorted(m.group(1) for c in rows if (m := _CONVENTION_IOL.match(c))
                  and f"iol_trans_{m.group(1)}" in rows)


def _pair_index(rows: Mapping[str, np.ndarray], model: str) -> dict[str, int]:
    """pair_id -> row index of the scored (error-free) rows of one model's rows."""
    ids = np.asarray(rows["pair_id"], dtype=object)
    ok = np.flatnonzero(np.asarray(rows["error"], dtype=object) == "")
    index: dict[str, int] = {}
    for i in ok:
        pid = str(ids[i])
        if pid in index:
            raise ValueError(f"summarize: model {model!r} has more than one scored row for pair "
                             f"{pid!r}; the rows must hold one row per (pair, model)")
        index[pid] = int(i)
    return index


def model_summary(rows: Mapping[str, np.ndarray], threshold: float = 0.5, *, eta: float = 0.4,
                  n_boot: int | None = None, seed: int | None = None, alpha: float = 0.05,
                  method: str = "clopper-pearson",
                  conventions: Sequence[str] | None = None) -> dict[str, Any]:
    """Scores of ONE model from its rows (columns of :data:`covidmt_jax.scoring.rows.ROW_COLUMNS`).

    Every proportion carries a binomial interval (``method``: "clopper-pearson", the default,
    or "wilson"; :func:`covidmt_jax.metrics.binomial_ci`), ROC-AUC DeLong's, and the paired
    original-vs-transmitted comparisons Newcombe's interval with McNemar's exact p
    (:func:`covidmt_jax.metrics.paired_comparison`). Keys: ``threshold``, ``n_pairs``,
    ``n_scored``, ``n_errors``, ``errors``, ``error_rate``, ``pi``, ``ols`` (``original``,
    ``transmitted``), ``ols_orig_vs_trans``, ``lung_frac``, ``n_labelled`` and, with labels,
    ``classification``, ``mcnemar_correct``, ``accuracy_orig_vs_trans``,
    ``roc_auc_orig_vs_trans``. Percentages for PI, OLS, error rate and the paired differences
    (percentage points); fractions in ``classification``.

    With a :data:`PATIENT_COLUMN` and a patient with several scored pairs, the rates get
    patient-clustered intervals and the paired tests the clustered McNemar test
    (:func:`covidmt_jax.metrics.clustered_binomial_ci`, ``clustered_mcnemar``), and the result
    gains ``n_patients``. With IOL under further lung conventions (``lungs=both``):
    ``ols_by_convention`` = ``{convention: {"original", "transmitted"}}`` (the first convention
    under ``conventions[0]``, default "first") and ``ols_convention_difference`` =
    ``{convention: {side: paired comparison of IOL < eta, first minus that convention}}``.

    ``n_boot`` and ``seed`` are accepted for callers written for the percentile-bootstrap
    version and ignored: no interval resamples any more.
    """
    err = np.asarray(rows["error"], dtype=object)
    ok = err == ""
    kinds = Counter(error_kind(e) for e in err[~ok])
    n_err = int((~ok).sum())
    out: dict[str, Any] = {"threshold": float(threshold), "n_pairs": int(len(err)),
                           "n_scored": int(ok.sum()), "n_errors": n_err,
                           "errors": dict(sorted(kinds.items())),
                           "error_rate": _ci(metrics.percent_ci(n_err, len(err), alpha, method))}
    if not ok.any():
        return out
    po = np.asarray(rows["prob_orig"], np.float64)[ok]
    pt = np.asarray(rows["prob_trans"], np.float64)[ok]
    do, dt = po >= threshold, pt >= threshold
    pts = patients(rows)
    cl = pts[ok] if pts is not None and metrics.has_repeats(pts[ok]) else None
    if pts is not None:
        out["n_patients"] = int(len(set(pts[ok].tolist())))
    pi = metrics.pi_score_ci(po, pt, threshold, alpha=alpha, method=method, clusters=cl)
    direction = metrics.mcnemar(do, dt) if cl is None else metrics.clustered_mcnemar(do, dt, cl)
    out["pi"] = {**_ci(pi), "n": int(ok.sum()), "n_flips": int((do != dt).sum()),
                 "pos_to_neg": int((do & ~dt).sum()), "neg_to_pos": int((~do & dt).sum()),
                 "mcnemar_direction": direction}
    out["ols"] = {}
    iols = {}
    for side, key in (("original", "iol_orig"), ("transmitted", "iol_trans")):
        iol = iols[side] = np.asarray(rows[key], np.float64)[ok]
        out["ols"][side] = _ols_side(iol, eta, alpha, method, cl)
    if all(col in rows for _, col in QC_SIDES):
        out["ols_without_flagged"] = {}
        for side, col in QC_SIDES:
            flagged = np.asarray([bool(parse_flags(f)) for f in np.asarray(rows[col], dtype=object)[ok]],
                                 bool)
            out["ols_without_flagged"][side] = {
                **_ols_side(iols[side][~flagged], eta, alpha, method, None if cl is None else cl[~flagged]),
                "n_flagged": int(flagged.sum())}
    out["ols_orig_vs_trans"] = metrics.ols_paired_comparison(iols["original"], iols["transmitted"],
                                                             eta, alpha, clusters=cl)
    further = further_conventions(rows)
    if further:
        names = list(conventions or ["first", *further])
        out["ols_by_convention"] = {names[0]: out["ols"]}
        out["ols_convention_difference"] = {}
        for conv in further:
            other = {side: np.asarray(rows[f"{key}_{conv}"], np.float64)[ok]
                     for side, key in (("original", "iol_orig"), ("transmitted", "iol_trans"))}
            out["ols_by_convention"][conv] = {side: _ols_side(v, eta, alpha, method, cl)
                                              for side, v in other.items()}
            out["ols_convention_difference"][conv] = {
                side: metrics.ols_paired_comparison(iols[side], other[side], eta, alpha, clusters=cl)
                for side in other}
    out["lung_frac"] = {"original": float(np.mean(np.asarray(rows["lung_frac_orig"])[ok])),
                        "transmitted": float(np.mean(np.asarray(rows["lung_frac_trans"])[ok]))}
    labels = np.asarray(rows["label"])[ok]
    known = labels >= 0
    out["n_labelled"] = int(known.sum())
    if known.any():
        y = labels[known].astype(bool)
        ck = None if cl is None else cl[known]
        out["classification"] = {
            side: metrics.classification_report(y, p[known], threshold, alpha=alpha, method=method,
                                                clusters=ck)
            for side, p in (("original", po), ("transmitted", pt))}
        out["mcnemar_correct"] = (metrics.mcnemar(do[known], dt[known], labels=y) if ck is None else
                                  metrics.clustered_mcnemar(do[known] == y, dt[known] == y, ck))
        out["accuracy_orig_vs_trans"] = metrics.paired_comparison(do[known] == y, dt[known] == y,
                                                                  alpha, clusters=ck)
        out["roc_auc_orig_vs_trans"] = metrics.roc_auc_compare(y, po[known], pt[known], alpha,
                                                               clusters=ck)
    return out


def _ols_side(iol: np.ndarray, eta: float, alpha: float, method: str, clusters=None) -> dict[str, Any]:
    """OLS of one side's IOLs: :func:`covidmt_jax.metrics.ols_counts` with its binomial interval
    and the mean IOL (no image at all, e.g. every one flagged: counts 0, score NaN)."""
    if not len(iol):
        nan = float("nan")
        return {"score": nan, "n_total": 0, "n_used": 0, "n_empty": 0, "n_out": 0,
                "eta": float(eta), "empty": "exclude", "lo": nan, "hi": nan, "mean_iol": nan}
    s = metrics.ols_score_ci(iol, eta, alpha=alpha, method=method, clusters=clusters)
    return {**metrics.ols_counts(iol, eta), "lo": s[1], "hi": s[2],
            "mean_iol": float(np.nanmean(iol)) if np.isfinite(iol).any() else float("nan")}


def lung_qc_summary(rows: Mapping[str, np.ndarray], examples: int = QC_EXAMPLES
                    ) -> dict[str, Any] | None:
    """Lung-mask QC over the pairs with at least one row without an error (the masks are the
    same for every model; a pair's first such row is read): ``{"original": qc_counts,
    "transmitted": qc_counts, "examples": [{"pair_id", "original": [flags], "transmitted":
    [flags]}]}`` (the first ``examples`` flagged pairs, by ``index`` where rows have it); None without the QC
    columns (:data:`QC_SIDES`)."""
    if not all(col in rows for _, col in QC_SIDES):
        return None
    ids = np.asarray(rows["pair_id"], dtype=object)
    ok = np.flatnonzero(np.asarray(rows["error"], dtype=object) == "")
    if "index" in rows:
        ok = ok[np.argsort(np.asarray(rows["index"])[ok], kind="stable")]
    first: dict[str, int] = {}
    for i in ok:
        first.setdefault(str(ids[i]), int(i))
    flags = {side: [parse_flags(rows[col][i]) for i in first.values()] for side, col in QC_SIDES}
    out: dict[str, Any] = {side: qc_counts([{"flags": f, "flagged": bool(f)} for f in v])
                           for side, v in flags.items()}
    out["examples"] = [{"pair_id": pid, **{side: flags[side][j] for side, _ in QC_SIDES}}
                       for j, pid in enumerate(first)
                       if any(flags[side][j] for side, _ in QC_SIDES)][:examples]
    return out


def compare_models(rows: Mapping[str, np.ndarray], model_a: str, model_b: str, *,
                   thresholds: Mapping[str, float] | None = None, eta: float = 0.4,
                   alpha: float = 0.05) -> dict[str, Any]:
    """Paired comparison of two models on the pairs both scored without an error.

    Returns ``{"models": [a, b], "n_pairs", "pi", "ols": {"original", "transmitted"},
    "roc_auc": {"original", "transmitted"}}`` (``roc_auc`` only with labelled pairs):
      - ``pi``: :func:`covidmt_jax.metrics.paired_comparison` of the flip indicators (pair
        flips under a / under b): ``diff`` = PI_a - PI_b in percentage points with Newcombe's
        interval, exact McNemar p on the pairs that flip under one model only (n10, n01).
      - ``ols``: :func:`covidmt_jax.metrics.ols_paired_comparison` per side: McNemar on
        ``IOL < eta`` over the pairs whose heat maps are non-empty under both models
        (``n_excluded`` counts the others); ``diff`` = OLS_a - OLS_b on those pairs.
      - ``roc_auc``: :func:`covidmt_jax.metrics.roc_auc_compare` (DeLong, paired), per side.
    Rows are matched by ``pair_id``; a model with two scored rows for one pair raises.
    """
    thresholds = thresholds or {}
    model = np.asarray(rows["model"], dtype=object)
    sub = {m: {k: np.asarray(v)[model == m] for k, v in rows.items()} for m in (model_a, model_b)}
    idx = {m: _pair_index(sub[m], m) for m in (model_a, model_b)}
    common = sorted(set(idx[model_a]) & set(idx[model_b]))
    out: dict[str, Any] = {"models": [model_a, model_b], "n_pairs": len(common)}
    if not common:
        return out
    take = {m: np.array([idx[m][p] for p in common]) for m in (model_a, model_b)}

    def col(m: str, key: str) -> np.ndarray:
        return np.asarray(sub[m][key], np.float64)[take[m]]

    def flips(m: str) -> np.ndarray:
        t = thresholds.get(m, 0.5)
        return (col(m, "prob_orig") >= t) != (col(m, "prob_trans") >= t)

    pts = patients(sub[model_a])
    cl = pts[take[model_a]] if pts is not None else None
    cl = cl if cl is not None and metrics.has_repeats(cl) else None
    out["pi"] = metrics.paired_comparison(flips(model_a), flips(model_b), alpha, clusters=cl)
    out["ols"] = {side: metrics.ols_paired_comparison(col(model_a, key), col(model_b, key), eta, alpha,
                                                      clusters=cl)
                  for side, key in (("original", "iol_orig"), ("transmitted", "iol_trans"))}
    labels = col(model_a, "label")
    known = labels >= 0
    if known.any():
        y = labels[known].astype(bool)
        ck = None if cl is None else cl[known]
        out["roc_auc"] = {side: metrics.roc_auc_compare(y, col(model_a, key)[known],
                                                        col(model_b, key)[known], alpha, clusters=ck)
                          for side, key in (("original", "prob_orig"), ("transmitted", "prob_trans"))}
    return out


def summarize(rows: Mapping[str, np.ndarray], models: Sequence[str], *, eta: float = 0.4,
              n_boot: int | None = None, seed: int | None = None,
              thresholds: Mapping[str, float] | None = None, alpha: float = 0.05,
              method: str = "clopper-pearson",
              conventions: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"models": {name: model_summary}, "comparisons": [compare_models for each pair of
    models, in the order given], "n_pairs", "n_pairs_with_error", "eta", "alpha", "ci",
    "intervals"}`` and, when the rows have the QC columns, ``"lung_qc"``
    (:func:`lung_qc_summary`).

    ``ci`` is a one-line description of the proportion intervals and ``intervals``
    (:func:`interval_methods`) describes each interval and test. A model with two scored rows
    for one ``pair_id`` raises ``ValueError`` (it would count the pair twice). ``n_boot`` and
    ``seed`` are accepted for callers written for the bootstrap version and ignored.
    """
    thresholds = thresholds or {}
    models = list(models)
    per = {}
    model = np.asarray(rows["model"], dtype=object)
    for m in models:
        sel = model == m
        mine = {k: np.asarray(v)[sel] for k, v in rows.items()}
        _pair_index(mine, m)  # one scored row per pair, or a clear error
        per[m] = model_summary(mine, thresholds.get(m, 0.5), eta=eta, alpha=alpha, method=method,
                               conventions=conventions)
    comparisons = [compare_models(rows, a, b, thresholds=thresholds, eta=eta, alpha=alpha)
                   for i, a in enumerate(models) for b in models[i + 1:]]
    ids = np.asarray(rows["pair_id"], dtype=object)
    bad = ids[np.asarray(rows["error"], dtype=object) != ""]
    pts = patients(rows)
    # clustered where some model's scored pairs include a patient twice (model_summary's rule)
    clustered = any(s.get("n_patients", s["n_scored"]) < s["n_scored"] for s in per.values())
    intervals = interval_methods(alpha, method, clustered=clustered)
    out = {"models": per, "comparisons": comparisons, "n_pairs": int(len(set(ids.tolist()))),
           "n_pairs_with_error": int(len(set(bad.tolist()))), "eta": float(eta),
           "alpha": float(alpha), "ci": intervals["proportions"], "intervals": intervals}
    if pts is not None:
        out["n_patients"] = int(len(set(pts.tolist())))
    qc = lung_qc_summary(rows)
    if qc is not None:
        out["lung_qc"] = qc
    return out


# ============================================================================ formatting
def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _with_ci(d: Mapping[str, Any] | None, key: str = "score") -> str:
    if not d:
        return "–"
    return f"{_f(d.get(key))} [{_f(d.get('lo'))}, {_f(d.get('hi'))}]"


def _with_ci_pair(value: Any, lohi: Sequence | None, digits: int = 3) -> str:
    """``value [lo, hi]`` from a value and a [lo, hi] list (classification rates)."""
    if not lohi:
        return _f(value, digits)
    return f"{_f(value, digits)} [{_f(lohi[0], digits)}, {_f(lohi[1], digits)}]"


def _paired_cells(c: Mapping[str, Any]) -> list[str]:
    """Table cells of a paired comparison: n, rate first, rate second, diff [CI], b, c, p."""
    return [str(c.get("n", 0)), _f(c.get("rate_first")), _f(c.get("rate_second")),
            f"{_f(c.get('diff'))} [{_f(c.get('lo'))}, {_f(c.get('hi'))}]",
            str(c.get("n10", "–")), str(c.get("n01", "–")), _p(c.get("p_value"))]


def _p(x: Any) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.3g}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return lines + [""]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ============================================================================ plots
def _errbars(values: Sequence[Mapping | None], key: str = "score"):
    """``(heights [M], errors [2, M])`` of bars with intervals; a missing score stays NaN (no
    bar, marked by :func:`_mark_missing`), never a bar at 0 %."""
    v = np.array([np.nan if not d or d.get(key) is None else d[key] for d in values], float)
    lo = np.array([np.nan if not d or d.get("lo") is None else d["lo"] for d in values], float)
    hi = np.array([np.nan if not d or d.get("hi") is None else d["hi"] for d in values], float)
    err = np.vstack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)])
    return v, np.clip(err, 0, None)


def _mark_missing(ax, xs: np.ndarray, v: np.ndarray) -> None:
    """Write "no score" where a bar has none (e.g. OLS when every heat map is empty)."""
    for x, h in zip(xs, v):
        if not np.isfinite(h):
            ax.text(x, 0, "no score", ha="center", va="bottom", rotation=90, fontsize=8, color="0.4")


def plot_pi(summary: Mapping[str, Any], path: Path) -> None:
    """Bar chart of PI per model with its 95 % CI."""
    plt = _plt()
    names = list(summary["models"])
    v, err = _errbars([summary["models"][m].get("pi") for m in names])
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), np.nan_to_num(v), yerr=err, capsize=4, color="#4c72b0")
    _mark_missing(ax, np.arange(len(names)), v)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("PI score (%)")
    ax.set_title("Prediction instability (95 % CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ols(summary: Mapping[str, Any], path: Path) -> None:
    """Grouped bars: OLS on originals vs transmitted images per model, with 95 % CIs."""
    plt = _plt()
    names = list(summary["models"])
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names) + 2), 3.5))
    x = np.arange(len(names))
    for j, (side, colour) in enumerate((("original", "#55a868"), ("transmitted", "#c44e52"))):
        v, err = _errbars([(summary["models"][m].get("ols") or {}).get(side) for m in names])
        ax.bar(x + (j - 0.5) * 0.38, np.nan_to_num(v), 0.38, yerr=err, capsize=4, color=colour, label=side)
        _mark_missing(ax, x + (j - 0.5) * 0.38, v)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel(f"OLS score (%), eta = {summary.get('eta', 0.4)}")
    ax.set_title("Out-of-lung saliency (95 % CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_iol_hist(rows: Mapping[str, np.ndarray], models: Sequence[str], eta: float, path: Path) -> None:
    """Histograms of IOL on originals and transmitted images per model (scored rows)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.2), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, m in zip(axes[0], models):
        sel = (np.asarray(rows["model"], dtype=object) == m) & (np.asarray(rows["error"], dtype=object) == "")
        for key, label, colour in (("iol_orig", "original", "#55a868"), ("iol_trans", "transmitted", "#c44e52")):
            v = np.asarray(rows[key], float)[sel]
            ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.55, label=label, color=colour)
        ax.axvline(eta, color="k", ls="--", lw=1, label=f"eta = {eta}")
        ax.set_title(m)
        ax.set_xlabel("IOL")
    axes[0][0].set_ylabel("images")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gallery_figure(panels: Sequence[Mapping[str, Any]], title: str, path: Path,
                   cam_threshold: float = 0.5) -> None:
    """One row per pair: original image | original heat map + lung contour | transmitted image |
    transmitted heat map + lung contour, titled with probability, decision and IOL.

    Each panel dict: ``image_orig``/``image_trans`` ``[S, S]`` in [0, 1], ``cam_*`` ``[S, S]``,
    ``lung_*`` ``[S, S]`` probabilities, ``prob_*``, ``iol_*``, ``threshold``, ``pair_id``,
    ``label`` and optionally ``note`` (a line under the pair id). The heat-map region
    (``cam >= cam_threshold``) is outlined in white.
    """
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.7 * n + 0.4), squeeze=False)
    for r, p in enumerate(panels):
        for j, side in enumerate(("orig", "trans")):
            img, cam, lung = p[f"image_{side}"], p[f"cam_{side}"], p[f"lung_{side}"]
            prob, iol = float(p[f"prob_{side}"]), float(p[f"iol_{side}"])
            dec = "COVID" if prob >= p["threshold"] else "non-COVID"
            a0, a1 = axes[r][2 * j], axes[r][2 * j + 1]
            a0.imshow(img, cmap="gray", vmin=0, vmax=1)
            a0.contour(lung, levels=[0.5], colors="lime", linewidths=0.8)
            name = "original" if side == "orig" else "transmitted"
            lab = {1: "label COVID", 0: "label non-COVID"}.get(int(p["label"]), "")
            a0.set_title(f"{name}" + (f" ({lab})" if j == 0 and lab else ""), fontsize=8)
            a1.imshow(img, cmap="gray", vmin=0, vmax=1)
            a1.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            a1.contour(lung, levels=[0.5], colors="lime", linewidths=0.8)
            if np.any(cam >= cam_threshold) and np.any(cam < cam_threshold):
                a1.contour(cam, levels=[cam_threshold], colors="white", linewidths=0.6)
            a1.set_title(f"p={prob:.3f} {dec}  IOL={'–' if not np.isfinite(iol) else f'{iol:.2f}'}",
                         fontsize=8)
        note = f"\n{p['note']}" if p.get("note") else ""
        axes[r][0].set_ylabel(str(p["pair_id"])[-28:] + note, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ============================================================================ report.md
def write_report(workdir: str | Path, summary: Mapping[str, Any], rows: Mapping[str, np.ndarray],
                 gallery: Mapping[str, Mapping[str, Sequence[Mapping]]] | None = None) -> Path:
    """``report.md`` + plots (+ galleries) in ``workdir``; returns the report's path."""
    workdir = Path(workdir)
    models = list(summary["models"])
    job = summary.get("job", {})
    eta = summary.get("eta", 0.4)
    plot_pi(summary, workdir / "pi.png")
    plot_ols(summary, workdir / "ols.png")
    plot_iol_hist(rows, models, eta, workdir / "iol_hist.png")
    L = ["# Scoring report", ""]
    if job:
        L += [f"Pairs: **{summary['n_pairs']}** from `{job.get('source', '')}`"
              + (f" (channel: {job['channel']})" if job.get("channel") else "")
              + f"; image size {job.get('image_size')} px; Grad-CAM `{job.get('cam_method')}`, "
              f"heat-map region = CAM >= {job.get('cam_threshold')}; lungs = U-Net prob >= 0.5; "
              f"eta = {eta}. IOL is computed at the model input resolution."
              + (" Patients: from " + ", ".join(f"`{Path(f).name}`" for f in job["patient_files"]) + "."
                 if job.get("patient_files") else ""), ""]
    iv = summary.get("intervals") or {}
    errors_note = "Scores use the rows without an error; pairs with an error are counted below."
    if summary.get("n_patients") is not None and "clustered" in iv.get("mcnemar", ""):
        L += [f"Intervals ({iv.get('level', '95 %')}): the {summary['n_pairs']} pairs come from "
              f"{summary['n_patients']} patients, some with several pairs, which are not "
              "independent. Rates (PI, OLS, accuracy, sensitivity, specificity) use the "
              f"{iv.get('proportions', '')}; the error rate the plain binomial interval over the rows; "
              f"ROC-AUC the {iv.get('roc_auc', '')}; paired differences (same pairs, two sides or two "
              f"models) the {iv.get('paired_difference', '')}; paired p-values the "
              f"{iv.get('mcnemar', '')}. {errors_note}", ""]
    else:
        L += [f"Intervals ({iv.get('level', '95 %')}): rates (PI, OLS, accuracy, sensitivity, "
              f"specificity, error rate) with the {summary.get('ci', '')}; ROC-AUC with DeLong's "
              "interval; paired differences (same pairs, two sides or two models) with Newcombe's "
              "hybrid score interval, in percentage points (pp), and McNemar's exact test "
              "(p = min(1, 2 P[Binom(b + c, 1/2) <= min(b, c)]), b and c the discordant counts). "
              f"{errors_note}", ""]
        if summary.get("n_patients") is not None:
            L += [f"The {summary['n_pairs']} pairs come from {summary['n_patients']} patients, one pair "
                  "each: the intervals above hold as they are.", ""]
    L += ["## Prediction instability (cf. Table 2)", ""]
    body = []
    for m in models:
        s = summary["models"][m]
        pi = s.get("pi")
        body.append([m, str(s["n_scored"]), _with_ci(pi),
                     str(pi["n_flips"]) if pi else "–", str(pi["pos_to_neg"]) if pi else "–",
                     str(pi["neg_to_pos"]) if pi else "–",
                     _p(pi["mcnemar_direction"]["p_value"]) if pi else "–"])
    L += _md_table(["model", "pairs", "PI % [95 % CI]", "flips", "COVID → non", "non → COVID",
                    "McNemar p (direction)"], body)
    L += ["![PI](pi.png)", ""]
    L += ["## Out-of-lung saliency, original vs transmitted (cf. Figs. 4 and 7)", ""]
    body = []
    for m in models:
        o = summary["models"][m].get("ols") or {}
        so, st = o.get("original"), o.get("transmitted")
        body.append([m, _with_ci(so), _with_ci(st),
                     f"{(so or {}).get('n_used', '–')} / {(st or {}).get('n_used', '–')}",
                     f"{(so or {}).get('n_empty', '–')} / {(st or {}).get('n_empty', '–')}",
                     _f((so or {}).get("mean_iol"), 3), _f((st or {}).get("mean_iol"), 3)])
    L += _md_table(["model", "OLS % original [CI]", "OLS % transmitted [CI]",
                    "maps used orig / trans", "empty heat maps orig / trans", "mean IOL orig",
                    "mean IOL trans"], body)
    L += ["Empty heat maps (no CAM pixel >= the threshold) have no IOL: they are left out of OLS "
          "and of its interval (which is over the maps used).", ""]
    body = []
    for m in models:
        c = summary["models"][m].get("ols_orig_vs_trans")
        if c:
            body.append([m, *_paired_cells(c), str(c["n_excluded"])])
    if body:
        L += ["Paired, on the pairs whose heat maps are non-empty on both sides (McNemar on "
              f"IOL < {eta}; b = out of the lungs on the original only, c = on the transmitted "
              "only):", ""]
        L += _md_table(["model", "pairs", "OLS % orig", "OLS % trans", "orig − trans pp [95 % CI]",
                        "b", "c", "McNemar exact p", "pairs excluded (empty map)"], body)
    L += _convention_section(summary, eta)
    L += ["![OLS](ols.png)", "", "![IOL histograms](iol_hist.png)", ""]
    L += _qc_section(summary)
    comparisons = [c for c in summary.get("comparisons", []) if c.get("n_pairs")]
    if comparisons:
        L += ["## Model comparisons (paired, on the pairs both models scored)", "",
              "diff = first model − second model in percentage points. PI: b = pairs that flip "
              "under the first model only, c = under the second only. OLS: McNemar on "
              f"IOL < {eta} over the pairs with non-empty heat maps under both models.", ""]
        body = []
        for c in comparisons:
            a, b = c["models"]
            name = f"{a} − {b}"
            body.append([name, "PI", *_paired_cells(c["pi"]), "–"])
            for side in ("original", "transmitted"):
                o = c["ols"][side]
                body.append([name, f"OLS {side}", *_paired_cells(o), str(o["n_excluded"])])
        L += _md_table(["models", "score", "pairs", "first %", "second %", "diff pp [95 % CI]",
                        "b", "c", "McNemar exact p", "excluded (empty map)"], body)
        body = []
        for c in comparisons:
            for side, r in (c.get("roc_auc") or {}).items():
                body.append([f"{c['models'][0]} − {c['models'][1]}", side, _f(r["auc_a"], 3),
                             _f(r["auc_b"], 3),
                             f"{_f(r['diff'], 3)} [{_f(r['lo'], 3)}, {_f(r['hi'], 3)}]",
                             _p(r["p_value"])])
        if body:
            L += ["ROC-AUC, paired DeLong test on the labelled pairs:", ""]
            L += _md_table(["models", "side", "AUC first", "AUC second", "diff [95 % CI]", "p"],
                           body)
    L += ["## Classification on each side", ""]
    body = []
    for m in models:
        c = summary["models"][m].get("classification")
        if not c:
            why = "(no labels)" if summary["models"][m].get("n_scored") else "(no scored rows)"
            body.append([m, why, "–", "–", "–", "–", "–"])
            continue
        mc = summary["models"][m]["mcnemar_correct"]
        for side in ("original", "transmitted"):
            r = c[side]
            ci = r.get("ci") or {}
            body.append([m, side, str(r["n"])] + [_with_ci_pair(r[k], ci.get(k)) for k in
                                                  ("accuracy", "sensitivity", "specificity",
                                                   "roc_auc")])
        acc = summary["models"][m].get("accuracy_orig_vs_trans") or {}
        auc = summary["models"][m].get("roc_auc_orig_vs_trans") or {}
        body.append([m, "orig − trans",
                     f"b={mc['b']}, c={mc['c']}",
                     f"{_f(acc.get('diff'))} pp [{_f(acc.get('lo'))}, {_f(acc.get('hi'))}], "
                     f"McNemar p={_p(mc['p_value'])} ({mc['method']})", "", "",
                     f"{_f(auc.get('diff'), 3)} [{_f(auc.get('lo'), 3)}, {_f(auc.get('hi'), 3)}], "
                     f"DeLong p={_p(auc.get('p_value'))}"])
    L += _md_table(["model", "side", "n", "accuracy [CI]", "sensitivity [CI]",
                    "specificity [CI]", "ROC-AUC [DeLong CI]"], body)
    L += ["## Errors", ""]
    body = [[m, str(s["n_pairs"]), str(s["n_errors"]), _with_ci(s.get("error_rate")),
             ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "–"]
            for m, s in summary["models"].items()]
    L += _md_table(["model", "rows", "errors", "error rate % [95 % CI]", "by kind"], body)
    if job.get("source_skipped"):
        L += [f"The pair source itself skipped {job['source_skipped']} file(s) while listing "
              "(no rows for them), e.g.:", ""]
        L += [f"- `{e}`" for e in job.get("source_skipped_examples", [])] + [""]
    if job.get("source_ignored"):
        L += [f"{job['source_ignored']} file(s) under the root are not image files and were "
              "ignored, e.g.:", ""]
        L += [f"- `{e}`" for e in job.get("source_ignored_examples", [])] + [""]
    if gallery:
        L += ["## Gallery", "",
              "Original beside transmitted: image with the lung contour (green), Grad-CAM of the "
              "predicted decision with the heat-map region outlined (white).", ""]
        cam_thr = float(job.get("cam_threshold", 0.5))
        titles = {"flipped": "flipped pairs", "random": "random pairs",
                  "qc_flagged": "pairs with a flagged lung mask"}
        for m in models:
            for kind in ("flipped", "random", "qc_flagged"):
                if kind not in (gallery.get(m) or {}):
                    continue
                panels = gallery[m][kind] or []
                if not panels:
                    L += [f"- {m}, {kind}: no pairs", ""]
                    continue
                fn = f"gallery_{_slug(m)}_{kind}.png"
                title = f"{m}: {titles[kind]}"
                gallery_figure(panels, title, workdir / fn, cam_thr)
                L += [f"### {m}, {kind} ({len(panels)} pairs)", "", f"![{m} {kind}]({fn})", ""]
    path = workdir / "report.md"
    path.write_text("\n".join(L))
    return path


def _convention_section(summary: Mapping[str, Any], eta: float) -> list[str]:
    """OLS under each lung convention side by side (``lungs=both``), and the paired difference."""
    models = [m for m, s in summary["models"].items() if s.get("ols_by_convention")]
    if not models:
        return []
    L = ["### OLS by lung definition", "",
         "The same heat maps against each convention's lung mask: how much OLS depends on what "
         "counts as lung.", ""]
    body = []
    for m in models:
        for conv, o in summary["models"][m]["ols_by_convention"].items():
            so, st = o.get("original") or {}, o.get("transmitted") or {}
            body.append([m, conv, _with_ci(so), _with_ci(st), _f(so.get("mean_iol"), 3),
                         _f(st.get("mean_iol"), 3)])
    L += _md_table(["model", "lungs", "OLS % original [CI]", "OLS % transmitted [CI]",
                    "mean IOL orig", "mean IOL trans"], body)
    body = []
    for m in models:
        first = next(iter(summary["models"][m]["ols_by_convention"]))
        for conv, sides in summary["models"][m].get("ols_convention_difference", {}).items():
            for side, c in sides.items():
                body.append([m, f"{first} − {conv}", side, *_paired_cells(c)])
    if body:
        L += [f"Paired on the same images (McNemar on IOL < {eta}; b = out of the lungs under the "
              "first definition only, c = under the second only):", ""]
        L += _md_table(["model", "lungs", "side", "images", "OLS % first", "OLS % second",
                        "diff pp [95 % CI]", "b", "c", "McNemar p"], body)
    return L


def _flag_cell(flags: Sequence[str]) -> str:
    return ", ".join(flags) or "–"


def _qc_section(summary: Mapping[str, Any]) -> list[str]:
    """report.md lines of the lung-mask QC: counts per side, OLS with and without the flagged
    images per model, the first flagged pairs."""
    qc = summary.get("lung_qc")
    if not qc:
        return []
    L = ["## Lung-mask quality control", "",
         "Per image, the default lung convention's mask (`covidmt_jax/lung_qc.py`): `fraction` "
         "(lung fraction outside the reference range), `components` (not exactly two large "
         "connected components), `confidence` (too much of the map in 0.25 < p < 0.75), "
         "`disagreement` (fields and anatomical masks disagree; only with both conventions: "
         f"{'checked' if qc.get('disagreement_checked') else 'not checked'} in this run). "
         "Counted over the pairs scored without an error; the thresholds are in "
         "`summary.json` (`lung_qc.thresholds`).", ""]
    body = [[side, str(qc[side]["n"]), str(qc[side]["flagged"]),
             *(str(qc[side].get(f, 0)) for f in QC_FLAGS)] for side in ("original", "transmitted")]
    L += _md_table(["side", "images", "flagged", *QC_FLAGS], body)
    body = []
    for m, s in summary["models"].items():
        wo = s.get("ols_without_flagged")
        if not wo:
            continue
        for side in ("original", "transmitted"):
            a, b = (s.get("ols") or {}).get(side) or {}, wo[side]
            body.append([m, side, f"{_with_ci(a)} (n={a.get('n_used', '–')})",
                         f"{_with_ci(b)} (n={b.get('n_used', '–')})", str(b["n_flagged"])])
    if body:
        L += ["OLS over all scored images and without the images whose lung mask is flagged "
              "(same binomial interval):", ""]
        L += _md_table(["model", "side", "OLS % all [CI]", "OLS % without flagged [CI]",
                        "flagged images left out"], body)
    ex = qc.get("examples") or []
    if ex:
        L += [f"First {len(ex)} pairs with a flagged mask (original; transmitted):", ""]
        L += [f"- `{e['pair_id']}`: {_flag_cell(e['original'])}; {_flag_cell(e['transmitted'])}"
              for e in ex] + [""]
    return L


def write_sweep_report(workdir: str | Path, sweep: Mapping[str, Any]) -> Path:
    """``report.md``, ``pi_vs_quality.png`` and ``ols_vs_quality.png`` for a quality sweep
    (``sweep = {"qualities": [...], "per_quality": {q: summary}}``)."""
    plt = _plt()
    workdir = Path(workdir)
    qs = list(sweep["qualities"])
    per = sweep["per_quality"]
    models = list(per[qs[0]]["models"]) if qs else []

    def series(m, getter):
        vals = [getter(per[q]["models"][m]) for q in qs]
        return _errbars(vals)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in models:
        v, err = series(m, lambda s: s.get("pi"))
        ax.errorbar(qs, v, yerr=err, marker="o", capsize=3, label=m)
    ax.set_xlabel("JPEG quality")
    ax.set_ylabel("PI score (%)")
    ax.set_title("PI vs JPEG quality (95 % CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(workdir / "pi_vs_quality.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in models:
        v, err = series(m, lambda s: (s.get("ols") or {}).get("transmitted"))
        line = ax.errorbar(qs, v, yerr=err, marker="o", capsize=3, label=f"{m} transmitted")
        vo, _ = series(m, lambda s: (s.get("ols") or {}).get("original"))
        ax.plot(qs, vo, ls="--", color=line[0].get_color(), label=f"{m} original")
    ax.set_xlabel("JPEG quality")
    ax.set_ylabel("OLS score (%)")
    ax.set_title("OLS vs JPEG quality (95 % CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(workdir / "ols_vs_quality.png", dpi=120)
    plt.close(fig)

    L = ["# JPEG-quality sweep", "",
         "One scoring job per quality (sub-folders `qNNN/`, each with its own report).", ""]
    body = []
    for q in qs:
        for m in models:
            s = per[q]["models"][m]
            o = s.get("ols") or {}
            body.append([str(q), m, str(s["n_scored"]), _with_ci(s.get("pi")),
                         _with_ci(o.get("original")), _with_ci(o.get("transmitted")),
                         str(s["n_errors"])])
    L += _md_table(["quality", "model", "pairs", "PI % [CI]", "OLS % original [CI]",
                    "OLS % transmitted [CI]", "errors"], body)
    L += ["![PI vs quality](pi_vs_quality.png)", "", "![OLS vs quality](ols_vs_quality.png)", ""]
    path = workdir / "report.md"
    path.write_text("\n".join(L))
    return path
