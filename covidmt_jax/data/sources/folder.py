"""Generic image folders: any images under a root, optionally labelled by sub-folder.

Which files count as images: names ending in an image extension (``.png .jpg .jpeg .dcm
.dicom .bmp .tif .tiff .gif .webp``, any case) and files with no extension at all, or a
numeric one (DICOMs named by UID, e.g. ``1.2.840.113619.2.55.3.604688``), whose magic bytes
are an image's (DICOM: ``DICM`` at offset 128). Other files (CSV, Markdown, JSON ...) are
ignored, and listed in the source's ``.ignored`` (``(path, why)``) so that callers can tell
the user; hidden files and folders are skipped. With ``check_formats`` (default) each candidate's first bytes are
sniffed, so a file named ``.png`` that is not an image is reported (DataError or
``.skipped``) when the source is built, not in a training worker.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from covidmt_jax.data.images import sniff_format
from covidmt_jax.data.records import DataError, Source, is_image_name, multi_hot
from covidmt_jax.data.sources import register_source

__all__ = ["walk_images", "head_format", "ImageFolderSource"]


def head_format(path: Path) -> str:
    """Image format of a file from its first bytes (DataError when it is not an image)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise DataError(path, f"cannot read file: {e.strerror or e}") from e
    return sniff_format(head, name=str(path))


def _sniffable(fn: str) -> bool:
    """A name without an image extension that may still be an image: no extension, or a
    numeric one (a DICOM UID such as ``1.2.840.113619.2.55.3.604688``)."""
    suffix = Path(fn).suffix
    return not suffix or suffix[1:].isdigit()


def walk_images(root: str | os.PathLike, *, check_formats: bool = True,
                bad: Callable[[str, str], None] | None = None,
                ignored: list | None = None) -> dict[Path, str]:
    """Image files under ``root``: ``{relative path: format}`` sorted by relative path.

    ``format`` is the sniffed format (``""`` when ``check_formats`` is off). Files named like
    images that are not go to ``bad(path, problem)`` (raise when ``bad`` is None). Other
    files that are not images are appended to ``ignored`` as ``(path, why)`` when given.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "folder not found" if not root.exists() else "not a folder")
    out: dict[Path, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            named = is_image_name(fn)
            if not named and not _sniffable(fn):
                if ignored is not None:
                    ignored.append((str(p), f"not an image file name ({Path(fn).suffix})"))
                continue
            if not check_formats and named:
                out[p.relative_to(root)] = ""
                continue
            try:
                fmt = head_format(p)
            except DataError as e:
                if not named:  # an extension-less non-image file: not ours
                    if ignored is not None:
                        ignored.append((str(p), f"no image extension and {e.problem}"))
                    continue
                if bad is None:
                    raise
                bad(e.path, e.problem)
                continue
            out[p.relative_to(root)] = fmt
    return dict(sorted(out.items(), key=lambda kv: kv[0].as_posix()))


@register_source("folder")
class ImageFolderSource(Source):
    """Every image under ``root`` (recursively), optionally labelled by sub-folder.

    Args:
      root: the folder.
      labels_from_subfolders: the first-level sub-folder of a file is its class; files
        directly in ``root`` are then errors (or skipped).
      label_names: target columns (class folder names); default: all class folders, sorted.
        Classes not in ``label_names`` give an all-zero target (e.g. ``("1_COVID-19",)``
        makes ``0_NON_COVID`` negative).
      check_formats: sniff each file's magic bytes while building (see module docstring).

    Record: ``{"id": relative path (POSIX), "image": path, ["labels": float32 [K]],
    "meta": {"class", "format"}}``.
    """

    def __init__(self, root: str | os.PathLike, *, labels_from_subfolders: bool = False,
                 label_names: Sequence[str] | None = None, check_formats: bool = True,
                 name: str | None = None, on_error: str = "raise"):
        super().__init__(on_error=on_error)
        self.root = Path(root)
        self.name = name or f"folder:{self.root.name}"
        self.ignored: list[tuple[str, str]] = []  # files that are not images (module docstring)
        files = walk_images(self.root, check_formats=check_formats, bad=self._bad, ignored=self.ignored)
        classes = sorted({rel.parts[0] for rel in files if len(rel.parts) > 1})
        if labels_from_subfolders:
            self.label_names = tuple(label_names) if label_names is not None else tuple(classes)
        elif label_names is not None:
            raise ValueError("label_names needs labels_from_subfolders=True")
        self.classes = tuple(classes)
        for rel, fmt in files.items():
            rec = {"id": rel.as_posix(), "image": str(self.root / rel), "meta": {"format": fmt}}
            if labels_from_subfolders:
                if len(rel.parts) < 2:
                    self._bad(self.root / rel, "image is not inside a class sub-folder")
                    continue
                rec["meta"]["class"] = rel.parts[0]
                rec["labels"] = multi_hot([rel.parts[0]], self.label_names)
            self._records.append(rec)
        if not self._records and on_error == "raise":
            raise DataError(self.root, "no image files found" + (
                f" ({len(self.ignored)} other file(s) ignored, e.g. {self.ignored[0][0]}: "
                f"{self.ignored[0][1]})" if self.ignored else ""))
        self._finish()

    def class_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self._records:
            c = r["meta"].get("class", "")
            counts[c] = counts.get(c, 0) + 1
        return counts
