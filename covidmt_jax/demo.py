r"""The out-of-the-box run: ``python -m covidmt_jax.demo --workdir DIR`` (no downloads).

In miniature, the paper's whole experiment on synthetic chest phantoms, repeated for
``--seeds`` seeds (3 by default) so that the figures come with their spread:

1. phantom datasets for the three task datasets (COVIDx-like, RSNA-like with boxes, NIH-like
   findings); the COVID training data carries a label-correlated SHORTCUT OUTSIDE the lungs
   (a burned-in corner marker that agrees with the COVID label with probability
   ``--shortcut``, default 0.9);
2. per seed, trains a single-task baseline (ResNet-18, COVID only) and a six-task COVIDMT
   (ResNet-18 backbone) with ``configs/demo.py`` through the real trainer (the seed sets the
   initialisation, batch order and augmentation; the training phantoms are the same; COVIDMT's
   box task gets denser consolidations and GroupNorm in its subnets, see
   :data:`BOX_FINDING_STRENGTH`);
3. per seed, scores both on that seed's own phantom test pairs — the original PNG and its copy
   sent through the ``whatsapp`` channel preset — where the corner marker is present but
   independent of the label, with the real scoring job (predictions, Grad-CAM, the shipped
   lung U-Net, IOL, paired model comparisons);
4. pools the seeds' rows (every seed has its own test pairs, so pooled pairs are distinct
   images) and summarises them with the scoring report's statistics (binomial intervals,
   exact McNemar, DeLong);
5. writes ``DIR/report.md`` (per-seed figures, mean and min-max over seeds, the pooled
   statistics, a plain reading that states only what holds in EVERY seed), ``DIR/summary.json``
   and ``DIR/seeds.csv``.

Nothing is tuned to favour either model; the statements are computed from the numbers.
Re-running with the same ``--workdir`` resumes: finished seeds are read back, an interrupted
seed resumes its training from the last checkpoint and its scoring from the stored rows; a
larger ``--seeds`` adds seeds. Other options must match the first run (the workdir records
them in ``demo.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from covidmt_jax.config_lib import ConfigError

log = logging.getLogger("covidmt_jax.demo")

MODELS = {"baseline": "baseline ResNet-18", "covidmt": "COVIDMT ResNet-18"}
BASE, MT = MODELS["baseline"], MODELS["covidmt"]
#: options that change the figures: a workdir holds one setting of them (``demo.json``)
SETTINGS = ("size", "n", "steps", "shortcut", "pairs", "lungs", "width")
#: per-model figures of one seed: key -> (label, digits)
FIGURES = {"val_auc": ("val. COVID ROC-AUC", 3), "test_auc": ("test ROC-AUC (originals)", 3),
           "pi": ("PI %", 1), "ols_orig": ("OLS % original", 1),
           "ols_trans": ("OLS % transmitted", 1), "box_map": ("box mAP (val.)", 3),
           "box_ap50": ("box AP@0.5 (val.)", 3)}
#: the comparisons of the plain reading: key, label, unit, the summary's comparison keys
COMPARED = (("ols_orig", "OLS on original images", "%", ("ols", "original")),
            ("ols_trans", "OLS on transmitted images", "%", ("ols", "transmitted")),
            ("pi", "PI", "%", ("pi",)),
            ("test_auc", "Test ROC-AUC (originals)", "", ("roc_auc", "original")))
ALPHA = 0.05
LOW_AUC = 0.6  # validation ROC-AUC below this: the model has not learned the COVID task
BOX_AP_FOUND = 0.5  # box AP@0.5 at or above this in every seed: boxes found, scores uncalibrated
BOX_AP_NOT_LEARNED = 0.1  # box AP@0.5 below this in every seed: the box task has not learned


# ============================================================================ configs
#: the demo's recipe on top of ``config_lib.demo_config``: BATCH images per task dataset per
#: step (baseline 8, COVIDMT 8 + 8 + 8), EPOCHS epochs, Adam lr 1e-3 without decay
BATCH, EPOCHS = 8, 2
#: the box task's part of COVIDMT's recipe, so that it learns within the demo's 120 steps
#: (README, "The box task at the demo's budget", measures each part): the RSNA-like phantoms' consolidations drawn this many times
#: denser (``finding_strength`` of the synthetic_rsna source; 1 draws them as faint as the other
#: findings, and the box head then learns only where boxes usually are) ...
BOX_FINDING_STRENGTH = 4.0
#: ... and GroupNorm in the box subnets (``model.kwargs.box_head_norm``; the paper's head,
#: "none", stays the default of every other config)
BOX_HEAD_NORM = "group"


def demo_train_config(model: str, *, size: int, n: int, shortcut: float, steps: int = -1,
                      seed: int = 0, width: float = 1.0):
    """The trainer's config of one arm (``configs/demo.py``): ``model`` "baseline" or
    "covidmt", ``n`` training phantoms per dataset at ``size`` px, ``steps`` (-1: ``EPOCHS``
    epochs of ``n // BATCH`` steps), ``seed`` (initialisation, batch order, augmentation),
    ``width`` (ResNet-18 stage widths as a fraction of torchvision's)."""
    from covidmt_jax.config_lib import demo_config
    c = demo_config(f"model={model},size={size},n={n},shortcut={shortcut},steps={steps},width={width}")
    c.data.per_task_batch = BATCH
    c.steps_per_epoch = max(1, n // BATCH)
    c.epochs = EPOCHS
    c.optimizer.milestones = ()
    c.checkpoint.every_steps = c.steps_per_epoch  # resume points at epoch ends
    c.seed = int(seed)
    if model == "covidmt":
        c.model.kwargs.box_head_norm = BOX_HEAD_NORM
        for split in (c.data.train, c.data.val):
            split.rsna.kwargs.finding_strength = BOX_FINDING_STRENGTH
    return c


def demo_score_config(models: Mapping[str, Path], *, size: int, n_pairs: int, lungs: str,
                      seed: int = 0, gallery: int = 4):
    """The scoring job's config of one seed: ``n_pairs`` test phantom pairs of its own
    (phantom seed ``1 + seed``); the corner marker is present at random, independent of the
    label (strength 0.5)."""
    from covidmt_jax.scoring.config import synthetic_config
    c = synthetic_config({k: str(v) for k, v in models.items()}, size=size, n=n_pairs, lungs=lungs,
                         gallery=gallery, seed=1 + int(seed), split="test", shortcut_strength=0.5)
    c.progress = False
    return c


# ============================================================================ figures
def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def seed_figures(train_summaries: Mapping[str, Mapping], score_summary: Mapping) -> dict[str, dict]:
    """``{model: {figure: value}}`` of one seed (keys of :data:`FIGURES`, plus ``best_step``,
    ``n_pairs``, ``n_flips``) from the trainer's and the scoring job's summaries; NaN where a
    figure does not exist (e.g. no box task)."""
    out = {}
    for name in MODELS.values():
        t, s = train_summaries[name], score_summary["models"][name]
        out[name] = {
            "val_auc": _num(_get(t, "best", "value")),
            "test_auc": _num(_get(s, "classification", "original", "roc_auc")),
            "pi": _num(_get(s, "pi", "score")),
            "ols_orig": _num(_get(s, "ols", "original", "score")),
            "ols_trans": _num(_get(s, "ols", "transmitted", "score")),
            "box_map": _num(_get(t, "final_eval", "box/map")),
            "box_ap50": _num(_get(t, "final_eval", "box/ap50")),
            "best_step": _get(t, "best", "step"),
            "n_pairs": s.get("n_scored"),
            "n_flips": _get(s, "pi", "n_flips")}
    return out


def model_comparison(summary: Mapping | None) -> tuple[dict, float]:
    """The summary's paired comparison of the two arms and the sign that turns its
    differences into COVIDMT minus baseline (``({}, nan)`` when there is none)."""
    for c in (summary or {}).get("comparisons", []):
        if list(c.get("models", ())) == [MT, BASE]:
            return c, 1.0
        if list(c.get("models", ())) == [BASE, MT]:
            return c, -1.0
    return {}, float("nan")


def mt_minus_base(c: Mapping, sign: float) -> tuple[float, float, float]:
    """(diff, lo, hi) of one paired comparison as COVIDMT minus baseline."""
    d, lo, hi = (_num(c.get(k)) for k in ("diff", "lo", "hi"))
    return (d, lo, hi) if sign > 0 else (-d, -hi, -lo)


def seed_comparison(score_summary: Mapping) -> dict[str, float]:
    """Per comparison key of :data:`COMPARED`: the p-value of the scoring job's paired test of
    the baseline against COVIDMT on this seed's pairs (NaN where not computed)."""
    comp, _ = model_comparison(score_summary)
    return {key: _num(_get(comp, *path, "p_value")) for key, _, _, path in COMPARED}


def spread(per_seed: Sequence[Mapping[str, Mapping]]) -> dict[str, dict[str, dict]]:
    """``{model: {figure: {"mean", "min", "max", "n"}}}`` over seeds (NaN values left out;
    all NaN when no seed has the figure)."""
    out: dict[str, dict[str, dict]] = {}
    for name in MODELS.values():
        out[name] = {}
        for key in FIGURES:
            v = [f[name][key] for f in per_seed if math.isfinite(f[name][key])]
            out[name][key] = ({"mean": sum(v) / len(v), "min": min(v), "max": max(v), "n": len(v)}
                              if v else {"mean": float("nan"), "min": float("nan"),
                                         "max": float("nan"), "n": 0})
    return out


def _fmt(x: Any, digits: int) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _range(s: Mapping[str, Any], digits: int) -> str:
    if not s["n"]:
        return "–"
    return f"{_fmt(s['mean'], digits)} [{_fmt(s['min'], digits)}, {_fmt(s['max'], digits)}]"


def _p(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.2g}"


def findings(per_seed: Sequence[Mapping[str, Mapping]], seed_p: Sequence[Mapping[str, float]],
             pooled: Mapping | None, seeds: Sequence[int]) -> list[str]:
    """The plain reading: sentences computed from the figures that claim only what holds in
    EVERY seed (a direction that does not hold in all seeds is reported as not shown)."""
    k = len(per_seed)
    out = []
    for name in MODELS.values():
        low = [s for s, f in zip(seeds, per_seed) if not f[name]["val_auc"] >= LOW_AUC]
        if low:
            out.append(f"Caution: {name} had NOT learned the COVID task in seed(s) "
                       f"{', '.join(map(str, low))} (validation ROC-AUC below {LOW_AUC}; chance is "
                       "0.5): its PI and OLS there describe a near-chance classifier.")
    for name in MODELS.values():  # where each model's heat maps lie, as a range over the seeds
        o = [f[name]["ols_orig"] for f in per_seed]
        if all(math.isfinite(x) for x in o):
            out.append(f"{name}: heat map mostly outside the lungs (OLS, originals) on "
                       f"{min(o):.1f}–{max(o):.1f} % of the test pairs with a non-empty heat map over the seeds (at least "
                       f"{min(o):.1f} % in every seed).")
    comp, sign = model_comparison(pooled)
    for key, label, unit, path in COMPARED:
        d = [f[MT][key] - f[BASE][key] for f in per_seed]
        if not all(math.isfinite(x) for x in d):
            out.append(f"{label}: not available in every seed, no comparison made.")
            continue
        digits = FIGURES[key][1]
        rng = {n: (min(f[n][key] for f in per_seed), max(f[n][key] for f in per_seed))
               for n in (MT, BASE)}
        vals = (f"{MT} {_fmt(rng[MT][0], digits)}–{_fmt(rng[MT][1], digits)}{unit}, "
                f"{BASE} {_fmt(rng[BASE][0], digits)}–{_fmt(rng[BASE][1], digits)}{unit} over the "
                "seeds")
        n_lo, n_hi = sum(x < 0 for x in d), sum(x > 0 for x in d)
        if n_lo == k or n_hi == k:
            rel = "lower" if n_lo == k else "higher"
            sig = sum(p[key] < ALPHA for p in seed_p)
            s = (f"{label}: {rel} for COVIDMT than for the baseline in every seed ({k} of {k}; "
                 f"{vals}); the paired test gives p < {ALPHA} in {sig} of {k} seeds")
            c = _get(comp, *path)
            if c and math.isfinite(_num(c.get("p_value"))):
                dd, lo, hi = mt_minus_base(c, sign)
                s += (f"; pooled over the seeds, COVIDMT minus baseline {_fmt(dd, digits)} "
                      f"[{_fmt(lo, digits)}, {_fmt(hi, digits)}], p = {_p(_num(c['p_value']))}")
            out.append(s + ".")
        else:
            out.append(f"{label}: no direction holds across the seeds (COVIDMT lower in {n_lo}, "
                       f"higher in {n_hi}, equal in {k - n_lo - n_hi} of {k}; {vals}), so this "
                       "demo does not show a difference.")
    box = [f[MT]["box_map"] for f in per_seed]
    ap = [f[MT].get("box_ap50", math.nan) for f in per_seed]
    if all(math.isfinite(b) for b in box):
        if all(b > 0 for b in box):
            line = (f"COVIDMT's box task learned in every seed: validation mAP "
                    f"{min(box):.3f}–{max(box):.3f} (above 0 in {k} of {k})")
            if all(math.isfinite(a) for a in ap):
                line += f", AP at IoU 0.5 {min(ap):.3f}–{max(ap):.3f}"
            out.append(line + ".")
        else:
            zero = [s for s, b in zip(seeds, box) if not b > 0]
            line = (f"COVIDMT's box task: validation RSNA mAP 0 in seed(s) "
                    f"{', '.join(map(str, zero))} (range {min(box):.3f}–{max(box):.3f}; it counts "
                    "only detections scoring >= 0.3)")
            if all(math.isfinite(a) for a in ap):
                line += (f"; its threshold-free AP at IoU 0.5 was {min(ap):.3f}–{max(ap):.3f}: ")
                if min(ap) >= BOX_AP_FOUND:
                    line += ("the boxes are found and ranked above the false alarms in every seed, "
                             "only their scores are not yet calibrated")
                elif max(ap) < BOX_AP_NOT_LEARNED:
                    line += (f"below {BOX_AP_NOT_LEARNED} in every seed, so at this budget the box "
                             "task has not learned to find the boxes")
                else:
                    line += "the seeds disagree on whether the box task found the boxes"
            out.append(line + ".")
    return out


# ============================================================================ pooling
def read_rows(score_dir: Path) -> dict:
    """The scoring job's current rows of one seed (``rows.csv``)."""
    from covidmt_jax.scoring.rows import RowStore
    rows = RowStore(score_dir).read()
    if not len(rows["pair_id"]):
        raise FileNotFoundError(f"{score_dir / 'rows.csv'}: no scored rows")
    return rows


def pooled_rows(score_dirs: Mapping[int, Path]) -> dict:
    """Every seed's rows in one table; ``pair_id`` prefixed ``seed<k>/`` (distinct pairs)."""
    import numpy as np
    parts = []
    for seed, d in score_dirs.items():
        rows = read_rows(d)
        rows["pair_id"] = np.asarray([f"seed{seed}/{p}" for p in rows["pair_id"].tolist()], dtype=object)
        parts.append(rows)
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def write_pooled(workdir: Path, score_dirs: Mapping[int, Path], eta: float) -> dict:
    """``workdir/pooled/{summary.json, report.md, plots}``: the scoring report's statistics of
    the pooled rows (:func:`covidmt_jax.report.summarize`)."""
    from covidmt_jax import report
    rows = pooled_rows(score_dirs)
    summary = report.summarize(rows, [MT, BASE], eta=eta, alpha=ALPHA)
    out = workdir / "pooled"
    out.mkdir(exist_ok=True)
    report.write_report(out, summary, rows)
    (out / "summary.json").write_text(json.dumps(report.jsonable(summary), indent=2))
    return summary


# ============================================================================ report
def plot_spread(per_seed: Sequence[Mapping[str, Mapping]], seeds: Sequence[int], path: Path) -> None:
    """OLS (original, transmitted) and test ROC-AUC of both models, one dot per seed, with the
    mean as a bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    panels = (("ols_orig", "OLS % (originals)"), ("ols_trans", "OLS % (transmitted)"),
              ("test_auc", "test ROC-AUC (originals)"))
    for ax, (key, title) in zip(axes, panels):
        for i, name in enumerate(MODELS.values()):
            v = [f[name][key] for f in per_seed]
            fin = [x for x in v if math.isfinite(x)]
            if fin:
                ax.bar(i, sum(fin) / len(fin), color=("#c44e52", "#4c72b0")[i], alpha=0.35, width=0.6)
            ax.scatter([i] * len(v), v, color=("#c44e52", "#4c72b0")[i], zorder=3, s=18)
        ax.set_xticks([0, 1], ["baseline", "COVIDMT"])
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 105 if key != "test_auc" else 1.0)
    fig.suptitle(f"demo: {len(seeds)} seeds (dots), mean (bars)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _with_ci(d: Mapping | None, digits: int = 1) -> str:
    if not d:
        return "–"
    v, lo, hi = (_fmt(_num(d.get(k)), digits) for k in ("score", "lo", "hi"))
    return f"{v} [{lo}, {hi}]"


def _pooled_lines(pooled: Mapping) -> list[str]:
    L = ["| model | pairs | PI % [95 % CI] | OLS % original [CI] | OLS % transmitted [CI] | "
         "test ROC-AUC [CI] |", "|---|---|---|---|---|---|"]
    for name in MODELS.values():
        s = pooled["models"][name]
        auc = _get(s, "classification", "original")
        auc_s = ("–" if not auc else
                 f"{_fmt(auc['roc_auc'], 3)} [{_fmt(auc['ci']['roc_auc'][0], 3)}, "
                 f"{_fmt(auc['ci']['roc_auc'][1], 3)}]")
        L.append(f"| {name} | {s.get('n_scored', 0)} | {_with_ci(s.get('pi'))} | "
                 f"{_with_ci(_get(s, 'ols', 'original'))} | "
                 f"{_with_ci(_get(s, 'ols', 'transmitted'))} | {auc_s} |")
    comp, sign = model_comparison(pooled)
    if comp:
        L += ["", "Paired comparisons on the pooled pairs (COVIDMT minus baseline):", "",
              "| comparison | pairs | difference [95 % CI] | p |", "|---|---|---|---|"]
        for key, label, unit, path in COMPARED:
            c = _get(comp, *path)
            if not c:
                continue
            digits = FIGURES[key][1] if unit else 3
            n = c["n"] if "n" in c else c.get("n_pos", 0) + c.get("n_neg", 0)
            dd, lo, hi = mt_minus_base(c, sign)
            L.append(f"| {label} | {n} | {_fmt(dd, digits)}{' points' if unit else ''} "
                     f"[{_fmt(lo, digits)}, {_fmt(hi, digits)}] | {_p(_num(c.get('p_value')))} |")
    return L


def _net(settings: Mapping[str, Any]) -> str:
    w = float(settings.get("width", 1.0))
    return "ResNet-18" if w == 1 else f"ResNet-18 at {w:g}x torchvision's widths"


def write_report(workdir: Path, result: Mapping[str, Any]) -> Path:
    """``workdir/report.md`` from the run's :func:`run` result."""
    a, seeds, per_seed = result["settings"], result["seeds"], result["per_seed"]
    sp, pooled = result["spread"], result["pooled"]
    k = len(seeds)
    L = ["# covidmt_jax demo: prediction instability and out-of-lung saliency in miniature", "",
         f"Everything here was computed by this run on synthetic phantoms (no real patients), "
         f"{k} seeds ({', '.join(map(str, seeds))}): per seed, a baseline {_net(a)} (COVID task "
         f"only) and a COVIDMT {_net(a)} (six tasks) trained {a['steps_run']} steps each with "
         f"the same recipe on {a['n']} training phantoms per dataset at {a['size']} px. The COVID "
         f"training phantoms carry a corner marker OUTSIDE the lungs that agrees with the COVID "
         f"label with probability {a['shortcut']}; each seed's {a['pairs']} test pairs (original "
         "PNG, and the same image after the `whatsapp` channel preset; its own phantoms) carry "
         "the marker independently of the label. Lung masks come from the shipped lung U-Net "
         "(trained on real CXRs). The seed sets initialisation, batch order and augmentation.",
         "", "## What this run shows (only what holds in every seed)", ""]
    L += [f"- {s}" for s in result["findings"]]
    L += ["- Single figures move with the seed, and in the same way with the CPU type and library "
          "versions (a different order of floating-point sums is a different training run): read "
          "the range over the seeds, not one run.",
          "- These are phantoms and small models trained for minutes: the numbers show the "
          "machinery working end to end, not the paper's clinical result.", "",
          f"## Spread over the {k} seeds: mean [min, max]", "",
          f"| figure | {BASE} | {MT} |", "|---|---|---|"]
    for key, (label, digits) in FIGURES.items():
        L.append(f"| {label} | {_range(sp[BASE][key], digits)} | {_range(sp[MT][key], digits)} |")
    L += ["", "Validation ROC-AUC is that of the scored checkpoint (each run's best by validation "
          "COVID ROC-AUC); box mAP (RSNA metric, detections scoring >= 0.3) and box AP@0.5 "
          "(threshold-free average precision) are COVIDMT's at the last validation; test figures come from "
          "the scoring job.", "", "## Per seed", "",
          "| seed | model | " + " | ".join(lbl for lbl, _ in FIGURES.values())
          + " | flips / pairs | scored step |", "|---" * (len(FIGURES) + 4) + "|"]
    for seed, f in zip(seeds, per_seed):
        for name in MODELS.values():
            r = f[name]
            L.append(f"| {seed} | {name} | "
                     + " | ".join(_fmt(r[key], d) for key, (_, d) in FIGURES.items())
                     + f" | {r['n_flips']} / {r['n_pairs']} | {r['best_step']} |")
    L += ["", "Paired tests of the baseline against COVIDMT on each seed's pairs (p-values; "
          "exact McNemar for PI and OLS, DeLong for ROC-AUC):", "",
          "| seed | " + " | ".join(lbl for _, lbl, _, _ in COMPARED) + " |",
          "|---" * (len(COMPARED) + 1) + "|"]
    for seed, p in zip(seeds, result["seed_p"]):
        L.append(f"| {seed} | " + " | ".join(_p(p[key]) for key, _, _, _ in COMPARED) + " |")
    L += ["", "Each seed's scoring report: "
          + ", ".join(f"[seed {s}](seed_{s}/score/report.md)" for s in seeds) + ".", "",
          "![spread over seeds](spread.png)", "",
          f"## Pooled over the seeds ({pooled['n_pairs']} distinct pairs)", "",
          "The scoring report's statistics on all seeds' rows together (every seed has its own "
          "test pairs): exact (Clopper-Pearson) intervals for PI and OLS, DeLong for ROC-AUC, "
          "exact McNemar for paired differences. The intervals treat the pooled pairs as one "
          "sample; they do not include the variation between training seeds (the table above "
          "shows that).", ""]
    L += _pooled_lines(pooled)
    L += ["", "Full tables and plots: [pooled/report.md](pooled/report.md).", "",
          f"## Seed {seeds[0]}: plots and galleries", ""]
    d0 = workdir / f"seed_{seeds[0]}" / "score"
    for png in sorted(d0.glob("*.png")):
        L.append(f"![{png.stem}](seed_{seeds[0]}/score/{png.name})")
    t = result["timings"]
    L += ["", "## Timings (this machine)", "",
          f"- the seeds' stages together: {t['stages_wall_s']:.0f} s wall, {t['stages_cpu_s']:.0f} s "
          "CPU (user + system, all threads of the process)",
          f"- this invocation: {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU, peak RSS "
          f"{t['peak_rss_gb']:.1f} GB"]
    for seed in seeds:
        st = t["seeds"][str(seed)]
        L.append(f"- seed {seed}" + (" (read back from an earlier run)" if st.get("resumed") else "")
                 + ": " + ", ".join(f"{name} {v['wall_s']:.0f} s wall / {v['cpu_s']:.0f} s CPU"
                                    for name, v in st["stages"].items()))
    path = workdir / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path


def write_seeds_csv(path: Path, seeds: Sequence[int], per_seed: Sequence[Mapping]) -> None:
    """One row per (seed, model) with the figures of :data:`FIGURES` (empty = not defined)."""
    cols = ["seed", "model", *FIGURES, "best_step", "n_pairs", "n_flips"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for seed, fig in zip(seeds, per_seed):
            for name in MODELS.values():
                r = fig[name]
                w.writerow([seed, name] + ["" if isinstance(r[c], float) and not math.isfinite(r[c])
                                           else r[c] for c in cols[2:]])


# ============================================================================ the run
def _timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    w, c = time.time(), time.process_time()
    out = fn()
    return out, {"wall_s": time.time() - w, "cpu_s": time.process_time() - c}


def check_workdir(workdir: Path, settings: Mapping[str, Any]) -> None:
    """Record the run's settings in ``demo.json``, or refuse a workdir made with others."""
    path = workdir / "demo.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k}={old.get(k)!r} (now {settings[k]!r})" for k in settings if old.get(k) != settings[k]]
        if diff:
            raise ConfigError(f"{workdir} holds a demo run with other settings: {', '.join(diff)}; "
                              "use a new --workdir, or the same options to resume it")
        return
    path.write_text(json.dumps(dict(settings), indent=2))


def run_seed(workdir: Path, seed: int, args: argparse.Namespace, *, gallery: int) -> dict[str, Any]:
    """Train both arms and score them for one seed (resumable); returns
    ``{"train": {model: summary}, "score": summary, "stages": timings}`` and writes it to
    ``workdir/seed_<seed>/done.json`` once complete."""
    from covidmt_jax import scoring, train
    sdir = workdir / f"seed_{seed}"
    done = sdir / "done.json"
    if done.is_file():
        out = json.loads(done.read_text())
        out["resumed"] = True
        return out
    stages: dict[str, dict] = {}
    trains: dict[str, dict] = {}
    exports: dict[str, Path] = {}
    for key, name in MODELS.items():
        print(f"[seed {seed}] training {name} on phantoms ...", flush=True)
        cfg = demo_train_config(key, size=args.size, n=args.n, shortcut=args.shortcut,
                                steps=args.steps, seed=seed, width=args.width)
        trains[name], stages[f"train {key}"] = _timed(lambda: train.train(cfg, sdir / f"train_{key}"))
        # the checkpoint a practitioner would deploy: best validation COVID ROC-AUC
        exports[name] = sdir / f"train_{key}" / "export" / "best"
    print(f"[seed {seed}] scoring both on WhatsApp-transmitted phantom pairs ...", flush=True)
    scfg = demo_score_config(exports, size=args.size, n_pairs=args.pairs, lungs=args.lungs,
                             seed=seed, gallery=gallery)
    _, stages["score"] = _timed(lambda: scoring.run(scfg, sdir / "score"))
    score_summary = json.loads((sdir / "score" / "summary.json").read_text())
    out = {"seed": seed, "train": trains, "score": score_summary, "stages": stages}
    from covidmt_jax import report
    done.write_text(json.dumps(report.jsonable(out), indent=1))
    return out


def _nan_floats(d: Any) -> Any:
    """JSON ``null`` back to NaN in a figures table (``None`` stays for non-figures)."""
    return {m: {k: (float("nan") if v is None and k in FIGURES else v) for k, v in r.items()}
            for m, r in d.items()}


@contextlib.contextmanager
def compile_cache(path: str):
    """Keep compiled XLA programs in ``path`` while the demo runs: seeds after the first (and a
    resumed run) reuse the train, eval and scoring programs instead of compiling them again.
    Does nothing when ``path`` is empty or a cache is already configured; restores the
    process's settings afterwards (the demo can run inside another program, e.g. a test)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    if not path or jax.config.jax_compilation_cache_dir:
        yield
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    min_s = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_s)
        cc.reset_cache()


def run(args: argparse.Namespace) -> Path:
    """The whole demo (see the module docstring); returns the report's path."""
    from covidmt_jax import report
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in SETTINGS}
    check_workdir(workdir, settings)
    t0, c0 = time.time(), time.process_time()
    if args.only_seed is not None:  # one seed of a run split over processes: no pooling yet
        run_seed(workdir, args.only_seed, args, gallery=args.gallery if args.only_seed == 0 else 0)
        print(f"seed {args.only_seed} done; run without --only-seed to pool and report", flush=True)
        return workdir / f"seed_{args.only_seed}" / "done.json"
    seeds = list(range(args.seeds))
    results = [run_seed(workdir, s, args, gallery=args.gallery if i == 0 else 0)
               for i, s in enumerate(seeds)]
    per_seed = [_nan_floats(seed_figures(r["train"], r["score"])) for r in results]
    seed_p = [seed_comparison(r["score"]) for r in results]
    eta = float(results[0]["score"].get("eta", 0.4))
    print("pooling the seeds' rows ...", flush=True)
    pooled = write_pooled(workdir, {s: workdir / f"seed_{s}" / "score" for s in seeds}, eta)
    plot_spread(per_seed, seeds, workdir / "spread.png")
    result = {
        "settings": {**settings, "seeds": args.seeds,
                     "steps_run": results[0]["train"][BASE]["steps"], "eta": eta},
        "seeds": seeds, "per_seed": per_seed, "seed_p": seed_p, "spread": spread(per_seed),
        "pooled": pooled, "findings": findings(per_seed, seed_p, pooled, seeds),
        "timings": {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
                    "stages_wall_s": sum(v["wall_s"] for r in results for v in r["stages"].values()),
                    "stages_cpu_s": sum(v["cpu_s"] for r in results for v in r["stages"].values()),
                    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                    "seeds": {str(r["seed"]): {"stages": r["stages"], "resumed": r.get("resumed", False)}
                              for r in results}}}
    path = write_report(workdir, result)
    write_seeds_csv(workdir / "seeds.csv", seeds, per_seed)
    (workdir / "summary.json").write_text(json.dumps(report.jsonable(
        {k: v for k, v in result.items() if k != "pooled"} | {"pooled": "pooled/summary.json"}),
        indent=2))
    print(f"report: {path}", flush=True)
    for line in result["findings"]:
        print("  " + line, flush=True)
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidmt_jax.demo",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="output folder (re-use it to resume)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, each a full train + score run")
    p.add_argument("--size", type=int, default=80, help="phantom / model input size in px")
    p.add_argument("--width", type=float, default=0.5,
                   help="ResNet-18 stage widths as a fraction of torchvision's 64-128-256-512")
    p.add_argument("--n", type=int, default=480, help="training phantoms per dataset")
    p.add_argument("--steps", type=int, default=-1,
                   help="training steps per model and seed (-1: the configs/demo.py epochs)")
    p.add_argument("--shortcut", type=float, default=0.9, help="out-of-lung cue/label agreement in training")
    p.add_argument("--pairs", type=int, default=64, help="test pairs per seed")
    p.add_argument("--gallery", type=int, default=4, help="gallery pairs of the first seed's report")
    p.add_argument("--lungs", default="", help="lung U-Net export dir (default: the shipped one)")
    p.add_argument("--only-seed", type=int, default=None,
                   help="train and score this one seed only (to run seeds in parallel processes "
                        "sharing the workdir, one process per seed); then run without it to pool "
                        "the finished seeds and write the report")
    p.add_argument("--compile-cache", default=None,
                   help="folder for compiled XLA programs (default WORKDIR/xla_cache; '' = off)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    # no cpu_malloc re-exec here: at 128 px it hardly changed the wall time, but the kept heap
    # raised the demo's peak RSS from 3.5 to 8.3 GB (two trainings and a scoring run, one process)
    args = parser().parse_args(argv)
    from covidmt_jax.cli import setup_logging
    setup_logging()
    cache = str(Path(args.workdir) / "xla_cache") if args.compile_cache is None else args.compile_cache
    try:
        with compile_cache(cache):
            run(args)
    except ConfigError as e:
        print(f"python -m covidmt_jax.demo: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
