"""Metrics of covidmt_jax: PI, IOL, OLS (../shared/SPEC.md), classification, CIs, McNemar, box mAP, Dice.

All functions are pure. Conventions:

- Population scores (``pi_score``, ``ols_score``, classification metrics, ``bootstrap_ci``,
  ``mcnemar``, ``rsna_map``) take numpy-convertible arrays and return Python floats / dicts.
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
from fractions import Fraction
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "RSNA_IOU_THRESHOLDS",
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
    "bootstrap_ci",
    "pi_score_ci",
    "ols_score_ci",
    "mcnemar",
    "mcnemar_from_counts",
    "box_iou",
    "rsna_image_scores",
    "rsna_map",
    "dice",
    "soft_dice_loss",
]

# The RSNA Pneumonia Detection Challenge's IoU thresholds 0.40, 0.45, ..., 0.75 (8 values),
# rounded so that e.g. 0.55 is exactly the float 0.55 (np.arange alone gives 0.5500000000000002).
RSNA_IOU_THRESHOLDS = np.round(np.arange(0.4, 0.76, 0.05), 2)

# McNemar: below this many discordant pairs the exact binomial test is used.
MCNEMAR_EXACT_BELOW = 25


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


def classification_report(labels, probs, threshold: float = 0.5) -> dict:
    """dict(n, n_pos, n_neg, threshold, tp, fp, tn, fn, accuracy, sensitivity, specificity, roc_auc).

    ``probs``: [N] probabilities (ROC-AUC needs scores, so boolean decisions are rejected).
    """
    p = _vector(probs, "classification_report", "probs")
    if p.dtype == bool:
        raise ValueError("classification_report: probs must be scores, not boolean decisions "
                         "(ROC-AUC needs a ranking)")
    c = confusion(labels, p, threshold)
    n_pos, n_neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    return {"n": n_pos + n_neg, "n_pos": n_pos, "n_neg": n_neg, "threshold": float(threshold),
            **c,
            "accuracy": (c["tp"] + c["tn"]) / (n_pos + n_neg),
            "sensitivity": _nan_ratio(c["tp"], n_pos),
            "specificity": _nan_ratio(c["tn"], n_neg),
            "roc_auc": roc_auc(labels, p)}


# --------------------------------------------------------------------------------------------
# bootstrap confidence intervals
# --------------------------------------------------------------------------------------------
def bootstrap_ci(statistic_fn: Callable[..., Any], *arrays, n_boot: int = 2000,
                 alpha: float = 0.05, seed: int = 0, vectorized: bool = False,
                 max_chunk_elems: int = 4_000_000) -> tuple[float, float, float]:
    """Percentile bootstrap (point, lo, hi) of ``statistic_fn(*arrays)``.

    Rows are resampled jointly: one index vector of length N (with replacement) is applied to
    every array, so paired data (original / transmitted, label / score) stay paired.

    Args:
      statistic_fn: the statistic. With ``vectorized=False`` it is called once per resample as
        ``statistic_fn(*resampled)`` (each resampled array has the original shape) and returns a
        scalar. With ``vectorized=True`` it receives a batch of resamples, arrays of shape
        [b, N, ...], and must return [b] — much faster for simple means (``pi_score_ci``).
      *arrays: one or more arrays with the same leading length N.
      n_boot: number of resamples.
      alpha: 1 - confidence level; the interval is the (alpha/2, 1 - alpha/2) quantiles.
      seed: numpy ``default_rng`` seed (deterministic).
      max_chunk_elems: resample indices are drawn in chunks of at most this many entries
        (memory stays flat for large N).

    Returns:
      (point, lo, hi) floats; point = the statistic on the data as given. Resamples on which the
      statistic is NaN (e.g. ROC-AUC of a one-class resample) are ignored by the quantiles.
    """
    fn = "bootstrap_ci"
    if not arrays:
        raise ValueError(f"{fn}: give at least one array")
    if not 0 < alpha < 1:
        raise ValueError(f"{fn}: alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"{fn}: n_boot must be >= 1, got {n_boot}")
    arrays = tuple(np.asarray(a) for a in arrays)
    if any(a.ndim == 0 for a in arrays):
        raise ValueError(f"{fn}: arrays must have a leading sample axis, got a scalar")
    n = _same_length(fn, **{f"arrays[{i}]": a for i, a in enumerate(arrays)})
    if n == 0:
        raise ValueError(f"{fn}: arrays are empty")

    if vectorized:
        point = float(np.asarray(statistic_fn(*(a[None] for a in arrays))).reshape(-1)[0])
    else:
        point = float(statistic_fn(*arrays))

    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, max_chunk_elems // n))
    stats = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        if vectorized:
            got = np.asarray(statistic_fn(*(a[idx] for a in arrays)), dtype=np.float64)
            if got.shape != (b,):
                raise ValueError(f"{fn}: vectorized statistic_fn must return shape ({b},), "
                                 f"got {got.shape}")
            stats[start:start + b] = got
        else:
            for k in range(b):
                stats[start + k] = float(statistic_fn(*(a[idx[k]] for a in arrays)))
    if np.isnan(stats).all():
        return point, float("nan"), float("nan")
    lo, hi = np.nanquantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return point, float(lo), float(hi)


def _percent_mean(x: np.ndarray) -> np.ndarray:
    """100 * mean over the last axis ([b, N] -> [b])."""
    return 100.0 * x.mean(axis=-1)


def pi_score_ci(prob_orig, prob_trans, threshold: float = 0.5, *, n_boot: int = 2000,
                alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(PI, lo, hi): :func:`pi_score` with a percentile-bootstrap CI over pairs."""
    flips = _flips(prob_orig, prob_trans, threshold, "pi_score_ci")
    return bootstrap_ci(_percent_mean, flips, n_boot=n_boot, alpha=alpha, seed=seed,
                        vectorized=True)


