r"""Training throughput (images/s) of covidmt_jax's real train step, next to a PyTorch reference.

What is measured: one optimisation step on a synthetic random batch that is already on the
device (no data loading), i.e. ``covidmt_jax.train.make_train_step`` (forward, the eq. 5 loss
of ``covidmt_jax.tasks`` including RetinaNet anchor matching for the box task, gradients,
Adam lr 2e-4 from ``covidmt_jax.train.build_optimizer``) under ``jax.jit`` with the state
donated, exactly as the trainer runs it. Compilation (``lower().compile()``) is timed
separately; ``--warmup`` steps are run and discarded; then ``--steps`` steps are timed one by
one with ``jax.block_until_ready``. Reported: images/s = batch / median step time, ms/step
(median; min-max in the ``spread`` column), compile s.

Models (``--models``, comma separated):

- ``covidmt_resnext50`` — COVIDMT with the paper's six tasks (COVID, box, Infiltration,
  Effusion, Atelectasis, Nodule) on ResNeXt-50 32x4d; the batch is one block per dataset
  (COVIDx, RSNA, NIH: ``--batch 12`` = 4 per task dataset, as the paper's recipe).
- ``resnet50`` — the single-task baseline (COVID-19 only), batch ``--batch``.
- any ``covidmt_<backbone>`` or ``<backbone>`` with backbone in resnet18/34/50/101 and
  resnext50 (``resnext50`` vs ``resnet50`` isolates the cost of grouped convolutions);
  single-task ``xception`` (depthwise convs; JAX only, no torchvision reference) and ``vgg19``.

PyTorch reference (when torch + torchvision are importable; ``--no-torch`` skips it): the
torchvision backbone with ``conv1`` replaced by a 1-channel conv, Adam lr 2e-4, BatchNorm in
training mode, ``torch.set_num_threads(os.cpu_count())``, channels_last (``--torch-layout``).
For COVIDMT it adds the same heads with the same widths: per dataset group a classification
head (3x3 conv 256 + BN + ReLU, global average pooling, linear), and an FPN (1x1 laterals,
nearest top-down, 3x3 smoothing, 256 channels) with RetinaNet box-regression and objectness
subnets (four 3x3 convs + ReLU, a 3x3 output conv, 9 anchors), shared over P3-P5. Its loss is
eq. 5 over the same six tasks, but the box task uses a STAND-IN for anchor matching: dense
targets fixed in advance (random deltas and a random ~1 % positive mask per anchor), squared
error on positives + focal objectness over all anchors, normalised by the positives, plus L2
on the box subnet's kernels. That is slightly less work than the JAX step (which matches
anchors to boxes inside the step), so the ratio slightly favours the reference.

Launch (glibc reads its ``MALLOC_*`` tunables only at process start, so the script re-executes
itself once with the values of covidmt_jax/cpu_malloc.py unless they are already set; this equals)::

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=2000000000000 \
    MALLOC_TOP_PAD_=1000000000 python benchmarks/train_throughput.py \
        --sizes 224,512 --models covidmt_resnext50,resnet50 --steps 5 --warmup 3

CPU conv paths (``covidmt_jax.models.cpu_conv``): ``--cpu-conv "on;off;-weight_grad"`` measures
the JAX step with each setting in turn (``on``/``off``, a list of paths, ``-path`` = all but
that one; default ``auto``: the ``COVIDMT_CPU_CONV`` variable), ``--rounds N`` repeats all
measurements N times interleaved, and a summary gives per setting the median over rounds and
the step time relative to all paths on::

    python benchmarks/train_throughput.py --models resnet50,covidmt_resnext50 --sizes 224 \
        --frameworks jax --steps 3 --warmup 1 --rounds 3 \
        --cpu-conv "on;off;-pointwise;-elementwise;-weight_grad"

Other flags: ``--dtype float32|bfloat16`` (compute dtype; parameters stay float32; torch uses
autocast), ``--device cpu|gpu`` (gpu: JAX in bfloat16 on the GPU backend, torch on cuda with
autocast bf16 and cudnn.benchmark), ``--xla-flags "..."`` (appended to ``XLA_FLAGS`` before
JAX starts), ``--json PATH`` (all measurements, per-step times included).

Machine noise: other processes on the same cores distort the figures; check ``uptime`` first.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from covidmt_jax.cpu_malloc import reexec_for_cpu  # noqa: E402  (glibc settings; see that module)

# short names -> zoo / torchvision names
BACKBONES = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
             "resnet101": "resnet101", "resnext50": "resnext50_32x4d",
             "resnext50_32x4d": "resnext50_32x4d", "xception": "xception", "vgg19": "vgg19"}
#: backbones without a torchvision counterpart in the reference step: JAX only
JAX_ONLY = ("xception",)


# ----------------------------------------------------------------------------- what to run

@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A benchmark entry: ``covidmt_<backbone>`` (six paper tasks) or ``<backbone>`` (COVID only)."""
    name: str
    backbone: str      # zoo / torchvision name
    multitask: bool

    @property
    def task_specs(self):
        from covidmt_jax.tasks import paper_tasks
        return paper_tasks(6 if self.multitask else 1)


