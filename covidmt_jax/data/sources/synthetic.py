"""Synthetic sources: phantoms (:mod:`covidmt_jax.data.synthetic`) exposed as the three task
datasets, a lung-mask set and a pair set, so pipelines, trainer and scorer run with no
downloads.

Every record is computed on access from ``(seed, kind, split, index)``: random access is
deterministic (grain can read any index in any worker) and nothing is held in memory.
Images and masks are PNG-encoded bytes, so the pipeline decodes them through the same
:func:`~covidmt_jax.data.images.open_image` path as files (8-bit by default, ``bits=16``
for 16-bit PNGs).

==================== ============================ =============================================
registered name      class                        record
==================== ============================ =============================================
``synthetic_covidx`` :class:`SyntheticCOVIDx`     ``id, image, labels [1] ("COVID-19"), meta``
``synthetic_nih``    :class:`SyntheticNIH`        ``id, image, labels [5], meta``
``synthetic_rsna``   :class:`SyntheticRSNA`       ``id, image, labels [1], boxes [N, 4], meta``
``synthetic_lungs``  :class:`SyntheticLungs`      ``id, image, mask, meta``
``synthetic_pairs``  :class:`SyntheticPairs`      ``id, original, transmitted, labels [1], meta``
==================== ============================ =============================================

``meta`` holds ``{"source", "split", "index", "seed", "findings", "cue", "cue_on"}``.
``with_mask=True`` adds the exact lung mask (``"mask"``, PNG bytes) to any record.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from covidmt_jax.data import images, synthetic
from covidmt_jax.data.records import Source
from covidmt_jax.data.sources import register_source

__all__ = ["SyntheticSource", "SyntheticCOVIDx", "SyntheticNIH", "SyntheticRSNA", "SyntheticLungs",
           "SyntheticPairs"]


def _phantom_key(label: str) -> str:
    """Phantom label name for a (case-insensitive) target column name."""
    for name in synthetic.LABEL_NAMES:
        if name.lower() == label.lower():
            return name
    if label.lower() == "positive":
        return "COVID-19"
    raise ValueError(f"synthetic phantoms have no label {label!r}; known: {synthetic.LABEL_NAMES}")


class SyntheticSource(Source):
    """Base of the phantom sources: ``n`` records, each rendered on access.

    Args:
      n: number of records.
      size: phantom size (``H = W = size`` or ``(H, W)``).
      seed: dataset seed; ``split``: a name mixed into the seed (``"train"``, ``"val"``,
        ``"test"`` give disjoint, reproducible streams).
      shortcut_strength: None (no cue) or the probability in [0, 1] that the out-of-lung cue
        agrees with ``shortcut_label`` (default: the dataset's main label), see
        :class:`~covidmt_jax.data.synthetic.Shortcut`; ``shortcut_kind`` in
        :data:`~covidmt_jax.data.synthetic.CUE_KINDS`.
      positive_fraction, prevalence, finding_strength: see
        :func:`~covidmt_jax.data.synthetic.sample_findings` / ``render_phantom``.
      label_names: target columns (case-insensitive phantom label names).
      bits: 8 or 16 (PNG bit depth of images).
      with_mask: also put the exact lung mask in each record (``"mask"``).
    """

    kind = "covidx"
    default_labels: tuple[str, ...] = ()

    def __init__(self, n: int = 1000, *, size: int | tuple[int, int] = 256, seed: int = 0, split: str = "train",
                 shortcut_strength: float | None = None, shortcut_kind: str = "marker",
                 shortcut_label: str | None = None, positive_fraction: float | None = None,
                 prevalence: float = 0.25, finding_strength: float = 1.0,
                 label_names: Sequence[str] | None = None, bits: int = 8, with_mask: bool = False,
                 name: str | None = None):
        super().__init__(on_error="raise")
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if bits not in (8, 16):
            raise ValueError(f"bits must be 8 or 16, got {bits!r}")
        self.n, self.size, self.seed, self.split = int(n), size, int(seed), str(split)
        self.bits, self.with_mask = bits, with_mask
        self.label_names = tuple(label_names) if label_names is not None else self.default_labels
        self._keys = tuple(_phantom_key(l) for l in self.label_names)
        if shortcut_label is not None:
            shortcut_label = _phantom_key(shortcut_label)
        self.options = dict(size=size, seed=self.seed, split=self.split, shortcut_strength=shortcut_strength,
                            shortcut_kind=shortcut_kind, shortcut_label=shortcut_label,
                            positive_fraction=positive_fraction, prevalence=prevalence,
                            finding_strength=finding_strength)
        self.name = name or f"synthetic_{self.kind}:{self.split}"
        if self.n:  # validate the options once (raises ValueError on a bad combination)
            self.phantom(0)

    # --- sequence protocol (records are computed, not stored) -----------------------------
    def __len__(self) -> int:
        return self.n

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"{self.name}: index {i} out of range for {self.n} records")
        return i

    @property
    def ids(self) -> list[str]:
        return [self._id(i) for i in range(self.n)]

    def _id(self, i: int) -> str:
        return f"{self.kind}-{self.split}-{i:07d}"

    def phantom(self, i: int) -> synthetic.Phantom:
        """The phantom behind record ``i`` (arrays, masks, boxes, cue)."""
        return synthetic.phantom_for(self.kind, self._index(i), **self.options)

    def _encode(self, x: np.ndarray) -> bytes:
        return images.encode_png(x, bits=self.bits)

    def _meta(self, i: int, p: synthetic.Phantom) -> dict:
        return {"source": self.name, "split": self.split, "index": i, "seed": self.seed,
                "findings": p.meta["findings"], "cue": p.meta["cue"], "cue_on": p.meta["cue_on"]}

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        p = self.phantom(i)
        rec = {"id": self._id(i), "image": self._encode(p.image), "meta": self._meta(i, p)}
        if self.label_names:
            rec["labels"] = np.array([p.labels[k] for k in self._keys], np.float32)
        if self.with_mask:
            rec["mask"] = images.encode_png(p.lung_mask)
        return rec


@register_source("synthetic_covidx")
class SyntheticCOVIDx(SyntheticSource):
    """COVIDx-like phantoms: COVID-19 positives (bilateral peripheral ground glass) and
    negatives (normal, or non-COVID pneumonia with probability 0.3). ``label_names``
    default ``("COVID-19",)``; ``positive_fraction`` default 0.5."""

    kind = "covidx"
    default_labels = ("COVID-19",)


@register_source("synthetic_nih")
class SyntheticNIH(SyntheticSource):
    """NIH-like phantoms: Infiltration / Effusion / Atelectasis / Nodule, each present with
    probability ``prevalence`` (0.25), ``Normal`` when none; multi-hot in that order."""

    kind = "nih"
    default_labels = ("Infiltration", "Effusion", "Atelectasis", "Nodule", "Normal")


@register_source("synthetic_rsna")
class SyntheticRSNA(SyntheticSource):
    """RSNA-like phantoms: pneumonia (focal consolidations) with probability
    ``positive_fraction`` (0.3) and one box per opacity (``boxes`` float32 [N, 4], xyxy in
    [0, 1]; N = 0 for negatives). ``label_names`` default ``("pneumonia",)`` as the RSNA
    source."""

    kind = "rsna"
    default_labels = ("pneumonia",)

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        rec = super().__getitem__(i)
        rec["boxes"] = self.phantom(i).boxes.copy()
        return rec


@register_source("synthetic_lungs")
class SyntheticLungs(SyntheticSource):
    """Lung-mask phantoms: ``image`` and ``mask`` (8-bit PNG, lung = 255) of the exact lung
    fields; some phantoms carry NIH-type findings (10 % each) for variety. No labels."""

    kind = "lungs"
    default_labels = ()

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        p = self.phantom(i)
        return {"id": self._id(i), "image": self._encode(p.image), "mask": images.encode_png(p.lung_mask),
                "meta": {**self._meta(i, p), "threshold": 127}}


@register_source("synthetic_pairs")
class SyntheticPairs(SyntheticSource):
    """(original, transmitted) pairs of COVIDx-like phantoms, the transmitted side made by a
    messaging channel (:mod:`covidmt_jax.channels`) from the original PNG bytes.

    Args (besides :class:`SyntheticSource`'s; ``split`` defaults to ``"test"``):
      channel: a preset name (``"whatsapp"``, ``"telegram"``, ``"jpeg75"`` ...) or a
        :class:`~covidmt_jax.channels.Channel`.
      quality: overrides the preset's JPEG quality.

    Record: ``{"id", "original": PNG bytes, "transmitted": JPEG bytes, "labels": float32 [1],
    ["mask"], "meta": {..., "channel"}}`` (the pair-record schema of WaCXR).
    """

    kind = "covidx"
    default_labels = ("COVID-19",)

    def __init__(self, n: int = 1000, *, channel="whatsapp", quality: int | None = None,
                 split: str = "test", **kwargs):
        from covidmt_jax import channels

        if isinstance(channel, channels.Channel):
            self.channel = channel if quality is None else dataclasses.replace(channel, quality=quality)
        else:
            self.channel = channels.get_channel(str(channel), quality=quality)
        kwargs.setdefault("name", f"synthetic_pairs:{self.channel.name}:{split}")
        super().__init__(n, split=split, **kwargs)

    def __getitem__(self, i: int) -> dict:
        rec = super().__getitem__(i)
        original = rec.pop("image")
        rec["original"] = original
        rec["transmitted"] = self.channel.transmit(original, name=rec["id"])
        rec["meta"]["channel"] = self.channel.describe()
        return rec
