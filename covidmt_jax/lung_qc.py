"""Per-image quality checks of predicted lung masks (an implausible mask makes IOL meaningless).

For one probability map ``p [H, W]`` (and optionally the other convention's map of the
same film) :func:`mask_qc` returns the figures and flags below; a film is ``flagged`` when
any flag fires. Defaults (:data:`DEFAULT_THRESHOLDS`) and where they come from (the
validation splits of :mod:`covidmt_jax.data.splits`; figures in the README's model cards):

* ``fraction`` -- lung fraction ``mean(p >= 0.5)`` outside ``[0.05, 0.62]``. The reference
  masks of all validation films lie in 0.05-0.62 (smallest: QU-Ex paediatric whole-trunk
  films, ~0.05; largest: tightly cropped AP films under the anatomical convention, 0.61).
* ``components`` -- the mask does not consist of exactly two large connected components
  (each >= 0.5 % of the image, 8-connectivity); every reference mask of every set has
  exactly two such components (the sets' PROVENANCE QC).
* ``confidence`` -- low confidence: more than 0.30 of the "lung-ish" pixels (p > 0.1)
  lie in the uncertain band 0.25 < p < 0.75. The threshold is the 95th percentile of this
  share on the 368 validation films under an earlier, 100-step fine-tune of the lung heads
  (median 0.15; the band includes the soft border of every mask). Under the shipped heads
  the share is lower (fields: median 0.05, 95th percentile 0.12; anatomical: 0.08, 0.17), so
  the flag fires on 0 (fields) and 1 (anatomical) of those films: a map that hesitates over
  a larger area is one the network does not recognise.
* ``disagreement`` -- with both conventions: Dice between the fields and anatomical masks
  below 0.70, or less than 0.80 of the fields mask inside the anatomical one. Between the
  two reference conventions on the 176 films annotated both ways the Dice is >= 0.74
  (median 0.86) and the anatomical mask contains nearly all of the fields mask, so a larger
  disagreement means at least one of the two masks is wrong.

All figures are computed on the map at any resolution (fractions are resolution free; the
component-size floor scales with the image area). They are made of integer pixel counts
(:func:`map_counts`, :func:`convention_counts`; numpy or ``jax.numpy``) and the number of large
components (:func:`large_components`, scipy on the host); :func:`qc_flags` is the one place the
thresholds are applied. The scoring job (:mod:`covidmt_jax.scoring.step`) counts on the device
and gets the same result as :func:`mask_qc` on the same map.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["QCThresholds", "DEFAULT_THRESHOLDS", "QC_FLAGS", "mask_qc", "qc_batch", "qc_counts",
           "map_counts", "convention_counts", "figures_from_counts", "large_components",
           "qc_flags", "qc_result", "flags_text", "parse_flags"]

QC_FLAGS = ("fraction", "components", "confidence", "disagreement")


@dataclasses.dataclass(frozen=True)
class QCThresholds:
    """Thresholds of :func:`mask_qc` (see the module docstring for their justification)."""
    min_fraction: float = 0.05
    max_fraction: float = 0.62
    min_component: float = 0.005
    n_components: int = 2
    uncertain_band: tuple[float, float] = (0.25, 0.75)
    lungish: float = 0.1
    max_uncertain: float = 0.30
    min_convention_dice: float = 0.70
    min_fields_inside: float = 0.80

    def __post_init__(self):
        if not 0 <= self.min_fraction < self.max_fraction <= 1:
            raise ValueError(f"need 0 <= min_fraction < max_fraction <= 1, got {self.min_fraction}, {self.max_fraction}")
        lo, hi = self.uncertain_band
        if not 0 < lo < 0.5 < hi < 1:
            raise ValueError(f"uncertain_band must satisfy 0 < lo < 0.5 < hi < 1, got {self.uncertain_band}")
        for name in ("min_component", "lungish", "max_uncertain", "min_convention_dice", "min_fields_inside"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if int(self.n_components) != self.n_components or self.n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {self.n_components}")


DEFAULT_THRESHOLDS = QCThresholds()
_EIGHT = np.ones((3, 3), bool)


def _prob(p: Any, name: str) -> np.ndarray:
    a = np.asarray(p, np.float32)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a [H, W] probability map, got shape {a.shape}")
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ValueError(f"{name}: probabilities must be finite and in [0, 1]")
    return a


def map_counts(prob: Any, thresholds: QCThresholds = DEFAULT_THRESHOLDS, *, xp: Any = np
               ) -> dict[str, Any]:
    """Pixel counts of probability map(s) ``prob [..., H, W]`` (float32) that the figures of
    :func:`mask_qc` are made of: ``{"lung": p >= 0.5, "uncertain": lo < p < hi (the uncertain
    band), "lungish": p > lungish}``, each ``[...]`` int32.

    ``xp``: the array module (``numpy``, or ``jax.numpy`` inside a jitted step); the counts are
    integers, so both give the same figures (:func:`figures_from_counts`)."""
    lo, hi = thresholds.uncertain_band
    dt = prob.dtype
    count = lambda m: xp.sum(m, axis=(-2, -1), dtype=xp.int32)  # noqa: E731
    return {"lung": count(prob >= xp.asarray(0.5, dt)),
            "uncertain": count((prob > xp.asarray(lo, dt)) & (prob < xp.asarray(hi, dt))),
            "lungish": count(prob > xp.asarray(thresholds.lungish, dt))}


def convention_counts(fields: Any, anatomical: Any, *, xp: Any = np) -> dict[str, Any]:
    """Pixel counts of two boolean lung masks ``[..., H, W]`` of one film under the fields and
    the anatomical convention: ``{"fields", "anatomical", "both"}`` (``[...]`` int32)."""
    count = lambda m: xp.sum(m, axis=(-2, -1), dtype=xp.int32)  # noqa: E731
    return {"fields": count(fields), "anatomical": count(anatomical),
            "both": count(fields & anatomical)}


def figures_from_counts(counts: Mapping[str, Any], size: int,
                        conventions: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Resolution-free figures of ONE map from its :func:`map_counts` (``size`` = H * W pixels)
    and, optionally, its :func:`convention_counts`: ``{"lung_frac", "uncertain_frac",
    "convention_dice", "fields_inside"}`` (the last two NaN without ``conventions``; an empty
    fields mask is inside, two empty masks agree: both 1.0)."""
    out = {"lung_frac": int(counts["lung"]) / size,
           "uncertain_frac": int(counts["uncertain"]) / max(int(counts["lungish"]), 1),
           "convention_dice": float("nan"), "fields_inside": float("nan")}
    if conventions is not None:
        f, a, both = (int(conventions[k]) for k in ("fields", "anatomical", "both"))
        out["convention_dice"] = 2 * both / (f + a) if f + a else 1.0
        out["fields_inside"] = both / f if f else 1.0
    return out


