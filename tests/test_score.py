"""The scoring job (covidmt_jax.scoring, CLI covidmt_jax.score): fused step, rows, resume, error rows, reports.

Tiny models (ResNet-18 and a one-backbone COVIDMT at 64 px, a depth-2 U-Net) exported with
``export.save_model`` once per module; synthetic phantom pairs through the WhatsApp preset.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from covidmt_jax import explain, metrics, models, score
from covidmt_jax.scoring import config as score_config
from covidmt_jax.scoring import job, loading, step
from covidmt_jax.scoring.rows import RowStore
from covidmt_jax.config_lib import ConfigError
from covidmt_jax.data import images
from covidmt_jax.data.pipeline import load_pair
from covidmt_jax.data.sources import get_source
from covidmt_jax.export import load_model, save_model

S = 64
COVIDMT_KW = {"tasks": ["infiltration", "covid"], "backbone": "resnet18", "transition_channels": [16],
              "in_channels": 1}
UNET_KW = {"depth": 2, "base_width": 4, "batch_norm": True, "num_classes": 1, "in_channels": 1}


def _unet(bias_shift: float | None):
    """A tiny random U-Net; its head bias is shifted so about half of the pixels are "lung"
    (``bias_shift=None``), or by ``bias_shift`` (a large negative value: no lung at all)."""
    u = models.create("unet", rngs=2, **UNET_KW)
    if bias_shift is None:
        src = get_source("synthetic_pairs", n=4, size=S)
        x = np.stack([load_pair(src[i], S).original for i in range(4)])
        bias_shift = -float(np.median(np.asarray(u(jnp.asarray(x)))))
    u.head.bias[...] = u.head.bias[...] + bias_shift
    return u


def export_tiny_models(d: Path) -> dict[str, Path]:
    """Export the tiny classifiers and U-Nets into ``d``; ``{name: folder}``."""
    r18 = models.create("resnet18", num_classes=1, in_channels=1, rngs=0)
    save_model(d / "resnet18", r18, name="resnet18", model_kwargs={"num_classes": 1, "in_channels": 1})
    mt = models.create("covidmt", rngs=1, **COVIDMT_KW)
    save_model(d / "covidmt", mt, name="covidmt", model_kwargs=COVIDMT_KW)
    save_model(d / "unet", _unet(None), name="unet", model_kwargs=UNET_KW, metadata={"image_size": S})
    save_model(d / "unet_empty", _unet(-1e4), name="unet", model_kwargs=UNET_KW,
               metadata={"image_size": S})
    return {"resnet18": d / "resnet18", "covidmt": d / "covidmt", "unet": d / "unet",
            "unet_empty": d / "unet_empty"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    return export_tiny_models(tmp_path_factory.mktemp("models"))


def _cfg(exported, names=("resnet18",), n=8, **pairs) -> ml_collections.ConfigDict:
    c = score_config.base_config()
    entries = {"resnet18": score_config.classifier_entry("export", str(exported["resnet18"])),
               "covidmt": score_config.classifier_entry("export", str(exported["covidmt"]), task="covid")}
    c.classifiers = {k: entries[k] for k in names}
    c.lungs = str(exported["unet"])
    c.pairs.source = "synthetic_pairs"
    c.pairs.kwargs = {"n": n, "size": S, "channel": "whatsapp", "quality": 20}
    for k, v in pairs.items():
        c.pairs[k] = v
    c.image_size = S
    c.batch_size = 4
    c.num_workers = 2
    c.gallery.flipped = 2
    c.gallery.random = 2
    c.progress = False
    return c


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fused_step_cams_equal_explain_gradcam(exported):
    """The jitted step's CAMs (sigmoid head and COVIDMT's covid column) are explain.gradcam's."""
    src = get_source("synthetic_pairs", n=3, size=S)
    xo = np.stack([load_pair(src[i], S).original for i in range(3)])
    xt = np.stack([load_pair(src[i], S).transmitted for i in range(3)])
    cfg = _cfg(exported, names=("resnet18", "covidmt"))
    classifiers, lung_map = loading.load_models(cfg)
    assert list(lung_map) == [loading.DEFAULT_LUNGS]
    lungs = lung_map[loading.DEFAULT_LUNGS]
    assert classifiers["covidmt"][1].column == 1  # "covid" is the 2nd classification task
    scorer = step.Scorer(classifiers, lung_map, S, 4)
    o, t = scorer(xo, xt, return_maps=True)
    for name, (model, head) in classifiers.items():
        col = head.column
        for x, out in ((xo, o), (xt, t)):
            ref = explain.gradcam(model, jnp.asarray(x), output=lambda z, c=col: z[:, c:c + 1])
            np.testing.assert_allclose(out[name]["cam"], np.asarray(ref), atol=1e-5)
            logits = np.asarray(model.pool_and_classify(model.features(jnp.asarray(x))["last_conv"]))
            np.testing.assert_allclose(out[name]["prob"], 1 / (1 + np.exp(-logits[:, col])), rtol=1e-5)
            lungs_ref = np.asarray(lungs.predict_normalised(jnp.asarray(x))) >= 0.5
            np.testing.assert_allclose(out[name]["iol"], metrics.iol(np.asarray(ref), lungs_ref), atol=1e-6)
            np.testing.assert_allclose(out["lung_frac"], lungs_ref.mean(axis=(1, 2)), atol=1e-6)


