r"""Model loading time: a zoo model built and filled from a weight file, in a fresh process,
covidmt_jax's two ways and torchvision's, in one run.

What is measured, per ``--models`` (torchvision names; default resnet50, resnext50_32x4d,
densenet121). The script first writes one torchvision-layout ``.safetensors`` file per model
(torchvision's random init, ``num_classes=1``; loading time does not depend on the values).
Then each row runs in its own child process, so that no compiled program or cache of an
earlier row helps it, with JAX's persistent compilation cache off:

- ``jax create+load``: ``models.create(name)`` (random initialisers compiled and run), then
  ``weights.load_torch_weights(model, file)``: what every loader did before
  ``create_unfilled``, and what a training run that starts from ImageNet weights still does
  (its new head needs an initialiser).
- ``jax unfilled+load``: ``models.create_unfilled(name)`` (shapes only), the same
  ``load_torch_weights``, ``models.check_filled``: what ``export.load_model``, the scoring
  job's ``kind="torch"`` classifiers and ``xrv.load`` do.
- ``torch``: ``torchvision.models.<name>(num_classes=1)`` then
  ``load_state_dict(safetensors.torch.load_file(file))`` (when torch and torchvision are
  importable; ``--frameworks jax`` skips it), ``torch.set_num_threads(os.cpu_count())``.

Each child times build + load until every tensor is on the device (JAX:
``block_until_ready``); the import of the framework is outside the timing. Reported: the
median and range over ``--rounds`` fresh processes per row.

    python benchmarks/model_load.py --models resnet50,resnext50_32x4d,densenet121 --rounds 3

On the CPU the script re-executes itself once with covidmt_jax/cpu_malloc.py's ``MALLOC_*``
values. Other processes on the same cores distort the figures; check ``uptime`` first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from covidmt_jax.cpu_malloc import reexec_for_cpu  # noqa: E402  (glibc settings; see that module)

#: how each row builds and fills its model (the child's ``--method``)
METHODS = ("jax create+load", "jax unfilled+load", "torch")


def write_weights(name: str, directory: Path) -> Path:
    """torchvision's ``name`` (random init, one output) as a ``.safetensors`` state dict."""
    import torch
    import torchvision
    from safetensors.torch import save_file
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(num_classes=1)
    path = directory / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def load_once(method: str, name: str, path: Path) -> float:
    """Seconds to build ``name`` and fill it from ``path`` by ``method`` (in this process)."""
    if method == "torch":
        import torch
        import torchvision
        from safetensors.torch import load_file
        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        net = getattr(torchvision.models, name)(num_classes=1)
        net.load_state_dict(load_file(str(path)))
        return time.perf_counter() - t0
    import jax
    from flax import nnx
    from covidmt_jax import models
    from covidmt_jax.weights import load_torch_weights
    jax.config.update("jax_compilation_cache_dir", None)
    t0 = time.perf_counter()
    if method == "jax create+load":
        model = models.create(name, num_classes=1, in_channels=3)
    elif method == "jax unfilled+load":
        model = models.create_unfilled(name, num_classes=1, in_channels=3)
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    load_torch_weights(model, path)
    models.check_filled(model, str(path))
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return time.perf_counter() - t0


def measure(method: str, name: str, path: Path) -> float:
    """:func:`load_once` in a fresh child process (no compilation cache)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run([sys.executable, __file__, "--child", method, name, str(path)],
                         capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"{method} {name}: child failed\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def run(names: Sequence[str], methods: Sequence[str], rounds: int, directory: Path) -> list[dict]:
    """Rows ``{model, method, median_s, min_s, max_s, rounds}``; rounds interleave the methods."""
    files = {n: write_weights(n, directory) for n in names}
    times: dict[tuple[str, str], list[float]] = {(n, m): [] for n in names for m in methods}
    for _ in range(rounds):
        for n in names:
            for m in methods:
                times[n, m].append(measure(m, n, files[n]))
    return [{"model": n, "method": m, "median_s": statistics.median(t), "min_s": min(t),
             "max_s": max(t), "rounds": len(t)} for (n, m), t in times.items()]


def format_table(rows: list[dict]) -> str:
    """A markdown table; ``vs torch``: this row's median over the torch row's of its model."""
    torch_s = {r["model"]: r["median_s"] for r in rows if r["method"] == "torch"}
    lines = ["| model | method | median s | range s | vs torch |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['median_s'] / torch_s[r['model']]:.1f}x" if r["model"] in torch_s else "-"
        lines.append(f"| {r['model']} | {r['method']} | {r['median_s']:.2f} | "
                     f"{r['min_s']:.2f}-{r['max_s']:.2f} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet50,resnext50_32x4d,densenet121",
                   help="comma-separated torchvision names that the zoo also has")
    p.add_argument("--frameworks", default="jax,torch", help="jax, torch or both")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per row")
    p.add_argument("--json", default="", help="write the rows here")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    frameworks = {f for f in args.frameworks.split(",") if f}
    if not frameworks <= {"jax", "torch"} or not frameworks:
        p.error(f"--frameworks: jax, torch or both, got {args.frameworks!r}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.methods = [m for m in METHODS if m.split()[0] in frameworks]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        _, method, name, path = argv
        print(json.dumps({"seconds": load_once(method, name, Path(path))}))
        return
    reexec_for_cpu(argv, script=__file__)
    args = parse_args(argv)
    if not torch_available():
        sys.exit("model_load.py writes its weight files with torchvision: pip install '.[torch]'")
    from covidmt_jax import models
    unknown = [m for m in args.models if m not in models.available()]
    if unknown:
        sys.exit(f"--models: {unknown} are not zoo models; zoo: {', '.join(models.available())}")
    with tempfile.TemporaryDirectory() as d:
        rows = run(args.models, args.methods, args.rounds, Path(d))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
