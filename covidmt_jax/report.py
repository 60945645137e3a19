"""Summaries and reports of a scoring job (:mod:`covidmt_jax.score`).

- :func:`summarize` — per-model scores from the per-pair rows: PI with a bootstrap 95 % CI,
  the flip directions and McNemar's test on them, OLS on originals and on transmitted images
  with CIs and the number of empty heat maps, accuracy / sensitivity / specificity / ROC-AUC on
  each side, McNemar's test on the paired correctness, and error counts by kind. Every score
  uses the rows of that model without an error; NaN (undefined, e.g. no positive label) is
  written as ``null`` in ``summary.json``.
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

__all__ = ["summarize", "model_summary", "jsonable", "write_report", "write_sweep_report",
           "gallery_figure"]


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


def model_summary(rows: Mapping[str, np.ndarray], threshold: float = 0.5, *, eta: float = 0.4,
                  n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Scores of ONE model from its rows (columns of :data:`covidmt_jax.score.ROW_COLUMNS`)."""
    err = np.asarray(rows["error"], dtype=object)
    ok = err == ""
    kinds = Counter(error_kind(e) for e in err[~ok])
    out: dict[str, Any] = {"threshold": float(threshold), "n_pairs": int(len(err)),
                           "n_scored": int(ok.sum()), "n_errors": int((~ok).sum()),
                           "errors": dict(sorted(kinds.items()))}
    if not ok.any():
        return out
    po = np.asarray(rows["prob_orig"], np.float64)[ok]
    pt = np.asarray(rows["prob_trans"], np.float64)[ok]
    do, dt = po >= threshold, pt >= threshold
    pi = metrics.pi_score_ci(po, pt, threshold, n_boot=n_boot, seed=seed)
    out["pi"] = {**_ci(pi), "n_flips": int((do != dt).sum()),
                 "pos_to_neg": int((do & ~dt).sum()), "neg_to_pos": int((~do & dt).sum()),
                 "mcnemar_direction": metrics.mcnemar(do, dt)}
    out["ols"] = {}
    for side, key in (("original", "iol_orig"), ("transmitted", "iol_trans")):
        iol = np.asarray(rows[key], np.float64)[ok]
        counts = metrics.ols_counts(iol, eta)
        s = metrics.ols_score_ci(iol, eta, n_boot=n_boot, seed=seed)
        out["ols"][side] = {**counts, "lo": s[1], "hi": s[2],
                            "mean_iol": float(np.nanmean(iol)) if np.isfinite(iol).any() else float("nan")}
    out["lung_frac"] = {"original": float(np.mean(np.asarray(rows["lung_frac_orig"])[ok])),
                        "transmitted": float(np.mean(np.asarray(rows["lung_frac_trans"])[ok]))}
    labels = np.asarray(rows["label"])[ok]
    known = labels >= 0
    out["n_labelled"] = int(known.sum())
    if known.any():
        y = labels[known].astype(bool)
        out["classification"] = {
            "original": metrics.classification_report(y, po[known], threshold),
            "transmitted": metrics.classification_report(y, pt[known], threshold)}
        out["mcnemar_correct"] = metrics.mcnemar(do[known], dt[known], labels=y)
    return out


def summarize(rows: Mapping[str, np.ndarray], models: Sequence[str], *, eta: float = 0.4,
              n_boot: int = 2000, seed: int = 0,
              thresholds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """``{"models": {name: model_summary}, "n_pairs", "n_errors", "eta", "n_boot"}``."""
    thresholds = thresholds or {}
    per = {}
    for m in models:
        sel = np.asarray(rows["model"], dtype=object) == m
        per[m] = model_summary({k: np.asarray(v)[sel] for k, v in rows.items()},
                               thresholds.get(m, 0.5), eta=eta, n_boot=n_boot, seed=seed)
    ids = np.asarray(rows["pair_id"], dtype=object)
    bad = ids[np.asarray(rows["error"], dtype=object) != ""]
    return {"models": per, "n_pairs": int(len(set(ids.tolist()))),
            "n_pairs_with_error": int(len(set(bad.tolist()))), "eta": float(eta),
            "n_boot": int(n_boot), "ci": "percentile bootstrap 95 % over pairs"}


# ============================================================================ formatting
def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _with_ci(d: Mapping[str, Any] | None, key: str = "score") -> str:
    if not d:
        return "–"
    return f"{_f(d.get(key))} [{_f(d.get('lo'))}, {_f(d.get('hi'))}]"


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
    v = np.array([np.nan if not d or d.get(key) is None else d[key] for d in values], float)
    lo = np.array([np.nan if not d or d.get("lo") is None else d["lo"] for d in values], float)
    hi = np.array([np.nan if not d or d.get("hi") is None else d["hi"] for d in values], float)
    err = np.vstack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)])
    return np.nan_to_num(v), np.clip(err, 0, None)


