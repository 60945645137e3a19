"""The trainer: config errors, a few steps of every model family, data-parallel equivalence on
4 simulated CPU devices, SIGKILL + resume equal to an uninterrupted run, NaN stop, ablation."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covidmt_jax import config_lib
from covidmt_jax.cpu_malloc import MALLOC_ENV
from covidmt_jax.config_lib import ConfigError, dataset_entry

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **MALLOC_ENV}


def tiny_config(*, model="covidmt", n_tasks=6, size=32, steps=4, n=24, backbone="resnet18"):
    """A seconds-long synthetic run."""
    c = config_lib.base_config()
    c.model.kwargs = {"backbone": backbone, "transition_channels": (8,), "fpn_channels": 8}
    if backbone == "resnet18":  # the same graph at 1/64 of the parameters: fast compile, step and save
        c.model.kwargs["stage_widths"] = (8, 16, 32, 64)
    common = dict(size=size, seed=0)
    c.data.train = {"covidx": dataset_entry("synthetic_covidx", n=n, split="train", shortcut_strength=0.9, **common),
                    "rsna": dataset_entry("synthetic_rsna", n=n, split="train", **common),
                    "nih": dataset_entry("synthetic_nih", n=n, split="train", **common)}
    c.data.val = {"covidx": dataset_entry("synthetic_covidx", n=8, split="val", **common),
                  "rsna": dataset_entry("synthetic_rsna", n=8, split="val", **common),
                  "nih": dataset_entry("synthetic_nih", n=8, split="val", **common)}
    c.data.image_size = size
    c.data.per_task_batch = 2
    c.data.eval_batch_size = 4
    config_lib.apply_task_count(c, n_tasks)
    if model != "covidmt":
        c.model.name = model
        c.model.kwargs = {"hidden": 16} if model.startswith("vgg") else (
            {"widths": (8, 16, 16, 16), "modules_per_stage": (1, 1, 1, 1)} if model == "covidnet" else {})
        config_lib.apply_task_count(c, 1)
    c.steps_per_epoch = 2
    c.total_steps = steps
    c.epochs = 1
    c.log_every_steps = 1
    c.checkpoint.every_steps = 2
    c.optimizer.lr = 1e-3
    return c


# ----------------------------------------------------------------------------- config errors

def test_validate_names_the_bad_key():
    c = tiny_config()
    c.model.name = "resnet5"
    with pytest.raises(ConfigError, match="model.name='resnet5'"):
        config_lib.validate(c)
    c = tiny_config()
    c.tasks = ("covid", "pneumothorax")
    with pytest.raises(ConfigError, match="unknown task 'pneumothorax'"):
        config_lib.validate(c)
    c = tiny_config(n_tasks=6)
    del c.data.train["nih"]
    with pytest.raises(ConfigError, match="dataset 'nih'"):
        config_lib.validate(c)
    c = tiny_config()
    c.data.train.covidx.source = "covidz"
    with pytest.raises(ConfigError, match="covidz"):
        config_lib.validate(c)


def test_config_arguments_and_ablation():
    from covidmt_jax.config_lib import covidmt_config
    c1 = covidmt_config("resnet50", "tasks=1,root=/x")
    assert c1.tasks == ("covid",) and set(c1.data.train.keys()) == {"covidx"}
    c6 = covidmt_config("resnext50_32x4d", "tasks=6")
    assert c6.tasks == ("covid", "box", "infiltration", "effusion", "atelectasis", "nodule")
    assert set(c6.data.train.keys()) == {"covidx", "rsna", "nih"}
    c3 = covidmt_config("resnet50", "tasks=3")
    assert c3.tasks == ("covid", "box", "infiltration")
    with pytest.raises(ValueError, match="1..6"):
        covidmt_config("resnet50", "tasks=7")
    with pytest.raises(ValueError, match="unknown config argument"):
        covidmt_config("resnet50", "taks=3")


def _run_cli(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "covidmt_jax.train", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_rejects_unknown_keys_and_wrong_types(tmp_path):
    bad_key = _run_cli(["--config", "configs/demo.py", "--workdir", str(tmp_path),
                        "--config.optimizer.lrr=0.1"])
    assert bad_key.returncode != 0 and "lrr" in (bad_key.stderr + bad_key.stdout)
    bad_type = _run_cli(["--config", "configs/demo.py", "--workdir", str(tmp_path),
                         "--config.optimizer.lr=fast"])
    assert bad_type.returncode != 0 and "lr" in (bad_type.stderr + bad_type.stdout)
    bad_value = _run_cli(["--config", "configs/demo.py", "--workdir", str(tmp_path),
                          "--config.model.name=resnet5"])
    assert bad_value.returncode != 0 and "resnet5" in (bad_value.stderr + bad_value.stdout)


# ----------------------------------------------------------------------------- a few steps

@pytest.mark.parametrize("model", ["covidmt", "resnet18", "vgg19", "covidnet"])
def test_a_few_steps_of_every_family(model, tmp_path):
    from covidmt_jax.train import train
    c = tiny_config(model=model, size=32 if model != "xception" else 80, steps=2)
    summary = train(c, tmp_path)
    assert summary["steps"] == 2
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    assert "covid/roc_auc" in summary["final_eval"]
    assert (tmp_path / "export" / "final" / "params.safetensors").is_file()
    assert (tmp_path / "summary.json").is_file()


def test_xception_trains_a_step(tmp_path):
    from covidmt_jax.train import train
    summary = train(tiny_config(model="xception", size=72, steps=1), tmp_path)
    assert summary["steps"] == 1


def test_unet_segmentation_run(tmp_path):
    from covidmt_jax.train import train
    c = tiny_config(steps=2)
    c.tasks = ("lungs",)
    c.task_options = {}
    c.model.name = "unet"
    c.model.kwargs = {"depth": 2, "base_width": 4}
    c.data.train = {"lungs": dataset_entry("synthetic_lungs", n=8, size=32, seed=0)}
    c.data.val = {"lungs": dataset_entry("synthetic_lungs", n=4, size=32, seed=1, split="val")}
    c.eval.best_metric = "lungs/dice"
    summary = train(c, tmp_path)
    assert 0.0 <= summary["final_eval"]["lungs/dice"] <= 1.0
    assert (tmp_path / "export" / "best" / "model.json").is_file()


# ----------------------------------------------------------------------------- data parallel

def equivalence_setup(B: int = 8, S: int = 32):
    """Shared by the data-parallel and multi-process equivalence tests: a fixed global batch
    for the six paper tasks and a factory of a tiny COVIDMT's (graphdef, state) with plain SGD,
    lr 1 (so one step's parameter change IS the gradient). Returns ``(batch, tasks, new_state)``."""
    import ml_collections
    from flax import nnx
    from covidmt_jax import models
    from covidmt_jax.tasks import build_tasks, paper_tasks
    from covidmt_jax.train import build_optimizer
    specs = paper_tasks(6)

    def new_model():  # resnet18's graph at narrow widths, as tiny_config: fast init and compile
        return models.create("covidmt", backbone="resnet18", stage_widths=(8, 16, 32, 64), tasks=specs,
                             transition_channels=(8,), fpn_channels=8, rngs=0)

    tasks = build_tasks(specs, anchors=new_model().anchors((S, S)))
    rng = np.random.RandomState(0)
    batch = {"image": rng.randn(B, S, S, 1).astype(np.float32),
             "labels": rng.randint(0, 2, (B, 5)).astype(np.float32),
             "label_weight": (rng.rand(B, 5) > 0.3).astype(np.float32),
             "boxes": np.tile(np.array([[[4, 4, 20, 24]]], np.float32), (B, 1, 1)),
             "box_valid": (rng.rand(B, 1) > 0.5).astype(np.float32),
             "box_weight": (rng.rand(B) > 0.5).astype(np.float32)}

    def new_state():
        model = new_model()
        cfg = ml_collections.ConfigDict({"optimizer": {"name": "sgd", "lr": 1.0, "b1": 0.9, "b2": 0.999,
              "eps": 1e-8, "milestones": (), "decay": 0.1, "grad_clip": 0.0, "weight_decay": 0.0, "momentum": 0.0}})
        tx, _ = build_optimizer(cfg, 10)
        model.train()
        return nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

    return batch, tasks, new_state


DP_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, jax
    from flax import nnx
    assert jax.device_count() == 4, jax.devices()
    sys.path.insert(0, TESTS_DIR)
    from test_train import equivalence_setup
    from covidmt_jax import parallel
    from covidmt_jax.train import make_train_step
    batch, tasks, new_state = equivalence_setup()
    results = {}
    for n_dev in (1, 4):
        gd, state = new_state()
        mesh = parallel.make_mesh(1, jax.devices()[:n_dev])
        ssh = parallel.state_shardings(state, mesh)
        bsh = parallel.data_sharding(mesh)
        state = jax.device_put(state, ssh)
        step = jax.jit(make_train_step(gd, tasks), in_shardings=(ssh, bsh), donate_argnums=0)
        gb = parallel.global_batch(batch, bsh)
        assert len(gb["image"].sharding.device_set) == n_dev
        state, metrics = step(state, gb)
        flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(nnx.merge(gd, state)[0], nnx.Any(nnx.Param, nnx.BatchStat)))}
        results[n_dev] = (float(metrics["loss"]), float(metrics["grad_norm"]), flat)
    l1, g1, p1 = results[1]; l4, g4, p4 = results[4]
    worst = max(float(np.max(np.abs(p1[k] - p4[k]))) for k in p1)
    print(json.dumps({"loss": [l1, l4], "grad_norm": [g1, g4], "max_param_diff": worst}))
