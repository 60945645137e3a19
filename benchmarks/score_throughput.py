r"""Scoring throughput (pairs/s) of covidmt_jax's fused scoring step, next to a PyTorch reference,
and the scoring job's peak memory at two pair counts.

Throughput (``--sizes``, default 512 px): one batch of ``--batch`` (original, transmitted) pairs
of random normalised grey images that are already in host memory (decoding is not timed), per
step:

- JAX: :class:`covidmt_jax.scoring.step.Scorer` exactly as the job calls it — host -> device, the ONE
  jitted step (ResNet-50 features -> COVID logit -> sigmoid -> Grad-CAM of the predicted
  decision -> U-Net lung probabilities -> IOL, originals and transmitted images together as
  ``[2B, S, S, 1]``), device -> host of the per-image scalars.
- PyTorch reference (when torch, torchvision and pytorch-grad-cam are importable): torchvision
  ResNet-50 (1 output, 3-channel input = the grey image replicated) with pytorch-grad-cam's
  ``GradCAM`` on ``layer4[-1]`` (``targets=None``; its forward + full backward), the same U-Net
  as ours written in torch (same depth, widths, BatchNorm, transposed convs) under
  ``torch.no_grad``, and numpy IOL (``metrics.iol``). Both on ``2B`` images per step;
  torch CPU threads: ``--torch-threads`` (default: the faster of 1 and all CPUs, probed on one
  forward; the table shows the count used).

Both models are randomly initialised (speed does not depend on the weights). Reported: pairs/s
= batch / median step time, ms per step (median; min-max), JAX compile seconds.

Memory (``--memory-pairs 100,1000``): the whole job (:func:`covidmt_jax.scoring.job.score_pairs`:
synthetic pairs through the WhatsApp preset, decoding threads, the fused step, CSV rows,
summary, report, gallery) in a fresh subprocess per pair count, at ``--memory-size`` px with
``--memory-backbone``; peak RSS from ``getrusage(RUSAGE_SELF).ru_maxrss``. Flat memory means
the two peaks are about equal.

Launch (on the CPU the script re-executes itself once with covidmt_jax/cpu_malloc.py's ``MALLOC_*`` values)::

    python benchmarks/score_throughput.py --sizes 512 --batch 4 --steps 3 \
        --memory-pairs 100,1000 --memory-size 128
    python benchmarks/score_throughput.py --device gpu --sizes 512 --batch 32   # accelerator

``--device gpu``: JAX on its GPU backend, torch on cuda (float32 both; JAX's default matmul
precision). ``--json PATH`` writes every measurement.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from covidmt_jax.cpu_malloc import reexec_for_cpu  # noqa: E402  (glibc settings; see that module)


def _train_bench():
    """benchmarks/train_throughput.py as a module (shared MALLOC values and timing loop)."""
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "benchmarks" / "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_throughput", mod)
    spec.loader.exec_module(mod)
    return sys.modules["train_throughput"]


_TT = _train_bench()
_timed_loop = _TT._timed_loop


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- JAX
def jax_models(backbone: str, size: int, unet_width: int, unet_depth: int, seed: int = 0):
    """``({"model": (classifier, Head)}, LungSegmenter)`` with random weights."""
    from covidmt_jax import models
    from covidmt_jax.lungs import LungSegmenter
    from covidmt_jax.scoring.loading import Head
    clf = models.create(backbone, num_classes=1, in_channels=1, rngs=seed)
    unet = models.create("unet", num_classes=1, in_channels=1, depth=unet_depth,
                         base_width=unet_width, rngs=seed + 1)
    return {"model": (clf, Head(0, "sigmoid", 0.5, 1))}, LungSegmenter(unet, size)


def bench_jax(size: int, batch: int, *, steps: int, warmup: int, backbone: str, unet_width: int,
              unet_depth: int) -> dict[str, Any]:
    import jax
    from covidmt_jax.scoring.step import Scorer
    classifiers, lungs = jax_models(backbone, size, unet_width, unet_depth)
    scorer = Scorer(classifiers, lungs, size, batch)
    rng = np.random.default_rng(0)
    xo = rng.standard_normal((batch, size, size, 1), np.float32)
    xt = xo + 0.05 * rng.standard_normal(xo.shape, np.float32)
    t0 = time.perf_counter()
    scorer(xo, xt)  # compile + first run
    compile_s = time.perf_counter() - t0
    warm, times, _ = _timed_loop(lambda: scorer(xo, xt) and None, warmup, steps, sync=lambda: None)
    return {"framework": "jax", "size": size, "batch": batch, "step_s": times, "compile_s": compile_s,
            "device": jax.devices()[0].device_kind}


# ----------------------------------------------------------------------------- PyTorch reference
def torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision", "pytorch_grad_cam"))


def torch_unet(depth: int, width: int):
    """Our U-Net (covidmt_jax/models/unet.py) in torch: same convs, BN, pools, transposed convs."""
    import torch
    from torch import nn

    def double(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                             nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            w = [width * 2 ** i for i in range(depth + 1)]
            self.down = nn.ModuleList([double(1 if i == 0 else w[i - 1], w[i]) for i in range(depth)])
            self.bottleneck = double(w[depth - 1], w[depth])
            self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(depth))])
            self.dec = nn.ModuleList([double(2 * w[i], w[i]) for i in reversed(range(depth))])
            self.head = nn.Conv2d(w[0], 1, 1)

        def forward(self, x):
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = torch.nn.functional.max_pool2d(x, 2)
            x = self.bottleneck(x)
            for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
                x = dec(torch.cat([up(x), skip], dim=1))
            return self.head(x)

    return UNet()


def _pick_threads(torch, model, x, threads: int) -> int:
    """``threads``, or (0 = auto) the faster of 1 and all CPUs for one forward of ``model``:
    on a shared, oversubscribed CPU OpenMP's spinning threads can make the multi-threaded run
    many times slower than one thread, which would flatter the JAX column."""
    if threads > 0:
        return threads
    best, best_t = 1, float("inf")
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        with torch.no_grad():
            model(x)
            t0 = time.perf_counter()
            model(x)
            dt = time.perf_counter() - t0
        if dt < best_t:
            best, best_t = n, dt
    return best


def bench_torch(size: int, batch: int, *, steps: int, warmup: int, backbone: str, unet_width: int,
                unet_depth: int, device: str, threads: int = 0) -> dict[str, Any]:
    import torch
    import torchvision
    from pytorch_grad_cam import GradCAM
    from covidmt_jax import metrics
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    torch.manual_seed(0)
    clf = getattr(torchvision.models, backbone)(num_classes=1).eval().to(dev)
    unet = torch_unet(unet_depth, unet_width).eval().to(dev)
    cam = GradCAM(model=clf, target_layers=[clf.layer4[-1]])
    rng = np.random.default_rng(0)
    xo = rng.standard_normal((batch, 1, size, size), np.float32)
    xt = xo + 0.05 * rng.standard_normal(xo.shape, np.float32)
    x = torch.from_numpy(np.concatenate([xo, xt])).to(dev)
    if dev.type == "cpu":
        torch.set_num_threads(_pick_threads(torch, clf, x.expand(-1, 3, -1, -1), threads))

    def step():
        cams = cam(input_tensor=x.expand(-1, 3, -1, -1), targets=None)        # [2B, S, S] numpy
        probs = torch.sigmoid(cam.outputs[:, 0]).detach().cpu().numpy()
        with torch.no_grad():
            lung = torch.sigmoid(unet(x))[:, 0].cpu().numpy()
        iol = metrics.iol(cams, lung >= 0.5)
        return float(probs.mean() + np.nanmean(iol) if np.isfinite(iol).any() else probs.mean())

    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    warm, times, _ = _timed_loop(step, warmup, steps, sync=sync)
    kind = torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"framework": "torch", "size": size, "batch": batch, "step_s": times, "compile_s": None,
            "device": kind, "torch": torch.__version__}


# ----------------------------------------------------------------------------- memory (whole job)
def memory_job(n_pairs: int, size: int, backbone: str, unet_width: int, unet_depth: int,
               batch: int, workdir: str) -> dict[str, Any]:
    """One scoring job on ``n_pairs`` synthetic pairs (this process); peak RSS in MB."""
    import logging
    from covidmt_jax.scoring import config, job
    logging.basicConfig(level=logging.WARNING)
    cfg = config.base_config()
    cfg.classifiers = {"model": config.classifier_entry("export", "(in memory)")}
    cfg.lungs = "(in memory)"
    cfg.pairs.source = "synthetic_pairs"
    cfg.pairs.kwargs = {"n": n_pairs, "size": size, "channel": "whatsapp"}
    cfg.image_size = size
    cfg.batch_size = batch
    cfg.num_workers = 2
    cfg.gallery.flipped = 4
    cfg.gallery.random = 4
    cfg.progress = False
    loaded = jax_models(backbone, size, unet_width, unet_depth)
    sampler = _RssSampler()
    t0 = time.perf_counter()
    with sampler:
        summary = job.score_pairs(cfg, workdir, models=loaded)
    wall = time.perf_counter() - t0
    return {"pairs": n_pairs, "size": size, "backbone": backbone, "rss_job_start_mb": sampler.start_mb,
            "rss_job_peak_mb": sampler.peak_mb, "rss_job_end_mb": sampler.end_mb,
            # ru_maxrss is inherited through fork + exec (the parent's torch run), so it is kept
            # for reference only; the sampled job peak is the figure that matters
            "process_peak_rss_mb": _peak_rss_mb(), "wall_s": wall,
            "job_pairs_per_s": summary["job"]["pairs_per_s"]}


class _RssSampler:
    """Current RSS sampled every 20 ms in a thread while the job runs (start, peak, end in MB);
    the process's lifetime peak (``ru_maxrss``) would include model initialisation."""

    def __enter__(self):
        import threading
        import psutil
        self._proc = psutil.Process()
        self.start_mb = self.peak_mb = self._proc.memory_info().rss / 2 ** 20
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(0.02):
                self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2 ** 20)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.end_mb = self._proc.memory_info().rss / 2 ** 20
        self.peak_mb = max(self.peak_mb, self.end_mb)


