"""Which patient each pair of a scoring job comes from (``config.pairs.patients``).

Test sets hold several films of some patients: in the COVIDx test lists 5-21 % of the films
are of a patient with another film in the list (v1-v9B), in the v9B training list 51 % (one
patient has 236). Films of one patient resemble each other, so counting them as independent pairs
makes every interval too narrow and every paired test too keen. Given the patients, the job's
summary and report use the patient-clustered intervals and tests of
:func:`covidmt_jax.report.summarize`; without, every pair counts as its own patient.

``config.pairs.patients`` names one or more files (comma-separated) that map image file names to
patients:

- a COVIDx label file (``patientid filename class [source]``, any version; parsed by
  :func:`covidmt_jax.data.sources.covidx.parse_covidx`). The patient is ``<source>/<patientid>``
  (patient ids are numbered per source in COVIDx, so ``5`` of ``cohen`` and ``5`` of another
  source are different people). Early versions give no source on some lines (v1-v2, the RSNA
  lines of v3-v5 and 7A): such a line takes the source another listed version gives the same
  film, else the one source its patient id has elsewhere in the files, else it stays
  ``<patientid>``. Several versions can therefore be combined;
- a ``.csv`` (or ``.csv.gz``) file with a header holding a file column (:data:`FILE_COLUMNS`)
  and a patient column (:data:`PATIENT_COLUMNS`; header case, spaces and ``_`` ignored). Its
  file column may hold bare names or paths.

A pair is matched by its id (the relative path of its original, e.g. ``1_COVID-19/NAME.png``
for WaCXR), else by the id's file name against the listed files' names. Every selected pair
must have a patient (otherwise a :class:`~covidmt_jax.config_lib.ConfigError` names how many
lack one, with examples). A file given two different patients is a
:class:`~covidmt_jax.data.records.DataError` naming both places; a pair that only a file name
matches, where two listed files of that name have different patients or two pairs share the
name, is a ConfigError naming them. The patients only change the statistics, never a row: they are not part of the job's
fingerprint, so adding them to a finished job re-summarises it without scoring anything again.
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

from covidmt_jax.config_lib import ConfigError
from covidmt_jax.data.records import DataError, iter_csv
from covidmt_jax.data.sources.covidx import parse_covidx

__all__ = ["FILE_COLUMNS", "PATIENT_COLUMNS", "PatientMap", "patient_files", "read_patient_map",
           "pair_patients"]

#: Header names of the file column of a ``.csv`` patient file (compared lower-case, without
#: spaces or ``_``; the first one present is used).
FILE_COLUMNS = ("filename", "file", "image", "path", "pair_id")
#: Header names of the patient column of a ``.csv`` patient file (compared as above).
PATIENT_COLUMNS = ("patient", "patient_id", "patientid")


def patient_files(spec: str | Sequence[str]) -> list[Path]:
    """The files of ``config.pairs.patients``: a comma-separated string or a sequence."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [Path(os.path.expanduser(str(s).strip())) for s in items if str(s).strip()]


def _key(name: str) -> str:
    return PurePosixPath(str(name).replace("\\", "/")).as_posix()


def _base(key: str) -> str:
    return PurePosixPath(key).name


def _norm(header: str) -> str:
    return header.strip().lower().replace(" ", "").replace("_", "")


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str          # the listed file, normalised (``a/b.png``)
    patient: str      # COVIDx: the patient id; CSV: the patient
    source: str | None  # COVIDx: the data source ("" = none given); CSV: None
    where: str        # "file:line"


@dataclasses.dataclass
class PatientMap:
    """Patients by listed file (``by_path``: normalised path as listed) and by file name
    (``by_name``: a list of ``(patient, where)``, more than one when names collide)."""
    by_path: dict[str, tuple[str, str]]
    by_name: dict[str, list[tuple[str, str]]]

    def __len__(self) -> int:
        return len(self.by_path)


def _csv_entries(path: Path) -> list[_Entry]:
    out = []
    file_col = patient_col = None
    for n, header, row in iter_csv(path):
        if file_col is None:
            norm = [_norm(h) for h in header]
            file_col = next((norm.index(_norm(c)) for c in FILE_COLUMNS if _norm(c) in norm), None)
            patient_col = next((norm.index(_norm(c)) for c in PATIENT_COLUMNS if _norm(c) in norm), None)
            if file_col is None or patient_col is None:
                raise DataError(path, f"line 1: a patient file needs a file column (one of "
                                      f"{list(FILE_COLUMNS)}) and a patient column (one of "
                                      f"{list(PATIENT_COLUMNS)}); the header is {header}")
        if len(row) <= max(file_col, patient_col):
            raise DataError(path, f"line {n}: {len(row)} field(s), the header has {len(header)}")
        name, patient = row[file_col].strip(), row[patient_col].strip()
        if not name or not patient:
            raise DataError(path, f"line {n}: empty {'file name' if not name else 'patient'}")
        out.append(_Entry(_key(name), patient, None, f"{path}:{n}"))
    return out


