r"""Paired A/B timing of two versions of the JAX train step, compiled in ONE process.

Why: on a shared 2-core machine the step time of the same program moves by 5-15 % between
processes (CPU frequency, page placement, neighbours), which is as large as the effects one
wants to measure (a kernel change, a path of the CPU conv switch). Here both arms are compiled
in the same process and timed alternately (ABBA, BAAB, ... so neither arm always runs first),
``--rounds`` times; each round gives one paired ratio B/A of the two arms' step times (each
arm's upper median of its ``2 * steps`` timings in the round, i.e. the slower of two at ``--steps 1``). Reported:
each arm's median ms/step and range over rounds, the median paired ratio with a distribution-
free 95 % interval (sign-test order statistics, scipy's binomial distribution) and the
two-sided Wilcoxon signed-rank p-value of the log ratios (scipy). A ratio interval that
contains 1 means no measurable difference.

Arms (``--a``, ``--b``):

- a ``COVIDMT_CPU_CONV`` setting of :mod:`covidmt_jax.models.cpu_conv`: ``on``, ``off``, a
  comma-separated list of paths, or ``-path`` (every path but that one);
- ``vjp`` — every path on, with the kernels' differentiation rule written as a
  ``jax.custom_vjp`` (backward = JAX's transpose of the same tangent maps) instead of the
  ``jax.custom_jvp`` the package uses (which JAX linearises and transposes itself, and which
  also gives forward mode). Earlier versions used such a ``custom_vjp``; this arm measures
  what the ``custom_jvp`` formulation costs or saves in a whole train step.

Example (the comparison in benchmarks/README.md)::

    python benchmarks/paired_ab.py --model covidmt_resnext50 --size 224 --batch 12 \
        --a on --b vjp --rounds 12 --steps 1

glibc's malloc settings (covidmt_jax/cpu_malloc.py) are applied by re-executing once, as in
train_throughput.py. Machine noise still widens the interval; check ``uptime`` first.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import train_throughput as tt  # noqa: E402  (benchmarks/ is not a package)

def custom_vjp_conv() -> Callable:
    """The CPU conv kernels of :mod:`covidmt_jax.models.cpu_conv` with a ``jax.custom_vjp``
    instead of its ``jax.custom_jvp``: the same forward, and a backward that is JAX's
    transpose of the same tangent maps (``_input_tangent``, ``_weight_tangent`` or XLA's conv),
    i.e. the same kernels with the differentiation rule written the other way round (no
    forward mode). Signature of ``cpu_conv._cpu_conv``."""
    from functools import partial

    import jax

    from covidmt_jax.models import cpu_conv as cc

    @partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
    def conv(x, w, strides, padding, groups, paths):
        return cc._forward(x, w, strides, padding, groups, paths)

    def fwd(x, w, strides, padding, groups, paths):
        return cc._forward(x, w, strides, padding, groups, paths), (x, w)

    def bwd(strides, padding, groups, paths, res, dy):
        x, w = res
        (dx,) = jax.linear_transpose(lambda tx: cc._input_tangent(tx, w, strides, padding, groups, paths), x)(dy)
        if "weight_grad" in paths and cc._takes_weight_grad_path(x.shape, w.shape, strides, padding, groups):
            weight_tangent = lambda tw: cc._weight_tangent(x, tw, strides, padding, groups).astype(dy.dtype)  # noqa: E731
        else:
            weight_tangent = lambda tw: cc._xla_conv(x, tw, strides, padding, groups)  # noqa: E731
        (dw,) = jax.linear_transpose(weight_tangent, w)(dy)
        return dx, dw

    conv.defvjp(fwd, bwd)
    return conv


@contextlib.contextmanager
def arm_context(arm: str):
    """Trace-time setting of one arm: a ``COVIDMT_CPU_CONV`` setting, or ``vjp`` (every path
    on, :func:`custom_vjp_conv` in place of the ``custom_jvp``)."""
    from covidmt_jax.models import cpu_conv
    if arm == "vjp":
        saved = cpu_conv._cpu_conv
        cpu_conv._cpu_conv = custom_vjp_conv()
        try:
            with cpu_conv.using("on"):
                yield
        finally:
            cpu_conv._cpu_conv = saved
    else:
        with cpu_conv.using(tt.cpu_conv_settings(arm)[0]):
            yield


def sign_test_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median: order statistics ``x_(k), x_(n+1-k)`` with
    the largest ``k`` such that ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2``; ``(nan, nan)``
    when ``n`` is too small for that level (n < 6 at 95 %)."""
    from scipy.stats import binom
    x = sorted(values)
    n = len(x)
    k = 0
    while k + 1 <= n and binom.cdf(k, n, 0.5) <= (1 - level) / 2:
        k += 1
    if k == 0:
        return math.nan, math.nan
    return x[k - 1], x[n - k]


def paired_summary(a_ms: Sequence[float], b_ms: Sequence[float]) -> dict[str, Any]:
    """Paired statistics of per-round step times (ms) of arms A and B."""
    import numpy as np
    from scipy.stats import wilcoxon
    if len(a_ms) != len(b_ms) or not a_ms:
        raise ValueError("paired_summary needs the same, non-zero number of rounds per arm")
    ratios = [b / a for a, b in zip(a_ms, b_ms)]
    lo, hi = sign_test_interval(ratios)
    logs = np.log(ratios)
    p = float(wilcoxon(logs).pvalue) if len(ratios) >= 6 and np.any(logs != 0) else math.nan
    return {"rounds": len(ratios), "ratios": ratios, "median_ratio": float(np.median(ratios)),
            "ratio_ci95": [lo, hi], "wilcoxon_p": p,
            "a_median_ms": float(np.median(a_ms)), "b_median_ms": float(np.median(b_ms))}


def run(model: str, size: int, batch: int, arms: tuple[str, str], *, rounds: int, steps: int,
        warmup: int, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compile both arms in this process, then time them alternately for ``rounds`` rounds
    (``steps`` steps per arm per round, after ``warmup`` untimed steps per arm)."""
    bench_model = tt.parse_model(model)
    steps_by_arm: dict[str, Callable[[], float]] = {}
    compile_s: dict[str, float] = {}
    for arm in arms:
        with arm_context(arm):
            steps_by_arm[arm], compile_s[arm] = tt.compile_jax_step(bench_model, size, batch, seed=seed)
        for _ in range(warmup):
            steps_by_arm[arm]()
        log(f"{arm}: compiled in {compile_s[arm]:.1f} s")
    per_round: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(rounds):
        order = arms if r % 2 == 0 else arms[::-1]
        order = order + order[::-1]  # ABBA / BAAB: each arm once early and once late
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for arm in order:
            for _ in range(steps):
                t0 = time.perf_counter()
                steps_by_arm[arm]()
                times[arm].append(time.perf_counter() - t0)
        for arm in arms:  # the upper median of the arm's 2 * steps timings (steps=1: the slower of two)
            per_round[arm].append(1000 * sorted(times[arm])[len(times[arm]) // 2])
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{arm} {per_round[arm][-1]:.0f} ms" for arm in arms))
    summary = paired_summary(per_round[arms[0]], per_round[arms[1]])
    return {"model": model, "size": size, "batch": batch, "arms": list(arms), "compile_s": compile_s,
            "per_round_ms": per_round, "steps_per_round": 2 * steps, **summary}


def format_result(res: dict[str, Any]) -> str:
    a, b = res["arms"]
    rows = [f"{res['model']} {res['size']} px, batch {res['batch']}: {res['rounds']} rounds, "
            f"per round, each arm's upper median of its {res['steps_per_round']} timed steps", "",
            "| arm | median ms/step | range over rounds | compile s |", "|---|---|---|---|"]
    for arm, median in ((a, res["a_median_ms"]), (b, res["b_median_ms"])):
        ms = res["per_round_ms"][arm]
        rows.append(f"| {arm} | {median:.0f} | {min(ms):.0f}-{max(ms):.0f} | "
                    f"{res['compile_s'][arm]:.1f} |")
    lo, hi = res["ratio_ci95"]
    rows += ["", f"paired ratio {b} / {a}: median {res['median_ratio']:.3f}, 95 % interval "
             f"[{lo:.3f}, {hi:.3f}] (sign test), Wilcoxon p = {res['wilcoxon_p']:.3g}"]
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="covidmt_resnext50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--a", default="on", help="arm A (the reference of the ratio)")
    p.add_argument("--b", default="off", help="arm B")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=1, help="timed steps per arm per half-round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--rounds and --steps must be >= 1, --warmup >= 0")
    if args.a == args.b:
        p.error("--a and --b are the same arm")
    for arm in (args.a, args.b):
        if arm != "vjp":
            try:
                tt.cpu_conv_settings(arm)
            except ValueError as e:
                p.error(str(e))
    tt.parse_model(args.model)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    tt.reexec_for_cpu(argv, script=__file__)
    import jax
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    res = run(args.model, args.size, args.batch, (args.a, args.b), rounds=args.rounds, steps=args.steps,
              warmup=args.warmup, log=lambda m: print(m, flush=True))
    res["load_avg_end"] = os.getloadavg()
    print()
    print(format_result(res))
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv, "jax": jax.__version__, **res}, indent=2))
    return res


if __name__ == "__main__":
    main()
