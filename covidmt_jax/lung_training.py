r"""Train the two-convention lung U-Net: ``python -m covidmt_jax.lung_training --config configs/unet_lungs_conventions.py --workdir DIR``;
evaluate segmenters: ``python -m covidmt_jax.lung_training evaluate --segmenters fields,anatomical --out val.json``.

One U-Net with one output channel (head) per mask convention: channel 0 = visible lung
fields, channel 1 = anatomical lungs (:data:`covidmt_jax.data.sources.lungs.CONVENTIONS`).
Each sample supervises only its own convention's channel (Dice + BCE on that channel; the
other channel gets no gradient from it), as eq. 5 masks the tasks a sample has no label
for. The generic trainer (``covidmt_jax.train``) has one target per segmentation task, so
this loop is separate; it reuses the U-Net, the export format and the metrics.

Steps:
1. The real sets' train and val splits (:mod:`covidmt_jax.data.splits`) are decoded once
   into memory at the network's size (uint8), each film resized by the config's policy:
   ``squash`` (stretch to square, as Montgomery/Shenzhen/QU-Ex were) or ``letterbox``
   (long side to the size, black padding).
2. Batches draw sets with the config's weights (the anatomical set is small), then films
   uniformly; :class:`covidmt_jax.data.lung_augment.LungAugment` per sample, in a
   background thread.
3. Init from an exported U-Net (default: the first fields model, ``assets/lung_unet``): all
   layers copied, a single head copied into both channels; an export of a narrower width is
   widened to the same function (Net2WiderNet, :func:`covidmt_jax.models.unet.widen_tensor`).
4. Adam with a cosine decay; every ``eval_every`` steps the val Dice per set (at the
   network's size, masks resized with nearest neighbour) goes to ``metrics.jsonl``, and the
   model with the best mean over sets is exported to ``WORKDIR/export/best``
   (``model.json`` + ``params.safetensors``, metadata: ``outputs``, ``image_size``,
   ``resize``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from covidmt_jax.data.lung_augment import LungAugment
from covidmt_jax.data.sources.lungs import CONVENTIONS, LungSetSource
from covidmt_jax.lungs import RESIZE_POLICIES, resize_to_input
from covidmt_jax.normalisation import normalise
from covidmt_jax.report import jsonable

log = logging.getLogger("covidmt_jax.lung_training")


# ----------------------------------------------------------------------------- data

def load_split(folder: str | Path, split: str, size: int, policy: str) -> dict[str, Any]:
    """Decode one set's split: ``{"images": uint8 [N, S, S], "masks": uint8 [N, S, S] (0/1),
    "convention": int [N], "ids": [N], "meta": [N dicts]}``."""
    from covidmt_jax.data.images import load_grey, load_mask, to_uint8
    src = LungSetSource(folder, split=split)
    images, masks, conv, ids, metas = [], [], [], [], []
    for i in range(len(src)):
        rec = src[i]
        g = load_grey(rec["image"], name=rec["id"])
        m = load_mask(rec["mask"], name=rec["id"]).astype(np.uint8)
        images.append(resize_to_input(to_uint8(g), size, policy))
        masks.append(resize_to_input(m, size, policy, nearest=True))
        conv.append(CONVENTIONS.index(rec["meta"]["convention"]))
        ids.append(rec["id"])
        metas.append(dict(rec["meta"], image=rec["image"], mask=rec["mask"]))
    return {"images": np.stack(images), "masks": np.stack(masks), "convention": np.asarray(conv, np.int32),
            "ids": ids, "meta": metas}


def merge_policies(loaded: list[dict]) -> dict:
    """One training set from the same split loaded under several resize policies: the
    first in full, from the others only the films whose input differs (non-square films)."""
    out = dict(loaded[0])
    for d in loaded[1:]:
        diff = np.flatnonzero((d["images"] != loaded[0]["images"]).reshape(len(d["ids"]), -1).any(1))
        out = {"images": np.concatenate([out["images"], d["images"][diff]]),
               "masks": np.concatenate([out["masks"], d["masks"][diff]]),
               "convention": np.concatenate([out["convention"], d["convention"][diff]]),
               "ids": out["ids"] + [d["ids"][i] for i in diff], "meta": out["meta"] + [d["meta"][i] for i in diff]}
    return out


class BatchStream:
    """Augmented training batches ``{"image": float32 [B, S, S, 1] normalised, "mask":
    float32 [B, S, S], "convention": int32 [B]}`` from weighted sets, built by a thread.

    Batch ``i`` (1-based step) depends only on ``(seed, i)``: its generator is
    ``numpy.random.default_rng([seed, i])``, so a resumed run starting at ``start`` draws
    exactly the batches the uninterrupted run would have drawn."""

    def __init__(self, sets: Mapping[str, dict], weights: Mapping[str, float], batch_size: int,
                 augment: LungAugment, seed: int, prefetch: int = 4, start: int = 1):
        self.sets, self.names = sets, sorted(sets)
        w = np.array([float(weights.get(n, 1.0)) for n in self.names])
        self.p = w / w.sum()
        self.batch_size, self.augment, self.seed = batch_size, augment, int(seed)
        self.next_step = int(start)
        self.q: queue.Queue = queue.Queue(prefetch)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of training step ``step``."""
        rng = np.random.default_rng([self.seed, int(step)])
        imgs, masks, convs = [], [], []
        for _ in range(self.batch_size):
            d = self.sets[self.names[rng.choice(len(self.names), p=self.p)]]
            j = int(rng.integers(len(d["ids"])))
            x, m = self.augment(d["images"][j].astype(np.float32) / 255.0, d["masks"][j], rng)
            imgs.append(normalise(x)), masks.append(m.astype(np.float32)), convs.append(d["convention"][j])
        return {"image": np.stack(imgs)[..., None], "mask": np.stack(masks),
                "convention": np.asarray(convs, np.int32)}

    def _run(self):
        step = self.next_step
        while not self._stop.is_set():
            item = self.batch(step)
            while not self._stop.is_set():
                try:
                    self.q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            step += 1

    def __next__(self) -> dict[str, np.ndarray]:
        return self.q.get()

    def close(self):
        self._stop.set()