def parse_model(name: str) -> BenchModel:
    """``"covidmt_resnext50"`` -> COVIDMT on ResNeXt-50 32x4d; ``"resnet50"`` -> baseline."""
    multitask = name.startswith("covidmt_")
    short = name[len("covidmt_"):] if multitask else name
    if short not in BACKBONES:
        raise ValueError(f"unknown benchmark model {name!r}: use <backbone> or covidmt_<backbone> "
                         f"with backbone one of {sorted(BACKBONES)}")
    return BenchModel(name, BACKBONES[short], multitask)


def synthetic_batch(model: BenchModel, size: int, batch: int, *, max_boxes: int = 8,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """A random batch with the trainer's layout (docs/architecture.md, data.pipeline):
    one block of ``batch / n_datasets`` rows per dataset in task order.

    ``image [B, S, S, 1]``, ``labels`` / ``label_weight [B, K]`` (K classification tasks),
    and for a box task ``boxes [B, M, 4]`` (1-3 valid xyxy pixel boxes on the box dataset's
    rows), ``box_valid [B, M]``, ``box_weight [B]``.
    """
    specs = model.task_specs
    datasets = list(dict.fromkeys(t.dataset for t in specs))
    if batch % len(datasets):
        raise ValueError(f"--batch {batch} must be a multiple of the {len(datasets)} task "
                         f"datasets of {model.name} ({datasets}): one equal block per dataset")
    per = batch // len(datasets)
    rng = np.random.default_rng(seed)
    cls = [t for t in specs if t.kind == "classification"]
    out = {"image": rng.standard_normal((batch, size, size, 1), dtype=np.float32),
           "labels": (rng.random((batch, len(cls))) < 0.5).astype(np.float32),
           "label_weight": np.zeros((batch, len(cls)), np.float32)}
    for j, t in enumerate(cls):
        d = datasets.index(t.dataset)
        out["label_weight"][d * per:(d + 1) * per, j] = 1.0
    box = [t for t in specs if t.kind == "box"]
    if box:
        d = datasets.index(box[0].dataset)
        boxes = np.zeros((batch, max_boxes, 4), np.float32)
        valid = np.zeros((batch, max_boxes), np.float32)
        for i in range(d * per, (d + 1) * per):
            for k in range(int(rng.integers(1, 4))):
                w, h = rng.uniform(0.1, 0.4, 2) * size
                x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
                boxes[i, k] = (x0, y0, x0 + w, y0 + h)
                valid[i, k] = 1.0
        weight = np.zeros(batch, np.float32)
        weight[d * per:(d + 1) * per] = 1.0
        out.update(boxes=boxes, box_valid=valid, box_weight=weight)
    return out


@dataclasses.dataclass
class Measurement:
    model: str
    size: int
    framework: str
    batch: int
    dtype: str
    step_s: list[float]          # timed steps, seconds each
    compile_s: float | None      # JAX: lower + compile; torch: None (eager)
    warmup_s: float              # all warm-up steps together
    losses: list[float]          # loss of every step run (warm-up included)
    cpu_conv: str = ""           # JAX on CPU: the CPU conv paths in force ("" for torch)
    load_1min: float | None = None  # the machine's 1-minute load average when the run started

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s

    def row(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "median_s": self.median_s,
                "mean_s": statistics.fmean(self.step_s), "images_per_s": self.images_per_s}


def _timed_loop(step: Callable[[], float | None], warmup: int, steps: int,
                sync: Callable[[], None]) -> tuple[float, list[float], list[float]]:
    """Run ``warmup`` + ``steps`` calls of ``step`` (returns a loss or None) with ``sync``
    after each; returns (warm-up seconds, timed seconds per step, losses)."""
    losses: list[float] = []
    t0 = time.perf_counter()
    for _ in range(warmup):
        losses.append(step())
        sync()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    return warm, times, losses


# ----------------------------------------------------------------------------- JAX

def bench_jax(model: BenchModel, size: int, batch: int, *, steps: int, warmup: int,
              dtype: str = "float32", seed: int = 0, cpu_conv: str = "auto") -> Measurement:
    """The trainer's jitted step (donated state, eq. 5 loss, Adam) on a synthetic batch, with
    the CPU conv paths ``cpu_conv`` (a ``COVIDMT_CPU_CONV`` value; "auto": that variable)."""
    from covidmt_jax.models import cpu_conv as cpu_conv_lib
    load = os.getloadavg()[0]
    with cpu_conv_lib.using(cpu_conv) as paths:
        result = _bench_jax(model, size, batch, steps=steps, warmup=warmup, dtype=dtype, seed=seed)
    result.cpu_conv = ",".join(p for p in cpu_conv_lib.PATHS if p in paths) or "off"
    result.load_1min = load
    return result


def compile_jax_step(model: BenchModel, size: int, batch: int, *, dtype: str = "float32",
                     seed: int = 0) -> tuple[Callable[[], float], float]:
    """The trainer's jitted step (donated state) for ``model`` at ``size`` px on a synthetic
    batch already on the device, compiled with the CPU conv switch in force now. Returns
    ``(step, compile_s)``: ``step()`` runs one optimisation step, waits for it and returns
    the loss; its state lives only inside ``step`` (donated each call)."""
    import jax
    from flax import nnx

    from covidmt_jax import config_lib, models, parallel
    from covidmt_jax.tasks import build_tasks
    from covidmt_jax.train import box_anchors, build_optimizer, make_train_step

    cfg = config_lib.base_config()  # the paper's recipe: Adam lr 2e-4, box loss options
    specs = model.task_specs
    if model.multitask:
        net = models.create("covidmt", backbone=model.backbone, tasks=specs, dtype=dtype,
                            rngs=nnx.Rngs(seed))
    else:
        net = models.create(model.backbone, num_classes=len(specs), dtype=dtype, rngs=nnx.Rngs(seed))
    tasks = build_tasks(specs, {k: dict(v) for k, v in cfg.task_options.items()},
                        anchors=box_anchors(net, specs, size))
    tx, _ = build_optimizer(cfg, steps_per_epoch=1000)
    optimizer = nnx.Optimizer(net, tx, wrt=nnx.Param)
    net.train()
    graphdef, state = nnx.split((net, optimizer))
    mesh = parallel.make_mesh(1)
    state_sh, batch_sh = parallel.state_shardings(state, mesh), parallel.data_sharding(mesh)
    state = jax.device_put(state, state_sh)
    host_batch = synthetic_batch(model, size, batch, seed=seed)
    dev_batch = parallel.global_batch(host_batch, batch_sh)
    step_fn = jax.jit(make_train_step(graphdef, tasks), in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, dev_batch).compile()
    compile_s = time.perf_counter() - t0
    del net, optimizer  # the state below is the only live copy (it is donated each step)
    holder = {"state": state}
    del state

    def step() -> float:
        holder["state"], metrics = compiled(holder["state"], dev_batch)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"])

    return step, compile_s


def _bench_jax(model: BenchModel, size: int, batch: int, *, steps: int, warmup: int,
               dtype: str, seed: int) -> Measurement:
    step, compile_s = compile_jax_step(model, size, batch, dtype=dtype, seed=seed)
    warm, times, losses = _timed_loop(step, warmup, steps, sync=lambda: None)
    result = Measurement(model.name, size, "jax", batch, dtype, times, compile_s, warm, losses)
    del step
    gc.collect()
    return result


# ----------------------------------------------------------------------------- PyTorch reference

def torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision"))


def _torch_reference_model(model: BenchModel):
    """torchvision backbone (1-channel conv1) + COVIDMT heads of the same widths, or the
    single-logit classifier. Forward returns ``{"groups": [logits [B, n_g]], "reg": [B, N, 4],
    "obj": [B, N]}`` (COVIDMT) or ``{"groups": [logits [B, 1]]}`` (baseline)."""
    import torch
    import torchvision
    from torch import nn

    datasets = list(dict.fromkeys(t.dataset for t in model.task_specs))
    group_sizes = [sum(t.kind == "classification" and t.dataset == d for t in model.task_specs)
                   for d in datasets]
    has_box = any(t.kind == "box" for t in model.task_specs)

    class Subnet(nn.Module):
        def __init__(self, ch: int, out: int, prior_bias: float = 0.0):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(ch, ch, 3, padding=1) for _ in range(4))
            self.out = nn.Conv2d(ch, 9 * out, 3, padding=1)
            nn.init.constant_(self.out.bias, prior_bias)
            self.k = out

        def forward(self, x):
            for c in self.convs:
                x = torch.relu(c(x))
            x = self.out(x)
            return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.k)

    class Reference(nn.Module):
        def __init__(self):
            super().__init__()
            net = getattr(torchvision.models, model.backbone)(weights=None)
            net.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
            self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
            c5 = net.fc.in_features
            chans = [c5 // 4, c5 // 2, c5]
            if model.multitask:
                self.heads = nn.ModuleList(
                    nn.Sequential(nn.Conv2d(c5, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256),
                                  nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(256, n)) for n in group_sizes if n)
            else:
                self.heads = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                          nn.Linear(c5, group_sizes[0]))])
            self.has_box = has_box
            if has_box:
                self.lateral = nn.ModuleList(nn.Conv2d(c, 256, 1) for c in chans)
                self.smooth = nn.ModuleList(nn.Conv2d(256, 256, 3, padding=1) for _ in chans)
                self.box_subnet = Subnet(256, 4)
                self.obj_subnet = Subnet(256, 1, -math.log(99.0))

        def forward(self, x):
            x = self.stem(x)
            feats = []
            for layer in self.layers:
                x = layer(x)
                feats.append(x)
            out = {"groups": [h(x) for h in self.heads]}
            if self.has_box:
                c3, c4, c5 = feats[1:]
                levels, top = [], None
                for lat, smooth, c in zip(reversed(self.lateral), reversed(self.smooth), (c5, c4, c3)):
                    p = lat(c)
                    if top is not None:
                        p = p + nn.functional.interpolate(top, size=p.shape[-2:], mode="nearest")
                    top = p
                    levels.append(smooth(p))
                levels = levels[::-1]
                out["reg"] = torch.cat([self.box_subnet(p) for p in levels], 1)
                out["obj"] = torch.cat([self.obj_subnet(p) for p in levels], 1)[..., 0]
            return out

    return Reference(), group_sizes


