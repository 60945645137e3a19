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
  where the line has a data source (patient ids are numbered per source in COVIDx, so ``5`` of
  ``cohen`` and ``5`` of another source are different people), else ``<patientid>``;
- a ``.csv`` file with a header holding a file column (:data:`FILE_COLUMNS`) and a patient
  column (:data:`PATIENT_COLUMNS`).

A pair is matched by its id (the relative path of its original, e.g. ``1_COVID-19/NAME.png``
for WaCXR), else by the id's file name. Every selected pair must have a patient (otherwise a
:class:`~covidmt_jax.config_lib.ConfigError` names how many lack one and examples), and a file
name given two different patients is a :class:`~covidmt_jax.data.records.DataError` naming both
places. The patients only change the statistics, never a row: they are not part of the job's
fingerprint, so adding them to a finished job re-summarises it without scoring anything again.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

from covidmt_jax.config_lib import ConfigError
from covidmt_jax.data.records import DataError, iter_csv
from covidmt_jax.data.sources.covidx import parse_covidx

__all__ = ["FILE_COLUMNS", "PATIENT_COLUMNS", "patient_files", "read_patient_map", "pair_patients"]

#: Header names of the file column of a ``.csv`` patient file (the first one present is used).
FILE_COLUMNS = ("filename", "file", "image", "path", "pair_id")
#: Header names of the patient column of a ``.csv`` patient file.
PATIENT_COLUMNS = ("patient", "patient_id", "patientid", "PatientID", "patientId")


def patient_files(spec: str | Sequence[str]) -> list[Path]:
    """The files of ``config.pairs.patients``: a comma-separated string or a sequence."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [Path(os.path.expanduser(str(s).strip())) for s in items if str(s).strip()]


def _key(name: str) -> str:
    return PurePosixPath(str(name).replace("\\", "/")).as_posix()


def _csv_entries(path: Path) -> list[tuple[int, str, str]]:
    out = []
    file_col = patient_col = None
    for n, header, row in iter_csv(path):
        if file_col is None:
            file_col = next((header.index(c) for c in FILE_COLUMNS if c in header), None)
            patient_col = next((header.index(c) for c in PATIENT_COLUMNS if c in header), None)
            if file_col is None or patient_col is None:
                raise DataError(path, f"line 1: a patient file needs a file column (one of "
                                      f"{list(FILE_COLUMNS)}) and a patient column (one of "
                                      f"{list(PATIENT_COLUMNS)}); the header is {header}")
        if len(row) <= max(file_col, patient_col):
            raise DataError(path, f"line {n}: {len(row)} field(s), the header has {len(header)}")
        name, patient = row[file_col].strip(), row[patient_col].strip()
        if not name or not patient:
            raise DataError(path, f"line {n}: empty {'file name' if not name else 'patient'}")
        out.append((n, name, patient))
    return out


def _covidx_entries(path: Path) -> list[tuple[int, str, str]]:
    return [(r.line, r.filename, f"{r.data_source}/{r.patient_id}" if r.data_source else r.patient_id)
            for r in parse_covidx(path)]


def read_patient_map(files: Sequence[str | os.PathLike]) -> dict[str, tuple[str, str]]:
    """``{file name: (patient, "file:line")}`` of the patient files (see the module docstring).

    A ``.csv`` file is read as a table, any other as a COVIDx label file. The same name with two
    different patients (in one file or across files) raises :class:`DataError` naming both
    lines; the same name with the same patient twice (e.g. two COVIDx versions) is fine."""
    out: dict[str, tuple[str, str]] = {}
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise DataError(path, "patient file not found" if not path.exists() else "not a file")
        entries = _csv_entries(path) if path.suffix.lower() == ".csv" else _covidx_entries(path)
        if not entries:
            raise DataError(path, "no patient listed")
        for n, name, patient in entries:
            key, where = _key(name), f"{path}:{n}"
            prior = out.get(key)
            if prior is not None and prior[0] != patient:
                raise DataError(path, f"line {n}: {name!r} is patient {patient!r} here but "
                                      f"{prior[0]!r} at {prior[1]}")
            out.setdefault(key, (patient, where))
    return out


def pair_patients(pair_ids: Sequence[str], patients: Mapping[str, tuple[str, str]],
                  files: Sequence[os.PathLike] = ()) -> dict[str, str]:
    """``{pair_id: patient}`` for every pair: by the id itself, else by its file name.

    Raises :class:`ConfigError` naming how many pairs have no patient, with examples."""
    out: dict[str, str] = {}
    missing = []
    for pid in pair_ids:
        key = _key(pid)
        hit = patients.get(key) or patients.get(PurePosixPath(key).name)
        if hit is None:
            missing.append(pid)
        else:
            out[pid] = hit[0]
    if missing:
        where = ", ".join(str(f) for f in files) or "the patient files"
        raise ConfigError(f"config.pairs.patients: {len(missing)} of {len(pair_ids)} pairs have no "
                          f"patient in {where} (e.g. {', '.join(repr(m) for m in missing[:3])}); "
                          "every pair needs one (matched by pair id or file name)")
    return out
