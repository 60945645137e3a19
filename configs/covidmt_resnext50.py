"""COVIDMT with a resnext50_32x4d base network, six tasks on COVIDx + RSNA + NIH (the paper's recipe).

    python -m covidmt_jax.train --config configs/covidmt_resnext50.py:root=/data --workdir runs/covidmt_resnext50
    # ablation (first N tasks: COVID, box, Infiltration, Effusion, Atelectasis, Nodule):
    python -m covidmt_jax.train --config configs/covidmt_resnext50.py:tasks=3,root=/data --workdir runs/mt3
    # ImageNet initialisation from a file you hold:
    ... --config.init.torch_weights=/weights/resnext50_32x4d.pth --config.init.source=torchvision
"""
from covidmt_jax.config_lib import covidmt_config


def get_config(arg=None):
    return covidmt_config("resnext50_32x4d", arg)