def plot_pi(summary: Mapping[str, Any], path: Path) -> None:
    """Bar chart of PI per model with its 95 % CI."""
    plt = _plt()
    names = list(summary["models"])
    v, err = _errbars([summary["models"][m].get("pi") for m in names])
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), v, yerr=err, capsize=4, color="#4c72b0")
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
        ax.bar(x + (j - 0.5) * 0.38, v, 0.38, yerr=err, capsize=4, color=colour, label=side)
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
    ``label``. The heat-map region (``cam >= cam_threshold``) is outlined in white.
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
        axes[r][0].set_ylabel(str(p["pair_id"])[-28:], fontsize=7)
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
              f"eta = {eta}. IOL is computed at the model input resolution.", ""]
    L += [f"Confidence intervals: {summary.get('ci', '')} ({summary.get('n_boot')} resamples). "
          "Scores use the rows without an error; pairs with an error are counted below.", ""]
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
                     _f((so or {}).get("mean_iol"), 3), _f((st or {}).get("mean_iol"), 3),
                     f"{(so or {}).get('n_empty', '–')} / {(st or {}).get('n_empty', '–')}"])
    L += _md_table(["model", f"OLS % original [CI]", "OLS % transmitted [CI]", "mean IOL orig",
                    "mean IOL trans", "empty heat maps orig / trans"], body)
    L += ["Empty heat maps (no CAM pixel >= the threshold) have no IOL and are left out of OLS.",
          "", "![OLS](ols.png)", "", "![IOL histograms](iol_hist.png)", ""]
    L += ["## Classification on each side", ""]
    body = []
    for m in models:
        c = summary["models"][m].get("classification")
        if not c:
            body.append([m, "(no labels)", "–", "–", "–", "–", "–"])
            continue
        mc = summary["models"][m]["mcnemar_correct"]
        for side in ("original", "transmitted"):
            r = c[side]
            body.append([m, side, str(r["n"]), _f(r["accuracy"], 3), _f(r["sensitivity"], 3),
                         _f(r["specificity"], 3), _f(r["roc_auc"], 3)])
        body.append([m, f"McNemar on correctness: b={mc['b']}, c={mc['c']}, p={_p(mc['p_value'])} "
                        f"({mc['method']})", "", "", "", "", ""])
    L += _md_table(["model", "side", "n", "accuracy", "sensitivity", "specificity", "ROC-AUC"], body)
    L += ["## Errors", ""]
    body = [[m, str(s["n_pairs"]), str(s["n_errors"]),
             ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "–"]
            for m, s in summary["models"].items()]
    L += _md_table(["model", "rows", "errors", "by kind"], body)
    if job.get("source_skipped"):
        L += [f"The pair source itself skipped {job['source_skipped']} file(s) while listing "
              "(no rows for them), e.g.:", ""]
        L += [f"- `{e}`" for e in job.get("source_skipped_examples", [])] + [""]
    if gallery:
        L += ["## Gallery", "",
              "Original beside transmitted: image with the lung contour (green), Grad-CAM of the "
              "predicted decision with the heat-map region outlined (white).", ""]
        cam_thr = float(job.get("cam_threshold", 0.5))
        for m in models:
            for kind in ("flipped", "random"):
                panels = (gallery.get(m) or {}).get(kind) or []
                if not panels:
                    L += [f"- {m}, {kind}: no pairs", ""]
                    continue
                fn = f"gallery_{_slug(m)}_{kind}.png"
                title = f"{m}: {'flipped pairs' if kind == 'flipped' else 'random pairs'}"
                gallery_figure(panels, title, workdir / fn, cam_thr)
                L += [f"### {m}, {kind} ({len(panels)} pairs)", "", f"![{m} {kind}]({fn})", ""]
    path = workdir / "report.md"
    path.write_text("\n".join(L))
    return path


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
