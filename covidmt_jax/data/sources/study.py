"""The real-film study's labelled sets, on the patient-disjoint splits of :mod:`covidmt_jax.data.splits`.

Both sources read the real lung-mask sets through
:class:`~covidmt_jax.data.sources.lungs.LungSetSource` (one split rule for the study, the lung
segmenters and their model cards), so a test film of the study is a test film everywhere.
``root`` is the data root that holds ``lungs_diseased/`` and ``lungs_mc_sz_512/`` (e.g.
``../shared/data``).

* ``study_covid`` — COVID-19 vs non-COVID films, label ``covid`` (1 = COVID-19). COVID films:
  ``v7_covid_anatomical`` and ``quex_covid_fields``; the two folders hold largely the same
  ieee8023 films; a film in both (same ieee8023 file name) counts once (``dedupe=True``), as
  its ``quex_covid_fields`` copy by default (``prefer``): visible-field mask and 256 x 256
  format like the non-COVID films, so neither mask convention nor image format separates the
  classes on those films (the other V7 films keep their anatomical masks). Non-COVID
  films: ``quex_pneumonia_normal_fields`` (non-COVID pneumonia and normal, adults and
  children). A film whose own finding contradicts its folder's class (one
  ``quex_covid_fields`` film is "No Finding" in the ieee8023 metadata) is left out and listed
  in ``.excluded``. Every film has a lung mask (``record["mask"]``): anatomical for the V7 films,
  visible fields for the others (``meta["convention"]``).
* ``study_tb`` — Montgomery/Shenzhen, label ``tb`` (1 = tuberculosis), with their
  visible-field lung masks; with ``boxes=True`` also the boxes of the two lungs
  (:func:`lung_boxes`), the targets of the study's lung-box auxiliary task.

Record: ``{"id": "<set>/<stem>", "image": path, "mask": path, "labels": float32 [1],
"meta": {"source", "convention", "film_type", "view", "portable", "paediatric", "patient_id",
"split", "threshold"}}``. ``meta["patient_id"]`` is the split group, the same for a patient
in both COVID folders.

``max_per_class`` keeps the first N films of each class in a fixed pseudo-random order (a hash
of the record id): small, reproducible subsets for tests and reduced runs.
"""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from covidmt_jax.data import splits as S
from covidmt_jax.data.records import DataError, Source
from covidmt_jax.data.sources import register_source
from covidmt_jax.data.sources.lungs import LungSetSource

__all__ = ["COVID_SETS", "NON_COVID_SETS", "TB_SET", "StudyCovidSource", "StudyTBSource", "hash_order", "lung_boxes"]

COVID_SETS = ("v7_covid_anatomical", "quex_covid_fields")
NON_COVID_SETS = ("quex_pneumonia_normal_fields",)
TB_SET = "lungs_mc_sz_512"


def hash_order(ids: Sequence[str], seed: str = "covidmt-study") -> list[int]:
    """Indices of ``ids`` in a fixed pseudo-random order (sha256 of ``seed:id``)."""
    keys = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in ids]
    return sorted(range(len(ids)), key=lambda k: keys[k])


def _folder(root: Path, name: str) -> Path:
    found = S.set_folders(root)
    if name not in found:
        raise DataError(root, f"set {name!r} not found under the data root (looked for {name}/ and "
                              f"lungs_diseased/{name}/)")
    return found[name]


def _ieee_names(folder: Path) -> dict[str, str]:
    """``{stem: ieee8023 file name}`` of an ieee8023-based folder (empty names dropped)."""
    path = folder / "pairs.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "ieee8023_filename" not in rows[0]:
        raise DataError(path, "needs the column 'ieee8023_filename' to find duplicate films")
    return {r["stem"]: r["ieee8023_filename"] for r in rows if r.get("ieee8023_filename")}


class _StudySet(Source):
    """Records of several lung sets with one binary label (see the module docstring)."""

    def _collect(self, root: Path, sets: Sequence[str], split: str | None,
                 label: Callable[[dict], float], keep: Callable[[str, dict], bool],
                 max_per_class: int, on_error: str) -> None:
        recs = []
        for name in sets:
            src = LungSetSource(_folder(root, name), split=split, on_error=on_error)
            self.skipped.extend(src.skipped)
            for i in range(len(src)):
                rec = src[i]
                if not keep(name, rec):
                    continue
                stem = rec["id"]
                recs.append({"id": f"{name}/{stem}", "image": rec["image"], "mask": rec["mask"],
                             "labels": np.array([label(rec["meta"])], np.float32),
                             "meta": {**rec["meta"], "stem": stem}})
        if max_per_class >= 0:
            order = hash_order([r["id"] for r in recs])
            counts: dict[float, int] = {}
            kept = []
            for k in order:
                y = float(recs[k]["labels"][0])
                if counts.get(y, 0) < max_per_class:
                    counts[y] = counts.get(y, 0) + 1
                    kept.append(k)
            recs = [recs[k] for k in sorted(kept)]
        self._records = recs
        if not recs and on_error == "raise":
            raise DataError(root, f"{self.name}: no films")
        self._finish()


