"""Synthetic-phantom training that runs on 2 CPU cores in minutes (no downloads).

Phantoms for all three task datasets, with a label-correlated shortcut cue OUTSIDE the lungs
in the COVID training data (``shortcut=`` its strength, the probability that the cue agrees
with the label). ``model=covidmt`` (six tasks, the default) or ``model=baseline`` (COVID only).

    python -m covidmt_jax.train --config configs/demo.py --workdir runs/demo
    python -m covidmt_jax.train --config configs/demo.py:model=baseline --workdir runs/demo_base
"""
from covidmt_jax.config_lib import demo_config


def get_config(arg=None):
    return demo_config(arg)
