"""Lung segmentation U-Net on image/mask sets (Dice + BCE), 15 % held out for validation.

Default data: the 704 Montgomery + Shenzhen pairs of ../shared/data/lungs_mc_sz_512
(``images/`` + ``masks/``); any layout `LungMaskSource` reads works (``root=PATH``).

    python -m covidmt_jax.train --config configs/unet_lungs.py:root=../shared/data/lungs_mc_sz_512 \
        --workdir runs/unet_lungs
"""
from covidmt_jax.config_lib import base_config, dataset_entry, parse_arg


def get_config(arg=None):
    opts = parse_arg(arg)
    unknown = set(opts) - {"root", "image_size", "width"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use root=PATH, image_size=S, width=W")
    root = opts.get("root", "../shared/data/lungs_mc_sz_512")
    c = base_config()
    c.tasks = ("lungs",)
    c.task_options = {}
    c.model.name = "unet"
    c.model.kwargs = {"depth": 4, "base_width": int(opts.get("width", 16)), "batch_norm": True}
    c.data.image_size = int(opts.get("image_size", 256))
    c.data.per_task_batch = 8
    c.data.eval_batch_size = 16
    c.data.train = {"lungs": dataset_entry("lungs", root=root, holdout=0.15, holdout_part="keep")}
    c.data.val = {"lungs": dataset_entry("lungs", root=root, holdout=0.15, holdout_part="hold")}
    c.epochs = 40
    c.optimizer.lr = 1e-3
    c.optimizer.milestones = (30, 36)
    c.eval.best_metric = "lungs/dice"
    c.eval.every_epochs = 5
    c.checkpoint.every_steps = 200
    return c
