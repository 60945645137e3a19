"""The real-film study on 2 CPU cores (``covidmt_jax.study``; design in ``docs/study_real.md``).

Four arms (baseline, multitask, baseline_channel, multitask_channel), the same ResNet-18
COVIDMT network at 128 px, 600 steps of 8 films per task dataset, seeds 0-2; scored on the
held-out COVID/non-COVID test films through ``whatsapp`` and JPEG qualities 30/50/70/90.
About 26 min per seed (all four arms, training and scoring) on an idle 2-core CPU; ``size=256``
costs about four times as much per step (docs/study_real.md, "Cost").

    python -m covidmt_jax.study --config configs/study_real.py:root=../shared/data --workdir runs/study

Arguments after ``:`` (comma-separated): ``root`` (data root holding ``lungs_diseased/`` and
``lungs_mc_sz_512/``), ``size`` (px), ``steps`` (per arm; evaluation every third),
``seeds`` (``0-2`` or ``0;1``). Any key can be overridden, e.g. ``--config.arms='("baseline",)'``
``--config.max_per_class=50 --config.max_test_per_class=20`` for a reduced run.
"""
from covidmt_jax.study import config_from_arg


def get_config(arg=None):
    return config_from_arg(arg)
