"""Training configuration: the defaults every ``configs/*.py`` starts from, and validation.

Configs are data (``get_config()`` returning an ``ml_collections.ConfigDict``); the trainer
reads them in one place. Layout::

    seed, epochs, total_steps (-1: from epochs), steps_per_epoch (-1: from data sizes)
    tasks                  task names in order (see covidmt_jax.taskspec.PAPER_TASKS)
    task_options.<task>    per-task options, checked against Task.OPTIONS (box: regression, l2,
                           focal_alpha, focal_gamma, score_threshold; classification: threshold)
    model.name, model.kwargs, model.in_channels, model.dtype ("float32" | "bfloat16")
        (COVIDMT kwargs: backbone, transition_channels, fpn_channels, anchor_sizes,
        box_head_norm ("none": the paper's RetinaNet subnets; "group": GroupNorm in them))
    model.cpu_conv_kernels ("auto": the COVIDMT_CPU_CONV variable, default on; "on", "off" or
        a comma-separated list of covidmt_jax.models.cpu_conv paths; CPU backend only)
    init.torch_weights, init.source     ImageNet initialisation from a user-given file
    data.image_size, data.per_task_batch, data.eval_batch_size, data.num_workers,
    data.on_error ("raise": an unreadable image stops the run naming the file; "skip": it is
        left out of training and evaluation, logged once, listed in summary.json)
    data.augment (the paper's ranges: translate, rotate_deg, zoom, hflip, intensity_shift; all 0 = off)
    data.train.<dataset> / data.val.<dataset>:
        source (a covidmt_jax.data.sources name), kwargs (its arguments),
        holdout (fraction held out by id, 0 = none), holdout_seed, holdout_part ("keep"|"hold")
    optimizer.name ("adam" | "adamw" | "sgd"), lr, b1, b2, eps, weight_decay, momentum,
        milestones (epochs), decay, grad_clip (0 = off)
    checkpoint.every_steps, checkpoint.keep
    eval.every_epochs, eval.best_metric ("<task>/<metric>"), eval.best_mode ("max" | "min")
    log_every_steps, mesh.model_axis
    (log_every_steps, checkpoint.every_steps, eval.every_epochs: integers >= 1, INTERVAL_KEYS)
"""
from __future__ import annotations

import ml_collections

from covidmt_jax import models
from covidmt_jax.data.records import ON_ERROR
from covidmt_jax.data.sources import SOURCES
from covidmt_jax.errors import ConfigError  # noqa: F401  (re-exported: config_lib.ConfigError)
from covidmt_jax.models import cpu_conv
from covidmt_jax.models.heads import BOX_HEAD_NORMS
from covidmt_jax.taskspec import KINDS, TaskSpec, paper_tasks, tasks_from_names


def dataset_entry(source: str, *, holdout: float = 0.0, holdout_part: str = "keep",
                  holdout_seed: int = 0, **kwargs) -> ml_collections.ConfigDict:
    """One ``data.train.<dataset>`` / ``data.val.<dataset>`` entry."""
    return ml_collections.ConfigDict({"source": source, "kwargs": dict(kwargs), "holdout": holdout,
                                      "holdout_part": holdout_part, "holdout_seed": holdout_seed})


