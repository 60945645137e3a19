"""Score a model on synthetic phantom pairs sent through the WhatsApp preset (no downloads).

    python -m covidmt_jax.score --config configs/score_demo.py:model=runs/demo/seed_0/train_covidmt/export/best \
        --workdir runs/score_demo

Arguments (``:key=value,...``): ``model`` (export dir, required), ``lungs`` (U-Net export dir;
default: the shipped segmenter), ``n`` pairs (200), ``size`` (phantom and model input size, 80 as
the demo's models), ``channel`` (whatsapp), ``quality`` (the preset's), ``name`` (model label in
the report), ``seed`` (phantom seed of the pairs; the demo's seed k scores the pairs of seed
1 + k). As in the demo, the out-of-lung corner marker is present at random, independent of the
label.
"""
from covidmt_jax.config_lib import ConfigError, parse_arg
from covidmt_jax.scoring.config import synthetic_config

KEYS = ("model", "lungs", "n", "size", "channel", "quality", "name", "seed")


def get_config(arg=None):
    opts = parse_arg(arg)
    unknown = set(opts) - set(KEYS)
    if unknown:
        raise ConfigError(f"configs/score_demo.py: unknown argument(s) {sorted(unknown)}; use "
                          "model=DIR[,lungs=DIR,n=N,size=S,channel=PRESET,quality=Q,name=NAME,seed=K]")
    if not opts.get("model"):
        raise ConfigError("configs/score_demo.py needs model=EXPORT_DIR "
                          "(e.g. runs/demo/seed_0/train_covidmt/export/best)")
    return synthetic_config({opts.get("name", "model"): opts["model"]}, size=int(opts.get("size", 80)),
                            n=int(opts.get("n", 200)), lungs=opts.get("lungs", ""),
                            channel=opts.get("channel", "whatsapp"), quality=int(opts.get("quality", 0)),
                            seed=int(opts.get("seed", 1)), split="test", shortcut_strength=0.5)
