"""Record schema, the data-layer error, and helpers every source shares.

A *source* (``covidmt_jax.data.sources.*``) is a sequence of records, one dict per sample::

    {"id": str,                  # unique within the source
     "image": str | bytes,       # a file path or encoded bytes (PNG/JPEG/DICOM ...)
     "labels": float32 [K],      # multi-hot, columns in the order of source.label_names
     "boxes": float32 [N, 4],    # xyxy normalised to [0, 1] of the original image
     "mask": str | bytes,        # lung-mask file or bytes (lung sets)
     "meta": dict}               # anything else (patient id, source, view ...)

Pair sources (WaCXR) yield ``{"id", "original", "transmitted", "labels", "meta"}`` instead.

Every problem with the input data raises :class:`DataError`, whose message starts with the
file it concerns. Sources take ``on_error="raise" | "skip"``: with ``"skip"`` a bad item is
recorded in ``source.skipped`` as ``(path, problem)`` and reported (a warning when the source
is built and :meth:`Source.skip_report`) — never dropped silently.

This module imports only the standard library and numpy, so that importing it is cheap.
"""
from __future__ import annotations

import csv
import gzip
import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence, TypedDict

import numpy as np

__all__ = [
    "DataError",
    "Record",
    "PairRecord",
    "Source",
    "ON_ERROR",
    "check_on_error",
    "multi_hot",
    "open_text",
    "iter_lines",
    "iter_csv",
    "IMAGE_EXTENSIONS",
    "is_image_name",
    "index_files",
    "patient_holdout",
]

ON_ERROR = ("raise", "skip")

#: File-name endings of image files that folder walkers consider (case-insensitive). Formats
#: themselves are always detected by magic bytes, never by the name.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ".gif", ".webp")


class DataError(ValueError):
    """Bad input data: ``DataError(path, problem)``; ``str(e) == f"{path}: {problem}"``.

    ``path`` is the file (or ``"<bytes>"`` / a record name for in-memory data); for label
    files the problem names the line number (``"line 12: ..."``).
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = str(path) if path is not None else "<bytes>"
        self.problem = str(problem)
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # picklable across multiprocessing workers
        return (type(self), (self.path, self.problem))


class Record(TypedDict, total=False):
    id: str
    image: str | bytes
    labels: np.ndarray
    boxes: np.ndarray
    mask: str | bytes
    meta: dict


class PairRecord(TypedDict, total=False):
    id: str
    original: str | bytes
    transmitted: str | bytes
    labels: np.ndarray
    meta: dict


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def skip_or_raise(error: "DataError", on_error: str, skipped: list | None) -> None:
    """Parsers' error policy: re-raise ``error`` unless ``on_error == "skip"``, in which case
    record ``(path, problem)`` in ``skipped`` (when given) so it is reported, never silent."""
    if on_error != "skip":
        raise error
    if skipped is not None:
        skipped.append((error.path, error.problem))


def is_image_name(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def multi_hot(names: Sequence[str], label_names: Sequence[str]) -> np.ndarray:
    """float32 [K] with 1 at the position of every name of ``names`` found in ``label_names``."""
    out = np.zeros(len(label_names), np.float32)
    index = {n: i for i, n in enumerate(label_names)}
    for n in names:
        i = index.get(n)
        if i is not None:
            out[i] = 1.0
    return out


class Source:
    """Base class of the dataset sources: a sequence of records.

    Subclasses fill ``self._records`` (a list of record dicts) in ``__init__`` and set
    ``name`` and ``label_names``. Malformed inputs go through :meth:`_bad`, which raises
    :class:`DataError` (``on_error="raise"``) or records ``(path, problem)`` in
    ``self.skipped`` (``on_error="skip"``); :meth:`_finish` warns once with the count.
    """

    name: str = "source"
    label_names: tuple[str, ...] = ()

    def __init__(self, *, on_error: str = "raise"):
        self.on_error = check_on_error(on_error)
        self.skipped: list[tuple[str, str]] = []
        self._records: list[dict] = []

    # --- sequence protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> dict:
        rec = self._records[i]
        out = dict(rec)
        if "meta" in out:
            out["meta"] = dict(out["meta"])
        for key in ("labels", "boxes"):
            if key in out:
                out[key] = np.array(out[key], copy=True)
        return out

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        extra = f", skipped={len(self.skipped)}" if self.skipped else ""
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, labels={self.label_names}{extra})"

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self._records]

    def subset(self, indices: Sequence[int], *, name: str | None = None) -> "Source":
        """A source of the same kind holding only ``records[indices]`` (e.g. a train/val split)."""
        sub = object.__new__(type(self))
        sub.__dict__.update(self.__dict__)
        sub._records = [self._records[int(i)] for i in indices]
        sub.skipped = list(self.skipped)
        sub.name = name or self.name
        return sub

    # --- error handling ----------------------------------------------------------------
    def _bad(self, path: str | os.PathLike, problem: str) -> None:
        if self.on_error == "raise":
            raise DataError(path, problem)
        self.skipped.append((str(path), problem))

    def _finish(self) -> None:
        """Check ids are unique and warn about skipped items (call at the end of ``__init__``)."""
        seen: dict[str, int] = {}
        for r in self._records:
            seen[r["id"]] = seen.get(r["id"], 0) + 1
        dups = [k for k, v in seen.items() if v > 1]
        if dups:
            raise DataError(self.name, f"{len(dups)} duplicated record ids, e.g. {dups[:3]}")
        if self.skipped:
            warnings.warn(self.skip_report(), stacklevel=3)

    def skip_report(self, limit: int = 10) -> str:
        """Human-readable list of the skipped items (first ``limit``)."""
        if not self.skipped:
            return f"{self.name}: nothing skipped"
        lines = [f"{self.name}: skipped {len(self.skipped)} bad item(s):"]
        lines += [f"  {p}: {msg}" for p, msg in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more (see .skipped)")
        return "\n".join(lines)


# --- text label files ------------------------------------------------------------------
def open_text(path: str | os.PathLike, member: str | None = None) -> io.TextIOBase:
    """Open a text label file, transparently reading ``.gz`` and ``.zip`` (``member`` or the
    single ``.csv``/``.txt`` inside). Missing files raise :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
        if path.suffix == ".zip":
            zf = zipfile.ZipFile(path)
            names = [n for n in zf.namelist() if not n.endswith("/")]
            if member is None:
                cands = [n for n in names if n.lower().endswith((".csv", ".txt"))]
                if len(cands) != 1:
                    raise DataError(path, f"expected one .csv/.txt inside the zip, found {cands or names}")
                member = cands[0]
            elif member not in names:
                raise DataError(path, f"zip has no member {member!r} (has {names})")
            return io.TextIOWrapper(zf.open(member), encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(path, f"cannot read: {e}") from e


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number starting at 1, stripped line) for every non-blank line of a text file."""
    with open_text(path) as f:
        n = 0
        try:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if line:
                    yield n, line
        except (UnicodeDecodeError, OSError, EOFError) as e:
            raise DataError(path, f"line {n + 1}: cannot read text: {e}") from e


def iter_csv(path: str | os.PathLike, *, min_header: Sequence[str] = ()) -> Iterator[tuple[int, list[str], list[str]]]:
    """Yield ``(line number, header, row)`` for each data row of a CSV (``.gz``/``.zip`` ok).

    ``min_header``: column names that must be present in the header (DataError otherwise).
    Blank rows are skipped. The line number is the physical line of the row (header = 1).
    """
    with open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(path, "empty file (no header)") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(path, f"line 1: unreadable header: {e}") from e
        header = [h.strip() for h in header]
        missing = [h for h in min_header if h not in header]
        if missing:
            raise DataError(path, f"line 1: header lacks column(s) {missing} (has {header})")
        try:
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                yield reader.line_num, header, row
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as e:
            raise DataError(path, f"line {reader.line_num}: unreadable CSV: {e}") from e


def as_path_str(p: Any) -> str:
    return os.fspath(p) if isinstance(p, os.PathLike) else str(p)


def index_files(root: str | os.PathLike, *, names: Sequence[str] | None = None,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """Map file name -> path for every file under ``root`` (recursively, hidden entries
    skipped) whose name ends with one of ``extensions`` (case-insensitive).

    Nested release layouts (NIH's ``images_001/images/...``) resolve this way. The same file
    name in two folders raises :class:`DataError` (which one is meant would be a guess).
    ``names``: keep only these file names (saves memory on big trees).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "image folder not found" if not root.exists() else "not a folder")
    wanted = set(names) if names is not None else None
    exts = tuple(e.lower() for e in extensions)
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith(".") or not fn.lower().endswith(exts):
                continue
            if wanted is not None and fn not in wanted:
                continue
            p = Path(dirpath) / fn
            if fn in out:
                raise DataError(p, f"file name also found at {out[fn]}; cannot tell which one is meant")
            out[fn] = p
    return out


