"""The trainer and bad input data: ``data.on_error`` ("raise" stops with one line naming the
file; "skip" leaves the file out, logs it once, lists it in summary.json, and a killed +
resumed run equals an uninterrupted one), "no records" errors naming split and source,
strict-JSON ``metrics.jsonl`` and the evaluation progress line."""
from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from covidmt_jax.cpu_malloc import MALLOC_ENV
from covidmt_jax.data import images

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **MALLOC_ENV}
SIZE = 32
BAD = "COVID-19/img05.png"


def make_folder(root: Path, n: int = 12, bad: str | None = BAD) -> Path:
    """``n`` small PNGs in ``COVID-19/`` and ``normal/`` (COVID-19 brighter); ``bad`` is
    truncated after its PNG signature and header, so it passes the source's format sniffing
    and fails only when decoded (in the pipeline, mid-run)."""
    for i in range(n):
        rel = f"{'COVID-19' if i % 2 else 'normal'}/img{i:02d}.png"
        rng = np.random.default_rng(i)
        a = np.clip(0.4 + 0.15 * rng.standard_normal((SIZE, SIZE)) + (0.2 if i % 2 else 0.0), 0, 1)
        data = images.encode_png(a)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data[:60] if rel == bad else data)
    return root


# A run script: the tiny config of test_train on an image folder; the "killing_folder"
# source SIGKILLs its own process when it reads its KILL_AT-th record (0 = never).
RUN_SCRIPT = textwrap.dedent("""
    import logging, os, signal, sys, threading
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
    sys.path.insert(0, {tests!r})
    from test_train import tiny_config
    from covidmt_jax.config_lib import dataset_entry
    from covidmt_jax.data.sources import register_source
    from covidmt_jax.data.sources.folder import ImageFolderSource
    from covidmt_jax.train import train

    KILL_AT = int(os.environ.get("KILL_AT", "0"))
    lock = threading.Lock()
    reads = [0]

    @register_source("killing_folder")
    class KillingFolder(ImageFolderSource):
        def __getitem__(self, i):
            with lock:
                reads[0] += 1
                if reads[0] == KILL_AT:
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().__getitem__(i)

    c = tiny_config(model="covidnet", steps={steps}, size={size})
    folder = dict(root={folder!r}, labels_from_subfolders=True)
    c.data.train = {{"covidx": dataset_entry("killing_folder", **folder)}}
    c.data.val = {{"covidx": dataset_entry("folder", **folder)}}
    c.data.on_error = {on_error!r}
    c.eval.every_epochs = 1000   # evaluate once, at the end
    c.checkpoint.every_steps = 2
    train(c, {workdir!r})
""")


def _script(tmp_path: Path, name: str, workdir: Path, folder: Path, *, steps: int, on_error: str = "skip") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(RUN_SCRIPT.format(tests=str(Path(__file__).parent), steps=steps, size=SIZE,
                                      folder=str(folder), on_error=on_error, workdir=str(workdir)))
    return path