def _covidx_entries(path: Path) -> list[_Entry]:
    return [_Entry(_key(r.filename), r.patient_id, r.data_source, f"{path}:{r.line}")
            for r in parse_covidx(path)]


def _is_csv(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".csv") or name.endswith(".csv.gz")


def _label(e: _Entry, source: str = "") -> str:
    src = e.source or source
    return f"{src}/{e.patient}" if src else e.patient


def _resolve(entries: Sequence[_Entry]) -> dict[str, tuple[str, str]]:
    """``{key: (patient label, where)}``; DataError where one file has two patients."""
    groups: dict[str, list[_Entry]] = defaultdict(list)
    for e in entries:
        groups[e.key].append(e)
    # the data source of each COVIDx-listed file, across versions
    source_of: dict[str, str] = {}
    sources_of_id: dict[str, set] = defaultdict(set)
    for key, es in groups.items():
        cov = [e for e in es if e.source is not None]
        for a in cov[1:]:
            b = cov[0]
            if a.patient != b.patient or (a.source and b.source and a.source != b.source):
                file, line = a.where.rsplit(":", 1)
                raise DataError(file, f"line {line}: {key!r} is patient {_label(a)!r} here but "
                                      f"{_label(b)!r} at {b.where}")
        src = next((e.source for e in cov if e.source), "")
        if cov:
            source_of[key] = src
            if src:
                sources_of_id[cov[0].patient].add(src)
    out: dict[str, tuple[str, str]] = {}
    for key, es in groups.items():
        first: tuple[str, str] | None = None
        for e in es:
            if e.source is None:
                label = e.patient
            else:
                ids_sources = sources_of_id[e.patient]
                label = _label(e, source_of[key] or (next(iter(ids_sources)) if len(ids_sources) == 1 else ""))
            if first is None:
                first = (label, e.where)
            elif label != first[0]:
                file, line = e.where.rsplit(":", 1)
                raise DataError(file, f"line {line}: {key!r} is patient {label!r} here but "
                                      f"{first[0]!r} at {first[1]}")
        out[key] = first
    return out


def read_patient_map(files: Sequence[str | os.PathLike]) -> PatientMap:
    """The patients of the listed files (see the module docstring).

    A ``.csv`` / ``.csv.gz`` file is read as a table, any other as a COVIDx label file. A file
    listed with two different patients (in one file or across files) raises
    :class:`DataError` naming both lines; the same patient twice (two COVIDx versions) is fine."""
    entries: list[_Entry] = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise DataError(path, "patient file not found" if not path.exists() else "not a file")
        got = _csv_entries(path) if _is_csv(path) else _covidx_entries(path)
        if not got:
            raise DataError(path, "no patient listed")
        entries += got
    by_path = _resolve(entries)
    by_name: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key, hit in by_path.items():
        if all(hit[0] != other[0] for other in by_name[_base(key)]):
            by_name[_base(key)].append(hit)
    return PatientMap(by_path, dict(by_name))


def pair_patients(pair_ids: Sequence[str], patients: PatientMap,
                  files: Sequence[os.PathLike] = ()) -> dict[str, str]:
    """``{pair_id: patient}`` for every pair: by the id itself, else by its file name.

    Raises :class:`ConfigError` naming how many pairs have no patient (with examples), or a pair
    matched by a file name that is ambiguous: two listed files of that name with different
    patients, or two pairs of that name."""
    where = ", ".join(str(f) for f in files) or "the patient files"
    keys = {pid: _key(pid) for pid in pair_ids}
    name_count = Counter(_base(k) for k in keys.values())
    out: dict[str, str] = {}
    missing = []
    for pid, key in keys.items():
        hit = patients.by_path.get(key)
        if hit is not None:
            out[pid] = hit[0]
            continue
        name = _base(key)
        hits = patients.by_name.get(name)
        if not hits:
            missing.append(pid)
            continue
        if len(hits) > 1:
            raise ConfigError(f"config.pairs.patients: pair {pid!r} matches by file name only, and "
                              f"{name!r} is listed with different patients: "
                              + "; ".join(f"{p!r} at {w}" for p, w in hits)
                              + " (list the pair's path as its id)")
        if name_count[name] > 1:
            others = [p for p, k in keys.items() if _base(k) == name and p != pid]
            raise ConfigError(f"config.pairs.patients: pairs {pid!r} and {others[0]!r} share the file "
                              f"name {name!r}, which {where} lists once ({hits[0][1]}): list each "
                              "pair by its path")
        out[pid] = hits[0][0]
    if missing:
        raise ConfigError(f"config.pairs.patients: {len(missing)} of {len(pair_ids)} pairs have no "
                          f"patient in {where} (e.g. {', '.join(repr(m) for m in missing[:3])}); "
                          "every pair needs one (matched by pair id or file name)")
    return out