@register_source("study_covid")
class StudyCovidSource(_StudySet):
    """COVID-19 (1) vs non-COVID (0) films with lung masks (see the module docstring).

    Args:
      root: data root holding ``lungs_diseased/``.
      split: ``"train" | "val" | "test"`` or None (all).
      covid_sets / non_covid_sets: folder names of each class.
      dedupe: keep one copy of a film held by both COVID folders (same ieee8023 file name).
      prefer: the folder whose copy is kept (default ``quex_covid_fields``: visible-field
        masks and 256 x 256 squashed films, the convention and format of the non-COVID films).
      max_per_class: keep at most N films per class (-1 = all).
    """

    label_names = ("covid",)

    def __init__(self, root: str | os.PathLike, *, split: str | None = None,
                 covid_sets: Sequence[str] = COVID_SETS, non_covid_sets: Sequence[str] = NON_COVID_SETS,
                 dedupe: bool = True, prefer: str = "quex_covid_fields", max_per_class: int = -1,
                 on_error: str = "raise"):
        super().__init__(on_error=on_error)
        root = Path(root)
        self.name = f"study_covid[{split or 'all'}]"
        covid_sets, non_covid_sets = tuple(covid_sets), tuple(non_covid_sets)
        if set(covid_sets) & set(non_covid_sets):
            raise ValueError(f"study_covid: a set cannot be both COVID and non-COVID: "
                             f"{sorted(set(covid_sets) & set(non_covid_sets))}")
        dup: set[str] = set()  # ids "<set>/<stem>" left out as copies of a film of the other folder
        if dedupe and {"v7_covid_anatomical", "quex_covid_fields"} <= set(covid_sets):
            if prefer not in ("v7_covid_anatomical", "quex_covid_fields"):
                raise ValueError(f"study_covid: prefer must be 'v7_covid_anatomical' or "
                                 f"'quex_covid_fields', got {prefer!r}")
            names = {n: _ieee_names(_folder(root, n)) for n in ("v7_covid_anatomical", "quex_covid_fields")}
            other = "v7_covid_anatomical" if prefer == "quex_covid_fields" else "quex_covid_fields"
            preferred = set(names[prefer].values())
            dup = {f"{other}/{s}" for s, n in names[other].items() if n in preferred}
        self.n_duplicates = len(dup)

        self.excluded: list[tuple[str, str]] = []

        def keep(name: str, rec: dict) -> bool:
            film = rec["meta"]["film_type"]
            if (name in covid_sets) != (film == "covid"):
                # e.g. one quex_covid_fields film whose ieee8023 finding is "No Finding"
                self.excluded.append((str(rec["image"]), f"{name} film with finding {film!r}"))
                return False
            return f"{name}/{rec['id']}" not in dup

        self._collect(root, covid_sets + non_covid_sets, split,
                      lambda meta: float(meta["film_type"] == "covid"), keep, int(max_per_class), on_error)


def lung_boxes(mask: np.ndarray, *, min_area: float = 0.01, max_boxes: int = 2) -> np.ndarray:
    """Bounding boxes of the lungs in a mask: float32 ``[N, 4]`` normalised xyxy (0..1) of the
    ``max_boxes`` largest connected components covering at least ``min_area`` of the image
    (the two lungs of a visible-field mask), largest first. ``mask``: bool ``[H, W]``."""
    from scipy import ndimage
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"lung_boxes expects a mask [H, W], got shape {m.shape}")
    h, w = m.shape
    lab, n = ndimage.label(m)
    if n == 0:
        return np.zeros((0, 4), np.float32)
    areas = ndimage.sum(m, lab, index=np.arange(1, n + 1))
    order = [k for k in np.argsort(-areas) if areas[k] >= min_area * h * w][:max_boxes]
    slices = ndimage.find_objects(lab)
    out = [[slices[k][1].start / w, slices[k][0].start / h, slices[k][1].stop / w, slices[k][0].stop / h]
           for k in order]
    return np.asarray(out, np.float32).reshape(-1, 4)


@register_source("study_tb")
class StudyTBSource(_StudySet):
    """Montgomery/Shenzhen tuberculosis (1) vs normal (0) films with their lung masks.

    Args: ``root`` (data root holding ``lungs_mc_sz_512/``), ``split``, ``max_per_class``;
    ``boxes``: records also carry ``boxes`` (:func:`lung_boxes` of the mask, computed when the
    record is read), the targets of the study's lung-box auxiliary task.
    """

    label_names = ("tb",)

    def __init__(self, root: str | os.PathLike, *, split: str | None = None, max_per_class: int = -1,
                 boxes: bool = False, on_error: str = "raise"):
        super().__init__(on_error=on_error)
        self.name = f"study_tb[{split or 'all'}]"
        self.with_boxes = bool(boxes)
        self._collect(Path(root), (TB_SET,), split, lambda meta: float(meta["film_type"] == "tb"),
                      lambda name, rec: True, int(max_per_class), on_error)

    def __getitem__(self, i: int) -> dict:
        rec = super().__getitem__(i)
        if self.with_boxes:
            from covidmt_jax.data.images import load_mask
            b = lung_boxes(load_mask(rec["mask"]))
            if not len(b):
                raise DataError(rec["mask"], "lung mask has no component large enough for a lung box")
            rec["boxes"] = b
        return rec