""")


def test_data_parallel_equals_single_device(tmp_path):
    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT.replace("TESTS_DIR", repr(str(Path(__file__).parent))))
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["loss"][0] == pytest.approx(res["loss"][1], rel=1e-5)
    assert res["grad_norm"][0] == pytest.approx(res["grad_norm"][1], rel=1e-4)
    # plain SGD with lr 1: the parameter change IS the gradient, so this compares every
    # gradient; BatchNorm running statistics (global over the data axis) are compared too
    assert res["max_param_diff"] < 1e-4


# ----------------------------------------------------------------------------- resume

RUN_SCRIPT = textwrap.dedent("""
    import sys, logging
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, {tests!r})
    from test_train import tiny_config
    from covidmt_jax.train import train
    c = tiny_config(steps={steps}, n=16)
    c.checkpoint.every_steps = 2
    c.data.val = {{}}
    train(c, {workdir!r})
""")


def _final_params(workdir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(workdir / "export" / "final" / "params.safetensors"))


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    steps = 24
    tests_dir = str(Path(__file__).parent)
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    for d in (ref_dir, killed_dir):
        (tmp_path / f"{d.name}.py").write_text(RUN_SCRIPT.format(tests=tests_dir, steps=steps, workdir=str(d)))
    ref = subprocess.run([sys.executable, str(tmp_path / "ref.py")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen([sys.executable, str(tmp_path / "killed.py")], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = killed_dir / "checkpoints"
    deadline = time.time() + 600
    # kill as soon as the step-4 checkpoint is complete: mid-run, steps 5.. not yet all done
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / "4").is_dir() and any((ckpts / "4").iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed:\n" + proc.stdout.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "export" / "final").exists()

    resumed = subprocess.run([sys.executable, str(tmp_path / "killed.py")], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    rows = [json.loads(l) for l in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == list(range(1, steps + 1)), "a step was repeated or skipped"
    a, b = _final_params(ref_dir), _final_params(killed_dir)
    assert set(a) == set(b)
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst < 1e-6, f"resumed run differs from the uninterrupted one by {worst}"


# ----------------------------------------------------------------------------- NaN

def test_nan_loss_stops_naming_step_and_task(tmp_path):
    from covidmt_jax.checkpoint import TrainCheckpointer
    from covidmt_jax.train import NonFiniteLossError, train
    c = tiny_config(n_tasks=1, steps=40)
    c.data.val = {}
    c.checkpoint.every_steps = 1
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.0
    c.optimizer.lr = 1e12  # diverges within a few steps
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+ in task\(s\) \['covid'\]") as err:
        train(c, tmp_path)
    bad_step = int(str(err.value).split("step ")[1].split()[0])
    ck = TrainCheckpointer(tmp_path)
    assert ck.latest_step() == bad_step - 1
    ck.close()
    assert not (tmp_path / "export" / "final").exists()


# Configs of other CLIs: score_* (covidmt_jax.score), study_* (covidmt_jax.study: tests/test_study.py),
# unet_lungs_conventions (covidmt_jax.lung_training).
OTHER_CLIS = ("score_", "study_", "unet_lungs_conventions")


@pytest.mark.parametrize("config_file", sorted(p.name for p in (ROOT / "configs").glob("*.py")
                                                if not p.name.startswith(OTHER_CLIS)))
def test_every_training_config_validates_and_binds_its_sources(config_file):
    """Each shipped config passes validation, and every data entry's kwargs bind to its
    source's constructor (catches renamed arguments without needing the real datasets)."""
    import importlib.util
    import inspect
    from covidmt_jax.data.sources import SOURCES
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / config_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(None)
    config_lib.validate(c)
    for split in ("train", "val"):
        for ds, entry in c.data[split].items():
            inspect.signature(SOURCES[entry.source]).bind(**entry.kwargs.to_dict())


