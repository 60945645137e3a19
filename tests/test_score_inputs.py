"""The scoring job's guards on its inputs and its workdir: the positive class of labelled
folders, gallery counts, config.json of refused runs, training workdirs, orphan rows, and
sources that list no pair (files ignored by name or magic bytes are reported)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from covidmt_jax import score
from covidmt_jax.config_lib import ConfigError
from covidmt_jax.data.records import DataError
from covidmt_jax.data.sources import get_source
from covidmt_jax.data.sources.folder import walk_images
from covidmt_jax.scoring import config as score_config
from covidmt_jax.scoring import job, pairs
from test_score import S, _cfg, exported  # noqa: F401  (module-scoped fixture)

ROOT = Path(__file__).resolve().parents[1]


def _class_folder(root: Path, classes: dict[str, int]) -> Path:
    """``root/<class>/x<i>.png`` phantom originals, ``classes = {folder: count}``."""
    src = get_source("synthetic_pairs", n=sum(classes.values()), size=S)
    i = 0
    for cls, k in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for _ in range(k):
            (root / cls / f"x{i}.png").write_bytes(src[i]["original"])
            i += 1
    return root


def _folder_cfg(exported, root: Path, **pairs_kw):  # noqa: F811
    c = _cfg(exported, **pairs_kw)
    c.pairs.source = "folder"
    c.pairs.channel = "whatsapp"
    c.pairs.kwargs = {"root": str(root), "labels_from_subfolders": True, "on_error": "skip"}
    c.gallery.flipped = c.gallery.random = c.gallery.qc_flagged = 0
    return c


def _labels(root: Path):
    return get_source("folder", root=str(root), labels_from_subfolders=True)


# ============================================================================ 1. positive class
def test_lone_negative_class_is_never_positive(exported, tmp_path):  # noqa: F811
    """Only 0_NON_COVID/: every film is label 0 (it used to be 1: the lone column)."""
    root = _class_folder(tmp_path / "neg", {"0_NON_COVID": 2})
    assert pairs.label_column(_labels(root), "") == pairs.ALL_NEGATIVE
    job.run(_folder_cfg(exported, root), tmp_path / "out")
    with open(tmp_path / "out" / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["label"] for r in rows} == {"0"}


def test_positive_class_by_name_or_a_clear_error(tmp_path):
    assert pairs.label_column(_labels(_class_folder(tmp_path / "a", {"1_COVID-19": 1})), "") == 0
    two = _labels(_class_folder(tmp_path / "b", {"0_NON_COVID": 1, "1_COVID-19": 1}))
    assert pairs.label_column(two, "") == 1
    other = _labels(_class_folder(tmp_path / "c", {"0_normal": 1, "1_pneumonia": 1}))
    with pytest.raises(ConfigError, match=r"'0_normal', '1_pneumonia'.*pairs\.label="):
        pairs.label_column(other, "")
    assert pairs.label_column(other, "1_pneumonia") == 1  # the user's choice
    lone = _labels(_class_folder(tmp_path / "d", {"images": 1}))
    with pytest.raises(ConfigError, match=r"\['images'\].*pairs\.label="):
        pairs.label_column(lone, "")


# ============================================================================ 2. gallery counts
@pytest.mark.parametrize("key,value", [("random", -1), ("flipped", -1), ("qc_flagged", -3)])
def test_gallery_counts_are_validated(exported, key, value):  # noqa: F811
    c = _cfg(exported)
    c.gallery[key] = value
    with pytest.raises(ConfigError, match=rf"config\.gallery\.{key} must be an integer >= 0"):
        score_config.validate(c)


# ============================================================================ 3.-5. the workdir
def test_refused_resume_keeps_config_json(exported, tmp_path):  # noqa: F811
    cfg = _cfg(exported, n=4)
    job.run(cfg, tmp_path)
    before = (tmp_path / "config.json").read_text()
    cfg.image_size = 2 * S
    with pytest.raises(ConfigError, match="image_size"):
        job.run(cfg, tmp_path)
    assert (tmp_path / "config.json").read_text() == before


def test_training_workdir_is_refused(exported, tmp_path):  # noqa: F811
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "export" / "best").mkdir(parents=True)
    (tmp_path / "summary.json").write_text('{"training": 1}')
    (tmp_path / "config.json").write_text('{"train": 1}')
    with pytest.raises(ConfigError, match=r"holds another kind of run \(checkpoints/, export/"):
        job.run(_cfg(exported, n=4), tmp_path)
    assert (tmp_path / "summary.json").read_text() == '{"training": 1}'
    assert (tmp_path / "config.json").read_text() == '{"train": 1}'
    assert not (tmp_path / "rows.csv").exists() and not (tmp_path / "job.json").exists()


def test_rows_without_job_json_are_refused(exported, tmp_path):  # noqa: F811
    cfg = _cfg(exported, n=4)
    job.run(cfg, tmp_path)
    (tmp_path / "job.json").unlink()
    rows = (tmp_path / "rows.csv").read_text()
    cfg.image_size = 2 * S
    with pytest.raises(ConfigError, match="rows of an unknown job"):
        job.run(cfg, tmp_path)
    assert (tmp_path / "rows.csv").read_text() == rows and not (tmp_path / "job.json").exists()


# ============================================================================ 6. no pairs
def test_uid_named_dicom_is_found_and_other_files_are_reported(tmp_path):
    (tmp_path / "1.2.840.113619.2.55.3.604688").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "2.5.1").write_bytes(b"not an image at all")
    ignored: list = []
    files = walk_images(tmp_path, ignored=ignored)
    assert {p.name: f for p, f in files.items()} == {"1.2.840.113619.2.55.3.604688": "dicom"}
    assert sorted(Path(p).name for p, _ in ignored) == ["2.5.1", "notes.txt"]


def test_no_pairs_is_an_error_naming_the_root(exported, tmp_path):  # noqa: F811
    root = tmp_path / "uids"
    root.mkdir()
    (root / "readme.md").write_text("x")
    (root / "1.2.3.4").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"uids: no pairs to score: 0 image file\(s\) skipped.*"
                                        r"2 other file\(s\) ignored"):
        job.run(_folder_cfg(exported, root), tmp_path / "out")
    assert not (tmp_path / "out" / "job.json").exists()
    summary = job.run(_folder_cfg(exported, root, limit=0), tmp_path / "out0")  # asked for
    assert summary["job"]["n_pairs_selected"] == 0 and summary["job"]["source_ignored"] == 2
    text = (tmp_path / "out0" / "report.md").read_text()
    assert "2 file(s) under the root are not image files and were ignored" in text and "readme.md" in text


def test_cli_empty_folder_exits_2_with_one_line(exported, tmp_path, capsys):  # noqa: F811
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["score", f"--config={ROOT / 'configs' / 'score_channel.py'}:root={empty},"
            f"model={exported['resnet18']},lungs={exported['unet']},size={S},labels=1",
            f"--workdir={tmp_path / 'out'}", "--config.progress=False"]
    assert score.main(argv) == 2
    err = capsys.readouterr().err
    assert "no pairs to score" in err and str(empty) in err and "Traceback" not in err
    assert not (tmp_path / "out" / "summary.json").exists()
