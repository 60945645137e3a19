"""Start-up checks of the training CLI: ``--help``, config keys refused in one line before any
run directory is made (best metric, intervals, CPU conv switch, model names and arguments,
the workdir itself), a resume refused when the config changed the model, and a NaN loss
reported in one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from covidmt_jax import cli, config_lib, score, study, train
from covidmt_jax.config_lib import ConfigError

from test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = f"--config={ROOT / 'configs' / 'demo.py'}:steps=2,n=16,size=32"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)


def _refused(capsys, monkeypatch, tmp_path, *overrides: str, workdir: Path | None = None) -> str:
    """Run the train CLI in-process; assert a one-line exit-2 refusal before any data source
    and no run directory; return stderr."""
    monkeypatch.setattr(train, "build_sources", lambda *a, **k: pytest.fail("data loaded before the check"))
    run = workdir or tmp_path / "run"
    rc = train.main(["train", DEMO, *overrides, f"--workdir={run}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if workdir is None:
        assert not run.exists()
    return err


# ----------------------------------------------------------------------------- 1. --help

@pytest.mark.parametrize("main", [train.main, score.main, study.main])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_exits_0(main, flag, capsys):
    assert main(["prog", flag]) == 0
    out, err = capsys.readouterr()
    assert not err, err
    for word in ("usage: python -m covidmt_jax.", "--config ", "--config.<key>=VALUE", "--workdir",
                 "--verbose", "-h, --help"):
        assert word in out, out


def test_help_from_the_command_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COVIDMT_NO_MALLOC_TUNING": "1"}
    r = subprocess.run([sys.executable, "-m", "covidmt_jax.train", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--workdir" in r.stdout and "bad config" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- 2. eval.best_metric

def test_best_metric_typo_is_refused_listing_the_valid_names(tmp_path, capsys, monkeypatch):
    err = _refused(capsys, monkeypatch, tmp_path, "--config.eval.best_metric=covid/auc")
    assert "config.eval.best_metric" in err and "'covid/auc'" in err, err
    assert "'covid/roc_auc'" in err and "'box/ap50'" in err and "'nodule/accuracy'" in err, err


def test_reported_metrics_are_what_evaluation_reports():
    from covidmt_jax.tasks import build_tasks
    assert train.reported_metrics(build_tasks(["lungs"])) == ["lungs/dice"]
    names = train.reported_metrics(build_tasks(["covid", "box"]))
    assert names == ["covid/roc_auc", "covid/sensitivity", "covid/specificity", "covid/accuracy",
                     "box/map", "box/ap50"]
    # each kind's METRICS are the keys its summarize returns, in order
    collected = {"covid": {"label": np.array([0.0, 1.0, 1.0]), "prob": np.array([0.2, 0.7, 0.4])},
                 "box": {"pred_boxes": [np.array([[0.1, 0.1, 0.5, 0.5]])], "pred_scores": [np.array([0.9])],
                         "gt_boxes": [np.array([[0.1, 0.1, 0.5, 0.6]])]},
                 "lungs": {"dice": np.array([0.9, 0.8])}}
    for task in build_tasks(["covid", "box", "lungs"]):
        assert tuple(task.summarize(collected[task.name])) == task.METRICS, task.name


# ----------------------------------------------------------------------------- 3. intervals

@pytest.mark.parametrize("key", config_lib.INTERVAL_KEYS)
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_interval_keys_must_be_positive_integers(key, value):
    import ml_collections
    c = ml_collections.ConfigDict(tiny_config().to_dict(), type_safe=False)  # as a config file may set it
    parent, _, leaf = key.rpartition(".")
    (config_lib.get_dotted(c, parent) if parent else c)[leaf] = value
    with pytest.raises(ConfigError, match=rf"config\.{key}=.*integer >= 1"):
        config_lib.validate(c)


def test_zero_checkpoint_interval_refused_by_the_cli(tmp_path, capsys, monkeypatch):
    err = _refused(capsys, monkeypatch, tmp_path, "--config.checkpoint.every_steps=0")
    assert "config.checkpoint.every_steps=0" in err, err


# ----------------------------------------------------------------------------- 4. / 5. model

def test_bad_cpu_conv_kernels_is_one_line(tmp_path, capsys, monkeypatch):
    err = _refused(capsys, monkeypatch, tmp_path, "--config.model.cpu_conv_kernels=bogus")
    assert "config.model.cpu_conv_kernels" in err and "bogus" in err and "pointwise" in err, err


def test_unknown_backbone_is_refused_before_the_workdir(tmp_path, capsys, monkeypatch):
    err = _refused(capsys, monkeypatch, tmp_path, "--config.model.kwargs.backbone=resnet19")
    assert "config.model.kwargs.backbone='resnet19'" in err and "'resnet18'" in err, err


def test_model_arguments_refused_before_the_workdir(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_sources", lambda *a, **k: pytest.fail("data loaded before the check"))
    c = tiny_config(model="resnet18")
    c.model.kwargs = {"no_such_argument": 1}
    with pytest.raises(ConfigError, match=r"config\.model .*no_such_argument"):
        train.train(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 6. workdir

def test_workdir_that_is_a_file_or_cannot_be_made(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    err = _refused(capsys, monkeypatch, tmp_path, workdir=afile)
    assert str(afile) in err and "not a directory" in err, err
    assert afile.read_text() == "keep me"
    below_file = afile / "run"
    err = _refused(capsys, monkeypatch, tmp_path, workdir=below_file)
    assert str(below_file) in err and "cannot create" in err, err


# ----------------------------------------------------------------------------- 7. resume

def test_config_changes_split_state_shape_keys():
    old = {"seed": 0, "tasks": ["covid"], "model": {"kwargs": {"stage_widths": [8, 16]}, "cpu_conv_kernels": "auto"},
           "optimizer": {"name": "adam", "lr": 1e-3, "grad_clip": 0.0}}
    new = {"seed": 1, "tasks": ["covid"], "model": {"kwargs": {"stage_widths": [8, 32]}, "cpu_conv_kernels": "off"},
           "optimizer": {"name": "adam", "lr": 1e-4, "grad_clip": 1.0}}
    assert train.config_changes(old, new) == (["model.kwargs.stage_widths", "optimizer.grad_clip"],
                                              ["model.cpu_conv_kernels", "optimizer.lr", "seed"])
    new["optimizer"]["grad_clip"] = 0.0
    new["model"]["kwargs"]["stage_widths"] = [8, 16]
    assert train.config_changes(old, new)[0] == []
    # the compute dtype (bf16 on a GPU after a CPU start) keeps the float32 state: resumable
    old["model"]["dtype"], new["model"]["dtype"] = "float32", "bfloat16"
    assert train.config_changes(old, new) == ([], ["model.cpu_conv_kernels", "model.dtype", "optimizer.lr", "seed"])


def test_resume_with_another_model_is_refused_and_keeps_config_json(tmp_path):
    c = tiny_config(model="resnet18", steps=2)
    c.data.val = {}
    c.model.kwargs = {"stage_widths": (8, 8, 8, 8)}
    train.train(c, tmp_path)
    stored = (tmp_path / "config.json").read_text()
    wider = tiny_config(model="resnet18", steps=2)
    wider.data.val = {}
    wider.model.kwargs = {"stage_widths": (8, 8, 8, 16)}
    with pytest.raises(ConfigError, match=r"model\.kwargs\.stage_widths: \[8, 8, 8, 8\] -> \[8, 8, 8, 16\]"):
        train.train(wider, tmp_path)
    assert (tmp_path / "config.json").read_text() == stored
    # without the stored config the checkpoint itself refuses, naming the workdir
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match=rf"--workdir {tmp_path}: its checkpoint \(step 2\) does not fit"):
        train.train(wider, tmp_path)
    assert not (tmp_path / "config.json").exists()


# ----------------------------------------------------------------------------- 8. NaN

def test_nonfinite_message_without_a_checkpoint():
    msg = train.nonfinite_message(3, ["covid"], None, Path("/w/checkpoints"))
    assert "None" not in msg and "no checkpoint had been written yet" in msg and "step 3" in msg
    assert "last good checkpoint (step 2)" in train.nonfinite_message(3, [], 2, Path("/w/checkpoints"))


def test_nan_loss_from_the_cli_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "nan.py"
    cfg.write_text("from covidmt_jax.demo import demo_train_config\n\n"
                   "def get_config(arg=None):\n"
                   "    c = demo_train_config('baseline', size=32, n=16, shortcut=0.9, steps=40, width=0.25)\n"
                   "    c.data.val = {}\n"
                   "    c.checkpoint.every_steps = 1000\n"
                   "    c.optimizer.name = 'sgd'\n"
                   "    c.optimizer.momentum = 0.0\n"
                   "    c.optimizer.lr = 1e12\n"
                   "    return c\n")
    rc = train.main(["train", f"--config={cfg}", f"--workdir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_RUN and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("train: error: non-finite loss at step") and "step None" not in err, err
    assert "no checkpoint had been written yet" in err, err