# ----------------------------------------------------------------------------- box task learns
#
# Why the box mAP could read exactly 0 while the box loss fell: the RSNA challenge metric is a
# hard-decision metric (TP / (TP + FP + FN) of the detections kept above
# ``task_options.box.score_threshold``, 0.3), and the focal-loss objectness of a short run is
# under-confident: after 100 steps (former head init) the phantoms' boxes scored 0.3-0.9 (AMD), near
# duplicates 0.1-0.2 and every anchor of a box-free image < 0.07. The loss is dominated by the
# box-free images (each sums the focal loss of all its anchors), so it falls whatever the
# positives do; when no positive anchor has crossed 0.3 yet, no image keeps a detection,
# box-free images are skipped and the boxed ones score 0: mAP exactly 0.0. Which side of 0.3
# the positives end on moves with floating-point summation order, so a CPU type can flip the
# metric between 0 and 1. The tests below therefore check (1) the decode / NMS / metric chain
# exactly on constructed head outputs (perfect outputs -> 1.0; the same outputs with
# objectness just under the threshold -> exactly 0.0) and (2) that training learns, on
# quantities with a wide margin: localisation of every box and a score gap between boxes and
# box-free images, not where the scores sit relative to 0.3.

BOX_SIZE, BOX_ANCHORS = 64, (8.0, 16.0, 32.0)  # anchors sized for the 64-px phantoms' boxes