def _run(script: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    import os
    env = {**os.environ, **ENV, "KILL_AT": str(kill_at)}
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def _params(workdir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(workdir / "export" / "final" / "params.safetensors"))


def test_skip_logs_once_counts_in_summary_and_resume_equals_uninterrupted(tmp_path):
    folder = make_folder(tmp_path / "data")
    steps = 12  # 24 training samples: the 12-image folder is read twice, the bad file met twice
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    ref = _run(_script(tmp_path, "ref", ref_dir, folder, steps=steps))
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    bad_path = str(folder / BAD)
    # logged once (the eval pass and the second epoch meet it again), with the problem
    lines = [l for l in ref.stdout.splitlines() if "skipped unreadable record" in l and bad_path in l]
    assert len(lines) == 2 and all("truncated" in l for l in lines), ref.stdout[-3000:]
    assert sum(l.startswith("WARNING folder:data: skipped") for l in lines) == 1      # training
    assert sum(l.startswith("WARNING val:folder:data: skipped") for l in lines) == 1  # evaluation
    summary = json.loads((ref_dir / "summary.json").read_text())
    assert summary["skipped_images"]["count"] == 1
    (entry,) = summary["skipped_images"]["files"]
    assert entry["path"] == bad_path and "truncated" in entry["problem"] and entry["where"] == "train:covidx"
    assert "1 unreadable image(s) left out" in ref.stdout
    # the evaluation progress line
    assert any("eval @12: 3/3 batches (covidx)" in l and "ETA" in l for l in ref.stdout.splitlines()), \
        ref.stdout[-3000:]

    # killed mid-run by its own data source (SIGKILL while reading record 17), then resumed
    killed_script = _script(tmp_path, "killed", killed_dir, folder, steps=steps)
    first = _run(killed_script, kill_at=17)
    assert first.returncode == -9, first.stdout[-3000:] + first.stderr[-3000:]
    assert not (killed_dir / "export" / "final").exists()
    saved = sorted(int(p.name) for p in (killed_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 0 < saved[-1] < steps, saved
    resumed = _run(killed_script)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    rows = [json.loads(l) for l in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, steps + 1))
    a, b = _params(ref_dir), _params(killed_dir)
    assert set(a) == set(b)
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst < 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    assert json.loads((killed_dir / "summary.json").read_text())["skipped_images"] == summary["skipped_images"]


def test_raise_stops_the_cli_with_one_line_naming_the_file(tmp_path):
    import os
    folder = make_folder(tmp_path / "data")
    cfg = tmp_path / "cfg.py"
    cfg.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import tiny_config
        from covidmt_jax.config_lib import dataset_entry

        def get_config():
            c = tiny_config(model="covidnet", steps=4, size={SIZE})
            c.data.train = {{"covidx": dataset_entry("folder", root={str(folder)!r}, labels_from_subfolders=True)}}
            c.data.val = {{}}
            c.data.per_task_batch = 12  # the first batch holds every image
            return c
    """))
    r = subprocess.run([sys.executable, "-m", "covidmt_jax.train", f"--config={cfg}", f"--workdir={tmp_path / 'w'}"],
                       cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and str(folder / BAD) not in r.stderr.replace(errors[0], ""), r.stderr
    assert str(folder / BAD) in errors[0] and "truncated" in errors[0] and "on_error=skip" in errors[0]


def test_on_error_is_validated():
    from test_train import tiny_config

    from covidmt_jax import config_lib
    c = tiny_config(n_tasks=1)
    assert c.data.on_error == "raise"  # the default
    c.data.on_error = "ignore"
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.on_error must be one of \('raise', 'skip'\)"):
        config_lib.validate(c)


def test_no_records_names_the_split_dataset_and_source(tmp_path):
    from covidmt_jax.config_lib import ConfigError, dataset_entry
    from covidmt_jax.train import build_sources
    folder = tmp_path / "data"
    (folder / "normal").mkdir(parents=True)
    (folder / "normal" / "a.png").write_bytes(b"not a png at all")  # fails the format check
    entry = dataset_entry("folder", root=str(folder), labels_from_subfolders=True)
    with pytest.raises(ConfigError) as e:
        build_sources({"covidx": entry}, "val", "skip")
    msg = str(e.value)
    assert "config.data.val.covidx" in msg and "val split" in msg and "'folder'" in msg
    assert "1 item(s) skipped" in msg and "a.png" in msg
    # data.on_error="raise" reaches the source: the bad file itself is the error
    from covidmt_jax.data.records import DataError
    with pytest.raises(DataError, match="a.png"):
        build_sources({"covidx": entry}, "train", "raise")
    # an entry's own on_error wins over the config-wide one
    entry.kwargs.on_error = "raise"
    with pytest.raises(DataError, match="a.png"):
        build_sources({"covidx": entry}, "train", "skip")
    # empty after a hold-out
    make_folder(tmp_path / "one", n=1, bad=None)
    held = dataset_entry("folder", root=str(tmp_path / "one"), holdout=0.9, holdout_part="keep")
    with pytest.raises(ConfigError, match=r"config\.data\.train\.nih: no records in train split .*holding out 0\.9"):
        build_sources({"nih": held}, "train")


def _tb_scalars(folder: Path) -> dict[str, list[float]]:
    """Scalars of the TensorBoard event files under ``folder`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2
    out: dict[str, list[float]] = {}
    for f in folder.rglob("events.out.tfevents.*"):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append(v.simple_value)
    return out


def test_metrics_jsonl_is_strict_json_and_tensorboard_gets_finite_values(tmp_path):
    from covidmt_jax.train import MetricWriter
    w = MetricWriter(tmp_path, resume_step=0)
    w.write(1, "train", {"loss": float("nan"), "grad_norm": np.float32(np.inf), "lr": 1e-3})
    w.write(2, "eval", {"covid/roc_auc": np.float64(0.75), "box/map": -np.inf})
    w.close()

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))

    rows = [strict(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] is None and rows[0]["grad_norm"] is None and rows[0]["lr"] == 1e-3
    assert rows[1]["covid/roc_auc"] == 0.75 and rows[1]["box/map"] is None
    assert _tb_scalars(tmp_path / "tensorboard") == {"train/lr": [pytest.approx(1e-3)],
                                                     "eval/covid/roc_auc": [0.75]}
    # a resumed writer keeps the rows up to its step (null values read back fine)
    MetricWriter(tmp_path, resume_step=1).close()
    assert [strict(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_eval_progress_lines_rate_and_eta(caplog):
    from covidmt_jax.train import EvalProgress
    now = [0.0]
    p = EvalProgress(10, 4, label="eval @5", every_s=5.0, clock=lambda: now[0],
                     logger=logging.getLogger("test.progress"))
    lines = []
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for i in range(10):
            now[0] = 10.0 + 2.0 * i  # batch 1 at t=10 (compiling), then one batch every 2 s
            lines.append(p.update("covidx"))
    logged = [l for l in lines if l]
    # not after the first (untimed) batch; every >= 5 s; always after the last
    assert [l.split(":")[1].split()[0] for l in logged] == ["4/10", "7/10", "10/10"]
    assert logged[0] == "eval @5: 4/10 batches (covidx)  0.50 batches/s  2.0 img/s  ETA 0:00:12"
    assert logged[-1].endswith("ETA 0:00:00")
    assert [r.getMessage() for r in caplog.records] == logged
    # a single-batch pass still reports
    one = EvalProgress(1, 8, clock=lambda: 0.0, logger=logging.getLogger("test.progress"))
    assert one.update() == "eval: 1/1 batches  rate ?  ETA 0:00:00"