def bench_torch(model: BenchModel, size: int, batch: int, *, steps: int, warmup: int,
                dtype: str = "float32", device: str = "cpu", layout: str = "channels_last",
                seed: int = 0) -> Measurement:
    """The PyTorch reference step (see the module docstring) on the same synthetic batch."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net, group_sizes = _torch_reference_model(model)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    net = net.to(dev, memory_format=fmt).train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    hb = synthetic_batch(model, size, batch, seed=seed)
    x = torch.from_numpy(hb["image"]).permute(0, 3, 1, 2).contiguous().to(dev, memory_format=fmt)
    y = torch.from_numpy(hb["labels"]).to(dev)
    w = torch.from_numpy(hb["label_weight"]).to(dev)
    autocast = dtype == "bfloat16" or dev.type == "cuda"
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast)
    col_of_group, col = [], 0
    for n in group_sizes:
        col_of_group.append((col, col + n))
        col += n
    if model.multitask:  # fixed dense targets: the anchor-matching stand-in
        with torch.no_grad(), torch.autocast(**amp):
            n_anchors = net.eval()(x[:1])["reg"].shape[1]
        net.train()
        g = torch.Generator().manual_seed(seed)
        reg_t = torch.randn(batch, n_anchors, 4, generator=g).to(dev)
        pos = (torch.rand(batch, n_anchors, generator=g) < 0.01).float().to(dev)
        box_w = torch.from_numpy(hb["box_weight"]).to(dev)

    def masked_mean(v, m):
        return (v * m).sum() / m.sum().clamp(min=1.0)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            out = net(x)
        task_losses = []
        for logits, (a, b) in zip(out["groups"], [c for c in col_of_group if c[1] > c[0]]):
            bce = F.binary_cross_entropy_with_logits(logits.float(), y[:, a:b], reduction="none")
            task_losses += [masked_mean(bce[:, j], w[:, a + j]) for j in range(b - a)]
        if model.multitask:
            reg, obj = out["reg"].float(), out["obj"].float()
            n_pos = pos.sum(1).clamp(min=1.0)
            reg_l = (((reg - reg_t) ** 2).sum(-1) * pos).sum(1) / n_pos
            p = torch.sigmoid(obj)
            ce = F.binary_cross_entropy_with_logits(obj, pos, reduction="none")
            p_t = p * pos + (1 - p) * (1 - pos)
            a_t = 0.25 * pos + 0.75 * (1 - pos)
            obj_l = (a_t * ce * (1 - p_t) ** 2).sum(1) / n_pos
            l2 = 1e-4 * sum((c.weight.float() ** 2).sum() for c in
                            [*net.box_subnet.convs, net.box_subnet.out])
            task_losses.append(masked_mean(reg_l, box_w) + masked_mean(obj_l, box_w) + l2)
        loss = sum(task_losses) / len(task_losses)
        loss.backward()
        opt.step()
        return float(loss.detach())

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    warm, times, losses = _timed_loop(step, warmup, steps, sync)
    result = Measurement(model.name, size, "torch", batch, dtype, times, None, warm, losses)
    del net, opt, x
    gc.collect()
    return result


# ----------------------------------------------------------------------------- conv probe

def conv_probe(size: int, batch: int, *, groups: int = 32, width: int = 128, repeats: int = 2,
               with_torch: bool = True) -> list[dict[str, Any]]:
    """Time one 3x3 conv of layer1 (input ``[batch, size/4, size/4, width]``) grouped
    (ResNeXt-50: ``groups``) and dense (``groups=1``): JAX forward, input gradient (dx) and
    weight gradient (dw) each jitted alone, and torch forward / backward (dx + dw).

    Also counts, in the compiled weight-gradient HLO, the convolutions XLA rewrote with
    ``lhs_dilate`` (how XLA expresses a grouped conv's weight gradient). Returns rows
    ``{"groups", "shape", "jax_fwd_ms", "jax_dx_ms", "jax_dw_ms", "torch_fwd_ms",
    "torch_bwd_ms", "dilated_convs_in_dw"}``.
    """
    import jax

    h = max(size // 4, 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, h, h, width), dtype=np.float32)
    cot = rng.standard_normal((batch, h, h, width), dtype=np.float32)

    def best_ms(fn, *a):
        jax.block_until_ready(fn(*a))
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            out.append(1e3 * (time.perf_counter() - t0))
        return min(out)

    rows = []
    for g in (groups, 1):
        w = (0.05 * rng.standard_normal((3, 3, width // g, width))).astype(np.float32)

        def conv(x, w, g=g):
            return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), feature_group_count=g,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

        fwd = jax.jit(conv)
        dx = jax.jit(lambda x, w, c: jax.vjp(lambda x: conv(x, w), x)[1](c)[0])
        dw = jax.jit(lambda x, w, c: jax.vjp(lambda w: conv(x, w), w)[1](c)[0])
        hlo = dw.lower(x, w, cot).compile().as_text()
        row = {"groups": g, "shape": f"[{batch},{h},{h},{width}]", "jax_fwd_ms": best_ms(fwd, x, w),
               "jax_dx_ms": best_ms(dx, x, w, cot), "jax_dw_ms": best_ms(dw, x, w, cot),
               "dilated_convs_in_dw": sum("lhs_dilate" in line and "convolution(" in line
                                          for line in hlo.splitlines())}
        if with_torch and torch_available():
            import torch
            torch.set_num_threads(os.cpu_count() or 1)
            conv_t = torch.nn.Conv2d(width, width, 3, padding=1, groups=g, bias=False).to(
                memory_format=torch.channels_last)
            conv_t.weight.data = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).contiguous(
                memory_format=torch.channels_last)
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(
                memory_format=torch.channels_last).requires_grad_()
            ct = torch.from_numpy(cot.transpose(0, 3, 1, 2).copy()).contiguous(
                memory_format=torch.channels_last)
            f_ms, b_ms = [], []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                out = conv_t(xt)
                t1 = time.perf_counter()
                out.backward(ct)
                t2 = time.perf_counter()
                f_ms.append(1e3 * (t1 - t0))
                b_ms.append(1e3 * (t2 - t1))
            row.update(torch_fwd_ms=min(f_ms[1:]), torch_bwd_ms=min(b_ms[1:]))
        rows.append(row)
    return rows


def format_probe(rows: Sequence[dict[str, Any]]) -> str:
    head = "| conv 3x3 | input | jax fwd ms | jax dx ms | jax dw ms | torch fwd ms | torch dx+dw ms | lhs-dilated convs in dw HLO |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        t = lambda k: f"{r[k]:.1f}" if k in r else "-"
        lines.append(f"| groups={r['groups']} | {r['shape']} | {r['jax_fwd_ms']:.1f} | {r['jax_dx_ms']:.1f} | "
                     f"{r['jax_dw_ms']:.1f} | {t('torch_fwd_ms')} | {t('torch_bwd_ms')} | "
                     f"{r['dilated_convs_in_dw']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- table

def format_table(rows: Sequence[Measurement]) -> str:
    """Fixed-width table; ``jax/torch`` is JAX images/s over the reference's (same model+size)."""
    torch_ips = {(r.model, r.size): r.images_per_s for r in rows if r.framework == "torch"}
    head = ["model", "size", "framework", "cpu conv paths", "dtype", "batch", "images/s", "ms/step",
            "spread ms", "compile s", "jax/torch"]
    lines = []
    for r in rows:
        ratio = ""
        if r.framework == "jax" and (r.model, r.size) in torch_ips:
            ratio = f"{r.images_per_s / torch_ips[(r.model, r.size)]:.2f}"
        lines.append([r.model, str(r.size), r.framework, r.cpu_conv or "-", r.dtype, str(r.batch),
                      f"{r.images_per_s:.2f}", f"{1e3 * r.median_s:.0f}",
                      f"{1e3 * min(r.step_s):.0f}-{1e3 * max(r.step_s):.0f}",
                      "-" if r.compile_s is None else f"{r.compile_s:.1f}", ratio])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(head), sep, *(fmt(l) for l in lines)])


