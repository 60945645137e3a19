"""Score a model on synthetic phantom pairs sent through the WhatsApp preset (no downloads).

    python -m covidmt_jax.score --config configs/score_demo.py:model=runs/demo/export/best \
        --workdir runs/score_demo

Arguments (``:key=value,...``): ``model`` (export dir, required), ``lungs`` (U-Net export dir;
default: the shipped segmenter), ``n`` pairs (200), ``size`` (phantom and model input size, 128),
``channel`` (whatsapp), ``quality`` (the preset's), ``name`` (model label in the report).
"""
from covidmt_jax.config_lib import parse_arg
from covidmt_jax.scoring.config import synthetic_config


def get_config(arg=None):
    opts = parse_arg(arg)
    unknown = set(opts) - {"model", "lungs", "n", "size", "channel", "quality", "name"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use model=DIR[,lungs=DIR,"
                         "n=N,size=S,channel=PRESET,quality=Q,name=NAME]")
    if not opts.get("model"):
        raise ValueError("configs/score_demo.py needs model=EXPORT_DIR (e.g. runs/demo/export/best)")
    return synthetic_config({opts.get("name", "model"): opts["model"]}, size=int(opts.get("size", 128)),
                            n=int(opts.get("n", 200)), lungs=opts.get("lungs", ""),
                            channel=opts.get("channel", "whatsapp"), quality=int(opts.get("quality", 0)))
