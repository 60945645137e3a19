r"""Train COVIDMT or any baseline: ``python -m covidmt_jax.train --config configs/X.py --workdir DIR``.

Overrides: ``--config.optimizer.lr=1e-4``; the paper's task-count ablation:
``--config configs/covidmt_resnext50.py:tasks=3``. Re-running with the same ``--workdir``
resumes from the last checkpoint (model, optimiser, step, RNG and data-iterator position);
a resume whose config changes the checkpointed state's shapes (``model.*``, ``tasks``, the
optimiser's name or clipping) is refused naming the keys, and ``config.json`` is rewritten
only after the checkpoint has been restored. Start-up checks (before any data or run
directory): the config keys (``config_lib.validate``), ``eval.best_metric`` against the
metrics the tasks report, the model's constructor arguments, the workdir.

The loop, in order:
1. ``jax.distributed.initialize()`` when there are several processes; a ``Mesh`` over all
   devices with a ``data`` axis (and ``model`` for parameter sharding).
2. Sources per dataset -> grain loaders -> one batch from each task loader per step,
   concatenated (``data.pipeline.make_train_iterator``).
3. A ``jax.jit`` train step with explicit in/out shardings and donated state:
   forward -> ``tasks.total_loss`` (eq. 5) -> gradients -> optax update. A non-finite loss
   leaves the state untouched and stops the run naming the step and the task.
4. Evaluation every ``eval.every_epochs`` and at the end (per-task metrics from ``tasks``);
   the best model by ``eval.best_metric`` is exported to ``WORKDIR/export/best``.
5. Orbax checkpoints every ``checkpoint.every_steps`` and at the end; ``metrics.jsonl`` and
   TensorBoard events in the workdir.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from covidmt_jax import config_lib, models, parallel
from covidmt_jax.checkpoint import TrainCheckpointer
from covidmt_jax.cli import hms as _hms
from covidmt_jax.cli import quiet_libraries, run_config_cli  # noqa: F401  (quiet_libraries: public here too)
from covidmt_jax.data.records import DataError
from covidmt_jax.export import save_model
from covidmt_jax.models import cpu_conv
from covidmt_jax.data.images import image_hw
from covidmt_jax.tasks import Task, build_tasks, total_loss

log = logging.getLogger("covidmt_jax.train")


class NonFiniteLossError(FloatingPointError):
    """A NaN/Inf loss: the message names the step and the task(s)."""


def nonfinite_message(step: int, bad: list[str], checkpoint_step: int | None, directory: Path) -> str:
    """The :class:`NonFiniteLossError` text: the step, the task(s) (``bad``; empty: only the
    total) and what is left on disk (``checkpoint_step``: the last saved step, None: none yet)."""
    saved = (f"the last good checkpoint (step {checkpoint_step}) in {directory} is intact"
             if checkpoint_step is not None else
             f"no checkpoint had been written yet (none in {directory}); a re-run starts from step 0")
    return (f"non-finite loss at step {step} in task(s) {bad or ['(total)']}; the update was not "
            f"applied and {saved} (a smaller --config.optimizer.lr or --config.optimizer.grad_clip "
            "may help)")


# ----------------------------------------------------------------------------- building blocks

def build_sources(split_cfg: Mapping[str, Any], split: str = "train", on_error: str = "raise") -> dict[str, Any]:
    """``{dataset: Source}`` from ``data.train`` / ``data.val`` entries (see config_lib).

    ``split`` ("train" / "val") names the config section in errors; ``on_error`` (the
    config's ``data.on_error``) is passed to every source that takes one, unless its entry's
    kwargs set it. An entry without records is a ConfigError naming the split, the dataset,
    the source, the hold-out and what its source skipped.
    """
    import inspect

    from covidmt_jax.data.records import SourceView, holdout_split
    from covidmt_jax.data.sources import SOURCES, get_source
    out = {}
    for ds, entry in split_cfg.items():
        kwargs = entry.kwargs.to_dict() if hasattr(entry.kwargs, "to_dict") else dict(entry.kwargs)
        cls = SOURCES.get(entry.source)
        if cls is not None and "on_error" in inspect.signature(cls).parameters:
            kwargs.setdefault("on_error", on_error)
        src = get_source(entry.source, **kwargs)
        frac = float(entry.get("holdout", 0.0))
        part = entry.get("holdout_part", "keep")
        if frac > 0:
            keep, hold = holdout_split(src, frac, seed=int(entry.get("holdout_seed", 0)))
            src = SourceView(src, keep if part == "keep" else hold, name=f"{src.name}[{part}]")
        if len(src) == 0:
            why = f" after holding out {frac:g} of its patients ({part!r} part)" if frac > 0 else ""
            skipped = list(getattr(src, "skipped", []))
            if skipped:
                why += f"; {len(skipped)} item(s) skipped, e.g. {skipped[0][0]}: {skipped[0][1]}"
            raise config_lib.ConfigError(
                f"config.data.{split}.{ds}: no records in {split} split of dataset {ds!r} "
                f"(source {entry.source!r}, {getattr(src, 'name', entry.source)}){why}")
        out[ds] = src
    return out


def model_kwargs(cfg: ml_collections.ConfigDict, tasks) -> dict[str, Any]:
    """Keyword arguments of ``models.create`` for this config (stored with exports)."""
    kw = dict(cfg.model.kwargs.to_dict()) if cfg.model.kwargs else {}
    kw["in_channels"] = cfg.model.in_channels
    if cfg.model.name == "covidmt":
        kw["tasks"] = [dataclasses.asdict(t) for t in tasks]
    elif cfg.model.name == "unet":
        kw["num_classes"] = 1
    else:
        kw["num_classes"] = sum(t.kind == "classification" for t in tasks)
    return kw


def build_model(cfg: ml_collections.ConfigDict, tasks) -> nnx.Module:
    """The zoo model of ``cfg.model`` (ImageNet-initialised when ``init.torch_weights`` is set);
    a constructor that refuses its arguments is a ConfigError naming ``config.model``."""
    try:
        model = models.create(cfg.model.name, dtype=cfg.model.dtype, rngs=nnx.Rngs(cfg.seed),
                              **model_kwargs(cfg, tasks))
    except (TypeError, ValueError) as e:
        kw = cfg.model.kwargs.to_dict() if cfg.model.kwargs else {}
        raise config_lib.ConfigError(f"config.model (name={cfg.model.name!r}, kwargs={kw}): "
                                     f"the model cannot be built: {e}") from None
    if cfg.init.torch_weights:
        from covidmt_jax.weights import load_torch_weights
        report = load_torch_weights(model, cfg.init.torch_weights, source=cfg.init.source,
                                    skip_head=True)
        log.info("ImageNet init from %s: %d tensors loaded, head skipped (%d)",
                 cfg.init.torch_weights, len(report["loaded"]), len(report["skipped"]))
    else:
        log.info("no ImageNet weights (config.init.torch_weights is empty): parameters start "
                 "random unless a checkpoint is restored; the paper starts from ImageNet weights")
    return model


def build_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (default) with the paper's multi-step decay at ``milestones`` epochs."""
    o = cfg.optimizer
    boundaries = {int(m * steps_per_epoch): float(o.decay) for m in o.milestones}
    lr = optax.piecewise_constant_schedule(float(o.lr), boundaries)
    if o.name == "adam":
        tx = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    elif o.name == "adamw":
        tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        tx = optax.sgd(lr, momentum=o.momentum)
    if o.grad_clip and o.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(float(o.grad_clip)), tx)
    return tx, lr


