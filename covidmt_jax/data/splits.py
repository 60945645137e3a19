"""Patient-disjoint train / validation / test splits of the real lung-mask sets, fixed here.

One rule for every set, so that the lung segmenters, their model cards and the real-film
study all see the same films on the same side:

* A film's **split group** is its patient: ``split_group`` of ``pairs.csv`` where the set
  has one (the ieee8023 patient id, merged across duplicate films), otherwise the film
  itself (see :data:`SOURCES`).
* A group's split is a pure function of its name: the first 8 bytes of
  ``sha256("<SEED>:<group>")`` read as a number ``u`` in [0, 1); ``u < 0.70`` -> train,
  ``u < 0.85`` -> val, else test (:data:`FRACTIONS`). The split of a film therefore never
  changes when films are added to or removed from a folder, all films of a patient land on
  one side, and two folders that share patients (``v7_covid_anatomical`` and
  ``quex_covid_fields`` use the same ``split_group`` ids for the same ieee8023 patients)
  put them on the same side.
* ``lungs_mc_sz_512`` (Montgomery + Shenzhen, one film per patient: the file stem
  ``MCUCXR_NNNN_T`` / ``CHNCXR_NNNN_T`` is the patient's only film) keeps the hold-out of
  the first shipped U-Net (``covidmt_jax/assets/lung_unet``, trained on 598 films): its
  106 held-out films are split 50/50 into val and test by the same hash, the other 598 are
  train. So no validation or test film was ever seen by that model or by a model
  fine-tuned from it. The held-out ids are :func:`legacy_mc_sz_holdout` of the folder's
  704 stems (``records.patient_holdout(sorted stems, 0.15, seed=0)``, as ``holdout_split``
  computed them); films beyond those 704 follow the 70/15/15 rule.
* ``quex_pneumonia_normal_fields`` has no patient field (COVID-QU-Ex renamed the films and
  did not record their origin), so it is split **by image**. Its paediatric part comes
  from a set with several films per child, so a child may have films on both sides; its
  validation Dice may be slightly optimistic for that reason.

``film_split(source, stem, group)`` gives one film's split; ``folder_splits(folder)`` all
films of a folder; ``split_counts(data_root)`` the table in the README's model cards.
"""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from covidmt_jax.data.records import DataError, patient_holdout

__all__ = ["SEED", "FRACTIONS", "SPLITS", "SOURCES", "group_split", "film_split", "read_groups",
           "folder_splits", "split_counts", "legacy_mc_sz_holdout", "source_of_folder"]

SEED = "covidmt-lungs-v1"
FRACTIONS = (0.70, 0.15, 0.15)
SPLITS = ("train", "val", "test")

#: folder name -> how its films are grouped: "split_group" (pairs.csv column), "image"
#: (each film is its own group), "mc_sz" (one film per patient + the legacy hold-out).
SOURCES: Mapping[str, str] = {
    "lungs_mc_sz_512": "mc_sz",
    "v7_covid_anatomical": "split_group",
    "quex_covid_fields": "split_group",
    "quex_pneumonia_normal_fields": "image",
}

_IMAGE_EXTS = (".png", ".jpg", ".jpeg")
_legacy_cache: dict[tuple[str, ...], frozenset] = {}