def test_end_to_end_cli_two_classifiers(exported, tmp_path):
    """CLI run with two classifiers: rows for every (pair, model), summary, report, plots, gallery;
    the summary's PI equals metrics.pi_score on the rows."""
    work = tmp_path / "run"
    demo = Path(__file__).resolve().parents[1] / "configs" / "score_demo.py"
    cfg_file = tmp_path / "two.py"
    cfg_file.write_text(
        "import importlib.util\n"
        "from covidmt_jax.scoring.config import classifier_entry\n"
        f"spec = importlib.util.spec_from_file_location('score_demo', {str(demo)!r})\n"
        "demo = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(demo)\n"
        "def get_config(arg=None):\n"
        "    c = demo.get_config(arg)\n"
        f"    c.classifiers['covidmt'] = classifier_entry('export', {str(exported['covidmt'])!r}, task='covid')\n"
        "    return c\n")
    argv = ["score", f"--config={cfg_file}:model={exported['resnet18']},lungs={exported['unet']},"
            f"n=10,size={S},quality=10,name=resnet18", f"--workdir={work}",
            "--config.batch_size=4", "--config.progress=False"]
    assert score.main(argv) == 0
    rows = _read_rows(work / "rows.csv")
    assert len(rows) == 20 and len({(r["pair_id"], r["model"]) for r in rows}) == 20
    assert {r["model"] for r in rows} == {"resnet18", "covidmt"}
    summary = json.loads((work / "summary.json").read_text())
    for m in ("resnet18", "covidmt"):
        mine = [r for r in rows if r["model"] == m and not r["error"]]
        po = [float(r["prob_orig"]) for r in mine]
        pt = [float(r["prob_trans"]) for r in mine]
        assert summary["models"][m]["pi"]["score"] == pytest.approx(metrics.pi_score(po, pt, 0.5))
        iol_o = [float(r["iol_orig"]) if r["iol_orig"] else np.nan for r in mine]
        assert summary["models"][m]["ols"]["original"]["score"] == pytest.approx(
            metrics.ols_score(iol_o, 0.4), nan_ok=True)
        for r in mine:
            assert int(r["flip"]) == int((float(r["prob_orig"]) >= 0.5) != (float(r["prob_trans"]) >= 0.5))
    report = (work / "report.md").read_text()
    assert "Prediction instability" in report and "resnet18" in report and "covidmt" in report
    for png in ("pi.png", "ols.png", "iol_hist.png", "gallery_resnet18_random.png",
                "gallery_covidmt_random.png"):
        assert (work / png).stat().st_size > 1000, png


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_resume_does_not_duplicate_rows(exported, tmp_path, fmt):
    cfg = _cfg(exported, n=10)
    cfg.output.format = fmt
    loaded = loading.load_models(cfg)
    cfg.pairs.limit = 5
    job.score_pairs(cfg, tmp_path, models=loaded)
    store = RowStore(tmp_path, fmt)
    assert sorted(store.read()["index"].tolist()) == list(range(5))
    cfg.pairs.limit = -1
    summary = job.score_pairs(cfg, tmp_path, models=loaded)
    assert summary["job"]["scored_this_run"] == 5
    rows = store.read()
    assert sorted(rows["index"].tolist()) == list(range(10))
    summary = job.score_pairs(cfg, tmp_path, models=loaded)  # nothing left to do
    assert summary["job"]["scored_this_run"] == 0
    assert len(store.read()["pair_id"]) == 10
    assert summary["models"]["resnet18"]["n_pairs"] == 10
    # a different job in the same workdir is refused
    cfg.threshold = 0.3
    with pytest.raises(ConfigError, match="different job"):
        job.score_pairs(cfg, tmp_path, models=loaded)


