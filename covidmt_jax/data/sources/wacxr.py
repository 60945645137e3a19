"""(original, transmitted) image pairs: the WaCXR set and any two parallel folders.

WaCXR (the paper's WhatsApp-transmitted COVID-Net test set) is laid out as::

    <root>/covid_binary_test/{0_NON_COVID,1_COVID-19}/NAME
    <root>/covid_binary_test_whatsapp/{0_NON_COVID,1_COVID-19}/NAME

A pair shares its relative path; the label comes from the class folder (``1_COVID-19`` ->
1). Transmitted files are JPEG even where the name ends in ``.png``: formats are sniffed
from magic bytes (``meta["original_format"]`` / ``meta["transmitted_format"]``) and the
decoder ignores names.

Files present on one side only are listed in ``.unpaired`` (``(path, why)``); with
``on_error="raise"`` (default) any unpaired or duplicated file is a DataError, with
``"skip"`` they are also in ``.skipped`` and a warning reports them.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Sequence

from covidmt_jax.data.records import DataError, Source, multi_hot
from covidmt_jax.data.sources import register_source
from covidmt_jax.data.sources.folder import walk_images

__all__ = ["PairFolderSource", "WaCXRSource", "WACXR_CLASSES"]

WACXR_CLASSES = {"0_NON_COVID": 0, "1_COVID-19": 1}


def _key(rel: Path, match: str) -> str:
    p = PurePosixPath(rel.as_posix())
    return str(p.with_suffix("")) if match == "stem" else str(p)


@register_source("pairs")
class PairFolderSource(Source):
    """Pairs of images with the same relative path under two folders.

    Args:
      original_dir, transmitted_dir: the two folders.
      match: ``"path"`` (same relative path, default) or ``"stem"`` (same relative path
        without extension, for channels that rename ``.png`` to ``.jpg``); two files that
        map to the same key on one side are a duplicated-pair error.
      labels_from_subfolders / label_names: as :class:`~.folder.ImageFolderSource`.
      check_formats: sniff both files' magic bytes while building.

    Record: ``{"id": relative path of the original, "original": path, "transmitted": path,
    ["labels": float32 [K]], "meta": {"class", "original_format", "transmitted_format"}}``.
    """

    def __init__(self, original_dir: str | os.PathLike, transmitted_dir: str | os.PathLike, *,
                 match: str = "path", labels_from_subfolders: bool = False,
                 label_names: Sequence[str] | None = None, check_formats: bool = True,
                 name: str | None = None, on_error: str = "raise"):
        super().__init__(on_error=on_error)
        if match not in ("path", "stem"):
            raise ValueError(f"match must be 'path' or 'stem', got {match!r}")
        self.original_dir, self.transmitted_dir = Path(original_dir), Path(transmitted_dir)
        self.name = name or f"pairs:{self.original_dir.name}"
        self.unpaired: list[tuple[str, str]] = []
        self.ignored: list[tuple[str, str]] = []  # files that are not images (folder.walk_images)
        sides = {}
        for side, root in (("original", self.original_dir), ("transmitted", self.transmitted_dir)):
            files = walk_images(root, check_formats=check_formats, bad=self._bad, ignored=self.ignored)
            keyed: dict[str, tuple[Path, str]] = {}
            for rel, fmt in files.items():
                k = _key(rel, match)
                if k in keyed:
                    self._bad(root / rel, f"duplicated {side} file: {root / keyed[k][0]} has the same pair key {k!r}")
                    continue
                keyed[k] = (rel, fmt)
            sides[side] = keyed
        orig, trans = sides["original"], sides["transmitted"]
        for k in sorted(set(orig) - set(trans)):
            self.unpaired.append((str(self.original_dir / orig[k][0]), "no transmitted counterpart"))
        for k in sorted(set(trans) - set(orig)):
            self.unpaired.append((str(self.transmitted_dir / trans[k][0]), "no original counterpart"))
        if self.unpaired:
            if self.on_error == "raise":
                ex = "; ".join(f"{p} ({why})" for p, why in self.unpaired[:3])
                raise DataError(self.original_dir, f"{len(self.unpaired)} unpaired file(s), e.g. {ex}")
            self.skipped.extend(self.unpaired)

        classes = sorted({orig[k][0].parts[0] for k in orig if len(orig[k][0].parts) > 1})
        if labels_from_subfolders:
            self.label_names = tuple(label_names) if label_names is not None else tuple(classes)
        elif label_names is not None:
            raise ValueError("label_names needs labels_from_subfolders=True")
        self.classes = tuple(classes)
        for k in sorted(set(orig) & set(trans)):
            (rel_o, fmt_o), (rel_t, fmt_t) = orig[k], trans[k]
            rec = {"id": rel_o.as_posix(), "original": str(self.original_dir / rel_o),
                   "transmitted": str(self.transmitted_dir / rel_t),
                   "meta": {"original_format": fmt_o, "transmitted_format": fmt_t}}
            if labels_from_subfolders:
                if len(rel_o.parts) < 2:
                    self._bad(self.original_dir / rel_o, "image is not inside a class sub-folder")
                    continue
                rec["meta"]["class"] = rel_o.parts[0]
                rec["labels"] = self._labels(rel_o.parts[0], self.original_dir / rel_o)
                if rec["labels"] is None:
                    continue
            self._records.append(rec)
        if not self._records and self.on_error == "raise":
            raise DataError(self.original_dir, "no image pairs found")
        self._finish()

    def _labels(self, cls: str, path: Path):
        """Target of a class folder (None: bad folder, already reported)."""
        return multi_hot([cls], self.label_names)


@register_source("wacxr")
class WaCXRSource(PairFolderSource):
    """The WaCXR pairs (see module docstring). ``label_names=("COVID-19",)``: 1 for
    ``1_COVID-19``, 0 for ``0_NON_COVID``; any other class folder is a DataError."""

    def __init__(self, root: str | os.PathLike, *, original: str = "covid_binary_test",
                 transmitted: str = "covid_binary_test_whatsapp", label_names: Sequence[str] = ("COVID-19",),
                 check_formats: bool = True, name: str | None = None, on_error: str = "raise"):
        self.root = Path(root)
        if tuple(label_names) != ("COVID-19",):
            raise ValueError("WaCXR has one binary target; label_names must be ('COVID-19',)")
        for sub in (original, transmitted):
            if not (self.root / sub).is_dir():
                raise DataError(self.root / sub, "WaCXR folder not found (expected <root>/covid_binary_test and "
                                                 "<root>/covid_binary_test_whatsapp)")
        super().__init__(self.root / original, self.root / transmitted, match="path",
                         labels_from_subfolders=True, label_names=("COVID-19",),
                         check_formats=check_formats, name=name or "wacxr", on_error=on_error)

    def _labels(self, cls: str, path: Path):
        if cls not in WACXR_CLASSES:
            self._bad(path, f"unknown WaCXR class folder {cls!r} (expected {sorted(WACXR_CLASSES)})")
            return None
        return multi_hot(["COVID-19"] if WACXR_CLASSES[cls] else [], ("COVID-19",))

    def class_counts(self) -> dict[str, int]:
        counts = {c: 0 for c in WACXR_CLASSES}
        for r in self._records:
            counts[r["meta"]["class"]] += 1
        return counts