# ----------------------------------------------------------------------------- model

def init_from_export(model: nnx.Module, directory: str | Path, seed: int = 0) -> list[str]:
    """Copy an exported U-Net's weights into ``model``: every tensor whose shape matches; a
    one-output export's head ``[1, 1, C, 1]`` kernel and ``[1]`` bias go to every output
    channel; an export of a narrower base width (``model``'s divided by a whole number) is
    widened so that ``model`` starts from the same function
    (:func:`covidmt_jax.models.unet.widen_tensor`, symmetry-breaking noise seeded by
    ``seed``). Returns the copied names; raises naming a tensor that cannot fit."""
    from covidmt_jax.export import load_model
    from covidmt_jax.models.unet import widen_tensor
    src = load_model(directory)
    flat_src = dict(nnx.to_flat_state(nnx.state(src, nnx.Any(nnx.Param, nnx.BatchStat))))
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    flat = dict(nnx.to_flat_state(state))
    rng = np.random.default_rng(seed)
    copied = []
    for path, var in flat.items():
        if path not in flat_src:
            raise ValueError(f"{directory}: no tensor {'/'.join(map(str, path))} (a different architecture)")
        v = np.asarray(flat_src[path].get_value() if hasattr(flat_src[path], "get_value") else flat_src[path].value)
        want = tuple(var.shape)
        if v.shape != want:
            try:
                v = widen_tensor(path, v, want, rng)
            except ValueError as err:
                raise ValueError(f"{directory}: {err} (model {want})") from None
        var.set_value(jnp.asarray(v, var.dtype)) if hasattr(var, "set_value") else setattr(var, "value", jnp.asarray(v))
        copied.append("/".join(map(str, path)))
    nnx.update(model, nnx.from_flat_state(flat))
    return copied


def export_convention(directory: str | Path, out: str | Path, convention: str, **metadata) -> Path:
    """Export one convention's head of a multi-head U-Net export as a single-output U-Net
    (what :func:`covidmt_jax.lungs.load_lung_segmenter` loads): the head's kernel
    ``[1, 1, C, K]`` and bias ``[K]`` are sliced to that convention's channel.
    ``metadata`` entries override the source's (e.g. ``resize="letterbox"``)."""
    from covidmt_jax import models
    from covidmt_jax.export import load_model, read_spec, save_model
    spec = read_spec(directory)
    outputs = spec.get("metadata", {}).get("outputs")
    if not outputs or convention not in outputs:
        raise ValueError(f"{directory}/model.json: metadata.outputs {outputs} has no {convention!r}")
    k = outputs.index(convention)
    src = load_model(directory)
    kwargs = dict(spec["model_kwargs"], num_classes=1)
    dst = models.create("unet", rngs=nnx.Rngs(0), **kwargs)
    flat = dict(nnx.to_flat_state(nnx.state(src, nnx.Any(nnx.Param, nnx.BatchStat))))
    for path, var in flat.items():
        if path[0] == "head":
            v = var.get_value()
            flat[path] = var.replace(v[..., k:k + 1])
    nnx.update(dst, nnx.from_flat_state(flat))
    meta = {key: v for key, v in spec.get("metadata", {}).items() if key != "outputs"}
    meta.update(convention=convention, head_of=list(outputs), **metadata)
    return save_model(out, dst, name="unet", model_kwargs=kwargs, metadata=meta)