def test_interrupted_csv_line_is_dropped_and_rescored(exported, tmp_path):
    cfg = _cfg(exported, n=4)
    loaded = loading.load_models(cfg)
    job.score_pairs(cfg, tmp_path, models=loaded)
    path = tmp_path / "rows.csv"
    text = path.read_text()
    path.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + "covidx-test-0000003,3,1,res")
    job.score_pairs(cfg, tmp_path, models=loaded)
    rows = _read_rows(path)
    assert sorted(int(r["index"]) for r in rows) == [0, 1, 2, 3]


def _pair_folders(root: Path) -> None:
    """4 labelled pairs: one good per class, one with a corrupt transmitted file, one whose
    transmitted side has another aspect ratio."""
    from covidmt_jax import channels
    src = get_source("synthetic_pairs", n=4, size=S)
    for i in range(4):
        rec = src[i]
        cls = "1_COVID-19" if rec["labels"][0] else "0_NON_COVID"
        for side in ("orig", "trans"):
            (root / side / cls).mkdir(parents=True, exist_ok=True)
        (root / "orig" / cls / f"p{i}.png").write_bytes(rec["original"])
        trans = rec["transmitted"]
        if i == 2:
            trans = trans[: len(trans) // 3]  # truncated JPEG
        if i == 3:
            x = images.load_grey(rec["original"])[:, : S // 2]
            trans = channels.get_channel("whatsapp").transmit(images.encode_png(x))
        (root / "trans" / cls / f"p{i}.png").write_bytes(trans)


def test_bad_pairs_become_error_rows(exported, tmp_path):
    _pair_folders(tmp_path / "data")
    cfg = _cfg(exported, names=("resnet18", "covidmt"))
    cfg.pairs.source = "pairs"
    cfg.pairs.kwargs = {"original_dir": str(tmp_path / "data" / "orig"),
                        "transmitted_dir": str(tmp_path / "data" / "trans"),
                        "labels_from_subfolders": True}
    summary = job.run(cfg, tmp_path / "out")
    rows = _read_rows(tmp_path / "out" / "rows.csv")
    assert len(rows) == 8
    by_id = {(r["pair_id"].split("/")[-1], r["model"]): r for r in rows}
    for m in ("resnet18", "covidmt"):
        assert by_id[("p2.png", m)]["error"].startswith("unreadable:")
        assert "p2.png" in by_id[("p2.png", m)]["error"]
        assert by_id[("p3.png", m)]["error"].startswith("size mismatch:")
        assert by_id[("p0.png", m)]["error"] == "" and by_id[("p1.png", m)]["error"] == ""
        s = summary["models"][m]
        assert s["n_errors"] == 2 and s["n_scored"] == 2
        assert s["errors"] == {"size mismatch": 1, "unreadable": 1}
        assert s["n_labelled"] == 2 and "classification" in s
    assert summary["n_pairs_with_error"] == 2
    assert "unreadable: 1" in (tmp_path / "out" / "report.md").read_text()


def test_empty_lung_mask_rows_are_errors(exported, tmp_path):
    cfg = _cfg(exported, n=4)
    cfg.lungs = str(exported["unet_empty"])
    summary = job.run(cfg, tmp_path)
    rows = _read_rows(tmp_path / "rows.csv")
    assert len(rows) == 4 and all(r["error"].startswith("empty lung mask") for r in rows)
    assert all(r["prob_orig"] != "" for r in rows)  # the values are kept, the row is flagged
    s = summary["models"]["resnet18"]
    assert s["n_scored"] == 0 and s["errors"] == {"empty lung mask": 4} and "pi" not in s
    assert (tmp_path / "report.md").is_file()


def test_quality_sweep_reports_pi_and_ols_against_quality(exported, tmp_path):
    cfg = _cfg(exported, n=4, qualities=(20, 90))
    cfg.gallery.random = 0
    sweep = job.run(cfg, tmp_path)
    assert sweep["qualities"] == [20, 90]
    for q in (20, 90):
        assert (tmp_path / f"q{q:03d}" / "summary.json").is_file()
        assert sweep["per_quality"][q]["job"]["quality"] == q
    assert (tmp_path / "pi_vs_quality.png").stat().st_size > 1000
    assert (tmp_path / "ols_vs_quality.png").stat().st_size > 1000
    assert "JPEG-quality sweep" in (tmp_path / "report.md").read_text()


def test_config_errors_are_clear(exported):
    cfg = _cfg(exported)
    cfg.bogus = 1
    with pytest.raises(ConfigError, match="bogus"):
        score_config.validate(cfg)
    cfg = _cfg(exported)
    cfg.classifiers.resnet18.colum = 3
    with pytest.raises(ConfigError, match="colum"):
        score_config.validate(cfg)
    cfg = _cfg(exported)
    cfg.classifiers.resnet18.task = "nope"
    cfg.classifiers.resnet18.path = str(exported["covidmt"])
    with pytest.raises(ConfigError, match="no task 'nope'"):
        loading.load_models(cfg)
    cfg = _cfg(exported)
    cfg.pairs.source = "folder"
    with pytest.raises(ConfigError, match="channel"):
        score_config.validate(cfg)


def test_demo_config_needs_a_model():
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "configs" / "score_demo.py"
    spec = importlib.util.spec_from_file_location("score_demo", path)
    score_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score_demo)
    with pytest.raises(ValueError, match="model="):
        score_demo.get_config("")
    with pytest.raises(ValueError, match="unknown"):
        score_demo.get_config("model=x,colour=red")


def test_throughput_benchmark_runs_tiny(monkeypatch):
    """benchmarks/score_throughput.py end to end at a toy size (no timing asserted)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "score_throughput.py"
    spec = importlib.util.spec_from_file_location("score_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("COVIDMT_NO_MALLOC_TUNING", "1")  # never re-exec the test process
    out = bench.main(["--sizes", "32", "--batch", "2", "--steps", "1", "--warmup", "0",
                      "--backbone", "resnet18", "--unet-width", "2", "--unet-depth", "2",
                      "--frameworks", "jax,torch"])
    frameworks = [r["framework"] for r in out["rows"]]
    assert frameworks[0] == "jax" and len(out["rows"][0]["step_s"]) == 1
    if bench.torch_available():
        assert frameworks == ["jax", "torch"]


# ============================================================================ resume by content
def _folder_cfg(exported, root: Path):
    cfg = _cfg(exported)
    cfg.pairs.source = "pairs"
    cfg.pairs.kwargs = {"original_dir": str(root / "orig"), "transmitted_dir": str(root / "trans"),
                        "labels_from_subfolders": True}
    return cfg


def _rows_by_id(path: Path) -> dict[str, dict]:
    rows = _read_rows(path)
    ids = [r["pair_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"duplicated rows in {path}"
    return {r["pair_id"].split("/")[-1]: r for r in rows}


def test_repaired_and_changed_inputs_are_rescored(exported, tmp_path):
    """Error rows are retried (a repaired transmitted image gets its score); a pair whose file
    changed (size + mtime) is re-scored; untouched pairs are not."""
    data = tmp_path / "data"
    _pair_folders(data)
    cfg = _folder_cfg(exported, data)
    loaded = loading.load_models(cfg)
    work = tmp_path / "out"
    job.score_pairs(cfg, work, models=loaded)
    before = _rows_by_id(work / "rows.csv")
    assert before["p2.png"]["error"].startswith("unreadable")
    src = get_source("synthetic_pairs", n=4, size=S)
    broken = next(data.glob("trans/*/p2.png"))
    broken.write_bytes(src[2]["transmitted"])           # repair
    changed = next(data.glob("orig/*/p0.png"))
    changed.write_bytes(images.encode_png(1 - images.load_grey(src[0]["original"])))  # new contents
    summary = job.score_pairs(cfg, work, models=loaded)
    after = _rows_by_id(work / "rows.csv")
    assert summary["job"]["scored_this_run"] == 3  # p2 (error), p3 (error), p0 (changed)
    assert summary["job"]["errors_retried"] == 2 and summary["job"]["inputs_changed"] == 1
    assert after["p2.png"]["error"] == "" and after["p3.png"]["error"].startswith("size mismatch")
    assert after["p0.png"]["prob_orig"] != before["p0.png"]["prob_orig"]
    assert after["p1.png"] == before["p1.png"]
    assert summary["models"]["resnet18"]["n_scored"] == 3 and summary["models"]["resnet18"]["n_pairs"] == 4


def test_deleted_and_added_pairs(exported, tmp_path):
    """Summary and rows follow the pairs in the source now; ``index`` is each pair's current
    position (unique), so galleries load the right images."""
    data = tmp_path / "data"
    _pair_folders(data)
    for side in ("orig", "trans"):      # only the two good pairs
        for i in (2, 3):
            next(data.glob(f"{side}/*/p{i}.png")).unlink()
    cfg = _folder_cfg(exported, data)
    loaded = loading.load_models(cfg)
    work = tmp_path / "out"
    job.score_pairs(cfg, work, models=loaded)
    cls = next(data.glob("orig/*/p1.png")).parent.name  # the same classes: the same labels
    for side in ("orig", "trans"):
        next(data.glob(f"{side}/*/p1.png")).unlink()                      # delete a pair
    src = get_source("synthetic_pairs", n=6, size=S)
    for side, key in (("orig", "original"), ("trans", "transmitted")):
        (data / side / cls).mkdir(parents=True, exist_ok=True)
        (data / side / cls / "a5.png").write_bytes(src[5][key])           # add one sorting first
    summary = job.score_pairs(cfg, work, models=loaded)
    rows = _rows_by_id(work / "rows.csv")
    assert set(rows) == {"p0.png", "a5.png"}
    assert summary["job"]["scored_this_run"] == 1 and summary["job"]["n_pairs_selected"] == 2
    assert summary["models"]["resnet18"]["n_pairs"] == 2 and summary["n_pairs"] == 2
    ids = get_source("pairs", **cfg.pairs.kwargs.to_dict()).ids
    for r in rows.values():
        assert ids[int(r["index"])] == r["pair_id"]


def test_limit_change_summarises_the_selected_pairs(exported, tmp_path):
    cfg = _cfg(exported, n=8)
    loaded = loading.load_models(cfg)
    job.score_pairs(cfg, tmp_path, models=loaded)
    cfg.pairs.limit = 3
    summary = job.score_pairs(cfg, tmp_path, models=loaded)
    assert summary["job"]["scored_this_run"] == 0 and summary["job"]["n_pairs_selected"] == 3
    assert summary["n_pairs"] == 3 and summary["models"]["resnet18"]["n_pairs"] == 3
    assert len(_read_rows(tmp_path / "rows.csv")) == 8  # kept for a later, larger selection
    for png in tmp_path.glob("gallery_*.png"):
        assert png.stat().st_size > 0


def test_model_swap_under_the_same_path_is_refused(exported, tmp_path):
    d = tmp_path / "model"
    kw = {"num_classes": 1, "in_channels": 1}
    save_model(d, models.create("resnet18", rngs=0, **kw), name="resnet18", model_kwargs=kw)
    cfg = _cfg(exported, n=6, limit=3)
    cfg.classifiers.resnet18.path = str(d)
    work = tmp_path / "out"
    job.run(cfg, work)
    rows_before = (work / "rows.csv").read_text()
    save_model(d, models.create("resnet18", rngs=7, **kw), name="resnet18", model_kwargs=kw)
    cfg.pairs.limit = -1
    with pytest.raises(ConfigError, match=r"classifier 'resnet18' parameters changed.*new --workdir"):
        job.run(cfg, work)
    assert (work / "rows.csv").read_text() == rows_before
    cfg.lungs = str(exported["unet_empty"])   # the lung segmenter is fingerprinted too
    save_model(d, models.create("resnet18", rngs=0, **kw), name="resnet18", model_kwargs=kw)
    with pytest.raises(ConfigError, match="lung segmenter 'lungs' parameters changed"):
        job.run(cfg, work)


def test_failed_start_writes_no_job(exported, tmp_path):
    """A typo in a model path or a pair root leaves no job.json: the corrected run starts."""
    work = tmp_path / "out"
    cfg = _cfg(exported, n=4)
    cfg.classifiers.resnet18.path = str(tmp_path / "typo")
    with pytest.raises(ConfigError, match="config.classifiers.resnet18.path"):
        job.run(cfg, work)
    assert not (work / "job.json").exists()
    cfg = _folder_cfg(exported, tmp_path / "nowhere")
    with pytest.raises(Exception, match="nowhere"):
        job.run(cfg, work)
    assert not (work / "job.json").exists()
    summary = job.run(_cfg(exported, n=4), work)
    assert summary["models"]["resnet18"]["n_pairs"] == 4 and (work / "job.json").is_file()
    fp = json.loads((work / "job.json").read_text())["fingerprint"]
    assert set(fp) == {"version", "settings", "classifiers", "lungs"}


def test_kill_9_mid_run_resumes_without_duplicates(exported, tmp_path):
    """A CLI job killed with SIGKILL between (or during) row writes resumes to the same rows as
    an uninterrupted job, each (pair, model) once."""
    import os
    import signal
    import subprocess
    import sys
    import time
    n = 120
    cfg_file = tmp_path / "kill.py"
    cfg = _cfg(exported, n=n)
    cfg.batch_size = 2
    cfg.num_workers = 1
    cfg.gallery.flipped = cfg.gallery.random = 0
    cfg_file.write_text("import json, ml_collections\n"
                        f"CFG = json.loads({cfg.to_json()!r})\n"
                        "def get_config():\n"
                        "    return ml_collections.ConfigDict(CFG)\n")
    root = Path(__file__).resolve().parents[1]
    argv = [f"--config={cfg_file}"]
    env = {**os.environ, "COVIDMT_NO_MALLOC_TUNING": "1", "PYTHONPATH": str(root)}
    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "covidmt_jax.score", *argv, f"--workdir={work}"],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows_path = work / "rows.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if rows_path.is_file() and rows_path.read_bytes().count(b"\n") > 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it was killed: {proc.stderr.read()[-2000:]!r}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = rows_path.read_bytes().count(b"\n") - 1
    assert 0 < killed_at < n and not (work / "summary.json").exists()
    assert score.main(["score", *argv, f"--workdir={work}"]) == 0
    resumed = _read_rows(rows_path)
    assert len(resumed) == n and len({r["pair_id"] for r in resumed}) == n
    clean = tmp_path / "clean"
    assert score.main(["score", *argv, f"--workdir={clean}"]) == 0
    ref = {r["pair_id"]: r for r in _read_rows(clean / "rows.csv")}
    for r in resumed:
        assert r["index"] == ref[r["pair_id"]]["index"] and r["error"] == ref[r["pair_id"]]["error"]
        np.testing.assert_allclose(float(r["prob_orig"]), float(ref[r["pair_id"]]["prob_orig"]), rtol=1e-5)
    s = json.loads((work / "summary.json").read_text())
    assert s["models"]["resnet18"]["n_pairs"] == n
