r"""The real-film study: does multi-task or channel-augmented training lower PI and OLS?

    python -m covidmt_jax.study --config configs/study_real.py:root=../shared/data --workdir runs/study

Design (``docs/study_real.md``): every arm is the same COVIDMT network (one backbone, a
classification head per dataset, the RetinaNet box head when a box task is present), trained
with the same budget (steps, batch per task, optimiser, augmentation) on the same
patient-disjoint splits (:mod:`covidmt_jax.data.splits`, through the ``study_covid`` /
``study_tb`` sources):

========================  ==========================================================
``baseline``              COVID-19 vs non-COVID only (the paper's single-task setting)
``multitask``             + tuberculosis (Montgomery/Shenzhen) + lung boxes on those films
``baseline_channel``      ``baseline`` with the messaging channel as augmentation
``multitask_channel``     ``multitask`` with the messaging channel as augmentation
========================  ==========================================================

Steps, each resumable (a finished step's output is found and kept; an interrupted training run
resumes from its checkpoint):

1. ``splits.json``: the train/val/test films of every dataset with their patients; the run
   stops if a patient is on two sides.
2. ``arms/<arm>/seed<k>/``: :func:`covidmt_jax.train.train` of each arm and seed (done when its
   ``summary.json`` exists); the best export by validation COVID ROC-AUC is scored.
3. ``scores/seed<k>/<condition>/rows_<arm>.csv``: the arms of a seed scored together on the held-out
   COVID/non-COVID test films (:class:`covidmt_jax.scoring.step.Scorer`: probability, Grad-CAM
   of the decision, IOL against the shipped lung U-Net) for each condition: ``whatsapp`` and
   the JPEG-quality sweep ``q30`` ... ``q90``; here the IOL against each film's OWN lung mask
   (ground truth), the CAM mass in the image border and outside the mask are added. The
   ``whatsapp`` condition also writes the worst-case galleries.
4. ``probe.json``: the source-prediction probe (can a linear classifier tell the data source
   from the film with its lungs blanked out?).
5. ``report.md`` (+ ``study.json``, figures): tables with intervals and paired tests
   (:func:`covidmt_jax.report.summarize`), the sweep, the shortcut check, the galleries.

Row columns (one row per film, arm): ``model`` (arm), ``pair_id``, ``error`` (always ""),
``label``, ``source``, ``convention``, ``prob_orig``/``prob_trans``, ``iol_orig``/``iol_trans``
(ground-truth masks), ``iol_unet_orig``/``iol_unet_trans`` (shipped U-Net),
``lung_frac_orig``/``lung_frac_trans`` (ground truth), ``unet_lung_frac_orig``/``_trans``,
``cam_border_orig``/``_trans`` and ``cam_outside_orig``/``_trans`` (fractions of the CAM's
mass in the border band / outside the ground-truth mask).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from covidmt_jax import channels, config_lib, metrics
from covidmt_jax.config_lib import ConfigError, dataset_entry

log = logging.getLogger("covidmt_jax.study")

#: arm -> (multi-task, channel in the loop)
ARMS = {"baseline": (False, False), "multitask": (True, False),
        "baseline_channel": (False, True), "multitask_channel": (True, True)}
COVID_TASK = {"name": "covid", "kind": "classification", "dataset": "covid", "label": "covid"}
AUX_TASKS = {
    "tb": {"name": "tb", "kind": "classification", "dataset": "tb", "label": "tb"},
    "lungbox": {"name": "lungbox", "kind": "box", "dataset": "tb", "label": "lung"},
}
ROW_COLUMNS = ("model", "pair_id", "patient", "error", "label", "source", "convention", "prob_orig", "prob_trans",
               "iol_orig", "iol_trans", "iol_unet_orig", "iol_unet_trans", "lung_frac_orig",
               "lung_frac_trans", "unet_lung_frac_orig", "unet_lung_frac_trans", "cam_border_orig",
               "cam_border_trans", "cam_outside_orig", "cam_outside_trans")
_TEXT = ("model", "pair_id", "patient", "error", "source", "convention")


# ============================================================================ configuration
def base_config() -> ml_collections.ConfigDict:
    """Every key of a study config with the 2-core CPU defaults (``configs/study_real.py``)."""
    c = ml_collections.ConfigDict()
    c.root = "../shared/data"
    c.arms = tuple(ARMS)
    c.seeds = (0, 1, 2)
    c.aux_tasks = ("tb", "lungbox")
    c.backbone = "resnet18"
    c.transition_channels = (64,)
    c.fpn_channels = 64
    c.image_size = 128              # 256 (4x the pixels) with size=256: see docs/study_real.md, "Cost"
    c.steps = 600
    c.eval_every_steps = 200
    c.per_task_batch = 8
    c.eval_batch_size = 32
    c.num_workers = 0
    c.lr = 3e-4
    c.milestones = (0.8,)            # fractions of the steps where the lr drops by 10
    c.max_per_class = -1             # train/val films per class and dataset (-1 = all)
    c.max_test_per_class = -1        # scored test films per class (-1 = all)
    c.augment = ml_collections.ConfigDict({"translate": 0.1, "rotate_deg": 10.0, "zoom": 0.15,
                                           "hflip": True, "intensity_shift": 0.1})
    c.channel_augment = ml_collections.ConfigDict({"p": 0.5, "quality": (30, 95), "scale": (0.5, 1.0)})
    c.score = ml_collections.ConfigDict({
        "channel": "whatsapp", "qualities": (30, 50, 70, 90), "batch_size": 16, "lungs": "",
        "threshold": 0.5, "eta": 0.4, "cam_threshold": 0.5, "border": 0.1, "gallery": 6})
    c.probe = ml_collections.ConfigDict({"size": 32, "steps": 400, "lr": 0.5, "l2": 1e-3,
                                         "sets": ("quex_covid_fields", "quex_pneumonia_normal_fields")})
    return c


def config_from_arg(arg: str | None) -> ml_collections.ConfigDict:
    """``root=PATH,size=S,steps=N,seeds=0-2|0,1`` (the ``--config file.py:ARG`` part)."""
    opts = config_lib.parse_arg(arg)
    unknown = set(opts) - {"root", "size", "steps", "seeds"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use root=, size=, steps=, seeds=")
    c = base_config()
    if "root" in opts:
        c.root = opts["root"]
    if "size" in opts:
        c.image_size = int(opts["size"])
    if "steps" in opts:
        c.steps = int(opts["steps"])
        c.eval_every_steps = max(1, c.steps // 3)
    if "seeds" in opts:
        s = opts["seeds"]
        c.seeds = tuple(range(int(s.split("-")[0]), int(s.split("-")[1]) + 1)) if "-" in s else \
            tuple(int(v) for v in s.split(";") if v)
    return c


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Unknown keys and impossible values, before anything expensive."""
    ref = base_config()
    unknown = sorted(set(cfg.keys()) - set(ref.keys()))
    if unknown:
        raise ConfigError(f"study config: unknown key(s) {unknown}; known: {sorted(ref.keys())}")
    for sec in ("score", "probe", "channel_augment", "augment"):
        extra = sorted(set(cfg[sec].keys()) - set(ref[sec].keys()))
        if extra:
            raise ConfigError(f"study config.{sec}: unknown key(s) {extra}; known: {sorted(ref[sec].keys())}")
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad or not cfg.arms:
        raise ConfigError(f"study config.arms: unknown arm(s) {bad}; choose from {list(ARMS)}")
    bad = [t for t in cfg.aux_tasks if t not in AUX_TASKS]
    if bad:
        raise ConfigError(f"study config.aux_tasks: unknown task(s) {bad}; choose from {list(AUX_TASKS)}")
    if any(ARMS[a][0] for a in cfg.arms) and not cfg.aux_tasks:
        raise ConfigError("study config.aux_tasks is empty but a multi-task arm is requested")
    if not cfg.seeds:
        raise ConfigError("study config.seeds is empty")
    if cfg.steps < 1 or cfg.eval_every_steps < 1:
        raise ConfigError("study config.steps and eval_every_steps must be >= 1")
    for q in cfg.score.qualities:
        if int(q) != q or not 1 <= q <= 100:
            raise ConfigError(f"study config.score.qualities: JPEG quality must be in 1..100, got {q!r}")
    channels.get_channel(cfg.score.channel)
    if not 0 < cfg.score.border < 0.5:
        raise ConfigError(f"study config.score.border must be in (0, 0.5), got {cfg.score.border}")