def patient_holdout(patients: Sequence[str], fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (keep, holdout) by patient, so no patient is in both.

    ``patients``: patient id of each sample; ``fraction`` of the distinct patients (rounded)
    go to the holdout, chosen with ``numpy.random.default_rng(seed)`` over the sorted ids.
    Returns two sorted int64 index arrays.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    uniq = sorted(set(patients))
    n_hold = int(round(fraction * len(uniq)))
    rng = np.random.default_rng(seed)
    held = set(np.asarray(uniq, dtype=object)[rng.permutation(len(uniq))[:n_hold]].tolist())
    mask = np.array([p in held for p in patients], dtype=bool)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


class SourceView(Source):
    """A read-only view of ``source`` restricted to ``indices`` (any source, list-backed or
    computed on access, e.g. phantoms). Records are fetched from the parent on access."""

    def __init__(self, source: Source, indices: Sequence[int], *, name: str | None = None):
        self.parent = source
        self.indices = np.asarray(indices, np.int64)
        self.name = name or getattr(source, "name", "source")
        self.label_names = tuple(getattr(source, "label_names", ()))
        self.on_error = getattr(source, "on_error", "raise")
        self.skipped = list(getattr(source, "skipped", []))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.parent[int(self.indices[i])]

    @property
    def ids(self) -> list[str]:
        parent_ids = self.parent.ids
        return [parent_ids[int(i)] for i in self.indices]


def holdout_split(source: Source, fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(keep_idx, hold_idx)`` of ``source`` with ``fraction`` of its patients held out.

    Patients come from ``meta["patient_id"]`` of list-backed sources (so no patient is on
    both sides), otherwise from record ids.
    """
    records = getattr(source, "_records", None)
    if records:
        patients = [str(r.get("meta", {}).get("patient_id", r["id"])) for r in records]
    else:
        patients = list(source.ids)
    return patient_holdout(patients, fraction, seed=seed)
