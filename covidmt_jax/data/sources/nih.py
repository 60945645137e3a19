"""NIH ChestX-ray14 (Wang et al. 2017).

``Data_Entry_2017.csv`` / ``Data_Entry_2017_v2020.csv`` (``.gz`` fine): the header has 9
names but each row 11 values, because ``OriginalImage[Width,Height]`` and
``OriginalImagePixelSpacing[x,y]`` each span two columns (the 2017 file adds a trailing
empty column). Rows are read by position. ``Finding Labels`` is ``|``-separated or
``No Finding``. A leading ``path`` column (the shared ``nih_64px`` extract) is accepted.

Splits: ``train_val_list.txt`` / ``test_list.txt`` (one image name a line). Images: the
official ``images/`` folder or the Kaggle release's ``images_001/images/ ...``: file names are
indexed by walking the image folder. ``BBox_List_2017.csv`` (984 boxes in 1024-px
coordinates, finding ``Infiltrate`` = ``Infiltration``) is optional.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from covidmt_jax.data.records import DataError, Source, index_files, iter_csv, iter_lines, skip_or_raise
from covidmt_jax.data.sources import register_source

__all__ = ["NIH_FINDINGS", "PAPER_LABELS", "NIHRow", "parse_data_entry", "parse_bbox_list",
           "read_split_list", "NIHSource"]

NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
                "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
                "Pneumonia", "Pneumothorax")
NO_FINDING = "No Finding"
#: The paper's NIH task set (its Table 1): four findings + Normal (= No Finding). The paper
#: keeps "categories with more than 5.0 % incidence"; Mass (5.16 % of the 112,120 images) also
#: passes that bar but is not in its table, and the table is followed.
PAPER_LABELS = ("Infiltration", "Effusion", "Atelectasis", "Nodule", "Normal")
_ALIASES = {"Normal": NO_FINDING, "Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}
_KNOWN = frozenset(NIH_FINDINGS) | {NO_FINDING}
#: Pixel size of the released PNGs (BBox coordinates refer to it).
NIH_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class NIHRow:
    line: int
    image: str
    findings: tuple[str, ...]   # () for "No Finding"
    follow_up: int
    patient_id: int
    age: int
    sex: str
    view: str
    original_size: tuple[int, int]     # (width, height) of the original image
    pixel_spacing: tuple[float, float]
    path: str = ""                     # the optional leading "path" column


def _canon(name: str) -> str:
    return _ALIASES.get(name, name)


def parse_data_entry(path: str | os.PathLike, *, on_error: str = "raise",
                     skipped: list | None = None) -> list[NIHRow]:
    """Parse a Data_Entry CSV into rows. Bad rows raise DataError naming file and line."""
    path = Path(path)
    rows: list[NIHRow] = []
    seen: dict[str, int] = {}
    for n, header, row in iter_csv(path, min_header=("Image Index", "Finding Labels")):
        offset = 1 if header[0] == "path" else 0
        try:
            vals = row[offset:]
            if len(vals) == 12 and not vals[11].strip():  # 2017 file: trailing comma
                vals = vals[:11]
            if len(vals) != 11:
                raise DataError(path, f"line {n}: expected 11 values (9 header names, two spanning "
                                      f"two columns), got {len(vals)}")
            name = vals[0].strip()
            if not name.lower().endswith(".png"):
                raise DataError(path, f"line {n}: Image Index {name!r} is not a .png file name")
            key = row[0].strip() if offset else name
            if key in seen:
                raise DataError(path, f"line {n}: image {key!r} already listed on line {seen[key]}")
            labels = [s.strip() for s in vals[1].split("|")]
            bad = [l for l in labels if l not in _KNOWN]
            if bad or not labels:
                raise DataError(path, f"line {n}: unknown finding(s) {bad or vals[1]!r}")
            if NO_FINDING in labels and len(labels) > 1:
                raise DataError(path, f"line {n}: 'No Finding' combined with findings: {vals[1]!r}")
            try:
                r = NIHRow(n, name, tuple(l for l in labels if l != NO_FINDING), int(vals[2]), int(vals[3]),
                           int(float(vals[4].rstrip("YMD") or -1)), vals[5].strip(), vals[6].strip(),
                           (int(vals[7]), int(vals[8])), (float(vals[9]), float(vals[10])),
                           row[0] if offset else "")
            except ValueError as e:
                raise DataError(path, f"line {n}: non-numeric field: {e}") from None
        except DataError as e:
            skip_or_raise(e, on_error, skipped)
            continue
        seen[key] = n
        rows.append(r)
    return rows


def parse_bbox_list(path: str | os.PathLike) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """BBox_List_2017.csv -> {image name: [(finding, (x, y, w, h) in 1024-px pixels), ...]}.

    Findings are canonical (``Infiltrate`` -> ``Infiltration``)."""
    path = Path(path)
    out: dict[str, list] = {}
    for n, header, row in iter_csv(path, min_header=("Image Index",)):
        vals = [v for v in row]
        while len(vals) > 6 and not vals[-1].strip():
            vals = vals[:-1]
        if len(vals) != 6:
            raise DataError(path, f"line {n}: expected 6 values (name, finding, x, y, w, h), got {len(vals)}")
        finding = _canon(vals[1].strip())
        if finding not in NIH_FINDINGS:
            raise DataError(path, f"line {n}: unknown finding {vals[1]!r}")
        try:
            x, y, w, h = (float(v) for v in vals[2:])
        except ValueError:
            raise DataError(path, f"line {n}: non-numeric box {vals[2:]}") from None
        if w <= 0 or h <= 0 or not np.isfinite([x, y, w, h]).all():
            raise DataError(path, f"line {n}: degenerate box {vals[2:]}")
        out.setdefault(vals[0].strip(), []).append((finding, (x, y, w, h)))
    return out


def read_split_list(path: str | os.PathLike) -> list[str]:
    """train_val_list.txt / test_list.txt: image names, one a line."""
    names: list[str] = []
    first: dict[str, int] = {}
    for n, line in iter_lines(path):
        if len(line.split()) != 1 or not line.lower().endswith(".png"):
            raise DataError(path, f"line {n}: expected one .png image name, got {line!r}")
        if line in first:
            raise DataError(path, f"line {n}: {line} is listed twice (first on line {first[line]})")
        first[line] = n
        names.append(line)
    return names


def _find(root: Path | None, names: Sequence[str]) -> Path | None:
    if root is None:
        return None
    for n in names:
        p = root / n
        if p.is_file():
            return p
    return None


def _normal_rank(image: str) -> str:
    """Order in which ``max_normal`` keeps "No Finding" images: the SHA-1 of the image name
    (a fixed pseudo-random order, independent of the rows' order and of the split)."""
    return hashlib.sha1(image.encode()).hexdigest()


@register_source("nih")
class NIHSource(Source):
    """NIH ChestX-ray14 as a multi-label source.

    Args:
      root: release folder (holding the Data_Entry CSV, split lists, ``images*/``); any of
        the explicit paths below overrides what is found there.
      data_entry: the Data_Entry CSV (``Data_Entry_2017_v2020.csv[.gz]`` or 2017).
      split: ``"all"``, ``"train_val"`` or ``"test"`` (needs the split list).
      split_list: explicit split list file.
      image_dir: folder searched recursively for the PNGs; ``None`` = ``root`` when it has
        image folders, else labels only (``image`` = the Image Index).
      label_names: target columns; findings, ``"No Finding"`` or its alias ``"Normal"``.
        Default: the paper's (Infiltration, Effusion, Atelectasis, Nodule, Normal).
      drop_unlabelled: keep only images with at least one positive target column (the
        paper trains on the task set's images).
      max_normal: keep at most this many images whose only positive target column is
        ``Normal`` / ``No Finding`` (the paper's Table 1 uses 5,000 + 800 of the 60,361), chosen
        by :func:`_normal_rank` (a hash of the image name: the same images whatever the order or
        split of the rows); ``-1`` keeps all. Needs a ``Normal`` column.
      bbox_file: optional BBox_List_2017.csv; boxed images get ``boxes`` (float32 [N, 4],
        xyxy normalised by 1024) and ``meta["box_findings"]``.

    With a leading ``path`` column (extracts such as ``nih_64px``), ``id`` is that path and
    the image is ``image_dir / path`` (``image_dir`` defaults to the CSV's folder).

    Record: ``{"id": Image Index, "image", "labels": float32 [K], ["boxes"], "meta":
    {"patient_id", "findings", "follow_up", "age", "sex", "view", "line"}}``.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, data_entry: str | os.PathLike | None = None,
                 split: str = "all", split_list: str | os.PathLike | None = None,
                 image_dir: str | os.PathLike | None = None, label_names: Sequence[str] = PAPER_LABELS,
                 drop_unlabelled: bool = False, max_normal: int = -1,
                 bbox_file: str | os.PathLike | None = None,
                 name: str | None = None, on_error: str = "raise"):
        super().__init__(on_error=on_error)
        root = Path(root) if root is not None else None
        if root is not None and not root.is_dir():
            raise DataError(root, "NIH root folder not found")
        if split not in ("all", "train_val", "test"):
            raise ValueError(f"split must be 'all', 'train_val' or 'test', got {split!r}")
        self.name = name or f"nih:{split}"
        self.label_names = tuple(label_names)
        cols = [_canon(l) for l in self.label_names]
        unknown = [l for l, c in zip(self.label_names, cols) if c not in _KNOWN]
        if unknown or not cols:
            raise ValueError(f"unknown NIH label names {unknown}; use {NIH_FINDINGS + (NO_FINDING, 'Normal')}")

        entry = Path(data_entry) if data_entry is not None else _find(
            root, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv",
                   "Data_Entry_2017.csv.gz"])
        if entry is None:
            raise DataError(root or "<no root>", "no Data_Entry_2017[_v2020].csv[.gz] found; pass data_entry=")
        self.data_entry = entry
        rows = parse_data_entry(entry, on_error=on_error, skipped=self.skipped)

        if split != "all":
            lst = Path(split_list) if split_list is not None else _find(
                root, [f"{split}_list.txt", f"{split}_list.txt.gz"])
            if lst is None:
                raise DataError(root or "<no root>", f"no {split}_list.txt found; pass split_list=")
            wanted = read_split_list(lst)
            by_name = {r.image: r for r in rows}
            missing = [w for w in wanted if w not in by_name]
            for w in missing:
                self._bad(lst, f"image {w!r} is not in {entry.name}")
            rows = [by_name[w] for w in wanted if w in by_name]

        if max_normal >= 0:
            if NO_FINDING not in cols:
                raise ValueError(f"max_normal needs a 'Normal' / 'No Finding' label column; label_names "
                                 f"are {self.label_names}")
            normals = [r for r in rows if not r.findings]
            if len(normals) > max_normal:
                keep = {r.image for r in sorted(normals, key=lambda r: _normal_rank(r.image))[:max_normal]}
                rows = [r for r in rows if r.findings or r.image in keep]

        boxes = parse_bbox_list(bbox_file) if bbox_file is not None else {}
        img_root = Path(image_dir) if image_dir is not None else (
            root if root is not None and any(p.is_dir() and p.name.startswith("images") for p in root.iterdir())
            else None)
        with_paths = bool(rows) and all(r.path for r in rows)
        if with_paths:  # extract with a leading "path" column: files relative to image_dir / the CSV
            img_root = img_root if img_root is not None else entry.parent
            files = None
        else:
            files = index_files(img_root, names=[r.image for r in rows]) if img_root is not None else None
        self.image_dir = img_root

        for r in rows:
            present = set(r.findings) if r.findings else {NO_FINDING}
            labels = np.array([c in present for c in cols], np.float32)
            if drop_unlabelled and not labels.any():
                continue
            if with_paths:
                p = img_root / r.path
                if not p.is_file():
                    self._bad(p, f"image of line {r.line} of {entry.name} not found")
                    continue
                image = str(p)
            elif files is not None:
                p = files.get(r.image)
                if p is None:
                    self._bad(img_root / r.image, f"image of line {r.line} of {entry.name} not found under {img_root}")
                    continue
                image = str(p)
            else:
                image = r.image
            rec = {"id": r.path or r.image, "image": image, "labels": labels,
                   "meta": {"patient_id": r.patient_id, "findings": list(r.findings), "follow_up": r.follow_up,
                            "age": r.age, "sex": r.sex, "view": r.view, "line": r.line}}
            if r.image in boxes:
                b = np.array([bb for _, bb in boxes[r.image]], np.float32)
                xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1) / NIH_IMAGE_SIZE
                rec["boxes"] = np.clip(xyxy, 0.0, 1.0).astype(np.float32)
                rec["meta"]["box_findings"] = [f for f, _ in boxes[r.image]]
            self._records.append(rec)
        self._finish()
