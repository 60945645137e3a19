"""Score classifiers on the real WaCXR pairs (the paper's WhatsApp-transmitted COVID-Net test set).

    python -m covidmt_jax.score \
        --config configs/score_wacxr.py:root=/data/WaCXR,model=runs/covidmt/export/best \
        --workdir runs/score_wacxr

Arguments: ``root`` (folder holding ``covid_binary_test`` and ``covid_binary_test_whatsapp``,
required); ``model`` (one or more export dirs separated by ``+``, required), ``names`` (their
labels in the report, ``+``-separated; default: ``model0``, ``model1`` ... or the folder names),
``lungs`` (U-Net export dir; default the shipped segmenter), ``size`` (512), ``batch`` (16),
``format`` (csv | parquet), ``patients`` (files naming each film's patient, ``+``-separated:
the COVIDx label files the test films come from, e.g. ``train_COVIDx8B.txt+test_COVIDx8B.txt``,
or ``filename,patient`` CSVs; covidmt_jax.scoring.patients). More models (e.g. imported torchvision weights) can be added with
``--config.classifiers`` overrides or by copying this file.
"""
from pathlib import Path

from covidmt_jax.config_lib import parse_arg
from covidmt_jax.scoring.config import base_config, classifier_entry


def get_config(arg=None):
    opts = parse_arg(arg)
    unknown = set(opts) - {"root", "model", "names", "lungs", "size", "batch", "format", "patients"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use root=PATH,model=DIR[+DIR]"
                         "[,names=A+B,lungs=DIR,size=S,batch=B,format=csv|parquet,patients=FILE+FILE]")
    for key in ("root", "model"):
        if not opts.get(key):
            raise ValueError(f"configs/score_wacxr.py needs {key}= (root=WACXR_DIR,model=EXPORT_DIR)")
    dirs = opts["model"].split("+")
    names = opts["names"].split("+") if opts.get("names") else [_name(d, i) for i, d in enumerate(dirs)]
    if len(names) != len(dirs) or len(set(names)) != len(names):
        raise ValueError(f"names {names} must be unique and match the {len(dirs)} model dir(s)")
    c = base_config()
    c.classifiers = {n: classifier_entry("export", d) for n, d in zip(names, dirs)}
    c.lungs = opts.get("lungs", "")
    c.pairs.source = "wacxr"
    c.pairs.kwargs = {"root": opts["root"], "on_error": "skip"}
    c.image_size = int(opts.get("size", 512))
    c.batch_size = int(opts.get("batch", 16))
    c.output.format = opts.get("format", "csv")
    c.pairs.patients = opts.get("patients", "").replace("+", ",")
    return c


def _name(directory: str, i: int) -> str:
    p = Path(directory)
    # runs/<run>/export/best -> <run>
    if p.name in ("best", "final") and p.parent.name == "export":
        return p.parent.parent.name or f"model{i}"
    return p.name or f"model{i}"