def _box_batch():
    """The 8 training phantoms (2 with 2 boxes each, 6 without) as one evaluation batch."""
    from covidmt_jax.data.pipeline import make_eval_iterator
    from covidmt_jax.data.sources import get_source
    from covidmt_jax.taskspec import tasks_from_names
    src = get_source("synthetic_rsna", n=8, split="train", size=BOX_SIZE, seed=0)
    return next(iter(make_eval_iterator(src, dataset="rsna", tasks=tasks_from_names(["box"]),
                                        image_size=BOX_SIZE, batch_size=8)))


def _perfect_box_outputs(anchors, batch, positive_logit):
    """Head outputs that decode exactly to the ground truth: every anchor matched to a box
    regresses to it and scores ``positive_logit``; all other anchors score -8."""
    from covidmt_jax.models.heads import encode_boxes, match_anchors
    a = jnp.asarray(anchors)
    regs, objs = [], []
    for boxes, valid in zip(jnp.asarray(batch["boxes"]), jnp.asarray(batch["box_valid"])):
        matched, label = match_anchors(a, boxes, valid)
        regs.append(encode_boxes(boxes[matched], a))
        objs.append(jnp.where(label == 1, positive_logit, -8.0))
    return {"box": {"regression": jnp.stack(regs), "objectness": jnp.stack(objs)}}


