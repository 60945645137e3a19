"""Lung-mask sets (for the U-Net that defines L(x) in IOL).

Layouts (``layout="auto"`` picks the first that fits):

* ``"montgomery"`` — NLM Montgomery County's own release: ``CXR_png/NAME.png`` with
  ``ManualMask/leftMask/NAME.png`` and ``ManualMask/rightMask/NAME.png``; the lung mask is
  the union of the two (built when the record is read, returned as PNG bytes).
* ``"images_masks"`` — an image folder (``images/``, ``CXR_png/``, ``imgs/``, ``image/``,
  ``img/``) and a mask folder (``masks/``, ``mask/``); a mask is ``NAME.<ext>`` or
  ``NAME_mask.<ext>`` / ``NAME-mask.<ext>`` (Shenzhen / Kaggle naming). This is the layout
  of ``../shared/data/lungs_mc_sz_512``.
* ``"flat"`` — images and ``NAME_mask.<ext>`` / ``NAME-mask.<ext>`` side by side.

Masks are grey images, lung = value > 127 (anti-aliased masks). Images without a mask are
listed in ``.unpaired`` and reported with a warning (Shenzhen masks cover 566 of 662
images); a mask without an image is a DataError (or skipped). Image and mask sizes are
checked from the file headers while building.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

from covidmt_jax.data import images as I
from covidmt_jax.data.records import DataError, Source
from covidmt_jax.data.sources import register_source
from covidmt_jax.data.sources.folder import walk_images

__all__ = ["LungMaskSource", "LungSetSource", "LAYOUTS", "CONVENTIONS", "SET_CONVENTION"]

LAYOUTS = ("auto", "montgomery", "images_masks", "flat")
_IMAGE_DIRS = ("images", "CXR_png", "imgs", "image", "img")
_MASK_DIRS = ("masks", "mask")
_MASK_SUFFIX = re.compile(r"[_-]mask$", re.IGNORECASE)
_TB = re.compile(r"^(MCUCXR|CHNCXR)_\d+_([01])$")


def _first_dir(root: Path, names) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


@register_source("lungs")
class LungMaskSource(Source):
    """Images with lung masks. See the module docstring for the layouts.

    Args:
      root: the set's folder.
      layout: one of :data:`LAYOUTS`.
      threshold: lung = mask value > threshold (8-bit scale), stored in ``meta`` for readers
        (``images.load_mask(rec["mask"], threshold=...)``).
      check_sizes: compare image and mask sizes from their headers while building.

    Record: ``{"id": image stem, "image": path, "mask": path | PNG bytes (Montgomery
    union), "meta": {"threshold", ["set", "tb"]}}``; no ``labels`` (segmentation only).
    """

    label_names: tuple[str, ...] = ()

    def __init__(self, root: str | os.PathLike, *, layout: str = "auto", threshold: float = 127,
                 check_sizes: bool = True, name: str | None = None, on_error: str = "raise"):
        super().__init__(on_error=on_error)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "lung-mask folder not found")
        self.name = name or f"lungs:{self.root.name}"
        self.threshold = threshold
        self.unpaired: list[tuple[str, str]] = []
        if layout == "auto":
            if (self.root / "ManualMask").is_dir():
                layout = "montgomery"
            elif _first_dir(self.root, _MASK_DIRS) is not None:
                layout = "images_masks"
            else:
                layout = "flat"
        self.layout = layout
        pairs = getattr(self, f"_pairs_{layout}")()
        for stem, image, mask in pairs:
            if check_sizes and not self._sizes_match(image, mask):
                continue
            meta = {"threshold": threshold}
            m = _TB.match(Path(stem).name)
            if m:
                meta.update(set=m.group(1), tb=int(m.group(2)))
            rec = {"id": stem, "image": str(image), "meta": meta}
            if isinstance(mask, tuple):
                meta["mask_parts"] = [str(p) for p in mask]
            else:
                rec["mask"] = str(mask)
            self._records.append(rec)
        if not self._records and on_error == "raise":
            raise DataError(self.root, f"no image/mask pairs found (layout {layout!r})")
        if self.unpaired:
            warnings.warn(f"{self.name}: {len(self.unpaired)} image(s) without a lung mask (see .unpaired), "
                          f"e.g. {self.unpaired[0][0]}", stacklevel=2)
        self._finish()

    # --- layouts ------------------------------------------------------------------------
    def _images(self, folder: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for rel in walk_images(folder, bad=self._bad):
            stem = rel.with_suffix("").as_posix()
            if stem in out:
                self._bad(folder / rel, f"duplicated image name: {out[stem]} has the same stem")
                continue
            out[stem] = folder / rel
        return out

    def _join(self, images: dict[str, Path], masks: dict[str, Path | tuple]) -> list:
        pairs = []
        for stem, img in images.items():
            if stem in masks:
                pairs.append((stem, img, masks[stem]))
            else:
                self.unpaired.append((str(img), "no lung mask"))
        for stem in sorted(set(masks) - set(images)):
            m = masks[stem]
            self._bad(m[0] if isinstance(m, tuple) else m, "lung mask without a matching image")
        return pairs

    def _split_masks(self, files: dict[str, Path], *, require_suffix: bool) -> tuple[dict, dict]:
        """Separate ``{stem: path}`` into (images, masks keyed by their image's stem)."""
        images, masks = {}, {}
        for stem, p in files.items():
            base = _MASK_SUFFIX.sub("", stem)
            if base != stem:
                if base in masks:
                    self._bad(p, f"duplicated lung mask: {masks[base]} is also the mask of {base!r}")
                    continue
                masks[base] = p
            elif require_suffix:
                images[stem] = p
            else:
                if stem in masks:
                    self._bad(p, f"duplicated lung mask: {masks[stem]} is also the mask of {stem!r}")
                    continue
                masks[stem] = p
        return images, masks

    def _pairs_montgomery(self) -> list:
        img_dir = _first_dir(self.root, _IMAGE_DIRS)
        if img_dir is None:
            raise DataError(self.root, f"Montgomery layout needs an image folder ({', '.join(_IMAGE_DIRS)})")
        left_dir, right_dir = self.root / "ManualMask" / "leftMask", self.root / "ManualMask" / "rightMask"
        for d in (left_dir, right_dir):
            if not d.is_dir():
                raise DataError(d, "Montgomery mask folder not found")
        left, right = self._images(left_dir), self._images(right_dir)
        for stem in sorted(set(left) ^ set(right)):
            p = left.get(stem) or right.get(stem)
            self._bad(p, "left and right lung masks must come together (the other one is missing)")
        masks = {s: (left[s], right[s]) for s in sorted(set(left) & set(right))}
        return self._join(self._images(img_dir), masks)

    def _pairs_images_masks(self) -> list:
        img_dir = _first_dir(self.root, _IMAGE_DIRS)
        mask_dir = _first_dir(self.root, _MASK_DIRS)
        if img_dir is None or mask_dir is None:
            raise DataError(self.root, f"images/masks layout needs an image folder ({', '.join(_IMAGE_DIRS)}) "
                                       f"and a mask folder ({', '.join(_MASK_DIRS)})")
        _, masks = self._split_masks(self._images(mask_dir), require_suffix=False)
        return self._join(self._images(img_dir), masks)

    def _pairs_flat(self) -> list:
        images, masks = self._split_masks(self._images(self.root), require_suffix=True)
        return self._join(images, masks)

    def _sizes_match(self, image: Path, mask) -> bool:
        size = I.image_size(image)
        for m in mask if isinstance(mask, tuple) else (mask,):
            ms = I.image_size(m)
            if ms != size:
                self._bad(m, f"mask size {ms[1]}x{ms[0]} differs from image {image} ({size[1]}x{size[0]})")
                return False
        return True

    # --- records ------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        rec = super().__getitem__(i)
        parts = rec["meta"].get("mask_parts")
        if parts is not None and "mask" not in rec:
            union = np.zeros(I.image_size(parts[0]), bool)
            for p in parts:
                union |= I.load_mask(p, threshold=self.threshold)
            rec["mask"] = I.encode_png(union)
        return rec


# --------------------------------------------------------------------------------------------
# the real lung sets with their convention, film type and split
# --------------------------------------------------------------------------------------------
#: Mask convention of each known set: "fields" = visible lung fields (heart and mediastinum
#: excluded: Montgomery, Shenzhen, COVID-QU-Ex); "anatomical" = both lungs including the
#: retrocardiac lung down to the posterior recesses (V7 Labs).
CONVENTIONS = ("fields", "anatomical")
SET_CONVENTION = {
    "lungs_mc_sz_512": "fields",
    "v7_covid_anatomical": "anatomical",
    "quex_covid_fields": "fields",
    "quex_pneumonia_normal_fields": "fields",
}
#: Lung fraction below which a COVID-QU-Ex pneumonia/normal film is counted as (probably)
#: paediatric: its PROVENANCE reports that films with fraction < 0.15 are mostly children's
#: whole-trunk films; the set does not record each film's origin, so this is a proxy.
PAEDIATRIC_FRACTION = 0.15


def _film_type(set_name: str, row: dict, meta: dict) -> str:
    if set_name == "lungs_mc_sz_512":
        return "tb" if meta.get("tb") == 1 else "normal"
    finding = (row.get("finding") or row.get("class") or "").lower()
    if "covid" in finding and "non-covid" not in finding:
        return "covid"
    if finding in ("non-covid", "pneumonia"):
        return "pneumonia"
    if finding in ("normal", "no finding"):
        return "normal"
    raise DataError(set_name, f"film {row.get('stem')!r}: unknown finding/class {finding!r}")


@register_source("lung_set")
class LungSetSource(LungMaskSource):
    """One of the real lung-mask sets (``lungs_mc_sz_512`` or a ``lungs_diseased/`` folder),
    with the patient-disjoint split of :mod:`covidmt_jax.data.splits`.

    Args:
      root: the set folder; its name selects the convention and split rule.
      split: ``"train" | "val" | "test"`` keeps that split only; ``None`` keeps all.

    Record meta, besides :class:`LungMaskSource`'s: ``source`` (folder name),
    ``convention`` ("fields" | "anatomical"), ``film_type`` ("covid" | "pneumonia" |
    "normal" | "tb"), ``view`` ("PA" | "AP" | "AP Supine" | ""), ``portable`` (AP or AP
    supine by the ieee8023 metadata), ``paediatric`` (QU-Ex pneumonia/normal films with lung
    fraction < :data:`PAEDIATRIC_FRACTION`; a proxy, see there), ``patient_id`` (the split
    group) and ``split``.
    """

    def __init__(self, root: str | os.PathLike, *, split: str | None = None, **kwargs):
        from covidmt_jax.data import splits as S
        set_name = S.source_of_folder(root)
        if split is not None and split not in S.SPLITS:
            raise ValueError(f"split must be one of {S.SPLITS} or None, got {split!r}")
        kwargs.setdefault("name", f"{set_name}[{split or 'all'}]")
        super().__init__(root, layout="images_masks", **kwargs)
        groups = S.read_groups(root)
        film_split = S.folder_splits(root)
        rows: dict[str, dict] = {}
        if (self.root / "pairs.csv").is_file():
            import csv
            with open(self.root / "pairs.csv", newline="") as f:
                rows = {r["stem"]: r for r in csv.DictReader(f)}
        kept = []
        for rec in self._records:
            stem = rec["id"]
            if stem not in groups:
                raise DataError(self.root / "pairs.csv", f"no row for film {stem!r}")
            row, meta = rows.get(stem, {"stem": stem}), rec["meta"]
            view = row.get("view", "") or ""
            frac = row.get("frac")
            meta.update(source=set_name, convention=SET_CONVENTION[set_name],
                        film_type=_film_type(set_name, row, meta), view=view,
                        portable=view.upper().startswith("AP"),
                        paediatric=bool(set_name == "quex_pneumonia_normal_fields" and frac
                                        and float(frac) < PAEDIATRIC_FRACTION),
                        patient_id=groups[stem], split=film_split[stem])
            if split is None or film_split[stem] == split:
                kept.append(rec)
        self._records = kept
        self._finish()