def base_config() -> ml_collections.ConfigDict:
    """The paper's recipe (SPEC.md) with COVIDMT-ResNeXt-50 and all six tasks."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.epochs = 25
    c.total_steps = -1
    c.steps_per_epoch = -1
    c.tasks = tuple(t.name for t in paper_tasks(6))
    c.task_options = ml_collections.ConfigDict({
        "box": {"regression": "squared", "l2": 1e-4, "score_threshold": 0.3},
    })
    c.model = ml_collections.ConfigDict({
        "name": "covidmt", "in_channels": 1, "dtype": "float32", "cpu_conv_kernels": "auto",
        "kwargs": {"backbone": "resnext50_32x4d", "transition_channels": (256,), "fpn_channels": 256,
                   "box_head_norm": "none"},
    })
    c.init = ml_collections.ConfigDict({"torch_weights": "", "source": "torchvision"})
    c.data = ml_collections.ConfigDict({
        "image_size": 512, "per_task_batch": 4, "eval_batch_size": 16, "num_workers": 0,
        "augment": {"translate": 0.1, "rotate_deg": 10.0, "zoom": 0.15, "hflip": True,
                    "intensity_shift": 0.1, "min_box_area": 0.2},
        "max_boxes": 8, "on_error": "raise", "train": {}, "val": {},
    })
    c.optimizer = ml_collections.ConfigDict({
        "name": "adam", "lr": 2e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
        "momentum": 0.9, "milestones": (8, 16, 20), "decay": 0.1, "grad_clip": 0.0,
    })
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 500, "keep": 3})
    c.eval = ml_collections.ConfigDict({"every_epochs": 1, "best_metric": "covid/roc_auc",
                                        "best_mode": "max"})
    c.log_every_steps = 20
    c.mesh = ml_collections.ConfigDict({"model_axis": 1})
    return c


def paper_data(c: ml_collections.ConfigDict, root: str = "/data") -> None:
    """Point ``c.data`` at the three real datasets in their published layouts under ``root``
    (``covidx/``, ``rsna/``, ``nih/``); change the paths with ``--config.data.train.<ds>.kwargs.*``."""
    # COVIDx3's two lists are the paper's train and validation sets (its test set, WaCXR, is
    # COVIDx8 minus both; the lists share no patient); COVID-19 rows are upsampled to the
    # pneumonia count. NIH: the task set's images (Table 1: the four findings, and 5,000 + 800
    # "No Finding" images) of the official train_val list, 12.5 % of its patients held out for
    # validation (Table 1's ratio); the official test list is left untouched.
    nih = {"root": f"{root}/nih", "split": "train_val", "drop_unlabelled": True, "max_normal": 5800}
    c.data.train = {
        "covidx": dataset_entry("covidx", label_file=f"{root}/covidx/train_COVIDx3.txt",
                                image_dir=f"{root}/covidx/train", upsample_covid=True),
        "rsna": dataset_entry("rsna", labels=f"{root}/rsna/stage_2_train_labels.csv",
                              image_dir=f"{root}/rsna/stage_2_train_images", holdout=0.25,
                              holdout_part="keep"),
        "nih": dataset_entry("nih", holdout=0.125, holdout_part="keep", **nih),
    }
    c.data.val = {
        "covidx": dataset_entry("covidx", label_file=f"{root}/covidx/test_COVIDx3.txt",
                                image_dir=f"{root}/covidx/test"),
        "rsna": dataset_entry("rsna", labels=f"{root}/rsna/stage_2_train_labels.csv",
                              image_dir=f"{root}/rsna/stage_2_train_images", holdout=0.25,
                              holdout_part="hold"),
        "nih": dataset_entry("nih", holdout=0.125, holdout_part="hold", **nih),
    }


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"tasks=3,backbone=resnet50"`` (the ``--config file.py:ARG`` part) -> dict."""
    out: dict[str, str] = {}
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def apply_task_count(c: ml_collections.ConfigDict, n: int | str) -> None:
    """The paper's ablation: the first ``n`` tasks (COVID, box, Infiltration, ...)."""
    tasks = paper_tasks(int(n))
    c.tasks = tuple(t.name for t in tasks)
    needed = {t.dataset for t in tasks}
    for split in ("train", "val"):
        entries = c.data[split]
        for ds in list(entries.keys()):
            if ds not in needed:
                del entries[ds]


#: keys the trainer uses as ``step % value`` intervals: integers >= 1
INTERVAL_KEYS = ("log_every_steps", "checkpoint.every_steps", "eval.every_epochs")


def get_dotted(c: ml_collections.ConfigDict, dotted: str) -> object:
    """``c["a"]["b"]`` of ``"a.b"``."""
    node = c
    for part in dotted.split("."):
        node = node[part]
    return node