def test_box_decoding_matching_and_map_on_constructed_outputs():
    """The evaluation chain (anchors -> match -> encode | decode -> NMS -> RSNA mAP) is exact:
    outputs built from the ground truth score 1.0; the SAME boxes with objectness 0.25 (under
    the 0.3 score threshold) keep no detection and score exactly 0.0 — the signature of an
    under-confident but well-localising model — and 1.0 again at score_threshold 0.2; the
    threshold-free AP at IoU 0.5 is 1.0 in both cases."""
    from covidmt_jax.models.heads import make_anchors
    from covidmt_jax.tasks import build_tasks
    anchors = make_anchors((BOX_SIZE, BOX_SIZE), sizes=BOX_ANCHORS)
    batch = {k: v for k, v in _box_batch().items() if isinstance(v, np.ndarray)}
    assert int(batch["box_valid"].sum()) == 4 and int((batch["box_valid"].sum(1) > 0).sum()) == 2

    def evaluate(positive_logit, threshold):
        task, = build_tasks(["box"], {"box": {"score_threshold": threshold}}, anchors=anchors)
        collected = task.eval_outputs(_perfect_box_outputs(anchors, batch, positive_logit), batch)
        return task.summarize(collected), collected

    def above(collected, threshold):
        return [b[np.asarray(s) >= threshold] for b, s in zip(collected["pred_boxes"], collected["pred_scores"])]

    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    res, collected = evaluate(logit(0.9), 0.3)
    assert res == {"map": 1.0, "ap50": 1.0}
    assert [len(b) for b in above(collected, 0.3)] == [len(g) for g in collected["gt_boxes"]]
    res, collected = evaluate(logit(0.25), 0.3)
    assert res["map"] == 0.0 and all(len(b) == 0 for b in above(collected, 0.3))
    assert res["ap50"] == 1.0  # the threshold-free AP still sees every box ranked first
    assert evaluate(logit(0.25), 0.2)[0]["map"] == 1.0
    # the training loss of the perfect outputs: no regression error (up to rounding)
    task, = build_tasks(["box"], anchors=anchors)
    _, aux = task.loss(_perfect_box_outputs(anchors, batch, logit(0.9)), batch)
    assert float(aux["regression"]) < 1e-9


def test_box_task_requires_matching_anchors():
    from covidmt_jax.models.heads import make_anchors
    from covidmt_jax.tasks import build_tasks
    batch = {k: v for k, v in _box_batch().items() if isinstance(v, np.ndarray)}
    no_anchors, = build_tasks(["box"])
    outputs = _perfect_box_outputs(make_anchors((BOX_SIZE, BOX_SIZE), sizes=BOX_ANCHORS), batch, 2.0)
    with pytest.raises(ValueError, match="without anchors"):
        no_anchors.loss(outputs, batch)
    other_size, = build_tasks(["box"], anchors=make_anchors((96, 96), sizes=BOX_ANCHORS))
    with pytest.raises(ValueError, match="anchors built for another image size"):
        other_size.eval_outputs(outputs, batch)