def format_cpu_conv_summary(rows: Sequence[Measurement]) -> str:
    """Per JAX model/size/CPU conv setting: the median over rounds of each run's median step,
    the runs' medians, and the step time relative to the setting with every path on."""
    from covidmt_jax.models.cpu_conv import PATHS
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r.framework == "jax":
            groups.setdefault((r.model, r.size, r.cpu_conv), []).append(r.median_s)
    lines = ["| model | size | cpu conv paths | ms/step (median of runs) | runs' medians ms | step / all on |",
             "|---|---|---|---|---|---|"]
    all_on = ",".join(PATHS)
    for (model, size, conv), meds in groups.items():
        med = statistics.median(meds)
        ref = groups.get((model, size, all_on))
        rel = f"{med / statistics.median(ref):.2f}" if ref else "-"
        lines.append(f"| {model} | {size} | {conv} | {1e3 * med:.0f} | "
                     f"{' '.join(f'{1e3 * m:.0f}' for m in meds)} | {rel} |")
    return "\n".join(lines)


def cpu_conv_settings(text: str) -> list[str]:
    """``--cpu-conv`` -> ``COVIDMT_CPU_CONV`` values: ``;``-separated settings, each ``on``,
    ``off``, ``auto``, a comma-separated list of paths, or ``-path`` (every path but that one)."""
    from covidmt_jax.models.cpu_conv import PATHS, parse_paths
    out = []
    for item in (t.strip() for t in text.split(";")):
        if not item:
            continue
        if item.startswith("-"):
            drop = parse_paths(item[1:], "--cpu-conv")
            item = ",".join(p for p in PATHS if p not in drop) or "off"
        elif item != "auto":
            parse_paths(item, "--cpu-conv")
        out.append(item)
    return out or ["auto"]


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="covidmt_resnext50,resnet50")
    p.add_argument("--sizes", default="224,512", help="comma-separated square image sizes")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--frameworks", default="jax,torch", help="jax, torch or both")
    p.add_argument("--torch-layout", choices=("channels_last", "contiguous"), default="channels_last")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before JAX starts")
    p.add_argument("--json", default="", help="write all measurements to this file")
    p.add_argument("--in-process", action="store_true",
                   help="measure everything in this process (default: one child process per "
                        "model/size/framework, so that one measurement's freed memory, kept by "
                        "the MALLOC settings, cannot push the next one out of RAM)")
    p.add_argument("--cpu-conv", default="auto",
                   help="CPU conv paths of the JAX step (covidmt_jax.models.cpu_conv): ';'-separated "
                        "settings measured in turn, each on, off, auto (COVIDMT_CPU_CONV), a "
                        "comma-separated list of paths, or -path (all but that path; write "
                        "--cpu-conv=-path when the first setting starts with -)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every measurement this many times, interleaved (settings innermost)")
    p.add_argument("--conv-probe", action="store_true",
                   help="also time one grouped (ResNeXt) and one dense 3x3 conv of layer1 at each "
                        "size: forward, input and weight gradient, JAX vs torch")
    args = p.parse_args(argv)
    args.models = [parse_model(m.strip()) for m in args.models.split(",") if m.strip()]
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    bad = set(args.frameworks) - {"jax", "torch"}
    if bad:
        p.error(f"--frameworks: unknown {sorted(bad)} (use jax, torch)")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    try:
        args.cpu_conv = cpu_conv_settings(args.cpu_conv)
    except ValueError as e:
        p.error(str(e))
    if args.device == "gpu":
        args.dtype = "bfloat16"  # GPU mode: bf16 compute for JAX, autocast bf16 for torch
    return args


