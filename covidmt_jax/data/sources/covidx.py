"""COVIDx (COVID-Net) label files of every released version.

Each line is ``patientid filename class [source]``, space-separated. Patient ids may contain
spaces (``COVID 70 COVID(70).png COVID-19 sirm``), so a line is parsed from the right: the
file name is the last token that ends in an image extension among the last three, the class
follows it and the optional data source after that; everything before it is the patient id.
Classes are ``normal`` / ``pneumonia`` / ``COVID-19`` (COVIDx 1-5 and the "A" files),
``positive`` / ``negative`` (COVIDx 6+ "B" files) or ``level1`` / ``level2`` (COVIDxSev,
all COVID-19 positive). The data-source typo ``rnsa`` is read as ``rsna``.

Images live in ``<root>/train/`` and ``<root>/test/`` of the COVIDx build (one folder per
label file). Without an image folder the source still parses the labels; ``image`` is then
the bare file name.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from covidmt_jax.data.records import DataError, Source, iter_lines, skip_or_raise
from covidmt_jax.data.sources import register_source

__all__ = ["COVIDxRow", "parse_covidx", "COVIDxSource", "COVIDX_CLASSES", "POSITIVE_CLASSES"]

COVIDX_CLASSES = ("normal", "pneumonia", "COVID-19", "positive", "negative", "level1", "level2")
POSITIVE_CLASSES = frozenset({"COVID-19", "positive", "level1", "level2"})
_CLASS_CANON = {c.lower(): c for c in COVIDX_CLASSES}
_SOURCE_TYPOS = {"rnsa": "rsna"}
_IMAGE_NAME = re.compile(r"\.(png|jpe?g|bmp|tiff?|dcm)$", re.IGNORECASE)


@dataclass(frozen=True)
class COVIDxRow:
    line: int
    patient_id: str
    filename: str
    cls: str          # canonical class spelling (see COVIDX_CLASSES)
    data_source: str  # "" when the file has no source column


def _parse_line(path: Path, n: int, line: str) -> COVIDxRow:
    tokens = line.split()
    if len(tokens) < 3:
        raise DataError(path, f"line {n}: expected 'patientid filename class [source]', got {line!r}")
    if _IMAGE_NAME.search(tokens[-2]):
        pid, fn, cls, src = tokens[:-2], tokens[-2], tokens[-1], ""
    elif len(tokens) >= 4 and _IMAGE_NAME.search(tokens[-3]):
        pid, fn, cls, src = tokens[:-3], tokens[-3], tokens[-2], tokens[-1]
    else:
        raise DataError(path, f"line {n}: no image file name (.png/.jpg/.jpeg ...) in the "
                              f"filename position of {line!r}")
    canon = _CLASS_CANON.get(cls.lower())
    if canon is None:
        raise DataError(path, f"line {n}: unknown class {cls!r} (expected one of {', '.join(COVIDX_CLASSES)})")
    src = _SOURCE_TYPOS.get(src.lower(), src.lower())
    return COVIDxRow(n, " ".join(pid), fn, canon, src)


def parse_covidx(path: str | os.PathLike, *, on_error: str = "raise",
                 skipped: list | None = None) -> list[COVIDxRow]:
    """Parse one COVIDx label file into rows (in file order).

    Malformed lines raise :class:`DataError` naming the file and the line number, or, with
    ``on_error="skip"``, are appended to ``skipped`` as ``(path, problem)``. A file name
    listed twice is an error.
    """
    path = Path(path)
    rows: list[COVIDxRow] = []
    first_line: dict[str, int] = {}
    for n, line in iter_lines(path):
        try:
            row = _parse_line(path, n, line)
            if row.filename in first_line:
                raise DataError(path, f"line {n}: file {row.filename!r} already listed on line "
                                      f"{first_line[row.filename]}")
        except DataError as e:
            skip_or_raise(e, on_error, skipped)
            continue
        first_line[row.filename] = n
        rows.append(row)
    if not rows and on_error != "skip":
        raise DataError(path, "no label rows")
    return rows


def _target(label: str, cls: str, path: Path) -> float:
    if label in ("COVID-19", "positive"):
        return float(cls in POSITIVE_CLASSES)
    if label == "negative":
        return float(cls not in POSITIVE_CLASSES)
    if label in ("normal", "pneumonia"):
        if cls in ("positive", "negative"):
            raise ValueError(f"{path}: label {label!r} cannot be derived from the binary class {cls!r} "
                             f"(positive/negative COVIDx files only support 'COVID-19'/'negative')")
        return float(cls == label)
    if label in ("level1", "level2"):
        return float(cls == label)
    raise ValueError(f"unknown COVIDx label name {label!r}; use names from {COVIDX_CLASSES}")


@register_source("covidx")
class COVIDxSource(Source):
    """One COVIDx label file (one split) as a source.

    Args:
      label_file: e.g. ``labels/train_COVIDx3.txt``.
      image_dir: folder holding the images of this split (``data/train``); ``None`` = labels
        only (``image`` is then the file name). Missing images are errors (or skipped).
      label_names: target columns. ``"COVID-19"`` (or ``"positive"``) is 1 for COVID-19 /
        positive / severity-level rows; ``"negative"``, ``"normal"``, ``"pneumonia"``,
        ``"level1"``, ``"level2"`` select those classes. Default ``("COVID-19",)``: the
        paper's binary COVID task.
      upsample_covid: replicate COVID-19-positive rows (the paper's balancing). ``True``: up
        to the number of pneumonia rows (3-class files only); an int: up to that count;
        ``False``: off. Whole copies first, then a ``seed``-chosen remainder; copies get ids
        ``"<file>#<k>"`` and ``meta["replica"] = k``. Never removes rows.
      on_error: ``"raise"`` or ``"skip"`` (bad lines / missing images go to ``.skipped``).

    Record: ``{"id": filename, "image", "labels": float32 [K], "meta": {"patient_id",
    "class", "data_source", "line", "replica"}}``.
    """

    def __init__(self, label_file: str | os.PathLike, image_dir: str | os.PathLike | None = None, *,
                 label_names: Sequence[str] = ("COVID-19",), upsample_covid: bool | int = False,
                 seed: int = 0, name: str | None = None, on_error: str = "raise"):
        super().__init__(on_error=on_error)
        self.label_file = Path(label_file)
        self.name = name or f"covidx:{self.label_file.stem}"
        self.label_names = tuple(label_names)
        if not self.label_names:
            raise ValueError("label_names must not be empty")
        self.rows = parse_covidx(self.label_file, on_error=on_error, skipped=self.skipped)
        image_dir = Path(image_dir) if image_dir is not None else None
        if image_dir is not None and not image_dir.is_dir():
            raise DataError(image_dir, "COVIDx image folder not found")
        for row in self.rows:
            labels = np.array([_target(l, row.cls, self.label_file) for l in self.label_names], np.float32)
            if image_dir is not None:
                image = image_dir / row.filename
                if not image.is_file():
                    self._bad(image, f"image listed on line {row.line} of {self.label_file} not found")
                    continue
                image = str(image)
            else:
                image = row.filename
            self._records.append({"id": row.filename, "image": image, "labels": labels,
                                  "meta": {"patient_id": row.patient_id, "class": row.cls,
                                           "data_source": row.data_source, "line": row.line, "replica": 0}})
        self.class_counts = self._count_classes()
        if upsample_covid:
            self._upsample(upsample_covid, seed)
        self._finish()

    def _count_classes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self._records:
            c = r["meta"]["class"]
            counts[c] = counts.get(c, 0) + 1
        return counts

    def _upsample(self, upsample: bool | int, seed: int) -> None:
        pos = [r for r in self._records if r["meta"]["class"] in POSITIVE_CLASSES]
        if upsample is True:
            if "pneumonia" not in self.class_counts:
                raise ValueError(f"{self.label_file}: upsample_covid=True needs pneumonia rows "
                                 f"(3-class file); pass the target count as an int instead")
            target = self.class_counts["pneumonia"]
        else:
            target = int(upsample)
        if not pos or target <= len(pos):
            return
        extra = target - len(pos)
        copies, rest = divmod(extra, len(pos))
        chosen = [(k + 1, r) for k in range(copies) for r in pos]
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(pos), size=rest, replace=False))
        chosen += [(copies + 1, pos[i]) for i in pick]
        for k, r in chosen:
            meta = dict(r["meta"], replica=k)
            self._records.append(dict(r, id=f"{r['id']}#{k}", meta=meta))

    @classmethod
    def from_root(cls, root: str | os.PathLike, version: str = "3", split: str = "train", **kwargs) -> "COVIDxSource":
        """The COVIDx build at ``root``: labels ``<root>/[labels/]<split>_COVIDx<version>.txt``
        and images ``<root>/<split>/`` (labels only when that folder is absent)."""
        root = Path(root)
        stem = f"{split}_COVIDx{version}.txt"
        for cand in (root / stem, root / "labels" / stem):
            if cand.is_file():
                break
        else:
            raise DataError(root / "labels" / stem, "COVIDx label file not found")
        images = root / split
        return cls(cand, images if images.is_dir() else None, **kwargs)
