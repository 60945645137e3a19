"""Metrics of covidmt_jax: PI, IOL, OLS (../shared/SPEC.md), classification, CIs, McNemar, box mAP, Dice.

All functions are pure. Conventions:

- Population scores (``pi_score``, ``ols_score``, classification metrics, the intervals,
  ``mcnemar``, ``paired_comparison``, ``rsna_map``) take numpy-convertible arrays and return
  Python floats / dicts.
- Intervals: every proportion (PI, OLS, accuracy, sensitivity, specificity, error rates) gets
  an exact Clopper-Pearson interval (:func:`binomial_ci`, which says why), ROC-AUC gets
  DeLong's (:func:`roc_auc_ci`), and paired comparisons get Newcombe's hybrid score interval
  for the difference with McNemar's exact test (:func:`paired_comparison`,
  :func:`roc_auc_compare` for two AUCs). Means of per-item scores (e.g. Dice per film) get a
  cluster-robust t-interval (:func:`clustered_mean_ci`; clusters = patients). Where films
  share patients (``clusters=``), proportions get Korn and Graubard's effective-size interval
  (:func:`clustered_binomial_ci`) and paired comparisons Durkalski's clustered McNemar test
  (:func:`clustered_mcnemar`). Nothing resamples: results are deterministic.
- Functions that run inside a jitted step (``heatmap_region``, ``iol``, ``dice``,
  ``soft_dice_loss``) are array-namespace generic: numpy in -> numpy out, jax arrays (and
  tracers under ``jax.jit``) in -> jax arrays out. They never branch on array *values*, only on
  static shapes / dtypes, so they trace.
- A "decision" from a score is ``score >= threshold`` (greater-or-equal, everywhere: PI,
  sensitivity / specificity, heat-map region, lung region). Boolean arrays are taken as
  decisions already made and are not thresholded again.
- Bad input raises ``ValueError`` naming the function, the argument and the problem.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

__all__ = [
    "RSNA_IOU_THRESHOLDS",
    "detection_ap",
    "pi_score",
    "heatmap_region",
    "iol",
    "ols_counts",
    "ols_score",
    "confusion",
    "accuracy",
    "sensitivity",
    "specificity",
    "roc_auc",
    "classification_report",
    "CI_METHODS",
    "binomial_ci",
    "percent_ci",
    "pi_score_ci",
    "ols_score_ci",
    "roc_auc_variance",
    "roc_auc_ci",
    "roc_auc_compare",
    "mcnemar",
    "mcnemar_from_counts",
    "paired_difference_ci",
    "paired_comparison",
    "clustered_binomial_ci",
    "clustered_mcnemar",
    "clustered_mean_ci",
    "design_effect",
    "has_repeats",
    "ols_paired_comparison",
    "box_iou",
    "rsna_image_scores",
    "rsna_map",
    "dice",
    "soft_dice_loss",
]

# The RSNA Pneumonia Detection Challenge's IoU thresholds 0.40, 0.45, ..., 0.75 (8 values),
# rounded so that e.g. 0.55 is exactly the float 0.55 (np.arange alone gives 0.5500000000000002).
RSNA_IOU_THRESHOLDS = np.round(np.arange(0.4, 0.76, 0.05), 2)


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------
def _xp(*arrays: Any):
    """The array namespace for ``arrays``: jax.numpy if any is a jax array / tracer, else numpy."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _decide(x, threshold: float, xp=np):
    """Decisions ``x >= threshold``; boolean input is returned unchanged. Shape preserved."""
    x = xp.asarray(x)
    if x.dtype == bool:
        return x
    return x >= threshold


def _vector(x, fn: str, name: str, *, allow_nan: bool = False) -> np.ndarray:
    """``x`` as a non-empty 1-D numpy array (a [N, 1] / [1, N] input is flattened)."""
    a = np.asarray(x)
    if a.ndim != 1:
        if a.ndim == 2 and 1 in a.shape:
            a = a.reshape(-1)
        else:
            raise ValueError(f"{fn}: {name} must be a 1-D array [N], got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{fn}: {name} is empty")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{fn}: {name} must be boolean or numeric, got dtype {a.dtype}")
    if not allow_nan and a.dtype.kind == "f" and np.isnan(a).any():
        raise ValueError(
            f"{fn}: {name} contains {int(np.isnan(a).sum())} NaN value(s); "
            "drop rows that carry an error before scoring")
    return a


def _same_length(fn: str, **arrays: np.ndarray) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{fn}: arrays must have the same length, got {lengths}")
    return next(iter(lengths.values()))


def _labels(labels, fn: str, name: str = "labels") -> np.ndarray:
    """Binary ground truth as a bool [N] array; values must be 0/1 (or bool)."""
    y = _vector(labels, fn, name)
    if y.dtype != bool:
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            raise ValueError(
                f"{fn}: {name} must be 0/1 or boolean, got {int(bad.sum())} other value(s), "
                f"e.g. {y[bad][0]!r}")
        y = y.astype(bool)
    return y


def _nan_ratio(num: float, den: float) -> float:
    """num / den as a float, NaN when the denominator is 0 (the metric is undefined)."""
    return float(num) / float(den) if den else float("nan")


# --------------------------------------------------------------------------------------------
# PI: prediction instability
# --------------------------------------------------------------------------------------------
def _flips(prob_orig, prob_trans, threshold: float, fn: str) -> np.ndarray:
    """Per-pair flip indicator 1[y(X) != y(R(X))] as bool [N]."""
    a = _vector(prob_orig, fn, "prob_orig")
    b = _vector(prob_trans, fn, "prob_trans")
    _same_length(fn, prob_orig=a, prob_trans=b)
    return _decide(a, threshold) != _decide(b, threshold)


def pi_score(prob_orig, prob_trans, threshold: float = 0.5) -> float:
    """Prediction-instability score in percent (SPEC.md: ``PI = 100/N * sum 1[y(X_i) != y(R(X_i))]``).

    Args:
      prob_orig: [N] COVID-19 probabilities (sigmoid outputs) on the original images X_i, or
        boolean decisions already made.
      prob_trans: [N] the same for the transmitted images R(X_i), paired by index.
      threshold: decision threshold, ``y = prob >= threshold`` (greater-or-equal). Ignored for
        boolean input.

    Returns:
      PI in [0, 100]. NaN probabilities raise (rows with errors must be dropped first).
    """
    return 100.0 * float(np.mean(_flips(prob_orig, prob_trans, threshold, "pi_score")))


# --------------------------------------------------------------------------------------------
# IOL / OLS: saliency inside / outside the lungs
# --------------------------------------------------------------------------------------------
def heatmap_region(cam, threshold: float = 0.5):
    """Heat-map region H: ``cam >= threshold`` (bool, same shape as ``cam``).

    ``cam`` must already be min-max normalised per image to [0, 1] (``explain.gradcam`` does
    this with pytorch-grad-cam's rule ``(c - min) / (max - min + 1e-7)``). A constant CAM
    (e.g. all-zero after the ReLU) normalises to all zeros, so with any threshold > 0 its region
    is empty; see :func:`iol` for what that gives. numpy in -> numpy out, jax in -> jax out.
    """
    xp = _xp(cam)
    return xp.asarray(cam) >= threshold