def task_outputs(raw: Any, tasks: list[Task]) -> dict[str, Any]:
    """Model output -> ``{task_name: output}`` for every model family."""
    if isinstance(raw, Mapping):
        return dict(raw)
    seg = [t for t in tasks if t.spec.kind == "segmentation"]
    if seg:
        return {seg[0].name: raw}
    cls = [t for t in tasks if t.spec.kind == "classification"]
    return {t.name: raw[:, t.column] for t in cls}


def task_weight_norms(model: nnx.Module) -> dict[str, jax.Array]:
    """``{task: sum of squared weights}`` the task losses regularise: the model's
    ``task_weight_norms()`` (COVIDMT: the box-regression subnet); empty for other families."""
    norms = getattr(model, "task_weight_norms", None)
    return norms() if norms is not None else {}


def box_anchors(model: nnx.Module, specs, image_size) -> Any:
    """``[N, 4]`` anchors of the model's box head at ``image_size`` (int or ``(H, W)``), or
    None when no task is a box task."""
    if not any(s.kind == "box" for s in specs):
        return None
    return model.anchors(image_hw(image_size))


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok`` else ``old``, leaf-wise (PRNG keys always advance)."""
    def pick(n, o):
        if jax.dtypes.issubdtype(n.dtype, jax.dtypes.prng_key):
            return n
        return jnp.where(ok, n, o)
    return jax.tree.map(pick, new, old)


def make_train_step(graphdef, tasks: list[Task]):
    """The pure train step ``(state, batch) -> (state, metrics)``."""

    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            return total_loss(tasks, task_outputs(model(batch["image"]), tasks), batch,
                              task_weight_norms(model))

        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        task_losses = {t.name: aux[f"{t.name}/loss"] for t in tasks}
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.isfinite(v) for v in task_losses.values()]))
        new_state = _select(finite, nnx.state((model, optimizer)), state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "finite": finite, **aux}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, tasks: list[Task]):
    def eval_step(state, images):
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        return task_outputs(model(images), tasks)
    return eval_step


# ----------------------------------------------------------------------------- logging

class MetricWriter:
    """``metrics.jsonl`` + TensorBoard (process 0 only). On resume, rows past the restored
    step are dropped so the file never holds a step twice.

    Each line is strict JSON (RFC 8259): a NaN or infinite value is written as ``null``
    (``json.loads`` of any line works in every JSON reader); TensorBoard gets the finite
    values only.
    """

    def __init__(self, workdir: Path, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # optional dependency; the JSON lines are the record of truth
            log.warning("tensorboardX not installed: TensorBoard events are not written")

    def write(self, step: int, kind: str, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        floats = {k: float(v) for k, v in values.items()}
        row = {"step": int(step), "kind": kind, "time": time.time(),
               **{k: v if math.isfinite(v) else None for k, v in floats.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in floats.items():
                if math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- evaluation

class EvalProgress:
    """Progress of one evaluation pass of ``total`` batches: ``update()`` after each batch
    logs ``"<label>: done/total batches (<dataset>)  r batches/s  i img/s  ETA h:mm:ss"``
    at most every ``every_s`` seconds (the first batch, which compiles, is not timed for
    the rate) and always after the last batch."""

    def __init__(self, total: int, batch_size: int, *, label: str = "eval", every_s: float = 10.0,
                 clock=time.monotonic, logger: logging.Logger | None = None):
        self.total, self.batch_size, self.label, self.every_s = int(total), int(batch_size), label, every_s
        self.clock, self.log = clock, logger or log
        self.done = 0
        self._t0 = self._last = None  # time after the first batch; time of the last line

    def update(self, what: str = "") -> str | None:
        """One batch done; returns the line when one was logged."""
        self.done += 1
        now = self.clock()
        if self._t0 is None:
            self._t0 = self._last = now
            if self.done < self.total:
                return None
        if self.done < self.total and now - self._last < self.every_s:
            return None
        self._last = now
        timed = self.done - 1
        rate = timed / (now - self._t0) if timed and now > self._t0 else float("nan")
        eta = (self.total - self.done) / rate if rate > 0 else (0.0 if self.done >= self.total else float("nan"))
        speed = f"{rate:.2f} batches/s  {rate * self.batch_size:.1f} img/s" if rate > 0 else "rate ?"
        line = (f"{self.label}: {self.done}/{self.total} batches{f' ({what})' if what else ''}  "
                f"{speed}  ETA {_hms(eta)}")
        self.log.info("%s", line)
        return line


def evaluate(eval_fn, state, val_sources: Mapping[str, Any], tasks: list[Task], cfg, mesh, *, skip_logs: Mapping[str, Any] | None = None, label: str = "eval",
             progress_every_s: float = 10.0) -> dict[str, float]:
    """Per-task metrics over every validation source (one pass, padded batches).

    ``cfg.data.on_error`` applies ("skip": an unreadable image becomes a zero-weight pad,
    logged in ``skip_logs[dataset]`` when given, each file once across calls). A progress
    line with the rate and ETA is logged every ``progress_every_s`` seconds and at the end
    (:class:`EvalProgress`).
    """
    from covidmt_jax.data.pipeline import make_eval_iterator
    sharding = parallel.data_sharding(mesh)
    results: dict[str, float] = {}
    on_error = cfg.data.get("on_error", "raise")
    # each process evaluates its own shard; results are all-gathered below
    iterators = {ds: make_eval_iterator(source, dataset=ds, tasks=[t.spec for t in tasks],
                                        image_size=cfg.data.image_size, batch_size=cfg.data.eval_batch_size,
                                        max_boxes=cfg.data.max_boxes, shard_index=None, shard_count=None,
                                        on_error=on_error, skip_log=(skip_logs or {}).get(ds))
                 for ds, source in val_sources.items() if any(t.spec.dataset == ds for t in tasks)}
    progress = EvalProgress(sum(it.num_batches for it in iterators.values()), cfg.data.eval_batch_size,
                            label=label, every_s=progress_every_s)
    for ds, it in iterators.items():
        ds_tasks = [t for t in tasks if t.spec.dataset == ds]
        arrays: dict[str, dict[str, list]] = {t.name: {} for t in ds_tasks}
        lists: dict[str, dict[str, list]] = {t.name: {} for t in ds_tasks}
        for batch in _data_errors_named(it, "evaluation"):
            gb = parallel.global_batch(batch, sharding)
            outputs = parallel.local_rows(eval_fn(state, gb["image"]))
            host_batch = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
            for t in ds_tasks:
                for k, v in t.eval_outputs(outputs, host_batch).items():
                    # arrays are per-sample columns (concatenated); lists hold per-image items
                    target = lists if isinstance(v, list) else arrays
                    target[t.name].setdefault(k, []).extend(v if isinstance(v, list) else [v])
            progress.update(ds)
        for t in ds_tasks:
            merged = {k: parallel.allgather_rows(np.concatenate(v)) for k, v in arrays[t.name].items()}
            merged.update({k: parallel.allgather_ragged(v) for k, v in lists[t.name].items()})
            for name, value in t.summarize(merged).items():
                results[f"{t.name}/{name}"] = value
    return results


# ----------------------------------------------------------------------------- unreadable images

def _data_errors_named(iterator, what: str) -> Iterator:
    """Iterate, re-raising an unreadable input (DataError, also from grain workers) as ONE
    DataError naming the file, the problem and the way round it (no grain frames)."""
    from covidmt_jax.data.records import DataError
    it = iter(iterator)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except DataError as e:
            raise DataError(e.path, f"{e.problem} (during {what}; --config.data.on_error=skip "
                                    "leaves unreadable images out)") from None
        yield item


def skipped_images(*logs_and_sources) -> dict[str, Any]:
    """``{"count", "files": [{"path", "problem", "where"}]}``: every file left out, once
    (by path), from SkipLogs (``(where, SkipLog)``) and sources' build-time ``skipped``
    lists (``(where, source)``)."""
    from covidmt_jax.data.pipeline import SkipLog
    files: dict[str, dict[str, str]] = {}
    for where, obj in logs_and_sources:
        items = obj.items if isinstance(obj, SkipLog) else getattr(obj, "skipped", [])
        for path, problem in items:
            files.setdefault(str(path), {"path": str(path), "problem": str(problem), "where": where})
    return {"count": len(files), "files": list(files.values())}


# ----------------------------------------------------------------------------- start-up checks

def reported_metrics(tasks: list[Task]) -> list[str]:
    """``["<task>/<metric>", ...]``: the keys :func:`evaluate` returns for ``tasks`` (each task
    kind's ``METRICS``)."""
    return [f"{t.name}/{m}" for t in tasks for m in t.METRICS]


def check_best_metric(cfg: ml_collections.ConfigDict, tasks: list[Task]) -> None:
    """ConfigError unless ``eval.best_metric`` is a metric the tasks report."""
    valid = reported_metrics(tasks)
    if cfg.eval.best_metric not in valid:
        raise config_lib.ConfigError(f"config.eval.best_metric={cfg.eval.best_metric!r} is not a metric "
                                     f"of this run's tasks; valid: {valid}")


def check_workdir(workdir: Path) -> None:
    """ConfigError naming ``workdir`` when it is not a directory and cannot be made one."""
    if workdir.exists() and not workdir.is_dir():
        raise config_lib.ConfigError(f"--workdir {workdir}: exists and is not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise config_lib.ConfigError(f"--workdir {workdir}: cannot create it ({e.strerror or e})") from None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` of nested dicts."""
    if not isinstance(tree, Mapping) or not tree:
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _state_shape_key(key: str) -> bool:
    """Whether changing config key ``key`` changes the shapes of the checkpointed state."""
    # model.dtype is the compute dtype: parameters and statistics stay float32 (param_dtype)
    return ((key.startswith("model.") and key not in ("model.cpu_conv_kernels", "model.dtype"))
            or key == "tasks"
            or key == "optimizer.name" or key == "optimizer.grad_clip")


def _state_value(key: str, value: Any) -> Any:
    # grad clipping adds an optax chain level when on, whatever its value
    return bool(value and value > 0) if key == "optimizer.grad_clip" else value


def config_changes(stored: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(state-shape keys, other keys)`` whose values differ between two JSON configs (dotted,
    sorted): the first kind (model.*, tasks, optimizer name / clipping) cannot resume."""
    a, b = _flat(stored), _flat(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    shape = [k for k in changed if _state_shape_key(k)
             and _state_value(k, a.get(k)) != _state_value(k, b.get(k))]
    return shape, [k for k in changed if k not in shape]


def check_resume(workdir: Path, cfg: ml_collections.ConfigDict) -> None:
    """Before resuming ``workdir`` (it holds a checkpoint and ``config.json``): ConfigError
    naming the keys that change the model / optimiser state shapes; other changes are logged."""
    stored_path = workdir / "config.json"
    ckpt_dir = workdir / "checkpoints"
    if not stored_path.is_file() or not ckpt_dir.is_dir() or not any(
            p.name.isdigit() for p in ckpt_dir.iterdir()):
        return
    try:
        stored = json.loads(stored_path.read_text())
    except (OSError, ValueError) as e:
        raise config_lib.ConfigError(f"{stored_path}: unreadable ({e}); cannot check that the resume "
                                     "fits this config") from None
    new = json.loads(cfg.to_json_best_effort())
    shape, other = config_changes(stored, new)
    a, b = _flat(stored), _flat(new)

    def describe(keys):
        return ", ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys)

    if shape:
        raise config_lib.ConfigError(f"--workdir {workdir} holds a checkpoint of another model/optimiser "
                                     f"({describe(shape)}); use a new --workdir or the stored config.json")
    if other:
        log.info("resuming with changed config (was in %s): %s", stored_path, describe(other))


# ----------------------------------------------------------------------------- the run

def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) training; returns the final summary."""
    from covidmt_jax.data.pipeline import make_train_iterator, steps_per_epoch as spe_of

    workdir = Path(workdir)
    specs = config_lib.validate(cfg)
    task_options = {k: dict(v) for k, v in cfg.task_options.items()}
    check_best_metric(cfg, build_tasks(specs, task_options))  # also checks the task options
    conv_paths = cpu_conv.set_paths(cfg.model.get("cpu_conv_kernels", "auto"), "config.model.cpu_conv_kernels")
    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh(cfg.mesh.model_axis)
    model = build_model(cfg, specs)
    check_resume(workdir, cfg)
    # after the config checks: a refused config leaves no run directory (and config.json is
    # written once the resume has restored, below)
    check_workdir(workdir)

    on_error = cfg.data.get("on_error", "raise")
    train_sources = build_sources({ds: cfg.data.train[ds] for ds in {t.dataset for t in specs}}, "train",
                                  on_error)
    val_sources = build_sources(cfg.data.val, "val", on_error) if cfg.data.val else {}
    n_loaders = len(train_sources)
    global_bs = cfg.data.per_task_batch * n_loaders * jax.process_count()
    parallel.check_batch_divisible(global_bs, mesh)
    spe = cfg.steps_per_epoch if cfg.steps_per_epoch > 0 else spe_of(
        train_sources, cfg.data.per_task_batch, shard_count=jax.process_count())
    total_steps = cfg.total_steps if cfg.total_steps > 0 else cfg.epochs * spe
    log.info("%s: %d tasks %s, %d loaders, global batch %d, %d steps/epoch, %d steps, %d devices",
             cfg.model.name, len(specs), [t.name for t in specs], n_loaders, global_bs, spe,
             total_steps, jax.device_count())
    if jax.default_backend() == "cpu":
        log.info("CPU conv paths: %s", ",".join(sorted(conv_paths)) or "off (plain lax convs)")

    tasks = build_tasks(specs, task_options, anchors=box_anchors(model, specs, cfg.data.image_size))
    tx, lr_schedule = build_optimizer(cfg, spe)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    model.train()
    graphdef, state = nnx.split((model, optimizer))
    state_sh = parallel.state_shardings(state, mesh)
    state = parallel.put_global(state, state_sh, "the initial model and optimiser state")
    batch_sh = parallel.data_sharding(mesh)

    train_step = parallel.CompiledTogether(jax.jit(
        make_train_step(graphdef, tasks), in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=0), "train step")
    eval_fn = parallel.CompiledTogether(jax.jit(make_eval_step(graphdef, tasks),
                                                in_shardings=(state_sh, batch_sh)), "eval step")

    data_iter = make_train_iterator(train_sources, specs, per_task_batch=cfg.data.per_task_batch,
                                    image_size=cfg.data.image_size, seed=cfg.seed,
                                    num_workers=cfg.data.num_workers,
                                    augment_cfg=cfg.data.augment.to_dict(),
                                    max_boxes=cfg.data.max_boxes, on_error=on_error)
    from covidmt_jax.data.pipeline import SkipLog
    eval_skip_logs = {ds: SkipLog(f"val:{getattr(src, 'name', ds)}") for ds, src in val_sources.items()}
    train_batches = _data_errors_named(data_iter, "training")
    ckpt = TrainCheckpointer(workdir, max_to_keep=cfg.checkpoint.keep)
    step, best = 0, None
    if ckpt.latest_step() is not None:
        try:
            state, data_state, meta = ckpt.restore(state)
        except (ValueError, TypeError, KeyError) as e:
            ckpt.close()
            raise config_lib.ConfigError(
                f"--workdir {workdir}: its checkpoint (step {ckpt.latest_step()}) does not fit this "
                f"config's model/optimiser state ({str(e).strip().splitlines()[-1] if str(e).strip() else e!r}); "
                "use a new --workdir or the stored config.json") from None
        data_iter.set_state(data_state)
        step, best = int(meta["step"]), meta.get("best")
        log.info("resumed from %s at step %d", ckpt.directory, step)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    writer = MetricWriter(workdir, step)

    def better(v):
        if best is None or not np.isfinite(best["value"]):
            return np.isfinite(v)
        return v > best["value"] if cfg.eval.best_mode == "max" else v < best["value"]

    def run_eval(at_step):
        nonlocal best
        if not val_sources:
            return {}
        res = evaluate(eval_fn, state, val_sources, tasks, cfg, mesh,
                       skip_logs=eval_skip_logs, label=f"eval @{at_step}")
        writer.write(at_step, "eval", res)
        log.info("eval @%d: %s", at_step, "  ".join(f"{k}={v:.4f}" for k, v in sorted(res.items())))
        key = cfg.eval.best_metric
        if key in res and better(res[key]):
            best = {"step": at_step, "metric": key, "value": float(res[key])}
            _export(workdir / "export" / "best", graphdef, state, cfg, specs, {"best": best})
        return res

    t_last, step_last = time.time(), step
    start = time.time()
    eval_results: dict[str, float] = {}
    try:
        while step < total_steps:
            local = next(train_batches)
            batch = parallel.global_batch(local, batch_sh)
            state, metrics = train_step(state, batch)
            step += 1
            if not bool(metrics["finite"]):
                bad = [t.name for t in tasks if not np.isfinite(float(metrics[f"{t.name}/loss"]))]
                ckpt.wait()
                raise NonFiniteLossError(nonfinite_message(step, bad, ckpt.latest_step(), ckpt.directory))
            if step % cfg.log_every_steps == 0 or step == total_steps:
                now = time.time()
                sps = (step - step_last) / max(now - t_last, 1e-9)
                host = {k: float(v) for k, v in metrics.items() if k != "finite"}
                host["lr"] = float(lr_schedule(step))
                host["steps_per_s"], host["images_per_s"] = sps, sps * global_bs
                writer.write(step, "train", host)
                eta = (total_steps - step) / max(sps, 1e-9)
                log.info("step %d/%d  loss %.4f  %.2f steps/s  %.1f img/s  ETA %s", step,
                         total_steps, host["loss"], sps, sps * global_bs, _hms(eta))
                t_last, step_last = now, step
            is_last = step == total_steps
            end_of_epoch = step % spe == 0 and (step // spe) % cfg.eval.every_epochs == 0
            if end_of_epoch or is_last:
                eval_results = run_eval(step)
            if step % cfg.checkpoint.every_steps == 0 or is_last:
                ckpt.save(step, state, data_iter.get_state(), {"step": step, "best": best},
                          force=True)
        if not eval_results:  # e.g. re-run of a finished workdir
            eval_results = run_eval(step)
        ckpt.wait()
    finally:
        ckpt.close()
        writer.close()
    _export(workdir / "export" / "final", graphdef, state, cfg, specs, {"step": step})
    summary = {"steps": step, "epochs": step / spe, "wall_s": time.time() - start,
               "final_eval": eval_results, "best": best, "workdir": str(workdir),
               "skipped_images": skipped_images(
                   *[(f"train:{ds}", src) for ds, src in train_sources.items()],
                   *[(f"val:{ds}", src) for ds, src in val_sources.items()],
                   *[(f"train:{ds}", lg) for ds, lg in data_iter.skip_logs.items()],
                   *[(f"val:{ds}", lg) for ds, lg in eval_skip_logs.items()])}
    if summary["skipped_images"]["count"]:
        log.warning("%d unreadable image(s) left out (listed in summary.json)", summary["skipped_images"]["count"])
    if jax.process_index() == 0:
        from covidmt_jax.report import jsonable  # strict JSON: NaN / inf -> null
        (workdir / "summary.json").write_text(json.dumps(jsonable(summary), indent=2, allow_nan=False,
                                                         default=float))
    log.info("done: %s", json.dumps(summary, default=float))
    return summary


def _export(directory: Path, graphdef, state, cfg, specs, metadata) -> None:
    if jax.process_index() != 0:
        return
    model, _ = nnx.merge(graphdef, jax.device_get(state))
    model.eval()
    save_model(directory, model, name=cfg.model.name, model_kwargs=model_kwargs(cfg, specs),
               metadata={**metadata, "image_size": cfg.data.image_size})


def main(argv: list[str] | None = None) -> int:
    """Run the training CLI on ``argv`` (``argv[0]`` = program name; None = the command line);
    returns the exit status (:func:`covidmt_jax.cli.run_config_cli`)."""
    return run_config_cli(train, module="covidmt_jax.train", config_help="configs/<x>.py[:arg]",
                          workdir_help="run directory (re-use it to resume)", argv=argv,
                          input_errors=(DataError,), run_errors=(NonFiniteLossError,))


if __name__ == "__main__":
    sys.exit(main())
