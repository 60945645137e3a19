"""Single-task baseline: xception on COVIDx (COVID-19 vs rest), the paper's recipe (Table 2).

    python -m covidmt_jax.train --config configs/baseline_xception.py:root=/data --workdir runs/baseline_xception
"""
from covidmt_jax.config_lib import baseline_config


def get_config(arg=None):
    return baseline_config("xception", arg)
