"""Two-convention lung U-Net (visible fields + anatomical heads) on all real lung sets.

    python -m covidmt_jax.lung_training --config configs/unet_lungs_conventions.py --workdir runs/lungs2

Arguments (``--config FILE:k=v,...``): ``root`` (data root holding ``lungs_mc_sz_512`` and
``lungs_diseased/``), ``image_size``, ``width``, ``resize`` (squash | letterbox | both: non-square films in both forms), ``steps``,
``lr``, ``batch``, ``init`` (an exported U-Net to start from; one of a narrower width, e.g. the
width-8 default with ``width=16``, is widened to compute the same function; ``none`` = random init),
``eval_every``, ``checkpoint_every``, ``seed``, ``sets`` (a ``+``-separated subset of the four
sets, e.g. ``sets=v7_covid_anatomical`` trains the anatomical head alone; the chosen sets keep
their draw weights, renormalised; a convention with no set leaves its head untrained), and
``aug_<field>`` for any probability of
:class:`covidmt_jax.data.lung_augment.LungAugment` (e.g. ``aug_p_opacity=0.8``).
Rerunning with the same ``--workdir`` resumes.
Defaults: fine-tune the shipped fields U-Net (width 8, 256 px) for 1,500 steps of batch 8;
non-square films (the anatomical set) are trained squashed and letterboxed, and val Dice is
measured both ways to choose the inference policy.
"""
from pathlib import Path

import ml_collections

from covidmt_jax.config_lib import parse_arg

SHIPPED_FIELDS = str(Path(__file__).resolve().parents[1] / "covidmt_jax" / "assets" / "lung_unet")
KNOWN = {"root", "image_size", "width", "resize", "steps", "lr", "batch", "init", "eval_every", "checkpoint_every", "seed",
         "sets"}
# draw probability of each set per sample: the 235 anatomical training films are a third of
# the samples, so the anatomical head trains as often as the fields head's main sets.
WEIGHTS = {"lungs_mc_sz_512": 0.25, "v7_covid_anatomical": 0.3, "quex_covid_fields": 0.1,
           "quex_pneumonia_normal_fields": 0.35}
ALL_SETS = tuple(WEIGHTS)


def get_config(arg=None):
    opts = parse_arg(arg)
    unknown = {k for k in opts if not k.startswith("aug_")} - KNOWN
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; known: {sorted(KNOWN)}")
    c = ml_collections.ConfigDict()
    c.data_root = opts.get("root", "../shared/data")
    sets = tuple(filter(None, opts.get("sets", "+".join(ALL_SETS)).split("+")))
    bad = sorted(set(sets) - set(ALL_SETS))
    if bad or not sets or len(set(sets)) != len(sets):
        raise ValueError(f"config argument sets={opts.get('sets')!r}: unknown, repeated or no set name(s) {bad}; "
                         f"known: {list(ALL_SETS)}, joined with '+'")
    c.sets = tuple(s for s in ALL_SETS if s in sets)
    c.weights = {s: WEIGHTS[s] for s in c.sets}
    c.image_size = int(opts.get("image_size", 256))
    c.width = int(opts.get("width", 8))
    c.resize = opts.get("resize", "both")
    c.steps = int(opts.get("steps", 1500))
    c.lr = float(opts.get("lr", 1e-3))
    c.batch_size = int(opts.get("batch", 8))
    init = opts.get("init", SHIPPED_FIELDS)
    c.init = "" if init == "none" else init
    c.seed = int(opts.get("seed", 0))
    c.eval_every = int(opts.get("eval_every", 250))
    c.checkpoint_every = int(opts.get("checkpoint_every", 50))  # and after every evaluation
    c.log_every = 10
    # LungAugment probabilities that differ from its defaults (checked when training starts)
    c.augment = {k[len("aug_"):]: float(v) for k, v in opts.items() if k.startswith("aug_")}
    return c