def box_fit(workdir, seed: int = 0, steps: int = 60) -> dict[str, float]:
    """Train the box task alone on the 8 phantoms through the real trainer (no augmentation)
    and measure what it learnt on them: per ground-truth box the IoU and score of the
    best-scoring detection that overlaps it, the top anchor score on box-free images, the
    first and last logged training loss, and the trainer's own box mAP (at 0.3)."""
    from covidmt_jax.export import load_model
    from covidmt_jax.models.heads import detect, pairwise_iou
    from covidmt_jax.train import train
    c = tiny_config(size=BOX_SIZE, steps=steps)
    c.seed = seed
    c.tasks = ("box",)
    src = dataset_entry("synthetic_rsna", n=8, split="train", size=BOX_SIZE, seed=0)
    c.data.train, c.data.val = {"rsna": src}, {"rsna": src}
    c.model.kwargs = {"backbone": "resnet18", "transition_channels": (32,), "fpn_channels": 32,
                      "anchor_sizes": BOX_ANCHORS}
    c.data.augment = {"translate": 0.0, "rotate_deg": 0.0, "zoom": 0.0, "hflip": False,
                      "intensity_shift": 0.0, "min_box_area": 0.2}
    c.data.per_task_batch = 8
    c.steps_per_epoch, c.epochs = steps, 1
    c.checkpoint.every_steps = 1000
    c.log_every_steps = 10
    c.eval.best_metric = "box/map"
    summary = train(c, workdir)
    losses = [r["loss"] for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    model = load_model(Path(workdir) / "export" / "final")
    batch = _box_batch()
    out = model(jnp.asarray(batch["image"]))["box"]
    anchors = jnp.asarray(model.anchors((BOX_SIZE, BOX_SIZE)))
    det = detect(out["regression"], out["objectness"], anchors, score_threshold=0.0, max_detections=20)
    probs = np.asarray(jax.nn.sigmoid(out["objectness"]))
    has_box = batch["box_valid"].sum(1) > 0
    ious, scores = [], []
    for i in np.flatnonzero(has_box):
        gt = jnp.asarray(batch["boxes"][i][batch["box_valid"][i] > 0])
        iou = np.asarray(pairwise_iou(det["boxes"][i], gt))  # [K, G]
        sc = np.where(np.asarray(det["valid"][i]), np.asarray(det["scores"][i]), 0.0)
        for g in range(iou.shape[1]):
            near = iou[:, g] > 0.1
            best = int(np.argmax(np.where(near, sc, -1.0)))
            ious.append(float(iou[best, g]) if near.any() else 0.0)
            scores.append(float(sc[best]) if near.any() else 0.0)
    return {"min_box_iou": min(ious), "min_box_score": min(scores),
            "max_free_score": float(probs[~has_box].max()), "first_loss": losses[0],
            "last_loss": losses[-1], "map_at_0.3": summary["final_eval"]["box/map"]}


def test_box_task_fits_a_small_set(tmp_path):
    """The whole box path through the real trainer — anchors, matching, encoded targets, the
    eq. 5 box loss, decoding, NMS — learns 8 phantoms (2 with 2 boxes of 7-10 x 11-15 px, 6
    without) in 60 steps. Asserted with margins (see the note above), measured on a 2-core
    Intel Xeon (AVX-512) with seeds 0, 1 and 2: every box found by its best detection at
    IoU >= 0.5 (measured >= 0.93), that detection scoring at least twice the top anchor of any
    box-free image (measured >= 0.83 vs <= 0.048), the loss falling at least 3-fold (measured
    0.145 -> 0.003 for seed 0, at least 44-fold for each seed). At 50 steps the same seeds
    still gave IoU >= 0.81 and scores >= 0.46 vs <= 0.060. With the head's former N(0, 0.01)
    init a 100-step run sat on a 50-step plateau (loss 0.288 -> 0.019, boxes scored
    0.32-0.86, near duplicates up to 0.19), which is where the CPU type decided the mAP at
    0.3. The mAP at the 0.3 threshold is only checked to be a valid number."""
    fit = box_fit(tmp_path)
    assert fit["min_box_iou"] >= 0.5, fit
    assert fit["min_box_score"] >= 2.0 * fit["max_free_score"], fit
    assert fit["last_loss"] <= fit["first_loss"] / 3.0, fit
    assert 0.0 <= fit["map_at_0.3"] <= 1.0, fit
