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
  lie in the uncertain band 0.25 < p < 0.75. On the 368 validation films the shipped
  segmenters' share has median 0.15 and 95th percentile 0.30 (the band includes the soft
  border of every mask), so about 5 % of ordinary films fire; a map that hesitates over
  a larger area is one the network does not recognise.
* ``disagreement`` -- with both conventions: Dice between the fields and anatomical masks
  below 0.70, or less than 0.80 of the fields mask inside the anatomical one. Between the
  two reference conventions on the 176 films annotated both ways the Dice is >= 0.74
  (median 0.86) and the anatomical mask contains nearly all of the fields mask, so a larger
  disagreement means at least one of the two masks is wrong.

All figures are computed in numpy on the map at any resolution (fractions are resolution
free; the component-size floor scales with the image area).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["QCThresholds", "DEFAULT_THRESHOLDS", "QC_FLAGS", "mask_qc", "qc_batch", "qc_counts"]

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


DEFAULT_THRESHOLDS = QCThresholds()
_EIGHT = np.ones((3, 3), bool)


def _prob(p: Any, name: str) -> np.ndarray:
    a = np.asarray(p, np.float32)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a [H, W] probability map, got shape {a.shape}")
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ValueError(f"{name}: probabilities must be finite and in [0, 1]")
    return a


def mask_qc(prob: Any, other: Any | None = None, *, thresholds: QCThresholds = DEFAULT_THRESHOLDS,
            other_is: str = "anatomical") -> dict[str, Any]:
    """QC of one lung probability map ``prob [H, W]``.

    ``other``: the other convention's map of the same film ``[H', W']`` (resized to
    ``prob``'s shape when it differs), ``other_is`` which convention it is
    (``"anatomical"`` when ``prob`` is the fields map, ``"fields"`` otherwise).

    Returns ``{"lung_frac", "n_large_components", "uncertain_frac", "convention_dice"
    (NaN without ``other``), "fields_inside" (NaN without), "flags": [names of the
    :data:`QC_FLAGS` that fire], "flagged": bool}``.
    """
    t = thresholds
    p = _prob(prob, "prob")
    m = p >= 0.5
    frac = float(m.mean())
    labels, n = ndimage.label(m, structure=_EIGHT)
    sizes = np.bincount(labels.ravel())[1:] if n else np.zeros(0, np.int64)
    n_large = int((sizes >= t.min_component * m.size).sum())
    lungish = p > t.lungish
    lo, hi = t.uncertain_band
    unc = float(((p > lo) & (p < hi)).sum() / max(int(lungish.sum()), 1))
    flags = []
    if not t.min_fraction <= frac <= t.max_fraction:
        flags.append("fraction")
    if n_large != t.n_components:
        flags.append("components")
    if unc > t.max_uncertain:
        flags.append("confidence")
    cdice = inside = float("nan")
    if other is not None:
        if other_is not in ("anatomical", "fields"):
            raise ValueError(f"other_is must be 'anatomical' or 'fields', got {other_is!r}")
        o = _prob(other, "other")
        if o.shape != p.shape:
            from covidmt_jax.lungs import _resize
            o = np.clip(_resize(o, p.shape), 0.0, 1.0)
        om = o >= 0.5
        fields, anat = (m, om) if other_is == "anatomical" else (om, m)
        total = int(fields.sum() + anat.sum())
        cdice = float(2 * (fields & anat).sum() / total) if total else 1.0
        inside = float((fields & anat).sum() / fields.sum()) if fields.any() else 1.0
        if cdice < t.min_convention_dice or inside < t.min_fields_inside:
            flags.append("disagreement")
    return {"lung_frac": frac, "n_large_components": n_large, "uncertain_frac": unc,
            "convention_dice": cdice, "fields_inside": inside, "flags": flags, "flagged": bool(flags)}


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
