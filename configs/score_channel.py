"""Score classifiers on an image folder sent through a messaging-channel preset on the fly,
optionally sweeping the JPEG quality (one job per quality; the report draws PI and OLS against
quality).

    python -m covidmt_jax.score \
        --config configs/score_channel.py:root=../shared/data/lungs_mc_sz_512/images,model=DIR \
        --workdir runs/score_channel
    python -m covidmt_jax.score \
        --config "configs/score_channel.py:root=IMAGES,model=DIR,qualities=30+50+70+90" \
        --workdir runs/score_sweep

Arguments: ``root`` (image folder, required), ``model`` (export dirs, ``+``-separated, required),
``names``, ``channel`` (whatsapp | whatsapp_hd | telegram | jpeg75 ..., default whatsapp),
``quality`` (one quality override), ``qualities`` (``+``-separated sweep, e.g. ``30+50+70+90``),
``labels`` (``1`` = labels from sub-folders, e.g. ``0_NON_COVID`` / ``1_COVID-19``), ``label``
(the positive class folder), ``lungs``, ``size`` (512), ``batch`` (16), ``limit``, ``patients``
(files naming each film's patient, ``+``-separated: COVIDx label files or ``filename,patient``
CSVs; covidmt_jax.scoring.patients).

A ``model`` item ``xrv:NAME@FILE`` is a torchxrayvision classifier (``NAME``: ``densenet121``,
``resnet50`` or a weight set such as ``densenet121-res224-rsna``; ``FILE``: its state dict),
scored on its output ``target`` (e.g. ``target=Pneumonia``) at its operating threshold when
known (covidmt_jax.xrv); export dirs and ``xrv:`` items mix freely.
"""
from covidmt_jax import xrv
from covidmt_jax.config_lib import parse_arg
from covidmt_jax.scoring.config import base_config, classifier_entry


def get_config(arg=None):
    opts = parse_arg(arg)
    known = {"root", "model", "names", "channel", "quality", "qualities", "labels", "label", "lungs",
             "size", "batch", "limit", "target", "patients"}
    unknown = set(opts) - known
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; known: {sorted(known)}")
    for key in ("root", "model"):
        if not opts.get(key):
            raise ValueError(f"configs/score_channel.py needs {key}= (root=IMAGE_DIR,model=EXPORT_DIR)")
    dirs = opts["model"].split("+")
    names = opts["names"].split("+") if opts.get("names") else (
        ["model"] if len(dirs) == 1 else [f"model{i}" for i in range(len(dirs))])
    if len(names) != len(dirs):
        raise ValueError(f"names {names} must match the {len(dirs)} model dir(s)")
    c = base_config()
    if any(d.startswith("xrv:") for d in dirs) and not opts.get("target"):
        raise ValueError("xrv: models need target= (the scored output, e.g. target=Pneumonia)")
    c.classifiers = {n: classifier_entry(**xrv.entry_from_spec(d, opts["target"])) if d.startswith("xrv:")
                     else classifier_entry("export", d) for n, d in zip(names, dirs)}
    c.lungs = opts.get("lungs", "")
    c.pairs.source = "folder"
    kwargs = {"root": opts["root"], "on_error": "skip"}
    if opts.get("labels", "0") == "1":
        kwargs["labels_from_subfolders"] = True
    c.pairs.kwargs = kwargs
    c.pairs.label = opts.get("label", "")
    c.pairs.channel = opts.get("channel", "whatsapp")
    c.pairs.quality = int(opts.get("quality", 0))
    c.pairs.qualities = tuple(int(q) for q in opts["qualities"].split("+")) if opts.get("qualities") else ()
    c.pairs.limit = int(opts.get("limit", -1))
    c.pairs.patients = opts.get("patients", "").replace("+", ",")
    c.image_size = int(opts.get("size", 512))
    c.batch_size = int(opts.get("batch", 16))
    return c