def large_components(mask: Any, thresholds: QCThresholds = DEFAULT_THRESHOLDS) -> int:
    """Connected components (8-connectivity) of a boolean mask ``[H, W]`` with at least
    ``min_component`` of the image's pixels."""
    m = np.asarray(mask, bool)
    labels, n = ndimage.label(m, structure=_EIGHT)
    sizes = np.bincount(labels.ravel())[1:] if n else np.zeros(0, np.int64)
    return int((sizes >= thresholds.min_component * m.size).sum())


def qc_flags(lung_frac: float, n_large_components: int, uncertain_frac: float,
             convention_dice: float = float("nan"), fields_inside: float = float("nan"), *,
             thresholds: QCThresholds = DEFAULT_THRESHOLDS) -> list[str]:
    """THE flag decision: the names of the :data:`QC_FLAGS` that fire for one map's figures
    (``disagreement`` only when the convention figures are given, i.e. not NaN)."""
    t = thresholds
    flags = []
    if not t.min_fraction <= lung_frac <= t.max_fraction:
        flags.append("fraction")
    if n_large_components != t.n_components:
        flags.append("components")
    if uncertain_frac > t.max_uncertain:
        flags.append("confidence")
    if not (math.isnan(convention_dice) and math.isnan(fields_inside)):
        if convention_dice < t.min_convention_dice or fields_inside < t.min_fields_inside:
            flags.append("disagreement")
    return flags