def arm_config(cfg: ml_collections.ConfigDict, arm: str, seed: int) -> ml_collections.ConfigDict:
    """The training config of one arm and seed: same network, budget and splits for every arm;
    only the tasks (and the datasets they read) and ``channel_p`` differ."""
    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r}; choose from {list(ARMS)}")
    multitask, channel = ARMS[arm]
    tasks = [COVID_TASK] + ([AUX_TASKS[t] for t in cfg.aux_tasks] if multitask else [])
    c = config_lib.base_config()
    c.seed = int(seed)
    c.tasks = tuple(tasks)
    c.task_options = {t["name"]: dict(c.task_options.box.to_dict()) for t in tasks if t["kind"] == "box"}
    c.model.name = "covidmt"
    c.model.kwargs = {"backbone": cfg.backbone, "transition_channels": tuple(cfg.transition_channels),
                      "fpn_channels": int(cfg.fpn_channels)}
    c.data.image_size = int(cfg.image_size)
    c.data.per_task_batch = int(cfg.per_task_batch)
    c.data.eval_batch_size = int(cfg.eval_batch_size)
    c.data.num_workers = int(cfg.num_workers)
    aug = dict(cfg.augment.to_dict())
    aug["channel_p"] = float(cfg.channel_augment.p) if channel else 0.0
    aug["channel_quality"] = tuple(cfg.channel_augment.quality)
    aug["channel_scale"] = tuple(cfg.channel_augment.scale)
    c.data.augment = aug
    common = {"root": str(cfg.root), "max_per_class": int(cfg.max_per_class)}
    datasets = {t["dataset"] for t in tasks}
    train, val = {}, {}
    if "covid" in datasets:
        train["covid"] = dataset_entry("study_covid", split="train", **common)
        val["covid"] = dataset_entry("study_covid", split="val", **common)
    if "tb" in datasets:
        boxes = any(t["kind"] == "box" for t in tasks)
        train["tb"] = dataset_entry("study_tb", split="train", boxes=boxes, **common)
        val["tb"] = dataset_entry("study_tb", split="val", boxes=boxes, **common)
    c.data.train, c.data.val = train, val
    c.total_steps = int(cfg.steps)
    c.steps_per_epoch = int(cfg.eval_every_steps)   # an "epoch" = one evaluation interval
    c.epochs = max(1, int(cfg.steps) // int(cfg.eval_every_steps))
    c.optimizer.lr = float(cfg.lr)
    c.optimizer.milestones = tuple(float(m) * cfg.steps / cfg.eval_every_steps for m in cfg.milestones)
    c.checkpoint.every_steps = max(1, min(int(cfg.eval_every_steps), 200))
    c.checkpoint.keep = 1
    c.eval.best_metric = "covid/roc_auc"
    c.log_every_steps = max(1, min(20, int(cfg.steps)))
    return c


def arm_configs(cfg: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """``{arm: training config}`` of the first seed, each checked by ``config_lib.validate``."""
    out = {}
    for arm in cfg.arms:
        c = arm_config(cfg, arm, cfg.seeds[0])
        config_lib.validate(c)
        out[arm] = c
    return out


# ============================================================================ step 1: splits
def split_manifest(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{dataset: {split: [[film id, patient], ...]}}`` of the study's sets; raises
    ``ConfigError`` when a patient is on two sides of a dataset or of the two datasets."""
    from covidmt_jax.data.sources import get_source
    out: dict[str, Any] = {}
    where: dict[str, str] = {}
    for ds, name, kw in (("covid", "study_covid", {}), ("tb", "study_tb", {})):
        out[ds] = {}
        for split in ("train", "val", "test"):
            n = int(cfg.max_test_per_class if split == "test" else cfg.max_per_class)
            src = get_source(name, root=str(cfg.root), split=split, max_per_class=n, **kw)
            films = []
            for i in range(len(src)):
                r = src[i]
                pid = f"{r['meta']['patient_id']}"
                films.append([r["id"], pid])
                prior = where.setdefault(pid, split)
                if prior != split:
                    raise ConfigError(f"splits: patient {pid!r} ({r['id']}) is in {split} and in {prior}")
            out[ds][split] = films
    return out


# ============================================================================ step 2: training
def _done(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def train_arm(cfg: ml_collections.ConfigDict, arm: str, seed: int, workdir: Path) -> Path:
    """Train (or resume, or keep) one arm/seed; returns its export to score."""
    from covidmt_jax.train import train
    d = workdir / "arms" / arm / f"seed{seed}"
    if not _done(d / "summary.json"):
        log.info("training %s seed %d in %s", arm, seed, d)
        train(arm_config(cfg, arm, seed), d)
    else:
        log.info("%s seed %d: finished earlier (%s)", arm, seed, d / "summary.json")
    best = d / "export" / "best"
    return best if (best / "model.json").is_file() else d / "export" / "final"


# ============================================================================ step 3: scoring
def _border_band(size: int, frac: float) -> np.ndarray:
    """bool ``[S, S]``: the outer ``frac`` of the image on each side."""
    k = max(1, int(round(frac * size)))
    band = np.ones((size, size), bool)
    band[k:size - k, k:size - k] = False
    return band


def cam_mass_fractions(cams: np.ndarray, lung: np.ndarray, band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Share of each CAM's total mass in the border band and outside the lung mask.

    ``cams`` ``[B, S, S]`` in [0, 1]; ``lung`` bool ``[B, S, S]``; ``band`` bool ``[S, S]``.
    Returns two ``[B]`` arrays (NaN for an all-zero CAM)."""
    total = cams.sum(axis=(1, 2))
    ok = total > 0
    safe = np.where(ok, total, 1.0)
    border = np.where(ok, (cams * band).sum(axis=(1, 2)) / safe, np.nan)
    outside = np.where(ok, (cams * ~lung).sum(axis=(1, 2)) / safe, np.nan)
    return border.astype(np.float32), outside.astype(np.float32)


def conditions(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{condition: Channel}``: the channel preset, then one plain JPEG per sweep quality."""
    out = {cfg.score.channel: channels.get_channel(cfg.score.channel)}
    for q in cfg.score.qualities:
        out[f"q{int(q)}"] = channels.jpeg(int(q))
    return out


def read_rows(paths: Path | Sequence[Path]) -> dict[str, np.ndarray]:
    """Columns of one or more ``rows_<arm>.csv`` files, concatenated (text columns as object
    arrays, the rest float)."""
    rows = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        with open(path, newline="") as f:
            part = list(csv.DictReader(f))
        if not part:
            raise ValueError(f"{path}: no rows")
        missing = [c for c in ROW_COLUMNS if c not in part[0] and c != "patient"]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        rows += part
    out = {}
    for c in ROW_COLUMNS:  # rows written before the patient column: "" (no clustering)
        vals = [r.get(c, "") for r in rows]
        out[c] = np.array(vals, dtype=object) if c in _TEXT else np.array(
            [float(v) if v not in ("", "nan") else np.nan for v in vals], np.float64)
    return out


def _write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def score_seed(cfg: ml_collections.ConfigDict, seed: int, exports: Mapping[str, Path], workdir: Path) -> None:
    """Score every arm of one seed on the test films under every condition (resumable per
    condition and arm: a finished ``rows_<arm>.csv`` is kept; arms added to the study later
    are scored on their own)."""
    base = workdir / "scores" / f"seed{seed}"
    todo = {name: ch for name, ch in conditions(cfg).items()
            if any(not _done(base / name / f"rows_{arm}.csv") for arm in exports)}
    if not todo:
        return
    exports = {arm: p for arm, p in exports.items()
               if any(not _done(base / name / f"rows_{arm}.csv") for name in todo)}
    from covidmt_jax.data import images
    from covidmt_jax.data.pipeline import load_pair
    from covidmt_jax.data.sources import get_source
    from covidmt_jax.normalisation import denormalise
    from covidmt_jax.scoring.loading import load_classifier, load_lungs
    from covidmt_jax.scoring.step import Scorer

    s = cfg.score
    size = int(cfg.image_size)
    test = get_source("study_covid", root=str(cfg.root), split="test", max_per_class=int(cfg.max_test_per_class))
    classifiers = {arm: load_classifier(arm, {"kind": "export", "path": str(p), "task": "covid"},
                                        default_threshold=float(s.threshold)) for arm, p in exports.items()}
    scorer = Scorer(classifiers, load_lungs(s.lungs), size, int(s.batch_size),
                    cam_threshold=float(s.cam_threshold))
    band = _border_band(size, float(s.border))
    for cond, channel in todo.items():
        out_dir = workdir / "scores" / f"seed{seed}" / cond
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        rows: dict[str, list[dict]] = {arm: [] for arm in exports}
        worst: dict[str, list] = {arm: [] for arm in exports}
        for start in range(0, len(test), int(s.batch_size)):
            recs = [test[i] for i in range(start, min(len(test), start + int(s.batch_size)))]
            pairs = [load_pair({"id": r["id"], "original": r["image"]}, size, channel=channel) for r in recs]
            xo = np.stack([p.original for p in pairs])
            xt = np.stack([p.transmitted for p in pairs])
            lung = np.stack([images.load_mask(r["mask"], size=(size, size)) for r in recs])
            o, t = scorer(xo, xt, return_maps=True)
            for arm in exports:
                res = {}
                for side, out in (("orig", o), ("trans", t)):
                    cam = np.asarray(out[arm]["cam"], np.float32)
                    res[f"cam_{side}"] = cam
                    res[f"prob_{side}"] = np.asarray(out[arm]["prob"], np.float64)
                    res[f"iol_{side}"] = np.asarray(metrics.iol(cam, lung, float(s.cam_threshold)))
                    res[f"iol_unet_{side}"] = np.asarray(out[arm]["iol"])
                    res[f"unet_lung_frac_{side}"] = np.asarray(out["lung_frac"])
                    res[f"cam_border_{side}"], res[f"cam_outside_{side}"] = cam_mass_fractions(cam, lung, band)
                for j, r in enumerate(recs):
                    row = {"model": arm, "pair_id": r["id"], "patient": f"{r['meta']['patient_id']}",
                           "error": "", "label": int(r["labels"][0]),
                           "source": r["meta"]["source"], "convention": r["meta"]["convention"],
                           "lung_frac_orig": float(lung[j].mean()), "lung_frac_trans": float(lung[j].mean())}
                    for k, v in res.items():
                        if not k.startswith("cam_") or k.startswith(("cam_border", "cam_outside")):
                            row[k] = float(v[j])
                    rows[arm].append(row)
                    if s.gallery and cond == cfg.score.channel:
                        iol_t = row["iol_trans"]
                        key = iol_t if np.isfinite(iol_t) else 2.0
                        worst[arm].append((key, {
                            "image_orig": denormalise(xo[j, ..., 0]), "image_trans": denormalise(xt[j, ..., 0]),
                            "cam_orig": res["cam_orig"][j], "cam_trans": res["cam_trans"][j],
                            "lung_orig": lung[j].astype(np.float32), "lung_trans": lung[j].astype(np.float32),
                            "prob_orig": row["prob_orig"], "prob_trans": row["prob_trans"],
                            "iol_orig": row["iol_orig"], "iol_trans": row["iol_trans"],
                            "threshold": float(s.threshold), "pair_id": r["id"], "label": row["label"]}))
                        worst[arm] = sorted(worst[arm], key=lambda kv: kv[0])[:int(s.gallery)]
        if s.gallery and cond == cfg.score.channel:
            from covidmt_jax.report import gallery_figure
            for arm, items in worst.items():
                if items:
                    gallery_figure([p for _, p in items], f"{arm} seed {seed}: lowest IOL (ground-truth lungs) "
                                   f"after {cond}", out_dir / f"gallery_{arm}.png", float(s.cam_threshold))
        for arm, arm_rows in rows.items():
            if not _done(out_dir / f"rows_{arm}.csv"):
                _write_rows(out_dir / f"rows_{arm}.csv", arm_rows)
        log.info("scored seed %d %s: %d films x %d arms in %.0f s", seed, cond, len(test), len(exports),
                 time.time() - t0)


# ============================================================================ step 4: the probe
def _probe_features(rec: Mapping[str, Any], size: int, keep: str) -> np.ndarray:
    """A film reduced to ``size`` x ``size`` with the lungs (``keep="outside"``) or everything
    but the lungs (``keep="inside"``) set to 0, flattened, plus a 16-bin histogram of the kept
    pixels."""
    from covidmt_jax.data import images
    img = images.load_grey(rec["image"], size=(size, size))
    lung = images.load_mask(rec["mask"], size=(size, size))
    kept = ~lung if keep == "outside" else lung
    x = np.where(kept, img, 0.0)
    hist = np.histogram(img[kept], bins=16, range=(0.0, 1.0))[0] / max(1, int(kept.sum()))
    return np.concatenate([x.ravel(), hist]).astype(np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, steps: int = 400, lr: float = 0.5,
                 l2: float = 1e-3) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """L2-regularised logistic regression by full-batch gradient descent on standardised
    features, classes weighted to balance. ``x`` ``[N, D]``, ``y`` ``[N]`` in {0, 1}.
    Returns ``(w [D], b, mean [D], std [D])``; score = ``sigmoid(((x - mean) / std) @ w + b)``."""
    y = np.asarray(y, np.float64)
    if len(np.unique(y)) != 2:
        raise ValueError("fit_logistic needs both classes in the training data")
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    wts = np.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w, b = np.zeros(z.shape[1]), 0.0
    for _ in range(int(steps)):
        p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
        g = wts * (p - y) / len(y)
        w -= lr * (z.T @ g + l2 * w)
        b -= lr * g.sum()
    return w, b, mean, std


def source_probe(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Can a linear classifier tell the data source (``probe.sets``: a COVID set, then a
    non-COVID set)
    from the film with its lungs blanked (``outside``), and, for reference, from the lungs
    alone (``inside``)? Trained on the train films, ROC-AUC (DeLong interval) and balanced
    accuracy on the test films (intervals clustered by patient where one has several)."""
    from covidmt_jax.data.sources import get_source
    p = cfg.probe
    sets = tuple(p.sets)
    if len(sets) != 2:
        raise ConfigError(f"study config.probe.sets must name two sets, got {sets}")
    data = {}
    for split, n in (("train", cfg.max_per_class), ("test", cfg.max_test_per_class)):
        src = get_source("study_covid", root=str(cfg.root), split=split, covid_sets=sets[:1],
                         non_covid_sets=sets[1:], dedupe=False, max_per_class=int(n))
        data[split] = [src[i] for i in range(len(src))]
    y = {sp: np.array([float(r["meta"]["source"] == sets[0]) for r in recs]) for sp, recs in data.items()}
    test_patients = np.asarray([str(r["meta"]["patient_id"]) for r in data["test"]], dtype=object)
    out: dict[str, Any] = {"sets": list(sets), "positive": sets[0], "n_train": len(y["train"]),
                           "n_test": len(y["test"]), "n_test_positive": int(y["test"].sum())}
    for keep in ("outside", "inside"):
        feats = {sp: np.stack([_probe_features(r, int(p.size), keep) for r in recs]) for sp, recs in data.items()}
        w, b, mean, std = fit_logistic(feats["train"], y["train"], steps=p.steps, lr=p.lr, l2=p.l2)
        score = 1.0 / (1.0 + np.exp(-(((feats["test"] - mean) / std) @ w + b)))
        auc, lo, hi = metrics.roc_auc_ci(y["test"].astype(bool), score, clusters=test_patients)
        rep = metrics.classification_report(y["test"].astype(bool), score, 0.5, clusters=test_patients)
        out[keep] = {"roc_auc": auc, "roc_auc_ci": [lo, hi],
                     "balanced_accuracy": 0.5 * (rep["sensitivity"] + rep["specificity"]),
                     "sensitivity": rep["sensitivity"], "specificity": rep["specificity"],
                     "ci": rep["ci"]}
    return out


# ============================================================================ step 5: report
def _unet_rows(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(rows)
    for side in ("orig", "trans"):
        out[f"iol_{side}"] = rows[f"iol_unet_{side}"]
        out[f"lung_frac_{side}"] = rows[f"unet_lung_frac_{side}"]
    return out


def _select(rows: Mapping[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[keep] for k, v in rows.items()}


def summarize_condition(rows: Mapping[str, np.ndarray], arms: Sequence[str], cfg) -> dict[str, Any]:
    """``report.summarize`` with ground-truth IOL (all films, and visible-field masks only) and
    with the shipped U-Net's IOL, plus the shortcut figures per arm."""
    from covidmt_jax.report import summarize
    kw = dict(eta=float(cfg.score.eta), thresholds={a: float(cfg.score.threshold) for a in arms})
    fields = np.asarray(rows["convention"], dtype=object) == "fields"
    out = {"truth": summarize(rows, arms, **kw), "truth_fields": summarize(_select(rows, fields), arms, **kw),
           "unet": summarize(_unet_rows(rows), arms, **kw), "shortcut": {}, "prob_change": {}}
    model = np.asarray(rows["model"], dtype=object)
    label = np.asarray(rows["label"])
    def mean(x: np.ndarray) -> float:  # NaN (all-zero CAMs) left out; NaN when nothing is left
        x = x[np.isfinite(x)]
        return float(x.mean()) if len(x) else float("nan")

    for a in arms:
        sel = model == a
        out["shortcut"][a] = {
            f"{k}_{side}_{cls}": mean(np.asarray(rows[f"{k}_{side}"])[sel & (label == v)])
            for k in ("cam_border", "cam_outside") for side in ("orig", "trans")
            for cls, v in (("covid", 1), ("noncovid", 0))}
        # how far the channel moves the COVID probability: PI counts only threshold crossings
        dp = np.abs(np.asarray(rows["prob_trans"]) - np.asarray(rows["prob_orig"]))[sel]
        dp = dp[np.isfinite(dp)]
        out["prob_change"][a] = {"mean_abs": float(dp.mean()) if len(dp) else float("nan"),
                                 "p95_abs": float(np.quantile(dp, 0.95)) if len(dp) else float("nan"),
                                 "max_abs": float(dp.max()) if len(dp) else float("nan")}
    return out


#: per-arm figures pooled over seeds by :func:`across_seeds` (PI, OLS, rates in %)
ACROSS_SEED_ARM_METRICS = ("auc_orig", "auc_trans", "sens_orig", "spec_orig", "pi", "dprob_mean",
                           "ols_gt_orig", "ols_gt_trans", "ols_unet_trans")
#: paired differences between arms pooled over seeds by :func:`across_seeds`
ACROSS_SEED_DIFF_METRICS = ("pi", "ols_gt_trans", "ols_unet_trans", "auc_trans")
ACROSS_SEED_LABELS = {"auc_orig": "AUC orig", "auc_trans": "AUC trans", "sens_orig": "sens orig",
                      "spec_orig": "spec orig", "pi": "PI", "dprob_mean": "mean abs Δp",
                      "ols_gt_orig": "OLS GT orig",
                      "ols_gt_trans": "OLS GT trans", "ols_unet_trans": "OLS U-Net trans"}


def _arm_figures(cond: Mapping[str, Any], arm: str) -> dict[str, float]:
    """The :data:`ACROSS_SEED_ARM_METRICS` of one arm in one seed's condition summary."""
    nan = float("nan")
    m, u = cond["truth"]["models"][arm], cond["unet"]["models"][arm]
    c = m.get("classification") or {}
    def cls(side: str, key: str, scale: float = 1.0) -> float:
        v = c.get(side, {}).get(key, nan)
        return nan if v is None else scale * float(v)
    def ols(s: Mapping, side: str) -> float:
        v = s.get("ols", {}).get(side, {}).get("score", nan)
        return nan if v is None else float(v)
    return {"auc_orig": cls("original", "roc_auc"), "auc_trans": cls("transmitted", "roc_auc"),
            "sens_orig": cls("original", "sensitivity", 100.0), "spec_orig": cls("original", "specificity", 100.0),
            "pi": float(m.get("pi", {}).get("score", nan)),
            "dprob_mean": float(cond.get("prob_change", {}).get(arm, {}).get("mean_abs", nan)),
            "ols_gt_orig": ols(m, "original"),
            "ols_gt_trans": ols(m, "transmitted"), "ols_unet_trans": ols(u, "transmitted")}


def _pair_figures(cond: Mapping[str, Any], a: str, b: str) -> dict[str, tuple[float, float]]:
    """``{metric: (difference a - b, p-value)}`` of :data:`ACROSS_SEED_DIFF_METRICS` in one seed."""
    nan = float("nan")
    def find(summary: Mapping) -> Mapping:
        return next((c for c in summary["comparisons"] if list(c["models"]) == [a, b]), {})
    t, u = find(cond["truth"]), find(cond["unet"])
    def get(d: Mapping) -> tuple[float, float]:
        diff, p = d.get("diff", nan), d.get("p_value", nan)
        return (nan if diff is None else float(diff), nan if p is None else float(p))
    return {"pi": get(t.get("pi", {})), "ols_gt_trans": get(t.get("ols", {}).get("transmitted", {})),
            "ols_unet_trans": get(u.get("ols", {}).get("transmitted", {})),
            "auc_trans": get(t.get("roc_auc", {}).get("transmitted", {}))}


def across_seeds(study: Mapping[str, Any], arms: Sequence[str], condition: str,
                 alpha: float = 0.05) -> dict[str, Any]:
    """The per-seed summaries of one condition pooled over the seeds that have it.

    ``study["scores"][seed][condition]`` holds :func:`summarize_condition`'s output per seed.
    Returns ``{"seeds", "arms": {arm: {metric: {"per_seed", "mean", "sd"}}}, "comparisons":
    [{"models": [a, b], metric: {"per_seed", "p_values", "mean", "lo", "hi", "n_p_below_05_up",
    "n_p_below_05_down"}}]}``:
    per arm the mean and sample sd of :data:`ACROSS_SEED_ARM_METRICS`; per pair of arms (in
    the order given) the per-seed paired differences of :data:`ACROSS_SEED_DIFF_METRICS`, their
    mean with a ``1 - alpha`` t-interval over the seeds (NaN with fewer than two seeds) and
    how many seeds had a paired-test p below 0.05 with a positive (``n_p_below_05_up``) and a
    negative (``n_p_below_05_down``) difference. NaN seeds (e.g. no OLS when every map is
    empty) are left out of the mean.
    """
    seeds = [s for s in study["seeds"] if condition in study["scores"].get(str(s), {})]
    conds = [study["scores"][str(s)][condition] for s in seeds]
    def pooled(vals: list[float]) -> dict[str, Any]:
        x = np.asarray(vals, np.float64)
        x = x[np.isfinite(x)]
        mean = float(x.mean()) if len(x) else float("nan")
        sd = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
        return {"per_seed": [float(v) for v in vals], "mean": mean, "sd": sd}
    out: dict[str, Any] = {"seeds": list(seeds), "arms": {}, "comparisons": []}
    for a in arms:
        figs = [_arm_figures(c, a) for c in conds]
        out["arms"][a] = {k: pooled([f[k] for f in figs]) for k in ACROSS_SEED_ARM_METRICS}
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            figs = [_pair_figures(c, a, b) for c in conds]
            cmp: dict[str, Any] = {"models": [a, b]}
            for k in ACROSS_SEED_DIFF_METRICS:
                diffs = np.asarray([f[k][0] for f in figs], np.float64)
                ps = [f[k][1] for f in figs]
                ok = diffs[np.isfinite(diffs)]
                mean, lo, hi = (metrics.clustered_mean_ci(ok, alpha=alpha) if len(ok)
                                else (float("nan"),) * 3)
                sig = [d for d, p in zip(diffs, ps) if np.isfinite(p) and p < 0.05]
                cmp[k] = {"per_seed": diffs.tolist(), "p_values": ps, "mean": mean, "lo": lo, "hi": hi,
                          "n_seeds": int(len(ok)), "sd": float(ok.std(ddof=1)) if len(ok) > 1 else float("nan"),
                          "n_p_below_05_up": int(sum(d > 0 for d in sig)),
                          "n_p_below_05_down": int(sum(d < 0 for d in sig))}
            out["comparisons"].append(cmp)
    return out


def _ci(d: Mapping | None, key: str = "score", scale: float = 1.0) -> str:
    if not d or key not in d or not np.isfinite(d[key]):
        return "–"
    return f"{scale * d[key]:.1f} [{scale * d['lo']:.1f}, {scale * d['hi']:.1f}]"


def _rate(cls: Mapping, key: str) -> str:
    v, (lo, hi) = cls[key], cls["ci"][key]
    return "–" if not np.isfinite(v) else f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _auc(cls: Mapping) -> str:
    v, (lo, hi) = cls["roc_auc"], cls["ci"]["roc_auc"]
    return "–" if not np.isfinite(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _p(x: Any) -> str:
    return "–" if x is None or not np.isfinite(x) else (f"{x:.3f}" if x >= 0.001 else "<0.001")


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(r) + " |" for r in body] + [""]


def _dprob(d: Mapping | None) -> str:
    if not d or d.get("mean_abs") is None or not np.isfinite(d["mean_abs"]):
        return "–"
    return f"{d['mean_abs']:.4f} / {d['p95_abs']:.4f} / {d['max_abs']:.4f}"


def _ols(s: Mapping, side: str) -> str:
    o = s.get("ols", {}).get(side)
    if not o:
        return "–"
    return f"{o['score']:.1f} [{o['lo']:.1f}, {o['hi']:.1f}]" if np.isfinite(o.get("score", np.nan)) else "–"


def write_report(cfg: ml_collections.ConfigDict, workdir: Path, study: Mapping[str, Any]) -> Path:
    """``report.md`` from ``study.json``'s content (see :func:`run`)."""
    arms = list(study["arms"])
    main = cfg.score.channel
    L = ["# Real-film study: single-task vs multi-task vs channel-augmented training", ""]
    L += [f"Backbone {cfg.backbone}, {cfg.image_size} px, {cfg.steps} steps x {cfg.per_task_batch} films "
          f"per task, seeds {list(study['seeds'])}, arms {arms}. Test films: "
          f"{study['n_test']} ({study['n_test_covid']} COVID-19), patient-disjoint from every training "
          f"and validation film (splits.json). Intervals: 95 % Clopper-Pearson (rates), DeLong (ROC-AUC); "
          f"paired tests: exact McNemar (PI, OLS), DeLong (AUC). PI/OLS/rates in %. abs Δp: how far the "
          f"channel moves the COVID probability of a film (|p transmitted - p original|; PI counts only "
          f"the moves that cross the threshold).", ""]
    if study.get("reduced"):
        L += [f"**Reduced run**: {study['reduced']}", ""]
    for seed in study["seeds"]:
        conds = study["scores"].get(str(seed), {})
        if main not in conds:
            continue
        s = conds[main]
        L += [f"## Seed {seed}: {main}", "", "### Classification, PI and OLS", ""]
        body = []
        for a in arms:
            m, u, f = s["truth"]["models"][a], s["unet"]["models"][a], s["truth_fields"]["models"][a]
            c = m.get("classification", {})
            body.append([a, _auc(c["original"]) if c else "–", _auc(c["transmitted"]) if c else "–",
                         _rate(c["original"], "sensitivity") if c else "–",
                         _rate(c["original"], "specificity") if c else "–",
                         _ci(m.get("pi")), _dprob(s.get("prob_change", {}).get(a)),
                         _ols(m, "original"), _ols(m, "transmitted"),
                         _ols(f, "transmitted"), _ols(u, "original"), _ols(u, "transmitted")])
        L += _table(["arm", "AUC orig", f"AUC {main}", "sens orig", "spec orig", "PI", "abs Δp mean / p95 / max",
                     "OLS GT orig", "OLS GT trans", "OLS GT trans (fields masks)", "OLS U-Net orig",
                     "OLS U-Net trans"], body)
        L += ["### Paired comparisons (first arm minus second)", ""]
        body = []
        for cmp, ucmp in zip(s["truth"]["comparisons"], s["unet"]["comparisons"]):
            a, b = cmp["models"]
            if "pi" not in cmp:
                continue
            auc = cmp.get("roc_auc", {}).get("transmitted", {})
            body.append([f"{a} vs {b}", f"{cmp['pi']['diff']:+.1f} [{cmp['pi']['lo']:+.1f}, {cmp['pi']['hi']:+.1f}]",
                         _p(cmp["pi"]["p_value"]),
                         f"{cmp['ols']['transmitted']['diff']:+.1f}", _p(cmp["ols"]["transmitted"]["p_value"]),
                         f"{ucmp['ols']['transmitted']['diff']:+.1f}", _p(ucmp["ols"]["transmitted"]["p_value"]),
                         f"{auc.get('diff', float('nan')):+.3f}", _p(auc.get("p_value"))])
        L += _table(["arms", "PI diff [CI]", "p", "OLS GT trans diff", "p", "OLS U-Net trans diff", "p",
                     f"AUC {main} diff", "p"], body)
        L += ["### JPEG-quality sweep (PI / OLS GT on the transmitted side / AUC transmitted)", ""]
        qs = [k for k in conds if k != main]
        body = []
        for a in arms:
            cells = []
            for q in qs:
                m = conds[q]["truth"]["models"][a]
                c = m.get("classification", {})
                auc = c["transmitted"]["roc_auc"] if c else float("nan")
                cells.append(f"{m['pi']['score']:.1f} / {m['ols']['transmitted']['score']:.1f} / {auc:.3f}")
            body.append([a] + cells)
        L += _table(["arm"] + qs, body)
        L += ["### Shortcut check: share of the CAM mass in the image border "
              f"({int(100 * cfg.score.border)} % band) and outside the ground-truth lung mask (originals)", ""]
        body = []
        for a in arms:
            sc = s["shortcut"][a]
            body.append([a] + [f"{100 * sc.get(k, float('nan')):.1f}" for k in (
                "cam_border_orig_covid", "cam_border_orig_noncovid", "cam_outside_orig_covid",
                "cam_outside_orig_noncovid")])
        L += _table(["arm", "border, COVID", "border, non-COVID", "outside lungs, COVID",
                     "outside lungs, non-COVID"], body)
        L += ["### Worst cases (lowest IOL against the ground-truth lungs after the channel)", ""]
        for a in arms:
            g = Path("scores") / f"seed{seed}" / main / f"gallery_{a}.png"
            if (workdir / g).is_file():
                L += [f"**{a}**", "", f"![{a}]({g.as_posix()})", ""]
    pr = study.get("probe")
    if pr:
        L += ["## Source-prediction probe", "",
              f"Linear classifier on {cfg.probe.size} px films of `{pr['sets'][0]}` vs `{pr['sets'][1]}` "
              f"(same archive, format and mask convention), trained on {pr['n_train']} training films, tested "
              f"on {pr['n_test']} ({pr['n_test_positive']} positive).", ""]
        body = [[k, f"{pr[k]['roc_auc']:.3f} [{pr[k]['roc_auc_ci'][0]:.3f}, {pr[k]['roc_auc_ci'][1]:.3f}]",
                 f"{100 * pr[k]['balanced_accuracy']:.1f}"] for k in ("outside", "inside")]
        L += _table(["pixels kept", "test ROC-AUC [DeLong 95 %]", "balanced accuracy %"], body)
    acr = study.get("across_seeds", {}).get(main)
    if acr and len(acr["seeds"]) > 1:
        n = len(acr["seeds"])
        L += [f"## Across seeds ({main}; seeds {acr['seeds']})", "",
              f"Per arm: mean ± sd of the per-seed figures ({n} seeds; a seed without a figure, e.g. no "
              "OLS when every map is empty, is left out). Paired differences: per-seed values and their "
              "mean with a t 95 % interval over the k seeds with a value (k - 1 degrees of freedom; k is "
              f"shown where it is below {n}); the seed is the unit of replication, so the interval covers "
              "training variation on these test films, not the sampling of test films (the per-seed "
              "intervals above cover that). Where every seed gives the same difference there is no "
              "between-seed spread to build an interval from, and none is shown. Every interval and "
              "p-value here stands alone, without a correction for the number of comparisons (arm "
              "pairs x figures x conditions): with this many, some reach p < 0.05 by chance.", ""]
        def fin(x: Any) -> bool:  # None: a NaN after a round trip through study.json
            return x is not None and bool(np.isfinite(x))
        def msd(v: Mapping) -> str:
            if not fin(v["mean"]):
                return "–"
            return f"{v['mean']:.3g} ± {v['sd']:.2g}" if fin(v["sd"]) else f"{v['mean']:.3g}"
        L += _table(["arm"] + [ACROSS_SEED_LABELS[k] for k in ACROSS_SEED_ARM_METRICS],
                    [[a] + [msd(acr["arms"][a][k]) for k in ACROSS_SEED_ARM_METRICS] for a in arms])
        def diff(v: Mapping) -> str:
            vals = ", ".join("–" if not fin(x) else f"{x:+.3g}" for x in v["per_seed"])
            k = v.get("n_seeds", n)  # study.json files written before n_seeds was recorded
            if fin(v["lo"]):
                ci = f" [{v['lo']:+.3g}, {v['hi']:+.3g}]"
            elif k > 1 and v.get("sd") == 0:
                ci = " [no between-seed spread]"
            else:
                ci = ""
            if not fin(v["mean"]):
                return "–"
            seeds = f"; {k} seeds" if k < n else ""
            return (f"{v['mean']:+.3g}{ci} ({vals}{seeds}; p < 0.05: {v['n_p_below_05_up']} up, "
                    f"{v['n_p_below_05_down']} down)")
        L += _table(["arms (first minus second)"]
                    + [f"{ACROSS_SEED_LABELS[k]} diff" for k in ACROSS_SEED_DIFF_METRICS],
                    [[f"{c['models'][0]} vs {c['models'][1]}"] + [diff(c[k]) for k in ACROSS_SEED_DIFF_METRICS]
                     for c in acr["comparisons"]])
        sweep = {q: v for q, v in study.get("across_seeds", {}).items() if q != main and len(v["seeds"]) > 1}
        if sweep:
            L += ["JPEG-quality sweep over the seeds (mean PI / mean OLS GT on the transmitted side / "
                  "mean AUC transmitted):", ""]
            def mean(v: Mapping, a: str, k: str, digits: int) -> str:
                x = v["arms"][a][k]["mean"]
                return f"{x:.{digits}f}" if fin(x) else "–"
            L += _table(["arm"] + list(sweep), [[a] + [
                f"{mean(v, a, 'pi', 2)} / {mean(v, a, 'ols_gt_trans', 1)} / {mean(v, a, 'auc_trans', 3)}"
                for v in sweep.values()] for a in arms])
    path = workdir / "report.md"
    path.write_text("\n".join(L))
    return path


# ============================================================================ the run
#: keys that may change between calls on one work directory (more arms or seeds)
RESUME_FREE = ("arms", "seeds")


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def check_resume(cfg: ml_collections.ConfigDict, workdir: Path) -> None:
    """Refuse to continue a work directory made with other settings (anything but
    :data:`RESUME_FREE`): finished arms and scores would be mixed with new ones."""
    path = workdir / "study_config.json"
    if not path.is_file():
        return
    old = {k: v for k, v in _flat(json.loads(path.read_text())).items() if k.split(".")[0] not in RESUME_FREE}
    new = {k: v for k, v in _flat(json.loads(cfg.to_json_best_effort())).items()
           if k.split(".")[0] not in RESUME_FREE}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"{workdir} holds a study made with other settings ({', '.join(diff)} differ: "
                          f"e.g. {diff[0]} was {old.get(diff[0])!r}, now {new.get(diff[0])!r}); "
                          f"use a new --workdir (only {list(RESUME_FREE)} may change)")


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) the whole study; returns the content of ``study.json``."""
    from covidmt_jax.report import jsonable
    validate(cfg)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_resume(cfg, workdir)
    (workdir / "study_config.json").write_text(cfg.to_json_best_effort(indent=2))
    arm_configs(cfg)
    manifest = split_manifest(cfg)
    (workdir / "splits.json").write_text(json.dumps(manifest))
    test = manifest["covid"]["test"]
    t0 = time.time()
    study: dict[str, Any] = {"arms": list(cfg.arms), "seeds": list(cfg.seeds), "n_test": len(test),
                             "scores": {}, "train": {}}
    for seed in cfg.seeds:
        exports = {arm: train_arm(cfg, arm, int(seed), workdir) for arm in cfg.arms}
        score_seed(cfg, int(seed), exports, workdir)
        study["scores"][str(seed)] = {}
        for cond in conditions(cfg):
            rows = read_rows([workdir / "scores" / f"seed{seed}" / cond / f"rows_{a}.csv" for a in cfg.arms])
            study["scores"][str(seed)][cond] = summarize_condition(rows, list(cfg.arms), cfg)
        study["train"][str(seed)] = {
            arm: json.loads((workdir / "arms" / arm / f"seed{seed}" / "summary.json").read_text()).get("wall_s")
            for arm in cfg.arms}
    study["across_seeds"] = {cond: across_seeds(study, list(cfg.arms), cond) for cond in conditions(cfg)}
    rows0 = read_rows(workdir / "scores" / f"seed{cfg.seeds[0]}" / cfg.score.channel / f"rows_{cfg.arms[0]}.csv")
    study["n_test_covid"] = int((rows0["label"] == 1).sum())
    probe_path = workdir / "probe.json"
    if not _done(probe_path):
        probe_path.write_text(json.dumps(jsonable(source_probe(cfg)), indent=2))
    study["probe"] = json.loads(probe_path.read_text())
    if cfg.max_per_class >= 0 or cfg.max_test_per_class >= 0:
        def most(n: int, what: str) -> str:
            return f"all {what} films" if n < 0 else f"at most {n} {what} films per class"
        study["reduced"] = f"{most(cfg.max_per_class, 'training/validation')}, {most(cfg.max_test_per_class, 'test')}"
    study["wall_s_this_call"] = time.time() - t0
    (workdir / "study.json").write_text(json.dumps(jsonable(study), indent=1, allow_nan=False, default=float))
    path = write_report(cfg, workdir, study)
    log.info("report: %s", path)
    return study


def main(argv: list[str] | None = None) -> int:
    """The study CLI (``--config configs/study_real.py[:ARG] --workdir DIR``); re-run to resume."""
    from covidmt_jax.cli import run_config_cli
    from covidmt_jax.data.records import DataError
    return run_config_cli(run, module="covidmt_jax.study", config_help="configs/study_real.py[:arg]",
                          workdir_help="study directory (re-use it to resume)", argv=argv,
                          input_errors=(DataError,))


if __name__ == "__main__":
    sys.exit(main())
