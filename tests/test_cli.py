"""The shared CLI runner (covidmt_jax.cli): config mistakes as one or two lines, exit status 2,
tracebacks only on request; the same behaviour for train and score."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from covidmt_jax import cli, score

ROOT = Path(__file__).resolve().parents[1]
DEMO = f"--config={ROOT / 'configs' / 'score_demo.py'}:model=/nonexistent/model"


def _run(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
    full_env.update(COVIDMT_NO_MALLOC_TUNING="1", PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_score_unknown_key_subprocess(tmp_path):
    r = _run("covidmt_jax.score", DEMO, f"--workdir={tmp_path}", "--config.pairs.limt=3")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 2 and "Traceback" not in r.stderr, r.stderr
    assert "limt" in r.stderr and "limit" in r.stderr and "config.pairs" in r.stderr
    assert not (tmp_path / "job.json").exists()


def test_train_wrong_type_subprocess_and_verbose_env(tmp_path):
    cfg = f"--config={ROOT / 'configs' / 'demo.py'}"
    r = _run("covidmt_jax.train", cfg, f"--workdir={tmp_path}", "--config.seed=abc")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    assert "config.seed" in r.stderr and "int" in r.stderr and "Traceback" not in r.stderr
    r = _run("covidmt_jax.train", cfg, f"--workdir={tmp_path}", "--config.seed=abc",
             **{cli.VERBOSE_ENV: "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr


def _in_process(capsys, *args: str) -> tuple[int, str]:
    rc = score.main(["score", *args])
    return rc, capsys.readouterr().err


def test_bad_values_name_the_key_and_choices(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    rc, err = _in_process(capsys, DEMO, f"--workdir={tmp_path}", "--config.cam.method=gradcm")
    assert rc == 2 and "config.cam.method" in err and "'hirescam'" in err and "Traceback" not in err
    rc, err = _in_process(capsys, DEMO, f"--workdir={tmp_path}", "--config.batch_size=many")
    assert rc == 2 and "config.batch_size" in err and "int" in err
    rc, err = _in_process(capsys, DEMO, f"--workdir={tmp_path}", "--config.gallery.flipped.x=1")
    assert rc == 2 and "config.gallery.flipped" in err
    rc, err = _in_process(capsys, f"--config={ROOT / 'configs' / 'score_demo.py'}:colour=red",
                          f"--workdir={tmp_path}")
    assert rc == 2 and "colour" in err and "model=DIR" in err and len(err.strip().splitlines()) <= 2
    rc, err = _in_process(capsys, f"--config={tmp_path / 'missing.py'}", f"--workdir={tmp_path}")
    assert rc == 2 and "missing.py" in err
    rc, err = _in_process(capsys, DEMO)
    assert rc == 2 and "--workdir" in err
    rc, err = _in_process(capsys, DEMO, f"--workdir={tmp_path}", "--config.bogus=1", "--verbose")
    assert rc == 2 and "Traceback" in err and "bogus" in err


@pytest.mark.parametrize("seconds,text", [(0, "0:00:00"), (3725.9, "1:02:05"), (float("nan"), "?"),
                                          (float("inf"), "?")])
def test_hms(seconds, text):
    assert cli.hms(seconds) == text


def test_train_bad_task_option_fails_before_any_data(tmp_path, capsys, monkeypatch):
    """A mistyped loss option (here the box task's focal gamma) would otherwise be ignored
    silently: the trainer refuses it in one line, naming the option and the known ones,
    before it builds a data source or a model."""
    from covidmt_jax import train
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    cfg = tmp_path / "bad_option.py"
    cfg.write_text("from covidmt_jax.demo import demo_train_config\n\n"
                   "def get_config(arg=None):\n"
                   "    c = demo_train_config('covidmt', size=64, n=16, shortcut=0.9, steps=2, width=0.25)\n"
                   "    c.task_options.box.focal_gama = 1.0\n"
                   "    return c\n")
    monkeypatch.setattr(train, "build_sources", lambda *a, **k: pytest.fail("data loaded before the check"))
    rc = train.main(["train", f"--config={cfg}", f"--workdir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) <= 2 and "Traceback" not in err, err
    assert "config.task_options.box" in err and "'focal_gama'" in err and "'focal_gamma'" in err, err
    assert not (tmp_path / "run").exists()  # a refused config leaves no run directory behind


def test_train_bad_box_head_norm_is_one_line(tmp_path, capsys, monkeypatch):
    """``model.kwargs.box_head_norm`` is checked with the config: a wrong value is one line naming
    the key and the choices, before any data source, not a traceback from the model's build."""
    from covidmt_jax import train
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(train, "build_sources", lambda *a, **k: pytest.fail("data loaded before the check"))
    rc = train.main(["train", f"--config={ROOT / 'configs' / 'demo.py'}:steps=2,n=16,size=64",
                     "--config.model.kwargs.box_head_norm=batch",
                     f"--workdir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) <= 2 and "Traceback" not in err, err
    assert "config.model.kwargs.box_head_norm" in err and "'group'" in err and "'batch'" in err, err
    assert not (tmp_path / "run").exists()