def qc_result(counts: Mapping[str, Any], size: int, n_large_components: int,
              conventions: Mapping[str, Any] | None = None, *,
              thresholds: QCThresholds = DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """The :func:`mask_qc` result of one map from its counts (:func:`map_counts`,
    :func:`convention_counts`) and its :func:`large_components` (the scoring step computes the
    counts on the device and the components on the host)."""
    fig = figures_from_counts(counts, size, conventions)
    flags = qc_flags(fig["lung_frac"], n_large_components, fig["uncertain_frac"],
                     fig["convention_dice"], fig["fields_inside"], thresholds=thresholds)
    return {"lung_frac": fig["lung_frac"], "n_large_components": int(n_large_components),
            "uncertain_frac": fig["uncertain_frac"], "convention_dice": fig["convention_dice"],
            "fields_inside": fig["fields_inside"], "flags": flags, "flagged": bool(flags)}


def mask_qc(prob: Any, other: Any | None = None, *, thresholds: QCThresholds = DEFAULT_THRESHOLDS,
            other_is: str = "anatomical") -> dict[str, Any]:
    """QC of one lung probability map ``prob [H, W]``.

    ``other``: the other convention's map of the same film ``[H', W']`` (resized to
    ``prob``'s shape when it differs), ``other_is`` which convention it is
    (``"anatomical"`` when ``prob`` is the fields map, ``"fields"`` otherwise).

    Returns ``{"lung_frac", "n_large_components", "uncertain_frac", "convention_dice"
    (NaN without ``other``), "fields_inside" (NaN without), "flags": [names of the
    :data:`QC_FLAGS` that fire], "flagged": bool}`` (:func:`qc_result`).
    """
    p = _prob(prob, "prob")
    m = p >= 0.5
    conv = None
    if other is not None:
        if other_is not in ("anatomical", "fields"):
            raise ValueError(f"other_is must be 'anatomical' or 'fields', got {other_is!r}")
        o = _prob(other, "other")
        if o.shape != p.shape:
            from covidmt_jax.lungs import _resize
            o = np.clip(_resize(o, p.shape), 0.0, 1.0)
        om = o >= 0.5
        fields, anat = (m, om) if other_is == "anatomical" else (om, m)
        conv = convention_counts(fields, anat)
    return qc_result(map_counts(p, thresholds), m.size, large_components(m, thresholds), conv,
                     thresholds=thresholds)


def flags_text(flags: Sequence[str]) -> str:
    """A result's flags as one row cell: ``";"``-joined names, ``""`` when clean."""
    return ";".join(flags)


def parse_flags(text: str) -> list[str]:
    """The flags of a row cell (:func:`flags_text`); raises on an unknown name."""
    flags = [f for f in str(text or "").split(";") if f]
    bad = [f for f in flags if f not in QC_FLAGS]
    if bad:
        raise ValueError(f"unknown lung QC flag(s) {bad}; known: {list(QC_FLAGS)}")
    return flags


def qc_batch(probs: Sequence[Any], others: Sequence[Any] | None = None, *,
             thresholds: QCThresholds = DEFAULT_THRESHOLDS, other_is: str = "anatomical") -> list[dict]:
    """:func:`mask_qc` of each map (``others`` aligned with ``probs`` when given)."""
    if others is not None and len(others) != len(probs):
        raise ValueError(f"qc_batch: {len(probs)} maps but {len(others)} other-convention maps")
    return [mask_qc(p, None if others is None else others[i], thresholds=thresholds, other_is=other_is)
            for i, p in enumerate(probs)]


def qc_counts(results: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``{"n", "flagged", <flag>: count}`` over :func:`mask_qc` results (summary.json)."""
    out = {"n": len(results), "flagged": sum(bool(r["flagged"]) for r in results)}
    out.update({f: sum(f in r["flags"] for r in results) for f in QC_FLAGS})
    return out