def soup(members: list[str | Path], out: str | Path, *, convention: str | None = None) -> Path:
    """One segmenter from several trainings of this module started from the same export:
    the element-wise mean of their weights (:func:`covidmt_jax.export.average_models`).

    ``convention``: take that head of each member (a multi-head ``export/best`` is sliced by
    :func:`export_convention`; a single-head member must already be that convention's); the
    result is then a single-output U-Net that :func:`covidmt_jax.lungs.load_lung_segmenter`
    loads. Members of one convention share their body, so souping each convention of the same
    members gives segmenters that share theirs too.
    """
    import tempfile
    from covidmt_jax.export import average_models, read_spec
    if convention is None:
        return average_models(members, out)
    with tempfile.TemporaryDirectory() as tmp:
        heads = []
        for i, m in enumerate(members):
            meta = read_spec(m).get("metadata", {})
            if meta.get("outputs"):
                heads.append(export_convention(m, Path(tmp) / str(i), convention))
            elif meta.get("convention") == convention:
                heads.append(Path(m))
            else:
                raise ValueError(f"{m}/model.json: neither a multi-head export (metadata.outputs) nor a "
                                 f"{convention!r} segmenter (metadata.convention={meta.get('convention')!r})")
        return average_models(heads, out, {"convention": convention}, names=[str(m) for m in members])


def masked_convention_loss(logits: jax.Array, mask: jax.Array, convention: jax.Array,
                           bce_weight: float = 1.0) -> jax.Array:
    """Dice + BCE of each sample on its own convention's channel only.

    ``logits [B, H, W, K]``, ``mask [B, H, W]`` in {0, 1}, ``convention int [B]`` in
    ``[0, K)``. Returns the batch-mean scalar loss.
    """
    from covidmt_jax.metrics import soft_dice_loss
    own = jnp.take_along_axis(logits, convention[:, None, None, None], axis=-1)[..., 0]
    bce = optax.sigmoid_binary_cross_entropy(own, mask).mean(axis=(1, 2))
    return jnp.mean(soft_dice_loss(own, mask) + bce_weight * bce)


@nnx.jit
def _predict_probs(model: nnx.Module, x: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(model(x))


def predict_sets(model: nnx.Module, data: dict, batch_size: int = 16) -> np.ndarray:
    """Probabilities ``[N, S, S, K]`` of a loaded split (model in eval mode)."""
    model.eval()
    fn = _predict_probs
    out = []
    x_all = data["images"]
    for s in range(0, len(x_all), batch_size):
        x = normalise(x_all[s:s + batch_size].astype(np.float32) / 255.0)[..., None]
        n = len(x)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], np.float32)])
        out.append(np.asarray(fn(model, jnp.asarray(x)))[:n])
    return np.concatenate(out)


def val_dice(model: nnx.Module, val_sets: Mapping[str, dict]) -> dict[str, float]:
    """Mean hard Dice (0.5) of each val set on its own convention's channel, at the input size."""
    from covidmt_jax.metrics import dice
    out = {}
    for name, d in val_sets.items():
        probs = predict_sets(model, d)
        own = np.take_along_axis(probs, d["convention"][:, None, None, None], axis=-1)[..., 0]
        out[name] = float(np.mean(dice(own, d["masks"].astype(bool))))
    return out


# ----------------------------------------------------------------------------- main loop

