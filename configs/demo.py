"""Synthetic-phantom training that runs on 2 CPU cores in a minute (no downloads): one arm of
``python -m covidmt_jax.demo``, with the demo's recipe (``covidmt_jax.demo.demo_train_config``).

Phantoms for all three task datasets, with a label-correlated shortcut cue OUTSIDE the lungs
in the COVID training data (``shortcut=`` its strength, the probability that the cue agrees
with the label). ``model=covidmt`` (six tasks, the default) or ``model=baseline`` (COVID only);
``size`` (80 px), ``n`` phantoms per dataset (480), ``steps`` (-1: the demo's epochs), ``seed`` (0),
``width`` (ResNet-18 stage widths as a fraction of torchvision's; 0.5). The COVIDMT arm's box
task has GroupNorm in its subnets and RSNA-like phantoms with 4x denser consolidations
(``covidmt_jax.demo.BOX_HEAD_NORM`` / ``BOX_FINDING_STRENGTH``; override with
``--config.model.kwargs.box_head_norm=none`` and
``--config.data.train.rsna.kwargs.finding_strength=1``, the same under ``data.val``).

    python -m covidmt_jax.train --config configs/demo.py --workdir runs/demo_mt
    python -m covidmt_jax.train --config configs/demo.py:model=baseline,seed=1 --workdir runs/demo_base
"""
from covidmt_jax.config_lib import ConfigError, parse_arg
from covidmt_jax.demo import demo_train_config

KEYS = {"model": "covidmt", "size": 80, "n": 480, "shortcut": 0.9, "steps": -1, "seed": 0, "width": 0.5}


def get_config(arg=None):
    opts = parse_arg(arg)
    unknown = sorted(set(opts) - set(KEYS))
    if unknown:
        raise ConfigError(f"configs/demo.py: unknown argument(s) {unknown}; known: {sorted(KEYS)}")
    o = {k: type(v)(opts.get(k, v)) for k, v in KEYS.items()}
    return demo_train_config(o.pop("model"), **o)