def run_memory(counts: Sequence[int], args) -> list[dict[str, Any]]:
    out = []
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-job", str(n),
                   "--memory-size", str(args.memory_size), "--memory-backbone", args.memory_backbone,
                   "--unet-width", str(args.unet_width), "--unet-depth", str(args.unet_depth),
                   "--batch", str(args.memory_batch), "--_workdir", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            if res.returncode != 0:
                raise RuntimeError(f"memory job for {n} pairs failed:\n{res.stderr[-3000:]}")
            out.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"memory: {n} pairs at {args.memory_size} px: job peak RSS {out[-1]['rss_job_peak_mb']:.0f} MB, "
                  f"{out[-1]['job_pairs_per_s']:.2f} pairs/s end-to-end", flush=True)
    return out


# ----------------------------------------------------------------------------- CLI
def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| framework | device | size | batch | pairs/s | ms/step (median) | min-max ms | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = statistics.median(r["step_s"])
        lines.append(f"| {r['framework']} | {r['device']} | {r['size']} | {r['batch']} | "
                     f"{r['batch'] / med:.3f} | {1000 * med:.0f} | {1000 * min(r['step_s']):.0f}-"
                     f"{1000 * max(r['step_s']):.0f} | "
                     f"{'' if r['compile_s'] is None else format(r['compile_s'], '.1f')} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="512", help="comma-separated input sizes (px)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--unet-width", type=int, default=16, help="U-Net base width (configs/unet_lungs.py: 16)")
    p.add_argument("--unet-depth", type=int, default=4)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch CPU threads (0 = the faster of 1 and all CPUs, probed)")
    p.add_argument("--memory-pairs", default="", help="e.g. 100,1000: whole-job peak RSS per count")
    p.add_argument("--memory-size", type=int, default=128)
    p.add_argument("--memory-backbone", default="resnet18")
    p.add_argument("--memory-batch", type=int, default=16)
    p.add_argument("--json", default="")
    p.add_argument("--_memory-job", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_workdir", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.sizes = [int(s) for s in a.sizes.split(",") if s]
    a.frameworks = [f for f in a.frameworks.split(",") if f]
    a.memory_counts = [int(s) for s in a.memory_pairs.split(",") if s]
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    reexec_for_cpu(argv, script=__file__)
    if args._memory_job:
        res = memory_job(args._memory_job, args.memory_size, args.memory_backbone, args.unet_width,
                         args.unet_depth, args.memory_batch, args._workdir)
        print(json.dumps(res))
        return res
    import jax
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu: JAX's default backend is {jax.default_backend()!r}")
    run_torch = "torch" in args.frameworks and torch_available()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; torch reference: "
          f"{'yes' if run_torch else 'not run'}; backbone {args.backbone}, U-Net depth "
          f"{args.unet_depth} width {args.unet_width}", flush=True)
    rows = []
    kw = dict(steps=args.steps, warmup=args.warmup, backbone=args.backbone,
              unet_width=args.unet_width, unet_depth=args.unet_depth)
    for size in args.sizes:
        if "jax" in args.frameworks:
            rows.append(bench_jax(size, args.batch, **kw))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        if run_torch:
            rows.append(bench_torch(size, args.batch, device=args.device, threads=args.torch_threads, **kw))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    memory = run_memory(args.memory_counts, args) if args.memory_counts else []
    print()
    print(format_table(rows))
    if memory:
        print()
        print("| pairs | size | backbone | RSS at job start MB | job peak RSS MB | RSS at end MB | "
              "job pairs/s |")
        print("|---|---|---|---|---|---|---|")
        for m in memory:
            print(f"| {m['pairs']} | {m['size']} | {m['backbone']} | {m['rss_job_start_mb']:.0f} | "
                  f"{m['rss_job_peak_mb']:.0f} | {m['rss_job_end_mb']:.0f} | "
                  f"{m['job_pairs_per_s']:.2f} |")
    result = {"argv": argv, "rows": rows, "memory": memory, "load_avg_end": os.getloadavg()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