def load_sets(cfg) -> tuple[dict[str, dict], dict[str, dict]]:
    """The config's train and val splits decoded at ``cfg.image_size`` (:func:`load_split`):
    ``({set: train data}, {set: val data})``; with ``resize="both"`` the train sets hold the
    non-square films in both forms and ``{set}@letterbox`` val entries are added (scored,
    not in the model-selection mean)."""
    from covidmt_jax.data.splits import set_folders
    folders = set_folders(cfg.data_root)
    missing = [s for s in cfg.sets if s not in folders]
    if missing:
        raise FileNotFoundError(f"{cfg.data_root}: lung set(s) {missing} not found")
    policies = RESIZE_POLICIES if cfg.resize == "both" else (cfg.resize,)
    train_sets, val_sets = {}, {}
    for s in cfg.sets:
        tr = [load_split(folders[s], "train", cfg.image_size, p) for p in policies]
        train_sets[s] = merge_policies(tr)
        for p in policies:
            va = load_split(folders[s], "val", cfg.image_size, p)
            if p == policies[0]:
                val_sets[s] = va
            elif (va["images"] != val_sets[s]["images"]).any():
                val_sets[f"{s}@{p}"] = va
    return train_sets, val_sets


# config fields a resumed run must share with the checkpointed one
RUN_FIELDS = ("sets", "weights", "image_size", "width", "resize", "steps", "lr", "batch_size", "init", "seed")


def augment_from_config(cfg) -> LungAugment:
    """The run's :class:`LungAugment`: its defaults with ``cfg.augment``'s overrides
    (``{field: probability}``); an unknown field is refused, naming the known ones."""
    over = dict(cfg.get("augment") or {})
    known = [f.name for f in dataclasses.fields(LungAugment)]
    unknown = sorted(set(over) - set(known))
    if unknown:
        raise ValueError(f"config.augment: unknown key(s) {unknown}; known: {known}")
    return LungAugment(**{k: float(v) for k, v in over.items()})


