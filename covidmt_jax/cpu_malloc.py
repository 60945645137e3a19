"""glibc malloc settings for XLA:CPU runs, applied by re-executing the command once.

An XLA:CPU executable allocates its temporaries (all activations of a training step: 9.8 GB
for ResNet-50 at 512 px, batch 12) as fresh buffers on every call. With glibc's defaults such
large buffers are new ``mmap`` regions, so every step page-faults its whole working set
again: measured on this project's 2-core CPU, ResNet-50 at 512 px spent 2.5 million minor
faults and 8-9 s of kernel time per 12 s step. The settings below keep every thread on the
main heap (``MALLOC_ARENA_MAX=1``: XLA's worker threads would otherwise get arenas that
``mmap`` large blocks), serve even multi-GB blocks from that heap (mmap threshold 1 TB) and
never give freed memory back (trim threshold 2 TB), so from the second step on a step
touches no new page: ResNet-50 at 512 px 12.4 s -> 7.5 s per step, 0 faults
(benchmarks/README.md). The price: a process keeps its peak memory until it exits, and
one that runs several different programs holds more (the demo, two trainings and a scoring
run in one process at 128 px, peaked at 8.3 GB instead of 3.5 and took about as long, so it
does not re-execute).

The train and score CLIs and the benchmarks call it. glibc reads these variables only at
process start, so :func:`reexec_for_cpu` re-runs the interpreter with them set (once: it
marks the environment with :data:`REEXECUTED_MARK`). It does nothing when the
variables are already set, when ``COVIDMT_NO_MALLOC_TUNING=1``, or when JAX will not run
on the CPU (an accelerator plugin is installed and ``JAX_PLATFORMS`` does not say cpu) unless
the caller's work runs on the CPU anyway (``any_backend=True``: image decoding).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Mapping, Sequence

MALLOC_ENV: Mapping[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "1000000000000",
    "MALLOC_TRIM_THRESHOLD_": "2000000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}
REEXECUTED_MARK = "COVIDMT_MALLOC_REEXECUTED"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def _has_accelerator_plugin() -> bool:
    for name in _ACCELERATOR_PLUGINS:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def runs_on_cpu(environ: Mapping[str, str] | None = None) -> bool:
    """Whether JAX's default backend will be the CPU, decided without importing jax."""
    env = os.environ if environ is None else environ
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not _has_accelerator_plugin()


def needs_reexec(environ: Mapping[str, str] | None = None, *, any_backend: bool = False) -> bool:
    """Whether :func:`reexec_for_cpu` would re-execute (``any_backend``: even when JAX will use
    an accelerator)."""
    env = os.environ if environ is None else environ
    if env.get(REEXECUTED_MARK) or env.get("COVIDMT_NO_MALLOC_TUNING") == "1":
        return False
    if all(k in env for k in MALLOC_ENV):
        return False
    return any_backend or runs_on_cpu(env)


def reexec_for_cpu(argv: Sequence[str], *, module: str | None = None, script: str | None = None,
                   any_backend: bool = False) -> None:
    """Re-execute ``python -m module argv`` (or ``python script argv``) with :data:`MALLOC_ENV`
    when :func:`needs_reexec`; values already in the environment win. Returns only when
    nothing is re-executed."""
    if not needs_reexec(any_backend=any_backend):
        return
    if (module is None) == (script is None):
        raise ValueError("give exactly one of module= or script=")
    env = {**MALLOC_ENV, **os.environ, REEXECUTED_MARK: "1"}
    head = ["-m", module] if module else [os.path.abspath(script)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *head, *argv], env)


def shell_exports() -> str:
    """:data:`MALLOC_ENV` as ``export NAME=VALUE`` lines, for scripts that start many Python
    processes (``.ci/run``: ``eval "$(python -m covidmt_jax.cpu_malloc)"``)."""
    return "\n".join(f"export {k}={v}" for k, v in MALLOC_ENV.items())


if __name__ == "__main__":
    print(shell_exports())