def ols_score_ci(iol_values, eta: float = 0.4, empty: str = "exclude", *, n_boot: int = 2000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(OLS, lo, hi): :func:`ols_score` with a percentile-bootstrap CI over images.

    All images are resampled (empty heat maps included), then each resample is scored with the
    same ``empty`` rule, so the interval carries the variation in how many maps were empty.
    """
    out, used, _ = _ols_indicators(iol_values, eta, empty, "ols_score_ci")

    def stat(o, u):
        n_used = u.sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n_used > 0, 100.0 * o.sum(axis=-1) / n_used, np.nan)

    return bootstrap_ci(stat, out, used, n_boot=n_boot, alpha=alpha, seed=seed, vectorized=True)


# --------------------------------------------------------------------------------------------
# McNemar
# --------------------------------------------------------------------------------------------
def mcnemar_from_counts(b: int, c: int, exact: bool | None = None) -> dict:
    """McNemar's test from the discordant counts of a paired 2x2 table.

    b = pairs positive/correct on the first side only, c = on the second side only.
    ``exact=None`` picks the exact binomial test when ``b + c < 25`` and the chi-square test
    with continuity correction otherwise.
      - exact: statistic = min(b, c); p = min(1, 2 * P[Binom(b + c, 1/2) <= min(b, c)]).
      - chi2: statistic = max(|b - c| - 1, 0)^2 / (b + c) (Edwards' continuity correction,
        clipped at 0 so b = c gives statistic 0 and p = 1); p = P[chi2_1 >= statistic]
        = erfc(sqrt(statistic / 2)).
    Returns dict(b, c, statistic, p_value, method) with method "exact" or "chi2".
    """
    if int(b) != b or int(c) != c or b < 0 or c < 0:
        raise ValueError(f"mcnemar: counts must be non-negative integers, got b={b}, c={c}")
    b, c = int(b), int(c)
    n = b + c
    if exact is None:
        exact = n < MCNEMAR_EXACT_BELOW
    if exact:
        k = min(b, c)
        # Exact rational arithmetic: 2 * sum_{i<=k} C(n, i) / 2^n, capped at 1.
        p = Fraction(2 * sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)
        return {"b": b, "c": c, "statistic": float(k), "p_value": float(min(Fraction(1), p)),
                "method": "exact"}
    if n == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "method": "chi2"}
    stat = max(abs(b - c) - 1.0, 0.0) ** 2 / n
    return {"b": b, "c": c, "statistic": stat, "p_value": math.erfc(math.sqrt(stat / 2.0)),
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
