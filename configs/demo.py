"""Synthetic-phantom training that runs on 2 CPU cores in minutes (no downloads).

Phantoms for all three task datasets, with a label-correlated shortcut cue OUTSIDE the lungs
in the COVID training data (``shortcut=`` its strength, the probability that the cue agrees
with the label). ``model=covidmt`` (six tasks, the default) or ``model=baseline`` (COVID only).

    python -m covidmt_jax.train --config configs/demo.py --workdir runs/demo
    python -m covidmt_jax.train --config configs/demo.py:model=baseline --workdir runs/demo_base
"""
from covidmt_jax.config_lib import base_config, dataset_entry, parse_arg, apply_task_count


def get_config(arg=None):
    opts = parse_arg(arg)
    unknown = set(opts) - {"model", "size", "n", "shortcut", "steps", "backbone"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}")
    size = int(opts.get("size", 128))
    n = int(opts.get("n", 480))
    shortcut = float(opts.get("shortcut", 0.9))
    c = base_config()
    c.model.kwargs = {"backbone": opts.get("backbone", "resnet18"), "transition_channels": (64,),
                      "fpn_channels": 64}
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
        c.model.name = "resnet18"
        c.model.kwargs = {}
        apply_task_count(c, 1)
    elif model != "covidmt":
        raise ValueError(f"model must be covidmt or baseline, got {model!r}")
    c.steps_per_epoch = n // c.data.per_task_batch
    c.epochs = 3
    c.total_steps = int(opts.get("steps", -1))
    c.optimizer.lr = 1e-3
    c.optimizer.milestones = (2,)
    c.log_every_steps = 10
    c.checkpoint.every_steps = 50
    return c
