"""Single-task baseline: resnext50_32x4d on COVIDx (COVID-19 vs rest), the paper's recipe (Table 2).

    python -m covidmt_jax.train --config configs/baseline_resnext50.py:root=/data --workdir runs/baseline_resnext50
"""
from covidmt_jax.config_lib import baseline_config


def get_config(arg=None):
    return baseline_config("resnext50_32x4d", arg)
