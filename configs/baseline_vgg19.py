"""Single-task baseline: vgg19 on COVIDx (COVID-19 vs rest), the paper's recipe (Table 2).

    python -m covidmt_jax.train --config configs/baseline_vgg19.py:root=/data --workdir runs/baseline_vgg19
"""
from covidmt_jax.config_lib import baseline_config


def get_config(arg=None):
    return baseline_config("vgg19", arg)