def iol(cam, lung_mask, cam_threshold: float = 0.5):
    """Inside-of-lung fraction of the heat map, ``IOL = |H ∩ L| / |H|`` per image (SPEC.md).

    Args:
      cam: [B, H, W] Grad-CAM maps, min-max normalised per image to [0, 1].
      lung_mask: [B, H, W] (or [B, H, W, 1]) lung masks: boolean, or U-Net probabilities
        (lung = prob >= 0.5).
      cam_threshold: heat-map region H = ``cam >= cam_threshold`` (default 0.5).

    Returns:
      [B] float32 IOL in [0, 1]; **NaN where the heat-map region is empty**.

    Empty heat map -> NaN (undefined), not 0 and not 1. An empty H means the CAM has no pixel at
    or above the threshold, which for a min-max normalised map happens only when the map was
    constant (pytorch-grad-cam returns an all-zero map when the ReLU removes every activation):
    the model shows *no* localised evidence, so the map is neither in nor out of the lungs.
    Calling it 0 would count the image as out-of-lung saliency and inflate OLS; calling it 1
    would deflate it. NaN keeps the fact visible; :func:`ols_score` excludes such images by
    default and :func:`ols_counts` reports how many there were, while ``empty="out"`` /
    ``empty="in"`` give the two bounds for a sensitivity analysis. An empty *lung* mask is not
    special here (IOL = 0 when H is non-empty); the scoring job flags those rows itself.

    Works on numpy arrays (returns numpy) and inside ``jax.jit`` (returns a jax array): no
    branching on values, shapes and dtypes only.
    """
    xp = _xp(cam, lung_mask)
    cam = xp.asarray(cam)
    lung_mask = xp.asarray(lung_mask)
    if lung_mask.ndim == 4 and lung_mask.shape[-1] == 1:
        lung_mask = lung_mask[..., 0]
    if cam.ndim != 3:
        raise ValueError(f"iol: cam must be [B, H, W], got shape {cam.shape}")
    if lung_mask.shape != cam.shape:
        raise ValueError(
            f"iol: lung_mask shape {lung_mask.shape} does not match cam shape {cam.shape}")
    region = heatmap_region(cam, cam_threshold)
    lungs = _decide(lung_mask, 0.5, xp)
    # Pixel counts in int32 (exact), then float32: exact up to 2**24 pixels per image.
    h = xp.sum(region, axis=(1, 2), dtype=xp.int32).astype(xp.float32)
    inter = xp.sum(region & lungs, axis=(1, 2), dtype=xp.int32).astype(xp.float32)
    return xp.where(h > 0, inter / xp.maximum(h, 1.0), xp.float32(np.nan))


_EMPTY_MODES = ("exclude", "out", "in")


def _ols_indicators(iol_values, eta: float, empty: str, fn: str):
    """(out [N] bool, used [N] bool, n_empty) where out = 1[IOL < eta] under the ``empty`` rule."""
    if empty not in _EMPTY_MODES:
        raise ValueError(f"{fn}: empty must be one of {_EMPTY_MODES}, got {empty!r}")
    v = _vector(iol_values, fn, "iol_values", allow_nan=True).astype(np.float64)
    undefined = np.isnan(v)
    finite = v[~undefined]
    if ((finite < 0) | (finite > 1)).any():
        raise ValueError(f"{fn}: iol_values must lie in [0, 1] (or be NaN for an empty heat map)")
    with np.errstate(invalid="ignore"):
        out = v < eta
    if empty == "out":
        out = out | undefined
    used = ~undefined if empty == "exclude" else np.ones_like(undefined)
    return out & used, used, int(undefined.sum())


def ols_counts(iol_values, eta: float = 0.4, empty: str = "exclude") -> dict:
    """OLS with its counts: dict(score, n_total, n_used, n_empty, n_out, eta, empty).

    ``score = 100 / n_used * n_out`` where ``n_out`` counts images with ``IOL < eta``.
    NaN IOL (empty heat map, see :func:`iol`) is handled by ``empty``:
      - "exclude" (default): dropped from numerator and denominator; ``n_empty`` reports how many.
      - "out": counted as out-of-lung (as if IOL = 0) — an upper bound.
      - "in": counted as in-lung (as if IOL = 1) — a lower bound.
    ``score`` is NaN when no image is left (all heat maps empty under "exclude").
    """
    out, used, n_empty = _ols_indicators(iol_values, eta, empty, "ols_counts")
    n_used, n_out = int(used.sum()), int(out.sum())
    return {"score": 100.0 * _nan_ratio(n_out, n_used), "n_total": int(len(used)),
            "n_used": n_used, "n_empty": n_empty, "n_out": n_out, "eta": float(eta),
            "empty": empty}


def ols_score(iol_values, eta: float = 0.4, empty: str = "exclude") -> float:
    """Out-of-lung saliency score in percent (SPEC.md: ``OLS_eta = 100/N * sum 1[IOL(x) < eta]``).

    Args:
      iol_values: [N] IOL values from :func:`iol`; NaN = empty heat map.
      eta: the IOL cut-off (paper: 0.4).
      empty: what a NaN IOL counts as — "exclude" (default; N = images with a defined IOL),
        "out" or "in". Use :func:`ols_counts` to get the number of empty heat maps alongside.
    """
    return ols_counts(iol_values, eta, empty)["score"]


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------
def _labels_and_decisions(labels, probs, threshold: float, fn: str):
    y = _labels(labels, fn)
    p = _vector(probs, fn, "probs")
    _same_length(fn, labels=y, probs=p)
    return y, _decide(p, threshold)


def confusion(labels, probs, threshold: float = 0.5) -> dict:
    """Confusion counts dict(tp, fp, tn, fn) of decisions ``probs >= threshold`` vs 0/1 labels.

    ``probs`` may be boolean decisions (then ``threshold`` is ignored).
    """
    y, d = _labels_and_decisions(labels, probs, threshold, "confusion")
    return {"tp": int((y & d).sum()), "fp": int((~y & d).sum()),
            "tn": int((~y & ~d).sum()), "fn": int((y & ~d).sum())}


def accuracy(labels, probs, threshold: float = 0.5) -> float:
    """Fraction of decisions ``probs >= threshold`` equal to the labels, in [0, 1]."""
    c = confusion(labels, probs, threshold)
    return (c["tp"] + c["tn"]) / sum(c.values())


def sensitivity(labels, probs, threshold: float = 0.5) -> float:
    """True-positive rate TP / (TP + FN); NaN when there is no positive label."""
    c = confusion(labels, probs, threshold)
    return _nan_ratio(c["tp"], c["tp"] + c["fn"])


def specificity(labels, probs, threshold: float = 0.5) -> float:
    """True-negative rate TN / (TN + FP); NaN when there is no negative label."""
    c = confusion(labels, probs, threshold)
    return _nan_ratio(c["tn"], c["tn"] + c["fp"])


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank (scipy's rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], len(xs)]                          # one past its last index
    group_rank = (starts + 1 + ends) / 2.0                     # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def roc_auc(labels, scores) -> float:
    """Exact ROC-AUC via the Mann-Whitney U statistic, ties counted 1/2.

    ``AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos * n_neg)`` with R_pos the sum of the
    positives' average ranks, which equals ``P(s_pos > s_neg) + 0.5 P(s_pos = s_neg)`` over all
    positive/negative pairs (the area under the trapezoidal ROC curve). NaN when only one class
    is present.
    """
    y = _labels(labels, "roc_auc")
    s = _vector(scores, "roc_auc", "scores").astype(np.float64)
    _same_length("roc_auc", labels=y, scores=s)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r_pos = _average_ranks(s)[y].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_report(labels, probs, threshold: float = 0.5, *, alpha: float = 0.05,
                          method: str = "clopper-pearson", clusters=None) -> dict:
    """dict(n, n_pos, n_neg, threshold, tp, fp, tn, fn, accuracy, sensitivity, specificity,
    roc_auc, ci).

    ``probs``: [N] probabilities (ROC-AUC needs scores, so boolean decisions are rejected).
    ``ci``: ``{"accuracy" | "sensitivity" | "specificity" | "roc_auc": [lo, hi], "method",
    "roc_auc_method", "level"}`` — the three rates with :func:`binomial_ci` (``method``,
    ``alpha``) over N, the positives and the negatives; ROC-AUC with DeLong's interval
    (:func:`roc_auc_ci`). Rates and their limits are fractions in [0, 1] here.
    ``clusters [N]`` (the films' patients): where a patient has several films, the three rates
    get :func:`clustered_binomial_ci` and ROC-AUC Obuchowski's clustered variance
    (:func:`roc_auc_ci`); ``ci["method"]`` and ``ci["roc_auc_method"]`` say so.
    """
    p = _vector(probs, "classification_report", "probs")
    if p.dtype == bool:
        raise ValueError("classification_report: probs must be scores, not boolean decisions "
                         "(ROC-AUC needs a ranking)")
    c = confusion(labels, p, threshold)
    n_pos, n_neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    _cluster_index(clusters, len(p), "classification_report")
    auc, auc_lo, auc_hi = roc_auc_ci(labels, p, alpha, clusters)
    if has_repeats(clusters):
        y, d = _labels_and_decisions(labels, p, threshold, "classification_report")
        cl = np.asarray(clusters)
        rates = {"accuracy": clustered_binomial_ci(y == d, cl, alpha, method)[1:],
                 "sensitivity": clustered_binomial_ci(d[y], cl[y], alpha, method)[1:],
                 "specificity": clustered_binomial_ci(~d[~y], cl[~y], alpha, method)[1:]}
        ci_method, auc_method = f"{method}, clustered (Korn-Graubard)", "DeLong, clustered (Obuchowski)"
    else:
        rates = {"accuracy": binomial_ci(c["tp"] + c["tn"], n_pos + n_neg, alpha, method),
                 "sensitivity": binomial_ci(c["tp"], n_pos, alpha, method),
                 "specificity": binomial_ci(c["tn"], n_neg, alpha, method)}
        ci_method, auc_method = method, "DeLong"
    return {"n": n_pos + n_neg, "n_pos": n_pos, "n_neg": n_neg, "threshold": float(threshold),
            **c,
            "accuracy": (c["tp"] + c["tn"]) / (n_pos + n_neg),
            "sensitivity": _nan_ratio(c["tp"], n_pos),
            "specificity": _nan_ratio(c["tn"], n_neg),
            "roc_auc": auc,
            "ci": {**{k: list(v) for k, v in rates.items()},
                   "roc_auc": [auc_lo, auc_hi], "method": ci_method, "roc_auc_method": auc_method,
                   "level": 1.0 - alpha}}


# --------------------------------------------------------------------------------------------
# confidence intervals: binomial proportions and ROC-AUC
# --------------------------------------------------------------------------------------------
CI_METHODS = ("clopper-pearson", "wilson")


def _check_alpha(alpha: float, fn: str) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"{fn}: alpha must be in (0, 1), got {alpha}")
    return float(alpha)


