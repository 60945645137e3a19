"""RSNA Pneumonia Detection Challenge (Shih et al. 2019).

``stage_2_train_labels.csv`` (also read straight from its ``.zip``): ``patientId,x,y,width,
height,Target``, one row per box; ``Target`` 0 rows have empty coordinates; coordinates are
pixels of the 1024 x 1024 DICOM. Rows are grouped per patient (first-appearance order) and
boxes become xyxy normalised to [0, 1]. Images are ``<patientId>.dcm`` (pydicom, the
``dicom`` extra) or PNG/JPEG conversions named ``<patientId>.png|.jpg`` anywhere under the
image folder. ``stage_2_detailed_class_info.csv`` is optional (``meta["class"]``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from covidmt_jax.data.records import DataError, Source, index_files, iter_csv, skip_or_raise
from covidmt_jax.data.sources import register_source

__all__ = ["RSNAPatient", "parse_rsna_labels", "parse_rsna_class_info", "RSNASource", "RSNA_IMAGE_SIZE"]

RSNA_IMAGE_SIZE = 1024
_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")


@dataclass
class RSNAPatient:
    patient_id: str
    target: int
    boxes_px: list[tuple[float, float, float, float]] = field(default_factory=list)  # (x, y, w, h)
    lines: list[int] = field(default_factory=list)


def parse_rsna_labels(path: str | os.PathLike, *, image_size: int = RSNA_IMAGE_SIZE, on_error: str = "raise",
                      skipped: list | None = None) -> tuple[list[RSNAPatient], int]:
    """Parse ``stage_2_train_labels.csv[.zip]``. Returns (patients in first-appearance order,
    number of data rows read). Bad rows raise DataError with file and line number."""
    path = Path(path)
    patients: dict[str, RSNAPatient] = {}
    n_rows = 0
    for n, header, row in iter_csv(path, min_header=_COLUMNS):
        n_rows += 1
        try:
            if len(row) != len(header):
                raise DataError(path, f"line {n}: expected {len(header)} values, got {len(row)}")
            d = dict(zip(header, (c.strip() for c in row)))
            pid = d["patientId"]
            if not pid:
                raise DataError(path, f"line {n}: empty patientId")
            if d["Target"] not in ("0", "1"):
                raise DataError(path, f"line {n}: Target must be 0 or 1, got {d['Target']!r}")
            target = int(d["Target"])
            coords = [d[k] for k in ("x", "y", "width", "height")]
            box = None
            if target == 0:
                if any(coords):
                    raise DataError(path, f"line {n}: Target 0 row has box coordinates {coords}")
            else:
                try:
                    box = tuple(float(c) for c in coords)
                except ValueError:
                    raise DataError(path, f"line {n}: Target 1 row needs numeric x, y, width, height, got {coords}") from None
                x, y, w, h = box
                if not all(math.isfinite(v) for v in box) or w <= 0 or h <= 0 or x < 0 or y < 0 \
                        or x + w > image_size + 1e-6 or y + h > image_size + 1e-6:
                    raise DataError(path, f"line {n}: box {coords} is empty or outside the {image_size}-px image")
            p = patients.get(pid)
            if p is None:
                p = patients[pid] = RSNAPatient(pid, target)
            elif p.target != target:
                raise DataError(path, f"line {n}: patient {pid} has Target {target} here but {p.target} "
                                      f"on line {p.lines[0]}")
            elif target == 0:
                raise DataError(path, f"line {n}: patient {pid} has a second Target 0 row (line {p.lines[0]})")
        except DataError as e:
            skip_or_raise(e, on_error, skipped)
            continue
        p.lines.append(n)
        if box is not None:
            p.boxes_px.append(box)
    return list(patients.values()), n_rows


def parse_rsna_class_info(path: str | os.PathLike) -> dict[str, str]:
    """``stage_2_detailed_class_info.csv`` -> {patientId: class}."""
    out: dict[str, str] = {}
    for n, header, row in iter_csv(path, min_header=("patientId", "class")):
        d = dict(zip(header, row))
        pid, cls = d["patientId"].strip(), d["class"].strip()
        if pid in out and out[pid] != cls:
            raise DataError(path, f"line {n}: patient {pid} has class {cls!r} but also {out[pid]!r}")
        out[pid] = cls
    return out


@register_source("rsna")
class RSNASource(Source):
    """RSNA pneumonia boxes, one record per patient (= image).

    Args:
      labels: ``stage_2_train_labels.csv`` or its ``.zip``.
      image_dir: folder searched recursively for ``<patientId>.dcm|.png|.jpg|.jpeg``
        (``.dcm`` preferred when several exist); ``None`` = labels only (``image`` is then
        ``"<patientId>.dcm"``). Missing images are errors (or skipped).
      label_names: one column, 1 for Target 1 patients. Default ``("pneumonia",)``.
      image_size: pixel size the coordinates refer to (1024).
      class_info: optional ``stage_2_detailed_class_info.csv``.

    Record: ``{"id": patientId, "image", "labels": float32 [1], "boxes": float32 [N, 4]
    (xyxy in [0, 1], N = 0 for Target 0), "meta": {"patient_id", "target", "lines",
    ["class"]}}``.
    """

    def __init__(self, labels: str | os.PathLike, image_dir: str | os.PathLike | None = None, *,
                 label_names: Sequence[str] = ("pneumonia",), image_size: int = RSNA_IMAGE_SIZE,
                 class_info: str | os.PathLike | None = None, name: str | None = None, on_error: str = "raise"):
        super().__init__(on_error=on_error)
        self.name = name or "rsna"
        self.label_names = tuple(label_names)
        if len(self.label_names) != 1:
            raise ValueError(f"RSNA has one target column, got label_names={self.label_names}")
        self.labels_file = Path(labels)
        patients, self.n_rows = parse_rsna_labels(labels, image_size=image_size, on_error=on_error,
                                                  skipped=self.skipped)
        info = parse_rsna_class_info(class_info) if class_info is not None else None
        files = None
        self.image_dir = Path(image_dir) if image_dir is not None else None
        if self.image_dir is not None:
            exts = (".dcm", ".png", ".jpg", ".jpeg")
            names = [p.patient_id + e for p in patients for e in exts]
            files = index_files(self.image_dir, names=names, extensions=exts)
        for p in patients:
            if files is not None:
                hit = next((files[p.patient_id + e] for e in (".dcm", ".png", ".jpg", ".jpeg")
                            if p.patient_id + e in files), None)
                if hit is None:
                    self._bad(self.image_dir / f"{p.patient_id}.dcm",
                              f"no image (.dcm/.png/.jpg) for patient on line {p.lines[0]} of {self.labels_file.name}")
                    continue
                image = str(hit)
            else:
                image = f"{p.patient_id}.dcm"
            b = np.array(p.boxes_px, np.float32).reshape(-1, 4)
            boxes = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1) / float(image_size)
            meta = {"patient_id": p.patient_id, "target": p.target, "lines": list(p.lines)}
            if info is not None:
                if p.patient_id not in info:
                    self._bad(class_info, f"no class for patient {p.patient_id}")
                    continue
                meta["class"] = info[p.patient_id]
            self._records.append({"id": p.patient_id, "image": image,
                                  "labels": np.array([p.target], np.float32),
                                  "boxes": np.clip(boxes, 0.0, 1.0).astype(np.float32), "meta": meta})
        self._finish()

    @property
    def n_boxes(self) -> int:
        return int(sum(len(r["boxes"]) for r in self._records))
