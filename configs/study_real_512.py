"""The real-film study at the paper's scale, for an accelerator (``covidmt_jax.study``).

Same arms, splits and scoring as ``configs/study_real.py``, with a ResNet-50 backbone at
512 px (the paper's resolution; ``backbone=resnext50_32x4d`` for COVIDMT-ResNeXt-50), the
paper's transition layer and FPN widths (256), 6,000 steps of 16 films per task dataset and
five seeds. No ImageNet initialisation (no weights ship with the project; set
``--config`` keys of the training config through a custom config to add them).

    python -m covidmt_jax.study --config configs/study_real_512.py:root=../shared/data --workdir runs/study_512

Arguments: ``root``, ``backbone``, ``size``, ``steps``, ``seeds`` (``0-4`` or ``0;1``).
"""
from covidmt_jax.config_lib import ConfigError, parse_arg
from covidmt_jax.study import config_from_arg


def get_config(arg=None):
    opts = parse_arg(arg)
    backbone = opts.pop("backbone", "resnet50")
    if backbone not in ("resnet50", "resnext50_32x4d", "resnet18", "resnet34", "resnet101"):
        raise ConfigError(f"configs/study_real_512.py: backbone {backbone!r} is not a ResNet/ResNeXt")
    c = config_from_arg(",".join(f"{k}={v}" for k, v in opts.items() if k != "seeds"))
    c.backbone = backbone
    c.transition_channels = (256,)
    c.fpn_channels = 256
    if "size" not in opts:
        c.image_size = 512
    if "steps" not in opts:
        c.steps = 6000
        c.eval_every_steps = 1000
    c.per_task_batch = 16
    c.eval_batch_size = 64
    c.num_workers = 8
    c.score.batch_size = 64
    c.seeds = tuple(range(5))
    if "seeds" in opts:
        c.seeds = config_from_arg(f"seeds={opts['seeds']}").seeds
    return c