def _counts(k, n, fn: str) -> tuple[np.ndarray, np.ndarray]:
    """``k``, ``n`` as int64 arrays (broadcast), checked 0 <= k <= n."""
    k_arr, n_arr = np.asarray(k), np.asarray(n)
    for name, a in (("k", k_arr), ("n", n_arr)):
        if a.dtype.kind not in "biuf" or (a.dtype.kind == "f" and not np.all(a == np.round(a))):
            raise ValueError(f"{fn}: {name} must hold integer counts, got {a!r}")
    k_arr, n_arr = np.broadcast_arrays(k_arr.astype(np.int64), n_arr.astype(np.int64))
    if (k_arr < 0).any() or (k_arr > n_arr).any():
        raise ValueError(f"{fn}: counts must satisfy 0 <= k <= n, got k={k}, n={n}")
    return k_arr, n_arr


def binomial_ci(k, n, alpha: float = 0.05, method: str = "clopper-pearson"):
    """Two-sided ``1 - alpha`` confidence interval (lo, hi) for a binomial proportion k / n.

    Args:
      k: successes, an int or an integer array (e.g. [R] for R simulated samples).
      n: trials, an int or an array broadcastable with ``k``.
      alpha: 1 - confidence level (0.05 -> 95 %).
      method: "clopper-pearson" (default) or "wilson".

    Returns:
      (lo, hi) as proportions in [0, 1]: floats for scalar input, arrays of the broadcast shape
      otherwise. NaN where ``n == 0`` (no observation, no interval).

    Methods (scipy.stats does the distribution work):
      - "clopper-pearson", the exact interval: lo = Beta(alpha/2; k, n - k + 1) quantile (0 when
        k = 0), hi = Beta(1 - alpha/2; k + 1, n - k) quantile (1 when k = n) — the inversion of
        two one-sided exact binomial tests, the same numbers as
        ``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``. Its coverage is
        **guaranteed** >= 1 - alpha at every true rate and every n; it is conservative (wider
        than nominal on average). This is the default because PI and OLS are published figures
        that often sit near 0 % (a few flips in hundreds of pairs), where approximate intervals
        lose coverage: the exact coverage of the 95 % interval at n = 200 is 98.1 % at a true
        rate of 0.5 % and 98.4 % at 1 %, while Wilson's is 92.0 % and 94.8 % (computed exactly,
        summing the binomial pmf over k). 0 of 200 gives [0, 1.83 %].
      - "wilson", the score interval (the same numbers as scipy's ``method="wilson"``): closer
        to nominal coverage *on average* and narrower, but it can dip below it at small n * p
        (the figures above). Offered for comparison with publications that use it.
    """
    fn = "binomial_ci"
    alpha = _check_alpha(alpha, fn)
    if method not in CI_METHODS:
        raise ValueError(f"{fn}: method must be one of {CI_METHODS}, got {method!r}")
    scalar = np.ndim(k) == 0 and np.ndim(n) == 0
    k_arr, n_arr = _counts(k, n, fn)
    lo, hi = _binomial_limits(k_arr.astype(np.float64), n_arr.astype(np.float64), alpha, method)
    if scalar:
        return float(lo), float(hi)
    return lo, hi


