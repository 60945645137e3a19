r"""Grad-CAM throughput (maps/s): ``covidmt_jax.explain.gradcam`` as users call it, the
``make_cam_fn`` closure, and pytorch-grad-cam on torchvision, in one run.

What is measured, per ``--sizes`` (default 512 px) and ``--batch`` images (default 4) of a
randomly initialised ``--backbone`` (default ResNet-50; 3-channel input, one output, speed
does not depend on the weights):

- ``explain.gradcam``: ``explain.gradcam(model, images)`` on a host (numpy) batch, the public
  call: it splits the model and runs the compiled program it caches per model graph, layer,
  method and input shape (the first call compiles; the timed calls reuse it).
- ``explain.make_cam_fn``: ``cam_fn = make_cam_fn(model)`` once, then ``cam_fn(images)``.
- ``pytorch-grad-cam``: ``GradCAM(model, [model.layer4[-1]])(input_tensor=x, targets=None)``
  on torchvision's model (when torch, torchvision and pytorch-grad-cam are importable;
  ``--frameworks jax`` skips it); ``torch.set_num_threads(os.cpu_count())``.

Each timed call ends with the maps on the host (``np.asarray``), as a user reads them.
Reported: maps/s = batch / median call time, ms per call (median; min-max), first-call
seconds (compilation for JAX). ``--json PATH`` writes every measurement.

    python benchmarks/gradcam_throughput.py --sizes 512 --batch 4 --steps 5 --warmup 1

On the CPU the script re-executes itself once with covidmt_jax/cpu_malloc.py's ``MALLOC_*``
values. Other processes on the same cores distort the figures; check ``uptime`` first.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
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


def _timed(call: Callable[[], Any], warmup: int, steps: int) -> tuple[float, list[float]]:
    """(first-call seconds, timed seconds per call) of ``warmup`` + ``steps`` calls."""
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        call()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return first, times


def bench_jax(size: int, batch: int, *, backbone: str, steps: int, warmup: int) -> list[dict[str, Any]]:
    from covidmt_jax import explain, models
    model = models.create(backbone, num_classes=1, in_channels=3, rngs=0)
    model.eval()
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3), np.float32)
    cam_fn = explain.make_cam_fn(model)
    rows = []
    for name, call in (("explain.gradcam", lambda: np.asarray(explain.gradcam(model, x))),
                       ("explain.make_cam_fn", lambda: np.asarray(cam_fn(x)))):
        first, times = _timed(call, warmup, steps)
        rows.append({"method": name, "size": size, "batch": batch, "first_s": first, "call_s": times})
    return rows


def torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision", "pytorch_grad_cam"))


def bench_torch(size: int, batch: int, *, backbone: str, steps: int, warmup: int) -> dict[str, Any]:
    import torch
    import torchvision
    from pytorch_grad_cam import GradCAM
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, backbone)(num_classes=1).eval()
    cam = GradCAM(model=model, target_layers=[model.layer4[-1]])
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, size, size), np.float32))
    first, times = _timed(lambda: cam(input_tensor=x, targets=None), warmup, steps)
    return {"method": "pytorch-grad-cam", "size": size, "batch": batch, "first_s": first,
            "call_s": times, "torch": torch.__version__, "threads": torch.get_num_threads()}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["method", "size", "batch", "maps/s", "ms/call", "spread ms", "first call s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        med = statistics.median(r["call_s"])
        lines.append(f"| {r['method']} | {r['size']} | {r['batch']} | {r['batch'] / med:.2f} | "
                     f"{med * 1e3:.0f} | {min(r['call_s']) * 1e3:.0f}-{max(r['call_s']) * 1e3:.0f} | "
                     f"{r['first_s']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512", help="comma-separated input sizes (px)")
    p.add_argument("--batch", type=int, default=4, help="images per call")
    p.add_argument("--steps", type=int, default=5, help="timed calls")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls, the first included")
    p.add_argument("--backbone", default="resnet50", choices=("resnet18", "resnet34", "resnet50", "resnet101"))
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    try:
        a.sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes {a.sizes!r}: expected comma-separated integers")
    if a.steps < 1 or a.warmup < 1 or a.batch < 1 or not a.sizes:
        p.error("--steps, --warmup and --batch must be >= 1 and --sizes non-empty")
    return a


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    reexec_for_cpu(argv, script=__file__)
    import jax
    run_torch = "torch" in args.frameworks and torch_available()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}; backbone {args.backbone}; pytorch-grad-cam: "
          f"{'yes' if run_torch else 'not run'}", flush=True)
    rows: list[dict[str, Any]] = []
    kw = dict(backbone=args.backbone, steps=args.steps, warmup=args.warmup)
    for size in args.sizes:
        if "jax" in args.frameworks:
            rows += bench_jax(size, args.batch, **kw)
        if run_torch:
            rows.append(bench_torch(size, args.batch, **kw))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