def _run_config(cfg) -> dict[str, Any]:
    def plain(v):
        return {k: plain(x) for k, x in v.items()} if hasattr(v, "items") else v
    out = {k: plain(cfg[k]) for k in RUN_FIELDS}
    out["augment"] = dataclasses.asdict(augment_from_config(cfg))
    return json.loads(json.dumps(jsonable(out)))


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop ``metrics.jsonl`` records of steps after ``last_step`` (written by a run that died
    before its next checkpoint; the resumed run writes them again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def train(cfg, workdir: str | Path, sets: tuple[dict, dict] | None = None) -> dict[str, Any]:
    """Run one training (or resume it); returns the best val Dice mean and its step.

    ``sets``: ``(train_sets, val_sets)`` as :func:`load_sets` returns them (default: loaded
    from ``cfg.data_root``). Model, Adam state, step and best-so-far are checkpointed to
    ``WORKDIR/checkpoints`` (orbax) every ``cfg.checkpoint_every`` steps and after every
    evaluation; a rerun with the same workdir resumes from the latest checkpoint and, because
    batch ``i`` depends only on ``(seed, i)``, continues as the uninterrupted run would. A
    workdir holding a run of other settings (:data:`RUN_FIELDS`, augmentation) is refused, naming them.
    A non-finite loss stops the run naming the step; the last checkpoint stays intact.
    """
    from covidmt_jax import models
    from covidmt_jax.checkpoint import TrainCheckpointer
    from covidmt_jax.export import save_model
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run_config = _run_config(cfg)
    ckpt = TrainCheckpointer(workdir, max_to_keep=2)
    kwargs = {"depth": 4, "base_width": int(cfg.width), "batch_norm": True, "num_classes": len(CONVENTIONS),
              "in_channels": 1}
    model = models.create("unet", rngs=nnx.Rngs(cfg.seed), **kwargs)
    schedule = optax.warmup_cosine_decay_schedule(cfg.lr * 0.1, cfg.lr, min(100, cfg.steps // 10), cfg.steps,
                                                  cfg.lr * 0.02)
    optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
    start, best, best_step, elapsed0 = 0, -1.0, -1, 0.0
    metrics_path = workdir / "metrics.jsonl"
    try:
        if ckpt.latest_step() is not None:
            restored, _, meta = ckpt.restore(nnx.state((model, optimizer)))
            saved = dict(meta["config"])
            saved.setdefault("augment", dataclasses.asdict(LungAugment()))  # runs from before the key
            differ = sorted(k for k in run_config if saved.get(k) != run_config[k])
            if differ:
                raise ValueError(
                    f"{workdir} holds a lung training run with other settings ({', '.join(differ)}: "
                    f"{ {k: saved.get(k) for k in differ} } there, { {k: run_config[k] for k in differ} } "
                    f"now); use a new --workdir, or the same settings to resume")
            nnx.update((model, optimizer), restored)
            start, best, best_step, elapsed0 = meta["step"], meta["best"], meta["best_step"], meta["elapsed_s"]
            _truncate_metrics(metrics_path, start)
            log.info("resumed from %s at step %d (best mean val Dice %.4f at step %d)", ckpt.directory, start,
                     best, best_step)
        elif cfg.init:
            log.info("init from %s: %d tensors", cfg.init, len(init_from_export(model, cfg.init, cfg.seed)))
        if start >= cfg.steps:
            return {"best_mean_dice": best, "best_step": best_step, "train_s": elapsed0}

        t0 = time.time()
        train_sets, val_sets = sets if sets is not None else load_sets(cfg)
        log.info("loaded %s train / %s val films in %.0f s", {k: len(v["ids"]) for k, v in train_sets.items()},
                 {k: len(v["ids"]) for k, v in val_sets.items()}, time.time() - t0)

        @nnx.jit
        def step(model, optimizer, batch):
            def loss_fn(m):
                return masked_convention_loss(m(batch["image"]), batch["mask"], batch["convention"])
            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        stream = BatchStream(train_sets, dict(cfg.weights), cfg.batch_size, augment_from_config(cfg), cfg.seed,
                             start=start + 1)
        policies = RESIZE_POLICIES if cfg.resize == "both" else (cfg.resize,)
        meta = {"image_size": int(cfg.image_size), "outputs": list(CONVENTIONS), "resize": policies[0],
                "trained_resize": cfg.resize,
                "summary": f"U-Net width {cfg.width}, {len(CONVENTIONS)} convention heads",
                "sets": list(cfg.sets), "init": str(cfg.init or "")}
        losses: list[float] = []
        t_start = time.time()
        elapsed = lambda: elapsed0 + time.time() - t_start  # noqa: E731

        def save_checkpoint(i: int) -> None:
            ckpt.save(i, nnx.state((model, optimizer)), {},
                      {"step": i, "best": best, "best_step": best_step, "elapsed_s": round(elapsed(), 1),
                       "config": run_config}, force=True)

        try:
            for i in range(start + 1, cfg.steps + 1):
                model.train()
                batch = {k: jnp.asarray(v) for k, v in next(stream).items()}
                loss = float(step(model, optimizer, batch))
                if not np.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss ({loss}) at step {i}; the last checkpoint (step "
                        f"{ckpt.latest_step()}) in {ckpt.directory} is intact: lower lr and use a new workdir")
                losses.append(loss)
                if i % cfg.log_every == 0:
                    log.info("step %d/%d loss %.4f (%.2f s/step)", i, cfg.steps,
                             np.mean(losses[-cfg.log_every:]), (time.time() - t_start) / (i - start))
                evaluated = i % cfg.eval_every == 0 or i == cfg.steps
                if evaluated:
                    d = val_dice(model, val_sets)
                    score = float(np.mean([v for k, v in d.items() if "@" not in k]))
                    rec = {"step": i, "loss": float(np.mean(losses[-cfg.eval_every:])), "val_dice": d,
                           "mean": score, "elapsed_s": round(elapsed(), 1)}
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(jsonable(rec), allow_nan=False) + "\n")  # strict JSON: NaN -> null
                    log.info("eval %s", rec)
                    if score > best:
                        best, best_step = score, i
                        save_model(workdir / "export" / "best", model, name="unet", model_kwargs=kwargs,
                                   metadata=dict(meta, step=i, val_dice=d, train_s=round(elapsed())))
                if evaluated or i % cfg.checkpoint_every == 0:
                    save_checkpoint(i)
        finally:
            stream.close()
        ckpt.wait()
    finally:
        ckpt.close()
    return {"best_mean_dice": best, "best_step": best_step, "train_s": elapsed()}


# ----------------------------------------------------------------------------- evaluation

def film_tags(meta: Mapping[str, Any]) -> list[str]:
    """Reporting groups of a film: its set, ``set/film_type`` and, where they apply,
    ``set/portable`` (AP or AP supine) and ``set/paediatric`` (the QU-Ex proxy)."""
    tags = [meta["source"], f"{meta['source']}/{meta['film_type']}"]
    if meta.get("portable"):
        tags.append(f"{meta['source']}/portable")
    if meta.get("paediatric"):
        tags.append(f"{meta['source']}/paediatric")
    return tags


def evaluate(segmenters: Mapping[str, Any], data_root: str | Path, *, split: str = "val",
             channel: str | None = "whatsapp", sets: tuple[str, ...] | None = None,
             resize: str | None = None) -> dict[str, Any]:
    """Dice of shipped/exported segmenters on a split, at each film's own resolution.

    ``segmenters``: ``{convention: LungSegmenter}``; every film is segmented by each, and
    scored against its reference by the segmenter of its set's convention. ``channel``:
    also segment the film's transmitted copy (``channels.get_channel``) and report the Dice
    between the two masks (mask stability). ``resize`` overrides each segmenter's policy.
    Returns ``{"rows": [per film], "groups": {tag: {"n", "patients", "dice_mean",
    "dice_ci95_lo", "dice_ci95_hi", "dice_median", "dice_min", "stability_mean", ...}}}``;
    the interval is :func:`covidmt_jax.metrics.clustered_mean_ci` over the films with patients
    as clusters (NaN with fewer than 2 patients). Dice figures are absent from a group whose
    convention no segmenter was given.
    """
    from covidmt_jax.channels import get_channel
    from covidmt_jax.data.images import load_grey, load_mask
    from covidmt_jax.data.splits import set_folders
    from covidmt_jax.lung_qc import mask_qc
    from covidmt_jax.metrics import clustered_mean_ci, dice
    folders = set_folders(data_root)
    ch = get_channel(channel) if channel else None
    if resize is not None:
        for seg in segmenters.values():
            seg.resize = resize
    rows = []
    for name in (sets or tuple(folders)):
        src = LungSetSource(folders[name], split=split)
        recs = [src[i] for i in range(len(src))]
        greys = [load_grey(r["image"], name=r["id"]) for r in recs]
        refs = [load_mask(r["mask"], name=r["id"]) for r in recs]
        probs = {c: seg.lung_masks(greys) for c, seg in segmenters.items()}
        trans = {}
        if ch is not None:
            sent = [ch.transmit_array(g, keep_size=True) for g in greys]
            trans = {c: seg.lung_masks(sent) for c, seg in segmenters.items()}
        for k, rec in enumerate(recs):
            meta, ref = rec["meta"], refs[k]
            own = meta["convention"]
            pk = {c: probs[c][k] for c in probs}
            row = {"id": rec["id"], "source": name, "patient": str(meta["patient_id"]),
                   "convention": own, "tags": film_tags(meta),
                   "ref_frac": float(ref.mean()),
                   "dice": float(dice(pk[own][None] >= 0.5, ref[None])[0]) if own in pk else float("nan")}
            for c, p in pk.items():
                other = [o for o in pk if o != c]
                row[f"qc_{c}"] = mask_qc(p, pk[other[0]] if other else None,
                                         other_is=other[0] if other else "anatomical")
                row[f"dice_{c}_vs_ref"] = float(dice(p[None] >= 0.5, ref[None])[0])
                if c in trans:
                    row[f"stability_{c}"] = float(dice(trans[c][k][None] >= 0.5, p[None] >= 0.5)[0])
            rows.append(row)
    groups: dict[str, dict] = {}
    for tag in sorted({t for r in rows for t in r["tags"]}):
        rs = [r for r in rows if tag in r["tags"]]
        d = np.array([r["dice"] for r in rs])
        scored = ~np.isnan(d)
        g = {"n": len(rs), "patients": len({r["patient"] for r in rs})}
        if scored.any():
            # the films of one patient are not independent: the interval is cluster-robust
            mean, lo, hi = clustered_mean_ci(d[scored], np.array([r["patient"] for r in rs])[scored])
            # a t-interval can run past Dice's range [0, 1]; the bounds are cut to it
            g.update(dice_mean=mean, dice_ci95_lo=max(0.0, lo) if np.isfinite(lo) else lo,
                     dice_ci95_hi=min(1.0, hi) if np.isfinite(hi) else hi,
                     dice_median=float(np.median(d[scored])), dice_min=float(np.min(d[scored])))
        for c in segmenters:
            if f"stability_{c}" in rs[0]:
                g[f"stability_{c}_mean"] = float(np.mean([r[f"stability_{c}"] for r in rs]))
            g[f"flagged_{c}"] = int(sum(r[f"qc_{c}"]["flagged"] for r in rs))
        groups[tag] = g
    return {"split": split, "channel": channel, "rows": rows, "groups": groups}


def conventions_figure(data_root: str | Path, out: str | Path, *, n: int = 4, split: str = "val",
                       segmenters: Mapping[str, Any] | None = None) -> Path:
    """PNG of ``n`` films of ``split`` annotated both ways (QU-Ex fields + V7 anatomical):
    per film, the reference contours (top) and both segmenters' predicted contours (bottom);
    fields in cyan, anatomical in orange."""
    import csv
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from covidmt_jax.data.images import load_grey, load_mask
    from covidmt_jax.data.splits import folder_splits, set_folders
    from covidmt_jax.lungs import lung_segmenter, resize_from_input
    folders = set_folders(data_root)
    v7, qx = folders["v7_covid_anatomical"], folders["quex_covid_fields"]
    with open(v7 / "pairs.csv", newline="") as f:
        by_name = {r["ieee8023_filename"]: r["stem"] for r in csv.DictReader(f)}
    with open(qx / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sp = folder_splits(qx)
    films = [(r["stem"], by_name[r["ieee8023_filename"]]) for r in rows
             if r["ieee8023_filename"] in by_name and sp[r["stem"]] == split][:n]
    segs = segmenters or {c: lung_segmenter(c) for c in CONVENTIONS}
    colours = {"fields": "cyan", "anatomical": "orange"}
    fig, axes = plt.subplots(2, len(films), figsize=(2.6 * len(films), 5.4), squeeze=False)
    for j, (q, a) in enumerate(films):
        img = load_grey(v7 / "images" / f"{a}.png")
        hw = img.shape
        refs = {"anatomical": load_mask(v7 / "masks" / f"{a}.png"),
                # the QU-Ex film is squashed to 256 x 256: unsquash its mask onto the V7 film
                "fields": resize_from_input(load_mask(qx / "masks" / f"{q}.png").astype(np.float32), hw) >= 0.5}
        preds = {c: seg.lung_masks([img])[0] >= 0.5 for c, seg in segs.items()}
        for i, (title, masks) in enumerate((("reference", refs), ("predicted", preds))):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            for c, m in masks.items():
                ax.contour(m.astype(float), levels=[0.5], colors=colours[c], linewidths=1.0)
            ax.set_title(f"{title}: {a}", fontsize=7)
            ax.axis("off")
    fig.suptitle("lung fields (cyan) vs anatomical lungs (orange)", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def worst_films_figure(data_root: str | Path, out: str | Path, *, set_name: str = "quex_covid_fields",
                       split: str = "val", n: int = 3, segmenters: Mapping[str, Any] | None = None) -> Path:
    """PNG of the ``n`` films of ``set_name`` / ``split`` with the lowest Dice of the segmenter of
    the set's convention: per film, the reference (white) and that segmenter's prediction
    (cyan for fields, orange for anatomical) with the film's Dice, and the other convention's
    prediction dashed, to judge where the disagreement lies. The PNG's "Description" text
    lists the films shown as ``id=dice``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from covidmt_jax.data.images import load_grey, load_mask
    from covidmt_jax.data.splits import set_folders
    from covidmt_jax.lungs import lung_segmenter
    from covidmt_jax.metrics import dice
    folders = set_folders(data_root)
    if set_name not in folders:
        raise ValueError(f"set {set_name!r} not under {data_root}; sets: {sorted(folders)}")
    src = LungSetSource(folders[set_name], split=split)
    if not len(src):
        raise ValueError(f"set {set_name!r} has no {split} films")
    recs = [src[i] for i in range(len(src))]
    own = recs[0]["meta"]["convention"]
    segs = segmenters or {c: lung_segmenter(c) for c in CONVENTIONS}
    greys = [load_grey(r["image"], name=r["id"]) for r in recs]
    refs = [load_mask(r["mask"], name=r["id"]) for r in recs]
    probs = {c: seg.lung_masks(greys) for c, seg in segs.items()}
    d = np.array([float(dice(probs[own][k][None] >= 0.5, refs[k][None])[0]) for k in range(len(recs))])
    worst = np.argsort(d, kind="stable")[:n]
    colours = {"fields": "cyan", "anatomical": "orange"}
    fig, axes = plt.subplots(1, len(worst), figsize=(3.0 * len(worst), 3.4), squeeze=False)
    for j, k in enumerate(worst):
        ax = axes[0, j]
        ax.imshow(greys[k], cmap="gray", vmin=0, vmax=1)
        ax.contour(refs[k].astype(float), levels=[0.5], colors="white", linewidths=1.2)
        for c, p in probs.items():
            ax.contour((p[k] >= 0.5).astype(float), levels=[0.5], colors=colours[c],
                       linewidths=1.0, linestyles="solid" if c == own else "dashed")
        ax.set_title(f"{recs[k]['id']}: Dice {d[k]:.3f}", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{set_name} {split}: the {len(worst)} lowest-Dice films of {len(recs)} (mean {d.mean():.3f}); "
                 f"reference white, {own} prediction solid, other convention dashed", fontsize=7)
    fig.tight_layout()
    out = Path(out)
    # the films shown, for a reader of the file (PNG text chunk "Description")
    fig.savefig(out, dpi=80, metadata={"Description": " ".join(f"{recs[k]['id']}={d[k]:.4f}" for k in worst)})
    plt.close(fig)
    return out


FIGURES = {"conventions": conventions_figure, "worst": worst_films_figure}


def load_config(spec: str):
    """``path/to/config.py[:k=v,...]`` -> the ConfigDict its ``get_config(arg)`` returns."""
    import importlib.util
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found")
    mod_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg or None)


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the two-convention lung U-Net, or evaluate segmenters.")
    sub = p.add_subparsers(dest="cmd")
    t = sub.add_parser("train", help="train (the default when --config is given)")
    t.add_argument("--config", required=True, help="configs/unet_lungs_conventions.py[:k=v,...]")
    t.add_argument("--workdir", required=True)
    e = sub.add_parser("evaluate", help="Dice / mask stability / QC of segmenters on a split")
    e.add_argument("--segmenters", default="fields,anatomical",
                   help="comma list of shipped names or convention=EXPORT_DIR (default: both shipped)")
    e.add_argument("--root", default="../shared/data")
    e.add_argument("--split", default="val", choices=("train", "val", "test"))
    e.add_argument("--channel", default="whatsapp", help="channel for mask stability ('' = none)")
    e.add_argument("--resize", default=None, choices=RESIZE_POLICIES, help="override the policy")
    e.add_argument("--sets", default="", help="comma list of set names (default: all present)")
    e.add_argument("--out", required=True, help="JSON file with per-film rows and per-group figures")
    sp = sub.add_parser("soup", help="average the weights of exports fine-tuned from one start (a model soup)")
    sp.add_argument("--members", required=True, help="comma list of export directories (same architecture)")
    sp.add_argument("--convention", default="",
                    help="export this convention's head of each multi-head member first (fields | anatomical)")
    sp.add_argument("--out", required=True, help="export directory of the averaged model")
    fg = sub.add_parser("figure", help="PNG: both conventions on films annotated both ways, or a set's worst films")
    fg.add_argument("kind", choices=sorted(FIGURES))
    fg.add_argument("--root", default="../shared/data")
    fg.add_argument("--split", default="val", choices=("train", "val", "test"))
    fg.add_argument("--n", type=int, default=0, help="films shown (default 4 conventions, 3 worst)")
    fg.add_argument("--set", default="quex_covid_fields", help="(worst) the lung set")
    fg.add_argument("--out", required=True, help="PNG file")
    argv = list(argv) if argv is not None else None
    import sys
    args_in = sys.argv[1:] if argv is None else argv
    if args_in and args_in[0].startswith("--") and args_in[0] not in ("-h", "--help"):
        args_in = ["train"] + args_in
    a = p.parse_args(args_in)
    if a.cmd is None:
        p.error("a command is needed: train (or --config ... --workdir ...), evaluate, soup or figure")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.cmd == "evaluate":
        from covidmt_jax.lungs import lung_segmenter
        segs = {}
        for item in filter(None, a.segmenters.split(",")):
            conv, _, d = item.partition("=")
            segs[conv] = lung_segmenter(d or conv)
        res = evaluate(segs, a.root, split=a.split, channel=a.channel or None, resize=a.resize,
                       sets=tuple(filter(None, a.sets.split(","))) or None)
        Path(a.out).write_text(json.dumps(jsonable(res), indent=1, allow_nan=False))
        for tag, g in res["groups"].items():
            print(f"{tag:45s} " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in g.items()))
        return
    if a.cmd == "figure":
        kw = {"split": a.split, **({"n": a.n} if a.n > 0 else {})}
        if a.kind == "worst":
            kw["set_name"] = a.set
        print(FIGURES[a.kind](a.root, a.out, **kw))
        return
    if a.cmd == "soup":
        print(soup(list(filter(None, a.members.split(","))), a.out, convention=a.convention or None))
        return
    cfg = load_config(a.config)
    print(json.dumps(jsonable(train(cfg, a.workdir)), allow_nan=False))


if __name__ == "__main__":
    main()