def _binomial_limits(kf: np.ndarray, nf: np.ndarray, alpha: float, method: str):
    """The limits of :func:`binomial_ci` for float counts ``0 <= kf <= nf`` (also non-integer
    ones: the effective counts of :func:`clustered_binomial_ci`); NaN where ``nf == 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "clopper-pearson":
            lo = np.where(kf == 0, 0.0, scipy_stats.beta.ppf(alpha / 2, kf, nf - kf + 1))
            hi = np.where(kf == nf, 1.0, scipy_stats.beta.ppf(1 - alpha / 2, kf + 1, nf - kf))
        else:
            z = scipy_stats.norm.isf(alpha / 2)
            p = kf / nf
            den = 1.0 + z * z / nf
            centre = (p + z * z / (2 * nf)) / den
            half = z * np.sqrt(p * (1 - p) / nf + z * z / (4 * nf * nf)) / den
            lo, hi = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    empty = nf == 0
    return np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


def _cluster_index(clusters, n: int, fn: str) -> tuple[np.ndarray, int]:
    """``(index [N] in 0..G-1, G)`` of ``clusters [N]`` (any hashable labels; None: every item
    its own cluster)."""
    if clusters is None:
        return np.arange(n), n
    labels = np.asarray(clusters)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{fn}: clusters must be a 1-D array of the values' length {n}, got shape {labels.shape}")
    if n == 0:
        return np.zeros(0, np.int64), 0
    if labels.dtype.kind in "fcO":
        bad = [i for i, v in enumerate(labels.tolist()) if v is None or (isinstance(v, float) and math.isnan(v))]
        if bad:
            raise ValueError(f"{fn}: clusters hold a missing label (None or NaN) at position {bad[0]} "
                             f"({len(bad)} in all); give each item of an unknown cluster a label of its own")
    if labels.dtype == object:  # mixed types (e.g. ints and strings) sort as their text
        labels = labels.astype(str)
    _, idx = np.unique(labels, return_inverse=True)
    return idx.reshape(-1), int(idx.max()) + 1


def _cluster_variance(x: np.ndarray, idx: np.ndarray, g: int) -> float:
    """Cluster-robust variance of ``mean(x)``: ``G / (G - 1) * sum_g (sum_{i in g} (x_i -
    mean))^2 / N^2`` (statsmodels' ``cov_type="cluster"`` of an intercept-only OLS)."""
    sums = np.bincount(idx, weights=x - x.mean(), minlength=g)
    return g / (g - 1) * float(np.sum(sums ** 2)) / len(x) ** 2


def design_effect(values, clusters=None) -> float:
    """Design effect of ``mean(values [N])`` under ``clusters [N]``: the cluster-robust variance
    over the variance if the N items were independent (``var(values, ddof=1) / N``), both with
    the same small-sample factors, so one item per cluster gives exactly 1. Above 1 where items
    of a cluster (films of one patient) resemble each other. NaN with fewer than two clusters
    or no variation."""
    fn = "design_effect"
    x = _vector(values, fn, "values").astype(np.float64)
    idx, g = _cluster_index(clusters, len(x), fn)
    if g < 2:
        return float("nan")
    v_iid = float(np.var(x, ddof=1)) / len(x)
    if not v_iid > 0:
        return float("nan")
    return _cluster_variance(x, idx, g) / v_iid


def has_repeats(clusters) -> bool:
    """Whether some cluster (patient) holds more than one item; False for None."""
    if clusters is None:
        return False
    labels = np.asarray(clusters)
    return len(np.unique(labels)) < len(labels)


def clustered_binomial_ci(successes, clusters=None, alpha: float = 0.05,
                          method: str = "clopper-pearson") -> tuple[float, float, float]:
    """(p, lo, hi): a proportion of ``successes [N]`` (bool) whose items come in ``clusters [N]``
    (patients with several films), with a ``1 - alpha`` interval that keeps its coverage when
    films of one patient are alike. Fractions in [0, 1]; all NaN when N = 0.

    Korn & Graubard (1998, Survey Methodology 24:193)'s interval, as R ``survey::svyciprop(method
    = "beta")``: :func:`binomial_ci`'s ``method`` on the *effective* counts ``n_eff = N / deff``,
    ``k_eff = p n_eff``, where ``deff`` = :func:`design_effect` (never below 1: clustering
    cannot make an interval narrower than for independent films), and ``n_eff`` is scaled by
    ``(t_{N-1} / t_{G-1})^2`` for G clusters (the degrees of freedom of a cluster-robust
    variance are G - 1). At p = 0 or 1 there is no variance to measure ``deff`` from, so
    ``n_eff = G``: as if every film of a patient had its patient's outcome (the worst case).
    With one item per cluster (or ``clusters=None``) it is exactly :func:`binomial_ci`.
    """
    fn = "clustered_binomial_ci"
    alpha = _check_alpha(alpha, fn)
    if method not in CI_METHODS:
        raise ValueError(f"{fn}: method must be one of {CI_METHODS}, got {method!r}")
    if np.size(successes) == 0:  # e.g. the positives of a set without any
        _cluster_index(clusters, 0, fn)
        return float("nan"), float("nan"), float("nan")
    x = _labels(successes, fn, "successes")
    n = len(x)
    idx, g = _cluster_index(clusters, n, fn)
    k = int(x.sum())
    p = k / n
    if g == n:  # one film per patient: the plain interval
        lo, hi = binomial_ci(k, n, alpha, method)
        return p, lo, hi
    if g < 2:  # every film one patient's: nothing to estimate the spread between patients from
        return p, float("nan"), float("nan")
    if k in (0, n):
        n_eff = float(g)
    else:
        n_eff = n / max(1.0, design_effect(x.astype(np.float64), idx))
        n_eff *= (scipy_stats.t.isf(alpha / 2, n - 1) / scipy_stats.t.isf(alpha / 2, g - 1)) ** 2
    lo, hi = _binomial_limits(np.float64(p * n_eff), np.float64(n_eff), alpha, method)
    return p, float(lo), float(hi)


def percent_ci(k: int, n: int, alpha: float = 0.05,
               method: str = "clopper-pearson") -> tuple[float, float, float]:
    """(100 k / n, lo, hi): a rate in percent with its :func:`binomial_ci`; all NaN when n = 0."""
    lo, hi = binomial_ci(k, n, alpha, method)
    return 100.0 * _nan_ratio(k, n), 100.0 * lo, 100.0 * hi


def clustered_mean_ci(values, clusters=None, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean of per-item ``values [N]`` with a ``1 - alpha`` interval that allows for clusters.

    ``clusters [N]`` (any hashable labels, e.g. patient ids) marks items that are not
    independent (several films of one patient). The interval is the cluster-robust t-interval
    of the item mean: ``se^2 = G / (G - 1) * sum_g (sum_{i in g} (x_i - mean))^2 / N^2`` with
    ``G - 1`` degrees of freedom for ``G`` clusters. With one item per cluster (or
    ``clusters=None``) this is exactly the ordinary t-interval ``mean ± t * s / sqrt(N)``.
    Returns ``(mean, lo, hi)``; ``lo = hi = NaN`` when there are fewer than 2 clusters or the
    standard error is 0 (e.g. every value equal: there is no spread to build an interval from,
    and a zero-width interval would claim certainty the data cannot give; scipy's
    ``t.interval`` is NaN there too).
    """
    fn = "clustered_mean_ci"
    alpha = _check_alpha(alpha, fn)
    x = _vector(values, fn, "values").astype(np.float64)
    idx, g = _cluster_index(clusters, len(x), fn)
    mean = float(x.mean())
    if g < 2:
        return mean, math.nan, math.nan
    se = math.sqrt(_cluster_variance(x, idx, g))
    if not se > 1e-12 * max(1.0, abs(mean)):
        return mean, math.nan, math.nan
    half = float(scipy_stats.t.ppf(1 - alpha / 2, g - 1)) * se
    return mean, mean - half, mean + half


def _percent_clustered(x: np.ndarray, clusters, alpha: float, method: str) -> tuple[float, float, float]:
    """:func:`percent_ci` of the indicators ``x [N]``, or with repeated ``clusters``
    :func:`clustered_binomial_ci` in percent."""
    if not has_repeats(clusters):
        return percent_ci(int(x.sum()), len(x), alpha, method)
    return tuple(100.0 * v for v in clustered_binomial_ci(x, clusters, alpha, method))


def pi_score_ci(prob_orig, prob_trans, threshold: float = 0.5, *, alpha: float = 0.05,
                method: str = "clopper-pearson", clusters=None) -> tuple[float, float, float]:
    """(PI, lo, hi) in percent: :func:`pi_score` with a binomial interval over the N pairs.

    The flips are N independent Bernoulli trials (one per pair), so PI = 100 * flips / N gets
    the exact binomial interval of :func:`binomial_ci` (Clopper-Pearson by default; ``method``
    and ``alpha`` as there). ``clusters [N]`` (the pairs' patients): where a patient has
    several pairs, :func:`clustered_binomial_ci` instead.
    """
    flips = _flips(prob_orig, prob_trans, threshold, "pi_score_ci")
    _cluster_index(clusters, len(flips), "pi_score_ci")
    return _percent_clustered(flips, clusters, alpha, method)


def ols_score_ci(iol_values, eta: float = 0.4, empty: str = "exclude", *, alpha: float = 0.05,
                 method: str = "clopper-pearson", clusters=None) -> tuple[float, float, float]:
    """(OLS, lo, hi) in percent: :func:`ols_score` with a binomial interval.

    The interval is over the ``n_used`` images that enter the score: with ``empty="exclude"``
    (the default) the images with a non-empty heat map only — the excluded empty maps are
    neither successes nor trials, and :func:`ols_counts` reports how many there were
    (``n_empty``); with "out" / "in" every image is a trial. All NaN when no image is used.
    ``clusters [N]`` (the images' patients): where a patient has several of the used images,
    :func:`clustered_binomial_ci` over them instead.
    """
    if clusters is None:
        c = ols_counts(iol_values, eta, empty)
        return percent_ci(c["n_out"], c["n_used"], alpha, method)
    out, used, _ = _ols_indicators(iol_values, eta, empty, "ols_score_ci")
    _cluster_index(clusters, len(used), "ols_score_ci")
    return _percent_clustered(out[used], np.asarray(clusters)[used], alpha, method)


def _midrank_components(y: np.ndarray, scores: np.ndarray):
    """DeLong's structural components of K score vectors, with midranks (Sun & Xu 2014).

    ``y``: [N] bool labels; ``scores``: [K, N]. Returns (auc [K], v10 [K, m], v01 [K, n]) with
    m positives and n negatives: ``v10[k, i]`` = the fraction of negatives that positive i
    outranks under score k (ties 1/2), ``v01[k, j]`` = the fraction of positives that outrank
    negative j. Three sorts per score vector: O(K N log N), no m x n matrix.
    """
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    auc = np.empty(len(scores))
    v10 = np.empty((len(scores), m))
    v01 = np.empty((len(scores), n))
    for k in range(len(scores)):
        tz = _average_ranks(np.concatenate([pos[k], neg[k]]))
        tx, ty = _average_ranks(pos[k]), _average_ranks(neg[k])
        v10[k] = (tz[:m] - tx) / n
        v01[k] = 1.0 - (tz[m:] - ty) / m
        auc[k] = v10[k].mean()
    return auc, v10, v01


def _delong(labels, score_list: Sequence, fn: str, clusters=None):
    """(auc [K], cov [K, K]) of DeLong et al. (1988), or with ``clusters [N]`` of Obuchowski
    (1997); NaN when a class has < 2 members (< 2 clusters holding it)."""
    y = _labels(labels, fn)
    scores = []
    for i, s in enumerate(score_list):
        a = _vector(s, fn, f"scores[{i}]" if len(score_list) > 1 else "scores").astype(np.float64)
        _same_length(fn, labels=y, scores=a)
        scores.append(a)
    scores = np.stack(scores)
    idx, g = _cluster_index(clusters, len(y), fn)
    m = int(y.sum())
    n = len(y) - m
    k = len(scores)
    if m == 0 or n == 0:
        return np.full(k, np.nan), np.full((k, k), np.nan)
    auc, v10, v01 = _midrank_components(y, scores)
    if g == len(y):  # one film per patient: DeLong's estimate
        if m < 2 or n < 2:
            return auc, np.full((k, k), np.nan)
        return auc, np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return auc, _obuchowski_cov(auc, v10, v01, idx[y], idx[~y], g)


def _obuchowski_cov(auc: np.ndarray, v10: np.ndarray, v01: np.ndarray, pos_cluster: np.ndarray,
                    neg_cluster: np.ndarray, g: int) -> np.ndarray:
    """Covariance [K, K] of K AUCs from clustered data (Obuchowski 1997, Biometrics 53:567).

    The structural components of DeLong (``v10 [K, M]`` per positive film, ``v01 [K, N]`` per
    negative film; :func:`_midrank_components`) are summed per cluster (patient) i, giving
    ``D10_i = sum_{films of i} v10 - m_i AUC`` and ``D01_i = sum v01 - n_i AUC`` for the m_i
    positive and n_i negative films of patient i. With I10 / I01 the numbers of patients with a
    positive / negative film and I the number of patients:
    ``S10 = I10 / ((I10 - 1) M) sum_i D10_i D10_i'``, ``S01 = I01 / ((I01 - 1) N) sum_i D01_i
    D01_i'``, ``S11 = I / (I - 1) sum_i D10_i D01_i'`` and
    ``cov = S10 / M + S01 / N + (S11 + S11') / (M N)``. With one film per patient S11 = 0 and
    this is DeLong's covariance; a patient's films may have either label."""
    m, n = v10.shape[1], v01.shape[1]
    m_i = np.bincount(pos_cluster, minlength=g)
    n_i = np.bincount(neg_cluster, minlength=g)
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    k = len(auc)
    if i10 < 2 or i01 < 2:
        return np.full((k, k), np.nan)
    d10 = np.stack([np.bincount(pos_cluster, weights=v, minlength=g) for v in v10]) - np.outer(auc, m_i)
    d01 = np.stack([np.bincount(neg_cluster, weights=v, minlength=g) for v in v01]) - np.outer(auc, n_i)
    s10 = i10 / ((i10 - 1) * m) * (d10 @ d10.T)
    s01 = i01 / ((i01 - 1) * n) * (d01 @ d01.T)
    s11 = g / (g - 1) * (d10 @ d01.T)
    return s10 / m + s01 / n + (s11 + s11.T) / (m * n)


def roc_auc_variance(labels, scores, clusters=None) -> tuple[float, float]:
    """(AUC, DeLong variance of the AUC) for one score vector (see :func:`roc_auc_ci`;
    ``clusters``: Obuchowski's clustered variance)."""
    auc, cov = _delong(labels, [scores], "roc_auc_variance", clusters)
    return float(auc[0]), float(cov[0, 0])


def roc_auc_ci(labels, scores, alpha: float = 0.05, clusters=None) -> tuple[float, float, float]:
    """(AUC, lo, hi): ROC-AUC (:func:`roc_auc`) with DeLong's interval.

    DeLong, DeLong & Clarke-Pearson (1988): the AUC is the Mann-Whitney statistic, a two-sample
    U-statistic; its variance is estimated from the structural components (each positive's
    fraction of negatives it outranks, each negative's fraction of positives outranking it):
    ``var = S10 / m + S01 / n`` with S10, S01 their sample variances over the m positives and n
    negatives. Computed with midranks in O(N log N) (Sun & Xu 2014), the same numbers as the
    direct O(m n) formula. Interval ``AUC -/+ z_{1-alpha/2} sqrt(var)``, clipped to [0, 1] (as
    R's pROC ``ci.auc(method="delong")``). All NaN with one class only; lo = hi = NaN with fewer
    than two members of a class. At AUC = 0 or 1 (perfect separation) the variance estimate is 0
    and the interval degenerates to a point: read it as "no ranking error in this sample", not
    as certainty.

    ``clusters [N]`` (the films' patients): where a patient has several films, the variance is
    Obuchowski's (1997) for clustered data (:func:`_obuchowski_cov`), which is DeLong's with one
    film per patient; lo = hi = NaN when fewer than two patients have a film of each class.
    """
    alpha = _check_alpha(alpha, "roc_auc_ci")
    auc, cov = _delong(labels, [scores], "roc_auc_ci", clusters)
    a, var = float(auc[0]), float(cov[0, 0])
    if not math.isfinite(var):
        return a, float("nan"), float("nan")
    half = float(scipy_stats.norm.isf(alpha / 2)) * math.sqrt(max(var, 0.0))
    return a, max(0.0, a - half), min(1.0, a + half)


def roc_auc_compare(labels, scores_a, scores_b, alpha: float = 0.05, clusters=None) -> dict:
    """DeLong's paired test of two ROC-AUCs on the same cases (two models, or one model on
    originals and on transmitted images): dict(auc_a, auc_b, diff, lo, hi, z, p_value, n_pos,
    n_neg, method).

    ``diff = auc_a - auc_b``; its variance ``var_a + var_b - 2 cov_ab`` comes from the joint
    DeLong covariance of the two AUCs (:func:`roc_auc_ci`); ``z = diff / sd`` and the two-sided
    normal p-value; [lo, hi] = ``diff -/+ z_{1-alpha/2} sd`` (not clipped). Identical score
    vectors give diff 0, sd 0: z and p are NaN then (no test to make), lo = hi = 0.
    ``clusters [N]`` (the cases' patients, with repeats): the joint covariance is Obuchowski's
    (1997) for clustered data, and ``method`` says so.
    """
    fn = "roc_auc_compare"
    alpha = _check_alpha(alpha, fn)
    auc, cov = _delong(labels, [scores_a, scores_b], fn, clusters)
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    sd = math.sqrt(max(var, 0.0)) if math.isfinite(var) else float("nan")
    z = diff / sd if sd > 0 else float("nan")
    half = float(scipy_stats.norm.isf(alpha / 2)) * sd
    y = _labels(labels, fn)
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "diff": diff,
            "lo": diff - half, "hi": diff + half, "z": z,
            "p_value": float(2 * scipy_stats.norm.sf(abs(z))) if math.isfinite(z) else float("nan"),
            "n_pos": int(y.sum()), "n_neg": int((~y).sum()),
            "method": "DeLong paired, clustered (Obuchowski)" if has_repeats(clusters) else "DeLong paired"}


# --------------------------------------------------------------------------------------------
# McNemar and paired differences of proportions
# --------------------------------------------------------------------------------------------
def mcnemar_from_counts(b: int, c: int, exact: bool | None = None) -> dict:
    """McNemar's test from the discordant counts of a paired 2x2 table.

    b = pairs positive/correct on the first side only, c = on the second side only. Under the
    null hypothesis (the two sides are equally often positive) b ~ Binom(b + c, 1/2).

    ``exact=True`` or ``None`` (the default, at every count): the exact test,
    statistic = min(b, c) and ``p = min(1, 2 * P[Binom(b + c, 1/2) <= min(b, c)])`` from
    ``scipy.stats.binom.cdf`` (microseconds at any count; 20,000 discordant pairs included).
    This is the convention of statsmodels' ``mcnemar(table, exact=True)``, of R's
    ``binom.test(b, b + c)`` and of ``exact2x2::mcnemar.exact`` (whose default two-sided method
    is this doubled tail), so the p-values match all three. At b = c every one of them gives
    p = 1: twice the tail P[X <= b] exceeds 1 there (b = c = 5: 2 * 638 / 1024 = 1.246), and
    so does R's "sum the outcomes no more likely than the observed one" rule. b = c = 0 (no
    discordant pair) gives p = 1.

    ``exact=False``: the chi-square test with continuity correction, as R's ``mcnemar.test``:
    statistic = (|b - c| - 1)^2 / (b + c) when b != c, and 0 when b = c (R drops the correction
    for a symmetric table; statsmodels' ``mcnemar(exact=False)`` keeps it and gives
    1 / (b + c) > 0 there, e.g. p = 0.855 instead of 1 at b = c = 15);
    p = P[chi2_1 >= statistic]; b = c = 0 gives statistic 0, p = 1 (R: NaN). Offered only to
    reproduce published chi-square values: the exact test has no large-sample condition.

    Returns dict(b, c, statistic, p_value, method) with method "exact" or "chi2".
    """
    if int(b) != b or int(c) != c or b < 0 or c < 0:
        raise ValueError(f"mcnemar: counts must be non-negative integers, got b={b}, c={c}")
    b, c = int(b), int(c)
    n = b + c
    if exact is None or exact:
        k = min(b, c)
        p = min(1.0, 2.0 * float(scipy_stats.binom.cdf(k, n, 0.5))) if n else 1.0
        return {"b": b, "c": c, "statistic": float(k), "p_value": p, "method": "exact"}
    if n == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "method": "chi2"}
    stat = (abs(b - c) - 1.0) ** 2 / n if b != c else 0.0
    return {"b": b, "c": c, "statistic": stat, "p_value": float(scipy_stats.chi2.sf(stat, 1)),
            "method": "chi2"}


def mcnemar(first, second, labels=None, exact: bool | None = None) -> dict:
    """McNemar's test on paired binary outcomes (see :func:`mcnemar_from_counts`).

    Two uses:
      - ``mcnemar(correct_orig, correct_trans)``: boolean [N] "classified correctly" on the
        original and on the transmitted image; b = right on the original only, c = right on the
        transmitted only. Tests whether transmission changes accuracy.
      - ``mcnemar(pred_orig, pred_trans, labels=y)``: predictions (boolean or 0/1) plus labels;
        correctness is computed as ``pred == label`` first.
    Without labels any two paired binary vectors work, e.g. the two sides' positive decisions
    (b = positive on the original only): the test of whether flips go one way more than the
    other — the paired disagreement table behind PI.
    """
    fn = "mcnemar"
    a = _labels(first, fn, "first")
    t = _labels(second, fn, "second")
    _same_length(fn, first=a, second=t)
    if labels is not None:
        y = _labels(labels, fn)
        _same_length(fn, first=a, labels=y)
        a, t = a == y, t == y
    return mcnemar_from_counts(int((a & ~t).sum()), int((~a & t).sum()), exact=exact)


def clustered_mcnemar(first, second, clusters) -> dict:
    """McNemar's test for paired binary outcomes whose units come in ``clusters [N]`` (several
    films of one patient), after Durkalski et al. (2003, Stat Med 22:2417; Obuchowski's
    cluster-adjusted statistic): with ``b_k``, ``c_k`` the discordant counts of cluster k
    (first only, second only), ``X2 = (sum_k (b_k - c_k))^2 / sum_k (b_k - c_k)^2``, compared
    with chi-square on 1 degree of freedom. One unit per cluster gives
    ``(b - c)^2 / (b + c)``, the chi-square McNemar statistic without continuity correction;
    no discordant unit gives statistic 0, p = 1. Returns dict(b, c, statistic, p_value,
    n_clusters, method="clustered chi2 (Durkalski)").
    """
    fn = "clustered_mcnemar"
    a = _labels(first, fn, "first")
    t = _labels(second, fn, "second")
    _same_length(fn, first=a, second=t)
    idx, g = _cluster_index(clusters, len(a), fn)
    d = np.bincount(idx, weights=(a & ~t).astype(np.float64) - (~a & t).astype(np.float64), minlength=g)
    den = float(np.sum(d ** 2))
    stat = float(np.sum(d)) ** 2 / den if den > 0 else 0.0
    return {"b": int((a & ~t).sum()), "c": int((~a & t).sum()), "statistic": stat,
            "p_value": float(scipy_stats.chi2.sf(stat, 1)) if den > 0 else 1.0,
            "n_clusters": g, "method": "clustered chi2 (Durkalski)"}


def paired_difference_ci(n11: int, n10: int, n01: int, n00: int,
                         alpha: float = 0.05) -> tuple[float, float, float]:
    """(diff, lo, hi): Newcombe's hybrid score interval for the difference of two paired
    proportions, ``diff = p1 - p2 = (n10 - n01) / N`` (proportions, not percent).

    The paired 2x2 table: n11 = positive on both sides, n10 = on the first only, n01 = on the
    second only, n00 = on neither; p1 = (n11 + n10) / N, p2 = (n11 + n01) / N.

    Newcombe (1998, Stat Med 17:2635, method 10; the "square-and-add" interval of Fagerland,
    Lydersen & Laake 2014, one of their recommended intervals for paired proportions): Wilson
    intervals [l1, u1], [l2, u2] for p1 and p2 are combined with the estimated correlation phi
    of the two sides, ``lo = diff - sqrt((p1 - l1)^2 + (u2 - p2)^2 - 2 phi (p1 - l1)(u2 - p2))``
    and ``hi = diff + sqrt((p2 - l2)^2 + (u1 - p1)^2 - 2 phi (p2 - l2)(u1 - p1))``, with
    ``phi = max(A - N/2, 0) / sqrt(row and column margins' product)`` for A = n11 n00 - n10 n01 >= 0
    (A itself when negative; 0 when a margin is 0). It is closed-form, stays inside [-1, 1],
    keeps close to nominal coverage down to small N and near 0 % — where the Wald interval
    ``diff -/+ z sd`` collapses (0 discordant pairs would give [0, 0]) — and it is what the
    paired comparisons of PI and OLS report next to McNemar's exact p. (Tango's score interval
    is the other recommended choice; it needs an iterative solve and gives similar limits.)
    N = 0 gives all NaN.
    """
    fn = "paired_difference_ci"
    alpha = _check_alpha(alpha, fn)
    cells = (n11, n10, n01, n00)
    if any(int(x) != x or x < 0 for x in cells):
        raise ValueError(f"{fn}: cells must be non-negative integers, got {cells}")
    n11, n10, n01, n00 = (int(x) for x in cells)
    n = n11 + n10 + n01 + n00
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    r1, r0, c1, c0 = n11 + n10, n01 + n00, n11 + n01, n10 + n00
    p1, p2 = r1 / n, c1 / n
    (l1, u1), (l2, u2) = binomial_ci(r1, n, alpha, "wilson"), binomial_ci(c1, n, alpha, "wilson")
    phi = 0.0
    if min(r1, r0, c1, c0) > 0:
        a = n11 * n00 - n10 * n01
        num = a - n / 2 if a > n / 2 else (0.0 if a >= 0 else a)
        phi = num / math.sqrt(float(r1) * r0 * c1 * c0)
    diff = p1 - p2
    lo = diff - math.sqrt(max((p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2), 0.0))
    hi = diff + math.sqrt(max((p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1), 0.0))
    return diff, max(-1.0, lo), min(1.0, hi)


def paired_comparison(first, second, alpha: float = 0.05, clusters=None) -> dict:
    """Paired comparison of two binary outcomes on the same N units, in percent.

    Args:
      first, second: [N] boolean (or 0/1) indicators on the same units, e.g. "pair flips under
        model A" / "under model B" (PI difference), or "IOL < eta on the original" / "on the
        transmitted image" (OLS difference).
      alpha: 1 - confidence level.

    Returns:
      dict(n, n11, n10, n01, n00, rate_first, rate_second, diff, lo, hi, p_value, mcnemar):
      rates in percent; ``diff = rate_first - rate_second`` in percentage points with
      Newcombe's hybrid score interval [lo, hi] (:func:`paired_difference_ci`); ``p_value``
      and ``mcnemar`` from the exact McNemar test on the discordant counts b = n10, c = n01
      (:func:`mcnemar_from_counts`). The interval and the test answer the same question in two
      ways and can disagree at the margin (the interval can exclude 0 at p just above alpha).
      clusters: [N] the units' patients, or None. Where a patient has several units (films
        of one patient are not independent), ``p_value`` and ``mcnemar`` come from
        :func:`clustered_mcnemar` and Newcombe's limits are moved away from ``diff`` by
        ``sqrt(deff)``, the :func:`design_effect` of the per-unit differences (at least 1);
        the result gains ``n_clusters`` and ``design_effect``.
    """
    fn = "paired_comparison"
    a = _labels(first, fn, "first")
    b = _labels(second, fn, "second")
    _same_length(fn, first=a, second=b)
    _cluster_index(clusters, len(a), fn)
    n11, n10 = int((a & b).sum()), int((a & ~b).sum())
    n01, n00 = int((~a & b).sum()), int((~a & ~b).sum())
    diff, lo, hi = paired_difference_ci(n11, n10, n01, n00, alpha)
    extra: dict[str, Any] = {}
    if has_repeats(clusters):
        test = clustered_mcnemar(a, b, clusters)
        deff = design_effect(a.astype(np.float64) - b.astype(np.float64), clusters)
        deff = max(1.0, deff) if math.isfinite(deff) else 1.0
        k = math.sqrt(deff)
        lo, hi = max(-1.0, diff - k * (diff - lo)), min(1.0, diff + k * (hi - diff))
        extra = {"n_clusters": test["n_clusters"], "design_effect": deff}
    else:
        test = mcnemar_from_counts(n10, n01, exact=True)
    n = len(a)
    return {"n": n, "n11": n11, "n10": n10, "n01": n01, "n00": n00,
            "rate_first": 100.0 * (n11 + n10) / n, "rate_second": 100.0 * (n11 + n01) / n,
            "diff": 100.0 * diff, "lo": 100.0 * lo, "hi": 100.0 * hi,
            "p_value": test["p_value"], "mcnemar": test, **extra}


def ols_paired_comparison(iol_first, iol_second, eta: float = 0.4, alpha: float = 0.05,
                          clusters=None) -> dict:
    """Paired OLS difference: two IOL vectors on the same N images (two models; or one model on
    originals and on transmitted images), McNemar on ``IOL < eta``.

    Only images whose heat map is non-empty on *both* sides (both IOLs defined) enter: an empty
    map has no IOL (:func:`iol`), and dropping it on one side only would unpair the data. The
    returned dict is :func:`paired_comparison` of ``IOL_first < eta`` vs ``IOL_second < eta``
    over those images (``diff`` = OLS_first - OLS_second in percentage points, on that common
    subset — so it can differ slightly from the difference of the two reported OLS, each of
    which uses all of its own non-empty maps) plus ``n_total`` (all images) and ``n_excluded``
    (images with an empty map on either side) and ``eta``. With no image left: n = 0 and NaN
    figures, p = NaN. ``clusters [N]``: the images' patients, as in :func:`paired_comparison`.
    """
    fn = "ols_paired_comparison"
    a = _vector(iol_first, fn, "iol_first", allow_nan=True).astype(np.float64)
    b = _vector(iol_second, fn, "iol_second", allow_nan=True).astype(np.float64)
    _same_length(fn, iol_first=a, iol_second=b)
    for name, v in (("iol_first", a), ("iol_second", b)):
        finite = v[~np.isnan(v)]
        if ((finite < 0) | (finite > 1)).any():
            raise ValueError(f"{fn}: {name} must lie in [0, 1] (or be NaN for an empty heat map)")
    both = ~np.isnan(a) & ~np.isnan(b)
    extra = {"n_total": int(len(a)), "n_excluded": int((~both).sum()), "eta": float(eta)}
    if not both.any():
        nan = float("nan")
        return {"n": 0, "n11": 0, "n10": 0, "n01": 0, "n00": 0, "rate_first": nan,
                "rate_second": nan, "diff": nan, "lo": nan, "hi": nan, "p_value": nan,
                "mcnemar": None, **extra}
    _cluster_index(clusters, len(a), fn)
    cl = None if clusters is None else np.asarray(clusters)[both]
    return {**paired_comparison(a[both] < eta, b[both] < eta, alpha, cl), **extra}


# --------------------------------------------------------------------------------------------
# detection: box IoU and the RSNA pneumonia challenge metric
# --------------------------------------------------------------------------------------------
def _boxes(x, fn: str, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return a.reshape(0, 4)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"{fn}: {name} must be [N, 4] xyxy boxes, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{fn}: {name} contains non-finite coordinates")
    if (a[:, 2] < a[:, 0]).any() or (a[:, 3] < a[:, 1]).any():
        raise ValueError(f"{fn}: {name} has boxes with x2 < x1 or y2 < y1 (expected xyxy)")
    return a


def box_iou(a, b) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: a [N, 4], b [M, 4] -> [N, M] float64.

    Continuous coordinates (area = (x2 - x1) * (y2 - y1), no +1). A pair whose union has zero
    area gets IoU 0.
    """
    a = _boxes(a, "box_iou", "a")
    b = _boxes(b, "box_iou", "b")
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _image_precisions(iou: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """TP/(TP+FP+FN) per threshold for one image; ``iou`` [P, G] with rows in score order."""
    n_pred, n_gt = iou.shape
    out = np.empty(len(thresholds), dtype=np.float64)
    for k, t in enumerate(thresholds):
        matched = np.zeros(n_gt, dtype=bool)
        tp = 0
        for p in range(n_pred):
            ok = ~matched & (iou[p] > t)
            if ok.any():
                matched[int(np.argmax(np.where(ok, iou[p], -np.inf)))] = True
                tp += 1
        fp, fn = n_pred - tp, n_gt - tp
        out[k] = tp / (tp + fp + fn)
    return out


def rsna_image_scores(pred_boxes: Sequence, pred_scores: Sequence, gt_boxes: Sequence,
                      iou_thresholds=RSNA_IOU_THRESHOLDS) -> np.ndarray:
    """Per-image RSNA average precision, [n_images] float64, NaN for skipped images.

    See :func:`rsna_map` for the definition; an image with neither ground-truth nor predicted
    boxes is NaN here (skipped by the mean).
    """
    fn = "rsna_map"
    if not (len(pred_boxes) == len(pred_scores) == len(gt_boxes)):
        raise ValueError(f"{fn}: pred_boxes, pred_scores and gt_boxes must list the same images, "
                         f"got {len(pred_boxes)}, {len(pred_scores)}, {len(gt_boxes)}")
    thresholds = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if thresholds.size == 0:
        raise ValueError(f"{fn}: iou_thresholds is empty")
    scores = np.full(len(gt_boxes), np.nan)
    for i, (pb, ps, gb) in enumerate(zip(pred_boxes, pred_scores, gt_boxes)):
        pb = _boxes(pb, fn, f"pred_boxes[{i}]")
        gb = _boxes(gb, fn, f"gt_boxes[{i}]")
        ps = np.asarray(ps, dtype=np.float64).reshape(-1)
        if len(ps) != len(pb):
            raise ValueError(f"{fn}: image {i} has {len(pb)} predicted boxes but {len(ps)} scores")
        if len(pb) == 0 and len(gb) == 0:
            continue
        order = np.argsort(-ps, kind="stable")  # descending confidence, ties keep input order
        scores[i] = _image_precisions(box_iou(pb[order], gb), thresholds).mean()
    return scores


def rsna_map(pred_boxes: Sequence, pred_scores: Sequence, gt_boxes: Sequence,
             iou_thresholds=RSNA_IOU_THRESHOLDS) -> float:
    """The RSNA Pneumonia Detection Challenge metric (Kaggle 2018): mean over images of the
    mean over IoU thresholds of TP / (TP + FP + FN).

    The challenge's evaluation page, as we understand it: the metric sweeps IoU thresholds
    0.4 to 0.75 in steps of 0.05; at threshold t a predicted object is a "hit" if its IoU with
    a ground-truth object is greater than t. At each t a precision value
    TP(t) / (TP(t) + FP(t) + FN(t)) is computed: a true positive is a single predicted object
    matching a ground-truth object above the threshold, a false positive is a predicted object
    with no associated ground-truth object, a false negative a ground-truth object with no
    associated prediction. If an image has no ground-truth objects, any number of predictions
    gives it a score of zero and it is included in the mean. Predictions are evaluated in order
    of their confidence, so higher-confidence boxes are checked for matches first. An image's
    score is the mean of its precisions over the thresholds; the final score is the mean over
    images.

    Implementation choices:
      - Greedy matching per threshold: predictions in descending score order, each matched to
        the *unmatched* ground-truth box with the highest IoU, if that IoU is > t (strict).
        Each ground-truth box matches at most one prediction.
      - Images with neither ground truth nor predictions are skipped (excluded from the mean).
        An image with ground truth and no prediction scores 0 (all FN).
      - Default thresholds are :data:`RSNA_IOU_THRESHOLDS` = 0.40, 0.45, ..., 0.75 rounded to
        two decimals (``np.arange(0.4, 0.76, 0.05)`` carries float noise such as 0.55000...02).

    Args:
      pred_boxes: per image, [P_i, 4] xyxy predicted boxes (any consistent unit).
      pred_scores: per image, [P_i] confidences.
      gt_boxes: per image, [G_i, 4] xyxy ground-truth boxes (empty for negative images).
      iou_thresholds: the IoU thresholds to average over.

    Returns:
      The mean over scored images; NaN if every image was skipped.
    """
    scores = rsna_image_scores(pred_boxes, pred_scores, gt_boxes, iou_thresholds)
    kept = scores[~np.isnan(scores)]
    return float(kept.mean()) if kept.size else float("nan")


def detection_ap(pred_boxes: Sequence, pred_scores: Sequence, gt_boxes: Sequence,
                 iou_threshold: float = 0.5) -> float:
    """Average precision of a detector at one IoU threshold (PASCAL VOC 2010+ / COCO style,
    all-point interpolation), free of any score threshold.

    All images' detections are ranked by score (ties keep image order, then input order);
    going down the ranking, a detection is a true positive when it overlaps a not yet matched
    ground-truth box of its image with IoU >= ``iou_threshold`` (the highest-IoU such box is
    taken), otherwise a false positive. AP is the area under the precision-recall curve with
    precision made monotone (each recall level gets the best precision at that recall or
    beyond). Unlike :func:`rsna_map`, it does not depend on where a confidence threshold cuts
    the scores, so it shows whether the boxes are found and ranked above the false alarms
    while the scores are not yet calibrated (e.g. early in training).

    Args:
      pred_boxes, pred_scores, gt_boxes: per image, as :func:`rsna_map`.
      iou_threshold: the IoU a detection needs to count as a hit.

    Returns:
      AP in [0, 1]; NaN when no image has a ground-truth box.
    """
    fn = "detection_ap"
    if not (len(pred_boxes) == len(pred_scores) == len(gt_boxes)):
        raise ValueError(f"{fn}: pred_boxes, pred_scores and gt_boxes must list the same images, "
                         f"got {len(pred_boxes)}, {len(pred_scores)}, {len(gt_boxes)}")
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise ValueError(f"{fn}: iou_threshold must be in (0, 1], got {iou_threshold}")
    gts = [_boxes(g, fn, f"gt_boxes[{i}]") for i, g in enumerate(gt_boxes)]
    n_gt = sum(len(g) for g in gts)
    if n_gt == 0:
        return float("nan")
    dets = []  # (score, image, box)
    for i, (pb, ps) in enumerate(zip(pred_boxes, pred_scores)):
        pb = _boxes(pb, fn, f"pred_boxes[{i}]")
        ps = np.asarray(ps, dtype=np.float64).reshape(-1)
        if len(ps) != len(pb):
            raise ValueError(f"{fn}: image {i} has {len(pb)} predicted boxes but {len(ps)} scores")
        if not np.isfinite(ps).all():
            raise ValueError(f"{fn}: pred_scores[{i}] contains non-finite scores")
        dets += [(float(ps[k]), i, pb[k]) for k in range(len(pb))]
    order = sorted(range(len(dets)), key=lambda k: -dets[k][0])  # stable: ties keep their order
    matched = [np.zeros(len(g), dtype=bool) for g in gts]
    hit = np.zeros(len(dets), dtype=bool)
    for rank, k in enumerate(order):
        _, i, box = dets[k]
        if len(gts[i]) == 0:
            continue
        iou = box_iou(box[None], gts[i])[0]
        ok = ~matched[i] & (iou >= iou_threshold)
        if ok.any():
            matched[i][int(np.argmax(np.where(ok, iou, -np.inf)))] = True
            hit[rank] = True
    if not len(dets):
        return 0.0
    tp = np.cumsum(hit)
    precision = tp / np.arange(1, len(dets) + 1)
    recall = tp / n_gt
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))


# --------------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------------
def dice(pred_mask, true_mask, eps: float = 1e-6, threshold: float = 0.5):
    """Hard Dice coefficient per sample: ``(2 |P ∩ T| + eps) / (|P| + |T| + eps)``.

    Args:
      pred_mask, true_mask: [B, ...] masks (e.g. [B, H, W] or [B, H, W, 1]) of the same shape;
        boolean, or probabilities binarised at ``>= threshold``.
      eps: smoothing; two empty masks give Dice 1.

    Returns:
      [B] float32. numpy in -> numpy out; jax in -> jax out (jit-able).
    """
    xp = _xp(pred_mask, true_mask)
    p = _decide(pred_mask, threshold, xp)
    t = _decide(true_mask, threshold, xp)
    if p.shape != t.shape:
        raise ValueError(f"dice: pred_mask shape {p.shape} does not match true_mask {t.shape}")
    if p.ndim < 2:
        raise ValueError(f"dice: masks must be [B, ...] with a batch axis, got shape {p.shape}")
    axes = tuple(range(1, p.ndim))
    inter = xp.sum(p & t, axis=axes, dtype=xp.int32).astype(xp.float32)
    total = (xp.sum(p, axis=axes, dtype=xp.int32) + xp.sum(t, axis=axes, dtype=xp.int32)).astype(xp.float32)
    return (2.0 * inter + eps) / (total + eps)


def soft_dice_loss(pred, target, *, from_logits: bool = True, eps: float = 1.0) -> jax.Array:
    """Soft Dice loss per sample, ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)``, in jnp.

    Args:
      pred: [B, ...] logits (``from_logits=True``, sigmoid applied) or probabilities in [0, 1].
      target: [B, ...] float masks in [0, 1], same shape.
      eps: additive smoothing (1.0, the usual choice, keeps empty-mask samples' gradient finite
        and gives loss 0 for an empty prediction of an empty mask).

    Returns:
      [B] float32 losses (the caller reduces, e.g. weighting samples that carry a mask).
    """
    pred = jnp.asarray(pred, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    if pred.shape != target.shape:
        raise ValueError(f"soft_dice_loss: pred shape {pred.shape} does not match target {target.shape}")
    if pred.ndim < 2:
        raise ValueError(f"soft_dice_loss: inputs must be [B, ...], got shape {pred.shape}")
    p = jax.nn.sigmoid(pred) if from_logits else pred
    axes = tuple(range(1, pred.ndim))
    inter = jnp.sum(p * target, axis=axes)
    total = jnp.sum(p, axis=axes) + jnp.sum(target, axis=axes)
    return 1.0 - (2.0 * inter + eps) / (total + eps)