def check_intervals(c: ml_collections.ConfigDict, keys=INTERVAL_KEYS) -> None:
    """ConfigError naming the first of ``keys`` that is not an integer >= 1."""
    for key in keys:
        value = get_dotted(c, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.{key}={value!r}: must be an integer >= 1 (an interval in "
                              f"{'epochs' if 'epochs' in key else 'steps'})")


def check_model_names(c: ml_collections.ConfigDict) -> None:
    """ConfigError unless ``model.name`` (and COVIDMT's ``model.kwargs.backbone``) is a zoo model
    and ``model.cpu_conv_kernels`` a valid switch (see :mod:`covidmt_jax.models.cpu_conv`)."""
    if c.model.name not in models.available():
        raise ConfigError(f"config.model.name={c.model.name!r} is not a zoo model; "
                          f"available: {models.available()}")
    if c.model.name == "covidmt":
        backbone = (c.model.kwargs or {}).get("backbone", "resnext50_32x4d")
        backbones = [m for m in models.available() if m not in ("covidmt", "unet")]
        if backbone not in backbones:
            raise ConfigError(f"config.model.kwargs.backbone={backbone!r} is not a zoo backbone; "
                              f"available: {backbones}")
    kernels = c.model.get("cpu_conv_kernels", "auto")
    if not (isinstance(kernels, str) and kernels.strip().lower() == "auto"):
        try:
            cpu_conv.parse_paths(kernels, "config.model.cpu_conv_kernels")
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None


def validate(c: ml_collections.ConfigDict) -> list[TaskSpec]:
    """Check a config before anything expensive happens; returns the task specs."""
    try:
        tasks = tasks_from_names(c.tasks)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.tasks: {e}") from None
    if not tasks:
        raise ConfigError("config.tasks is empty")
    check_model_names(c)
    if c.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.model.dtype must be float32, bfloat16 or float16, got {c.model.dtype!r}")
    if c.model.name == "covidmt":
        norm = (c.model.kwargs or {}).get("box_head_norm", "none")
        if norm not in BOX_HEAD_NORMS:
            raise ConfigError(f"config.model.kwargs.box_head_norm must be one of {list(BOX_HEAD_NORMS)}, "
                              f"got {norm!r}")
    if c.model.name != "covidmt":
        kinds = {t.kind for t in tasks}
        if c.model.name == "unet" and kinds != {"segmentation"}:
            raise ConfigError("config.model.name='unet' trains segmentation tasks only")
        if c.model.name != "unet" and kinds != {"classification"}:
            raise ConfigError(f"a plain classifier ({c.model.name}) trains classification tasks only; "
                              f"use model.name='covidmt' for {sorted(kinds - {'classification'})} tasks")
    for t in tasks:
        if t.kind not in KINDS:
            raise ConfigError(f"task {t.name}: unknown kind {t.kind}")
        if t.dataset not in c.data.train:
            raise ConfigError(f"task {t.name!r} reads dataset {t.dataset!r} but config.data.train has "
                              f"no entry for it (have: {sorted(c.data.train.keys())})")
    for split in ("train", "val"):
        for ds, entry in c.data[split].items():
            where = f"config.data.{split}.{ds}"
            if "source" not in entry:
                raise ConfigError(f"{where}: missing 'source'")
            if entry.source not in SOURCES:
                raise ConfigError(f"{where}.source={entry.source!r} unknown; available: {sorted(SOURCES)}")
            if not 0.0 <= float(entry.get("holdout", 0.0)) < 1.0:
                raise ConfigError(f"{where}.holdout must be in [0, 1)")
            if entry.get("holdout_part", "keep") not in ("keep", "hold"):
                raise ConfigError(f"{where}.holdout_part must be 'keep' or 'hold'")
    if c.data.get("on_error", "raise") not in ON_ERROR:
        raise ConfigError(f"config.data.on_error must be one of {ON_ERROR}, got {c.data.on_error!r}")
    if c.optimizer.name not in ("adam", "adamw", "sgd"):
        raise ConfigError(f"config.optimizer.name must be adam, adamw or sgd, got {c.optimizer.name!r}")
    if c.optimizer.lr <= 0:
        raise ConfigError("config.optimizer.lr must be > 0")
    if c.data.per_task_batch < 1 or c.data.image_size < 16:
        raise ConfigError("config.data.per_task_batch must be >= 1 and data.image_size >= 16")
    if c.epochs < 1 and c.total_steps < 1:
        raise ConfigError("set config.epochs >= 1 or config.total_steps >= 1")
    if "/" not in c.eval.best_metric or c.eval.best_mode not in ("max", "min"):
        raise ConfigError("config.eval.best_metric must look like '<task>/<metric>' and best_mode be max|min")
    check_intervals(c)
    return tasks


def covidmt_config(backbone: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """COVIDMT with ``backbone`` on the three real datasets; ``arg`` may hold ``tasks=N``
    (the ablation), ``root=/path`` (dataset root) and ``image_size=S``."""
    opts = parse_arg(arg)
    unknown = set(opts) - {"tasks", "root", "image_size"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use tasks=N, root=PATH, image_size=S")
    c = base_config()
    c.model.kwargs.backbone = backbone
    paper_data(c, opts.get("root", "/data"))
    if "image_size" in opts:
        c.data.image_size = int(opts["image_size"])
    apply_task_count(c, opts.get("tasks", 6))
    return c


def baseline_config(model_name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """A single-task COVID-19 classifier (the paper's Table 2 baselines) on COVIDx."""
    opts = parse_arg(arg)
    unknown = set(opts) - {"root", "image_size"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use root=PATH, image_size=S")
    c = base_config()
    c.model.name = model_name
    c.model.kwargs = ml_collections.ConfigDict({})
    if model_name == "xception":
        c.init.source = "timm"  # legacy_xception weights come from timm
    paper_data(c, opts.get("root", "/data"))
    if "image_size" in opts:
        c.data.image_size = int(opts["image_size"])
    apply_task_count(c, 1)
    return c


def demo_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Synthetic-phantom training for 2 CPU cores (``configs/demo.py``; see its docstring)."""
    opts = parse_arg(arg)
    unknown = set(opts) - {"model", "size", "n", "shortcut", "steps", "backbone", "width"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}")
    size = int(opts.get("size", 128))
    n = int(opts.get("n", 480))
    shortcut = float(opts.get("shortcut", 0.9))
    c = base_config()
    # anchors sized to the phantoms' pneumonia boxes (7-15 x 10-19 px at 80 px, 10-25 x 18-31 px
    # at 128 px): with (size/8, size/4, size/2) 77 % / 99 % of them have an anchor at IoU >= 0.5
    # (3 / 7 positive anchors per box); the paper's (32, 64, 128), made for 512-px inputs, give
    # 0 % / 27 % (only the forced best-anchor match), so the box task could not learn
    # width: the backbone's stage widths as a fraction of torchvision's (64, 128, 256, 512)
    width = float(opts.get("width", 1.0))
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width}")
    narrow = {} if width == 1 else {"stage_widths": tuple(max(1, round(w * width)) for w in (64, 128, 256, 512))}
    c.model.kwargs = {"backbone": opts.get("backbone", "resnet18"), "transition_channels": (64,),
                      "fpn_channels": 64, "anchor_sizes": (size / 8, size / 4, size / 2),
                      "box_head_norm": "none", **narrow}
    c.data.image_size = size
    c.data.per_task_batch = 8
    c.data.eval_batch_size = 32
    common = dict(size=size, seed=0)
    c.data.train = {
        "covidx": dataset_entry("synthetic_covidx", n=n, split="train", shortcut_strength=shortcut, **common),
        "rsna": dataset_entry("synthetic_rsna", n=n, split="train", **common),
        "nih": dataset_entry("synthetic_nih", n=n, split="train", **common),
    }
    c.data.val = {
        "covidx": dataset_entry("synthetic_covidx", n=96, split="val", **common),
        "rsna": dataset_entry("synthetic_rsna", n=64, split="val", **common),
        "nih": dataset_entry("synthetic_nih", n=64, split="val", **common),
    }
    model = opts.get("model", "covidmt")
    if model == "baseline":
        c.model.name = opts.get("backbone", "resnet18")
        c.model.kwargs = dict(narrow)
        apply_task_count(c, 1)
    elif model != "covidmt":
        raise ValueError(f"model must be covidmt or baseline, got {model!r}")
    c.steps_per_epoch = n // c.data.per_task_batch
    # 6 epochs: the six-task model needs about that many to learn the COVID task at all
    # (measured: validation ROC-AUC 0.52 after 3 epochs, 0.81 after 6); same recipe for both
    c.epochs = 6
    c.total_steps = int(opts.get("steps", -1))
    c.optimizer.lr = 1e-3
    c.optimizer.milestones = (5,)
    c.log_every_steps = 10
    c.checkpoint.every_steps = 50
    return c
