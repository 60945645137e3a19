"""Score a model on synthetic phantom pairs sent through the WhatsApp preset (no downloads).

    python -m covidmt_jax.score --config configs/score_demo.py:model=runs/demo/export/best \
        --workdir runs/score_demo

Arguments (``:key=value,...``): ``model`` (export dir, required), ``lungs`` (U-Net export dir;
default: the shipped segmenter), ``n`` pairs (200), ``size`` (phantom and model input size, 128),
``channel`` (whatsapp), ``quality`` (the preset's), ``name`` (model label in the report).
"""
from covidmt_jax.config_lib import parse_arg
from covidmt_jax.score import base_config, classifier_entry


def get_config(arg=None):
    opts = parse_arg(arg)
    unknown = set(opts) - {"model", "lungs", "n", "size", "channel", "quality", "name"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use model=DIR[,lungs=DIR,"
                         "n=N,size=S,channel=PRESET,quality=Q,name=NAME]")
    if not opts.get("model"):
        raise ValueError("configs/score_demo.py needs model=EXPORT_DIR (e.g. runs/demo/export/best)")
    size = int(opts.get("size", 128))
    c = base_config()
    c.classifiers = {opts.get("name", "model"): classifier_entry("export", opts["model"])}
    c.lungs = opts.get("lungs", "")
    c.pairs.source = "synthetic_pairs"
    c.pairs.kwargs = {"n": int(opts.get("n", 200)), "size": size, "seed": 0,
                      "channel": opts.get("channel", "whatsapp")}
    c.pairs.quality = int(opts.get("quality", 0))
    c.image_size = size
    c.batch_size = 16
    c.num_workers = 2
    c.n_boot = 1000
    c.gallery.flipped = 6
    c.gallery.random = 6
    c.log_every = 5
    return c
