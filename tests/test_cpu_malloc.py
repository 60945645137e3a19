"""covidmt_jax.cpu_malloc: when the CLIs re-execute themselves with the glibc settings."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from covidmt_jax import cpu_malloc

ROOT = Path(__file__).resolve().parents[1]


def test_needs_reexec_decisions():
    assert cpu_malloc.needs_reexec({"JAX_PLATFORMS": "cpu"})
    assert not cpu_malloc.needs_reexec({"JAX_PLATFORMS": "cuda"})
    assert cpu_malloc.needs_reexec({"JAX_PLATFORMS": "cuda"}, any_backend=True)  # CPU-only work
    assert not cpu_malloc.needs_reexec({"JAX_PLATFORMS": "cuda", cpu_malloc.REEXECUTED_MARK: "1"}, any_backend=True)
    assert not cpu_malloc.needs_reexec({"JAX_PLATFORMS": "cpu", "COVIDMT_NO_MALLOC_TUNING": "1"})
    assert not cpu_malloc.needs_reexec({"JAX_PLATFORMS": "cpu", "COVIDMT_MALLOC_REEXECUTED": "1"})
    assert not cpu_malloc.needs_reexec({"JAX_PLATFORMS": "cpu", **cpu_malloc.MALLOC_ENV})
    assert cpu_malloc.runs_on_cpu({"JAX_PLATFORMS": "cpu,cuda"})
    assert not cpu_malloc.runs_on_cpu({"JAX_PLATFORMS": "tpu"})


def test_reexec_sets_the_env_once_and_keeps_the_arguments(tmp_path):
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from covidmt_jax.cpu_malloc import reexec_for_cpu
        print("START", flush=True)
        reexec_for_cpu(sys.argv[1:], script=__file__)
        print("ARGS", sys.argv[1:], "ARENA", os.environ.get("MALLOC_ARENA_MAX"),
              "TRIM", os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("COVIDMT_MALLOC_REEXECUTED", None)
    out = subprocess.run([sys.executable, str(script), "--config.x=1", "a b"], text=True,
                         capture_output=True, env={**env, "JAX_PLATFORMS": "cpu", "MALLOC_TRIM_THRESHOLD_": "7"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("START") == 2  # ran once more, not in a loop
    assert "ARGS ['--config.x=1', 'a b'] ARENA 1 TRIM 7" in out.stdout  # user's value wins
    off = subprocess.run([sys.executable, str(script)], text=True, capture_output=True,
                         env={**env, "JAX_PLATFORMS": "cpu", "COVIDMT_NO_MALLOC_TUNING": "1"})
    assert off.stdout.count("START") == 1 and "ARENA None" in off.stdout


def test_shell_exports_are_the_module_settings():
    out = subprocess.run([sys.executable, "-m", "covidmt_jax.cpu_malloc"], text=True,
                         capture_output=True, cwd=ROOT, check=True).stdout.split("\n")
    assert [line for line in out if line] == [f"export {k}={v}" for k, v in cpu_malloc.MALLOC_ENV.items()]
