"""Per-pair rows of a scoring job: columns, building rows from step outputs, and the on-disk store.

One row per (pair, classifier). :data:`ROW_COLUMNS` are the columns of the default lung
convention (with its lung-mask QC flags per side, :data:`QC_COLUMNS`); every further convention ``c`` adds ``lung_frac_orig_c``, ``lung_frac_trans_c``,
``iol_orig_c``, ``iol_trans_c`` (:func:`row_columns`). The store also keeps
:data:`INPUT_SIG`, the signature of the pair's input files the row was computed from
(:func:`covidmt_jax.scoring.pairs.input_signature`), so a resumed job re-scores pairs whose
files changed.

The store is append-only while a job runs; the row of a (pair_id, model) is its LAST line, so
a re-scored pair's new row supersedes the old one, and a job killed at any point (``kill -9``)
leaves a readable store (a CSV line cut mid-way is dropped when the store is opened).
:meth:`RowStore.compact` rewrites it atomically with one row per key at the end of a job.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from covidmt_jax.lung_qc import flags_text
from covidmt_jax.scoring.config import FORMATS

log = logging.getLogger("covidmt_jax.scoring")

ROW_COLUMNS = ("pair_id", "index", "label", "model", "prob_orig", "prob_trans", "pred_orig",
               "pred_trans", "flip", "iol_orig", "iol_trans", "lung_frac_orig", "lung_frac_trans",
               "heat_frac_orig", "heat_frac_trans", "orig_h", "orig_w", "trans_h", "trans_w",
               "qc_flags_orig", "qc_flags_trans", "error")
#: Lung-mask QC columns (default convention): the :data:`covidmt_jax.lung_qc.QC_FLAGS` that
#: fire on each side's mask, ";"-joined, "" when clean (and on rows without outputs).
QC_COLUMNS = ("qc_flags_orig", "qc_flags_trans")
#: Bookkeeping column of the store: the signature of the pair's inputs ("" = unknown).
INPUT_SIG = "input_sig"
_CONVENTION_COLUMNS = ("iol_orig", "iol_trans", "lung_frac_orig", "lung_frac_trans")
_FLOAT_PREFIXES = ("prob_", "iol_", "lung_frac_", "heat_frac_")
_STR_COLUMNS = ("pair_id", "model", "error", INPUT_SIG) + QC_COLUMNS

# Error kinds (the text before the first ":" of the error column).
ERR_UNREADABLE = "unreadable"
ERR_SIZE = "size mismatch"
ERR_LUNGS = "empty lung mask"
ERR_NONFINITE = "non-finite output"


def convention_suffix(position: int, name: str) -> str:
    """Column / output suffix of a lung convention: ``""`` for the default (first), else
    ``"_<name>"``."""
    if position == 0:
        return ""
    if not re.fullmatch(r"[a-z][a-z0-9]*", name):
        raise ValueError(f"lung convention name {name!r} must be lower-case letters and digits")
    return f"_{name}"


def row_columns(conventions: Sequence[str] = ()) -> tuple[str, ...]:
    """:data:`ROW_COLUMNS` plus the per-convention columns of every convention after the first."""
    extra = tuple(f"{c}{convention_suffix(i, name)}" for i, name in enumerate(conventions) if i
                  for c in _CONVENTION_COLUMNS)
    return ROW_COLUMNS + extra


def _kind_of(column: str) -> type:
    if column in _STR_COLUMNS:
        return str
    return float if column.startswith(_FLOAT_PREFIXES) else int


def _na(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v)


def _typed(cols: Mapping[str, list], columns: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for c in columns:
        v = cols[c]
        kind = _kind_of(c)
        if kind is str:
            out[c] = np.asarray(["" if x is None else str(x) for x in v], dtype=object)
        elif kind is float:
            out[c] = np.asarray([np.nan if x in ("", None) else float(x) for x in v], np.float64)
        else:
            out[c] = np.asarray([-1 if x in ("", None) else int(float(x)) for x in v], np.int64)
    return out


def latest(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The last row of every (pair_id, model), in the order of those last rows."""
    keys = list(zip(rows["pair_id"].tolist(), rows["model"].tolist()))
    last = {k: i for i, k in enumerate(keys)}
    if len(last) == len(keys):
        return dict(rows)
    keep = np.asarray(sorted(last.values()), np.int64)
    return {c: v[keep] for c, v in rows.items()}