def _measure_in_child(argv: Sequence[str], model: BenchModel, size: int, framework: str,
                      cpu_conv: str = "auto") -> Measurement:
    """One measurement in a fresh interpreter (same flags, one model/size/framework)."""
    import subprocess
    import tempfile

    keep, skip = [], False
    for a in argv:  # drop the selection and output flags; the child gets its own
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--models", "--sizes", "--frameworks", "--json", "--cpu-conv", "--rounds"):
            skip = "=" not in a
            continue
        if name in ("--conv-probe", "--in-process"):
            continue
        keep.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *keep, "--in-process",
               "--models", model.name, "--sizes", str(size), "--frameworks", framework, "--json", str(out),
               "--cpu-conv", cpu_conv]
        proc = subprocess.run(cmd, env={**os.environ}, text=True, capture_output=True)
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"measurement {model.name} {size} px {framework} failed "
                             f"(exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        (row,) = json.loads(out.read_text())["rows"]
    fields = {f.name for f in dataclasses.fields(Measurement)}
    return Measurement(**{k: v for k, v in row.items() if k in fields})


def main(argv: Sequence[str] | None = None) -> list[Measurement]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    reexec_for_cpu(argv, script=__file__)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    import jax
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu: JAX's default backend is {jax.default_backend()!r}, "
                         "not gpu (install jax[cuda12] or run on the GPU machine)")
    run_torch = "torch" in args.frameworks and torch_available()
    if "torch" in args.frameworks and not run_torch:
        print("torch/torchvision not importable: the PyTorch reference is skipped", flush=True)
    if run_torch:
        import torch
        torch_info = f"torch {torch.__version__} ({torch.get_num_threads()} threads before set)"
    else:
        torch_info = "torch: not run"
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; {torch_info}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    rows: list[Measurement] = []
    runs = [(size, m, fw, conv) for _ in range(args.rounds) for size in args.sizes for m in args.models
            for fw in ("jax", "torch")
            if fw in args.frameworks and (fw == "jax" or (run_torch and m.backbone not in JAX_ONLY))
            for conv in (args.cpu_conv if fw == "jax" else ["auto"])]
    for size, m, fw, conv in runs:
        if not args.in_process and len(runs) > 1:
            rows.append(_measure_in_child(argv, m, size, fw, conv))
        elif fw == "jax":
            rows.append(bench_jax(m, size, args.batch, steps=args.steps, warmup=args.warmup,
                                  dtype=args.dtype, cpu_conv=conv))
        else:
            rows.append(bench_torch(m, size, args.batch, steps=args.steps, warmup=args.warmup,
                                    dtype=args.dtype, device=args.device, layout=args.torch_layout))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    probes = {}
    if args.conv_probe:
        for size in args.sizes:
            probes[size] = conv_probe(size, args.batch, with_torch=run_torch)
            print(f"\nconv probe at {size} px (layer1, batch {args.batch}):\n" + format_probe(probes[size]),
                  flush=True)
    print()
    print(format_table(rows))
    if args.rounds > 1 or len(args.cpu_conv) > 1:
        print()
        print(format_cpu_conv_summary(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"argv": argv, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "load_avg_end": os.getloadavg(), "rows": [r.row() for r in rows],
             "cpu_conv_summary": format_cpu_conv_summary(rows),
             "conv_probe": probes}, indent=2))
    return rows


if __name__ == "__main__":
    main()
