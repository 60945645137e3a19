"""Shared pytest fixtures, and one XLA compilation cache for the whole test run.

Many tests compile the same small programs (the tiny trainer's step, the scoring step) in
different tests, xdist workers and subprocesses. JAX's persistent compilation cache, keyed
on the program text, the compile options and the jax/jaxlib versions, lets every compile after
the first read the executable back: results are bit-identical, only the compile time goes.
The cache lives in ``COVIDMT_TEST_XLA_CACHE`` when set, otherwise in this run's pytest
temporary folder (fresh for every run, shared by its xdist workers); it is
passed to subprocesses through ``JAX_COMPILATION_CACHE_DIR``. ``COVIDMT_TEST_XLA_CACHE=off``
disables it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("COVIDMT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _cache_dir(config: pytest.Config) -> Path | None:
    value = os.environ.get("COVIDMT_TEST_XLA_CACHE", "")
    if value.strip().lower() in ("off", "0", "none"):
        return None
    if value:
        return Path(value)
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:
        return None
    base = factory.getbasetemp()
    # xdist workers get <run>/popen-gwN: share <run>/xla_cache between them
    root = base.parent if base.name.startswith("popen-gw") else base
    return root / "xla_cache"


@pytest.hookimpl(trylast=True)  # after the tmp_path plugin has set up config._tmp_path_factory
def pytest_configure(config: pytest.Config) -> None:
    path = _cache_dir(config)
    if path is None:
        return
    path.mkdir(parents=True, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)  # subprocesses started by tests
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    import jax
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


#: marker -> (module that must import, the extra that provides it)
EXTRAS = {"torch": ("torch", "torch"), "dicom": ("pydicom.pixels", "dicom")}


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``torch`` / ``dicom`` skip cleanly when that extra is not installed."""
    missing = {m: f"the {extra} extra is not installed: pip install '.[{extra}]'"
               for m, (module, extra) in EXTRAS.items()
               if any(item.get_closest_marker(m) for item in items) and not _importable(module)}
    for item in items:
        for marker, reason in missing.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (real CXR data); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (set COVIDMT_SHARED_DATA)")
    return SHARED_DATA