def select(rows: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {c: v[mask] for c, v in rows.items()}


class RowStore:
    """Rows in ``WORKDIR/rows.csv`` or ``WORKDIR/rows.parquet/part-NNNNNN.parquet``.

    ``append`` writes one batch and flushes it to disk (CSV: flush + fsync; Parquet: one part
    file per batch, written to a temporary name and renamed). ``read`` returns the latest row
    of every (pair_id, model). ``columns``: :func:`row_columns` of the job's lung conventions
    (the store adds :data:`INPUT_SIG`).
    """

    def __init__(self, workdir: str | os.PathLike, fmt: str = "csv",
                 columns: Sequence[str] = ROW_COLUMNS):
        if fmt not in FORMATS:
            raise ValueError(f"row format must be one of {FORMATS}, got {fmt!r}")
        self.fmt = fmt
        self.columns = tuple(columns) + (INPUT_SIG,)
        self.path = Path(workdir) / ("rows.csv" if fmt == "csv" else "rows.parquet")
        if fmt == "csv" and self.path.is_file():
            self._repair_csv()

    def _repair_csv(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: dropping an incomplete last line (interrupted run)", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet")) if self.path.is_dir() else []

    def read_all(self) -> dict[str, np.ndarray]:
        """Every stored line, superseded ones included, as typed columns (NaN / -1 = missing)."""
        cols: dict[str, list] = {c: [] for c in self.columns}
        if self.fmt == "csv":
            if self.path.is_file():
                with open(self.path, newline="") as f:
                    reader = csv.DictReader(f)
                    if reader.fieldnames and tuple(reader.fieldnames) != self.columns:
                        raise ValueError(f"{self.path}: columns {reader.fieldnames} are not the "
                                         f"scoring job's {list(self.columns)}")
                    for r in reader:
                        for c in self.columns:
                            cols[c].append(r[c])
        elif self._parts():
            d = pq.read_table([str(p) for p in self._parts()]).to_pydict()
            missing = sorted(set(self.columns) - set(d))
            if missing:
                raise ValueError(f"{self.path}: columns {missing} missing (not this job's rows)")
            for c in self.columns:
                cols[c] = d[c]
        return _typed(cols, self.columns)

    def read(self) -> dict[str, np.ndarray]:
        """The current row of every (pair_id, model): the last one stored."""
        return latest(self.read_all())

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        if self.fmt == "csv":
            new = not self.path.is_file() or self.path.stat().st_size == 0
            with open(self.path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(self.columns)
                for r in rows:
                    w.writerow([_na(r.get(c)) for c in self.columns])
                f.flush()
                os.fsync(f.fileno())
            return
        self._write_part(_typed({c: [r.get(c) for r in rows] for c in self.columns}, self.columns))

    def _write_part(self, typed: Mapping[str, np.ndarray]) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        parts = self._parts()
        n = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        tmp = self.path / f".part-{n:06d}.parquet.tmp"
        pq.write_table(pa.table({c: typed[c] for c in self.columns}), tmp)
        final = self.path / f"part-{n:06d}.parquet"
        os.replace(tmp, final)
        return final

    def compact(self, rows: Mapping[str, np.ndarray]) -> None:
        """Replace the stored lines by ``rows`` (typed columns, one per key), crash-safe: CSV is
        written to a temporary file and renamed; Parquet gets one new part holding all rows,
        then the older parts are removed (a crash in between leaves lines the new part
        supersedes)."""
        n = len(rows["pair_id"])
        if self.fmt == "csv":
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.columns)
                for i in range(n):
                    w.writerow([_cell(c, rows[c][i]) for c in self.columns])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return
        old = self._parts()
        self._write_part(rows)
        for p in old:
            p.unlink()


def _cell(column: str, v: Any) -> str:
    """A typed value as its CSV cell, as :meth:`RowStore.append` writes it (missing: "")."""
    if isinstance(v, np.generic):
        v = v.item()
    if _kind_of(column) is int and v == -1:
        return ""
    return _na(v)


def pair_rows(item, names: Sequence[str], heads: Mapping[str, Any], orig: Mapping | None,
              trans: Mapping | None, k: int, conventions: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of one pair (one per classifier) from the step's outputs at position ``k``.

    ``item``: a :class:`covidmt_jax.scoring.pairs.Loaded`; ``orig`` / ``trans``: the
    :class:`~covidmt_jax.scoring.step.Scorer` outputs (None for a pair that failed to load).
    """
    sfxs = [convention_suffix(i, c) for i, c in enumerate(conventions)] or [""]
    rows = []
    for name in names:
        r: dict[str, Any] = {"pair_id": item.pair_id, "index": item.index, "label": item.label,
                             "model": name, "orig_h": item.orig_hw[0], "orig_w": item.orig_hw[1],
                             "trans_h": item.trans_hw[0], "trans_w": item.trans_hw[1],
                             "error": item.error, INPUT_SIG: item.signature}
        if orig is not None and not item.error:
            thr = heads[name].threshold
            for side, o in (("orig", orig), ("trans", trans)):
                r[f"prob_{side}"] = float(o[name]["prob"][k])
                r[f"heat_frac_{side}"] = float(o[name]["heat_frac"][k])
                for sfx in sfxs:
                    r[f"iol_{side}{sfx}"] = float(o[name][f"iol{sfx}"][k])
                    r[f"lung_frac_{side}{sfx}"] = float(o[f"lung_frac{sfx}"][k])
                r[f"qc_flags_{side}"] = flags_text(o["qc"][k]["flags"])
            if not (np.isfinite(r["prob_orig"]) and np.isfinite(r["prob_trans"])):
                r["error"] = f"{ERR_NONFINITE}: probability is NaN or Inf"
            else:
                r["pred_orig"] = int(r["prob_orig"] >= thr)
                r["pred_trans"] = int(r["prob_trans"] >= thr)
                r["flip"] = int(r["pred_orig"] != r["pred_trans"])
            empty = [s for s, key in (("original", "lung_frac_orig"), ("transmitted", "lung_frac_trans"))
                     if not r[key] > 0]
            if empty and not r["error"]:
                r["error"] = f"{ERR_LUNGS}: no lung pixel on the {' and '.join(empty)} image"
        rows.append(r)
    return rows