def _unit(key: str, seed: str = SEED) -> float:
    """A number in [0, 1) from ``sha256(seed:key)`` (stable across Python runs)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def group_split(group: str, *, fractions: Iterable[float] = FRACTIONS, seed: str = SEED) -> str:
    """``"train" | "val" | "test"`` of a split group (patient) by the hash rule."""
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fr}")
    if not group:
        raise ValueError("empty split group")
    u = _unit(str(group), seed)
    return "train" if u < fr[0] else ("val" if u < fr[0] + fr[1] else "test")


def legacy_mc_sz_holdout(stems: Iterable[str]) -> frozenset:
    """The Montgomery/Shenzhen stems the first shipped U-Net held out: 15 % of the sorted
    stems chosen by ``patient_holdout(..., 0.15, seed=0)`` (its training config's rule)."""
    key = tuple(sorted(set(stems)))
    if key not in _legacy_cache:
        _, hold = patient_holdout(list(key), 0.15, seed=0)
        _legacy_cache[key] = frozenset(key[i] for i in hold)
    return _legacy_cache[key]


def source_of_folder(folder: str | os.PathLike) -> str:
    """The :data:`SOURCES` name of a set folder (its directory name); clear error otherwise."""
    name = Path(folder).name
    if name not in SOURCES:
        raise DataError(folder, f"no split rule for folder {name!r}; known sets: {sorted(SOURCES)}")
    return name


def film_split(source: str, stem: str, group: str | None = None, *,
               legacy_holdout: frozenset | None = None) -> str:
    """Split of one film of ``source`` (a :data:`SOURCES` name).

    ``group``: the film's ``split_group`` (required for the ieee8023 folders).
    ``legacy_holdout``: for ``lungs_mc_sz_512``, :func:`legacy_mc_sz_holdout` of its stems;
    when given, a stem in it is val/test and any other stem among the legacy 704 is train.
    Without it (or for a stem the legacy set never had) the 70/15/15 rule applies.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {sorted(SOURCES)}")
    rule = SOURCES[source]
    stem = Path(stem).stem if Path(stem).suffix.lower() in _IMAGE_EXTS else str(stem)
    if rule == "split_group":
        if not group:
            raise ValueError(f"{source}/{stem}: split_group is required for this set")
        return group_split(group)
    if rule == "mc_sz" and legacy_holdout is not None:
        if stem in legacy_holdout:
            return "val" if _unit(stem) < 0.5 else "test"
        return "train"
    return group_split(stem)


def read_groups(folder: str | os.PathLike) -> dict[str, str]:
    """``{stem: split group}`` of a set folder (``pairs.csv`` where the rule needs it,
    otherwise the stems of ``images/``)."""
    folder = Path(folder)
    rule = SOURCES[source_of_folder(folder)]
    if rule == "split_group":
        path = folder / "pairs.csv"
        if not path.is_file():
            raise DataError(path, "pairs.csv (with a split_group column) not found")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "split_group" not in rows[0] or "stem" not in rows[0]:
            raise DataError(path, "needs the columns 'stem' and 'split_group'")
        out = {}
        for i, r in enumerate(rows, start=2):
            if not r["split_group"]:
                raise DataError(path, f"line {i}: empty split_group for stem {r['stem']!r}")
            if r.get("status", "ok") == "ok":
                out[r["stem"]] = r["split_group"]
        return out
    img_dir = folder / "images"
    if not img_dir.is_dir():
        raise DataError(img_dir, "images/ folder not found")
    return {p.stem: p.stem for p in sorted(img_dir.iterdir()) if p.suffix.lower() in _IMAGE_EXTS}


def folder_splits(folder: str | os.PathLike) -> dict[str, str]:
    """``{stem: "train" | "val" | "test"}`` for every film of a set folder."""
    source = source_of_folder(folder)
    groups = read_groups(folder)
    legacy = legacy_mc_sz_holdout(groups) if SOURCES[source] == "mc_sz" else None
    return {s: film_split(source, s, g, legacy_holdout=legacy) for s, g in groups.items()}


def set_folders(data_root: str | os.PathLike) -> dict[str, Path]:
    """``{source: folder}`` of the sets present under a data root (``shared/data``)."""
    root = Path(data_root)
    found = {}
    for name in SOURCES:
        for cand in (root / name, root / "lungs_diseased" / name):
            if cand.is_dir():
                found[name] = cand
                break
    return found


def split_counts(data_root: str | os.PathLike) -> dict[str, dict[str, int]]:
    """``{source: {"train": n, "val": n, "test": n, "groups_<split>": n}}`` for the sets
    present under ``data_root``."""
    out = {}
    for name, folder in set_folders(data_root).items():
        splits, groups = folder_splits(folder), read_groups(folder)
        row = {s: 0 for s in SPLITS}
        gsets: dict[str, set] = {s: set() for s in SPLITS}
        for stem, sp in splits.items():
            row[sp] += 1
            gsets[sp].add(groups[stem])
        row.update({f"groups_{s}": len(gsets[s]) for s in SPLITS})
        out[name] = row
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m covidmt_jax.data.splits [DATA_ROOT]``: films and patient groups per split."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m covidmt_jax.data.splits",
                                description="Films and patient groups per split of the lung sets under DATA_ROOT.")
    p.add_argument("data_root", nargs="?", default="../shared/data",
                   help="folder holding lungs_diseased/ and the Montgomery/Shenzhen set (default ../shared/data)")
    a = p.parse_args(argv)
    counts = split_counts(a.data_root)
    if not counts:
        p.error(f"no lung set found under {a.data_root}")
    for name, row in counts.items():
        print(f"{name:30s} " + " ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
