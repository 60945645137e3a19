"""Single-task baseline: covidnet on COVIDx (COVID-19 vs rest), the paper's recipe (Table 2).

    python -m covidmt_jax.train --config configs/baseline_covidnet.py:root=/data --workdir runs/baseline_covidnet
"""
from covidmt_jax.config_lib import baseline_config


def get_config(arg=None):
    return baseline_config("covidnet", arg)
