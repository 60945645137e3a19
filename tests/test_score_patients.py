"""The scoring job's patients (``config.pairs.patients``): COVIDx label files and CSV maps,
their errors, and patient-clustered statistics in a scoring job's summary."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from covidmt_jax import metrics
from covidmt_jax.config_lib import ConfigError
from covidmt_jax.data.records import DataError
from covidmt_jax.scoring import job
from covidmt_jax.scoring import patients as P
from test_score import exported  # noqa: F401  (module-scoped fixture)
from test_score_inputs import _class_folder, _folder_cfg


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_covidx_label_file_names_patients_by_source(tmp_path):
    f = _write(tmp_path / "test.txt",
               "5 a.png positive cohen\n5 b.jpg negative rsna\nCOVID 70 COVID(70).png positive sirm\n"
               "5 c.png positive cohen\n")
    m = P.read_patient_map([f])
    assert {k: v[0] for k, v in m.by_path.items()} == {"a.png": "cohen/5", "b.jpg": "rsna/5",
                                                       "COVID(70).png": "sirm/COVID 70", "c.png": "cohen/5"}
    assert m.by_path["c.png"][1] == f"{f}:4"
    old = _write(tmp_path / "v1.txt", "7 d.png COVID-19\n")  # an old version without a source column
    assert P.read_patient_map([old]).by_path["d.png"][0] == "7"


def test_versions_with_and_without_a_source_column_combine(tmp_path):
    # v1-style lines give no source; a later version names it for the same film (a.png) or
    # for another film of the same patient id (b.png takes cohen from a.png's patient)
    v1 = _write(tmp_path / "test_v1.txt", "5 a.png COVID-19\n5 b.png COVID-19\n9 z.png normal\n")
    v8 = _write(tmp_path / "test_v8.txt", "5 a.png positive cohen\n9 y.png negative rsna\n9 x.png negative sirm\n")
    m = {k: v[0] for k, v in P.read_patient_map([v1, v8]).by_path.items()}
    assert m == {"a.png": "cohen/5", "b.png": "cohen/5", "z.png": "9",  # 9: two sources, left as it is
                 "y.png": "rsna/9", "x.png": "sirm/9"}
    clash = _write(tmp_path / "clash.txt", "6 a.png positive cohen\n")
    with pytest.raises(DataError, match=r"clash.txt: line 1: 'a.png' is patient 'cohen/6' here but 'cohen/5'"):
        P.read_patient_map([v8, clash])


def test_real_covidx_versions_combine(shared_data):
    files = sorted((shared_data / "labels" / "covidx").glob("*.txt"))
    assert len(files) == 15
    m = P.read_patient_map(files)  # every released list at once: no film with two patients
    assert len(m) > 30_000
    # the first line of test_COVIDx.txt (v1) is an RSNA film listed without a source; later
    # versions name RSNA for it
    first = (shared_data / "labels" / "covidx" / "test_COVIDx.txt").read_text().split()
    assert m.by_path[first[1]][0] == f"rsna/{first[0]}"


def test_csv_map_and_matching_by_path_or_file_name(tmp_path):
    f = _write(tmp_path / "p.csv", "File Name,Patient ID,age\nx0.png,p1,50\nsub/x1.png,p2,60\n"
                                    "/data/covidx/test/x2.png,p3,70\n")
    m = P.read_patient_map([f])
    got = P.pair_patients(["1_COVID-19/x0.png", "sub/x1.png", "0_NON_COVID/x2.png"], m)
    assert got == {"1_COVID-19/x0.png": "p1", "sub/x1.png": "p2", "0_NON_COVID/x2.png": "p3"}
    with pytest.raises(ConfigError, match=r"2 of 3 pairs have no patient in .*p.csv .*'a/x9.png'"):
        P.pair_patients(["x0.png", "a/x9.png", "x8.png"], m, [f])
    assert P.patient_files(" a.txt, b.csv ,") == [Path("a.txt"), Path("b.csv")]
    gz = tmp_path / "p.csv.gz"
    import gzip
    gz.write_bytes(gzip.compress(b"image,patient\nq.png,p9\n"))
    assert P.read_patient_map([gz]).by_path["q.png"][0] == "p9"


def test_a_file_name_that_cannot_tell_the_patient_is_an_error(tmp_path):
    f = _write(tmp_path / "p.csv", "path,patient\nsiteA/x.png,p1\nsiteB/x.png,p2\nsiteA/y.png,p3\n")
    m = P.read_patient_map([f])
    assert P.pair_patients(["siteA/x.png", "siteB/x.png"], m) == {"siteA/x.png": "p1", "siteB/x.png": "p2"}
    with pytest.raises(ConfigError, match=r"'other/x.png' matches by file name only.*'p1' at .*p.csv:2; 'p2' at"):
        P.pair_patients(["other/x.png"], m)
    with pytest.raises(ConfigError, match=r"pairs 'a/y.png' and 'b/y.png' share the file name 'y.png'"):
        P.pair_patients(["a/y.png", "b/y.png"], m)


@pytest.mark.parametrize("text, match", [
    ("name,who\nx.png,p\n", r"needs a file column .* the header is \['name', 'who'\]"),
    ("filename,patient\nx.png,\n", "line 2: empty patient"),
    ("filename,patient\nx.png,p1\nx.png,p2\n", r"line 3: 'x.png' is patient 'p2' here but 'p1' at .*p.csv:2"),
    ("filename,patient\n", "no patient listed"),
])
def test_bad_csv_maps_name_the_file_and_line(tmp_path, text, match):
    f = _write(tmp_path / "p.csv", text)
    with pytest.raises(DataError, match=match) as e:
        P.read_patient_map([f])
    assert str(f) in str(e.value)


def test_conflict_across_files_and_missing_file(tmp_path):
    a = _write(tmp_path / "a.txt", "5 x.png positive cohen\n")
    same = _write(tmp_path / "same.txt", "5 x.png positive cohen\n")
    other = _write(tmp_path / "b.csv", "file,patient\nx.png,someone\n")
    assert P.read_patient_map([a, same]).by_path["x.png"][0] == "cohen/5"  # two versions agreeing
    with pytest.raises(DataError, match=r"b.csv.*'x.png' is patient 'someone' here but 'cohen/5' at .*a.txt:1"):
        P.read_patient_map([a, other])
    with pytest.raises(DataError, match="patient file not found"):
        P.read_patient_map([tmp_path / "nope.txt"])


def test_real_covidx_test_list(shared_data):
    f = shared_data / "labels" / "covidx" / "test_COVIDx9B.txt"
    m = P.read_patient_map([f])
    assert len(m) == 400 and len({v[0] for v in m.by_path.values()}) == 378


def test_scoring_job_clusters_by_patient_and_adds_patients_later(exported, tmp_path):  # noqa: F811
    root = _class_folder(tmp_path / "films", {"0_NON_COVID": 4, "1_COVID-19": 4})
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    out = tmp_path / "out"
    plain = job.run(_folder_cfg(exported, root), out)
    assert "n_patients" not in plain
    # the same job, told that the films are of 3 patients: nothing is scored again
    pmap = _write(tmp_path / "patients.csv", "path,patient\n" + "".join(
        f"{n},p{min(i // 3, 2)}\n" for i, n in enumerate(names)))
    cfg = _folder_cfg(exported, root, patients=str(pmap))
    summary = job.run(cfg, out)
    assert summary["job"]["scored_this_run"] == 0 and summary["job"]["patient_files"] == [str(pmap)]
    assert summary["n_patients"] == 3 and "Korn-Graubard" in summary["intervals"]["proportions"]
    assert "Obuchowski" in summary["intervals"]["roc_auc"]
    with open(out / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "patients.csv", newline="") as f:
        patient = {r["pair_id"]: r["patient"] for r in csv.DictReader(f)}
    assert sorted(patient) == names and len(set(patient.values())) == 3
    flips = np.array([r["flip"] == "1" for r in rows])
    want = metrics.clustered_binomial_ci(flips, [patient[r["pair_id"]] for r in rows])
    pi = summary["models"]["resnet18"]["pi"]
    assert (pi["score"], pi["lo"], pi["hi"]) == pytest.approx(tuple(100 * v for v in want), nan_ok=True)
    text = (out / "report.md").read_text()
    assert "come from 3 patients, some with several pairs" in text and "Patients: from `patients.csv`" in text
    assert json.loads((out / "summary.json").read_text())["n_patients"] == 3
    # a pair without a patient stops the job before anything is scored or written
    short = _write(tmp_path / "short.csv", "path,patient\n" + "".join(f"{n},p\n" for n in names[1:]))
    shutil.copy(out / "summary.json", tmp_path / "kept.json")
    with pytest.raises(ConfigError, match=r"1 of 8 pairs have no patient .*short.csv"):
        job.run(_folder_cfg(exported, root, patients=str(short)), out)
    assert (out / "summary.json").read_text() == (tmp_path / "kept.json").read_text()
    # without patients again: the pair -> patient map of the earlier run is removed
    again = job.run(_folder_cfg(exported, root), out)
    assert "n_patients" not in again and not (out / "patients.csv").exists()



def test_wacxr_pairs_take_their_patients_from_a_covidx_label_file(tmp_path):
    from PIL import Image

    from covidmt_jax.data.sources import get_source
    films = {"1_COVID-19": ["a.png", "b.png"], "0_NON_COVID": ["c.png"]}
    for side in ("covid_binary_test", "covid_binary_test_whatsapp"):
        for cls, names in films.items():
            (tmp_path / side / cls).mkdir(parents=True)
            for n in names:
                Image.new("L", (16, 16), 100).save(tmp_path / side / cls / n)
    labels = _write(tmp_path / "test_COVIDx8B.txt",
                    "17 a.png positive ricord\n17 b.png positive ricord\n17 c.png negative rsna\n")
    src = get_source("wacxr", root=str(tmp_path))
    got = P.pair_patients(list(src.ids), P.read_patient_map([labels]))
    assert got == {"1_COVID-19/a.png": "ricord/17", "1_COVID-19/b.png": "ricord/17",
                   "0_NON_COVID/c.png": "rsna/17"}
