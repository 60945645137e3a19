"""Devices, meshes and shardings: the one place that knows how arrays are laid out.

- ``maybe_initialize_distributed()`` calls ``jax.distributed.initialize()`` when the process
  is one of several (SLURM with more than one task, a multi-worker Cloud TPU VM, or an
  explicit ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``); on one
  host it does nothing. On CPU processes with a JAX version whose persistent compilation cache
  hangs multi-process programs (``CPU_MULTIPROCESS_CACHE_HANGS``) it turns that cache off for
  the run, with a warning.
- ``make_mesh(model_axis=1)``: a ``Mesh`` over all devices with axes ``("data", "model")``.
- Batches are sharded over ``"data"``; parameters and optimiser state are replicated, or,
  with ``model_axis > 1``, sharded along their largest dimension divisible by it
  (FSDP-style parameter sharding).
- ``global_batch``: host-local numpy batch -> global ``jax.Array`` with
  ``jax.make_array_from_process_local_data``.

BatchNorm statistics under ``jax.jit`` over a data-sharded global batch are computed over
the *global* batch (XLA inserts the cross-device reductions), i.e. averaged over the data axis.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

# JAX versions (``jax.__version_info__``) from which an XLA:CPU program with cross-process
# collectives, once read back from the persistent compilation cache, never completes in a
# multi-process run: every process waits on the first result forever. Measured with 2
# processes x 2 CPU devices (gloo collectives) on a warm cache: jax 0.12.1 hangs; 0.10.2,
# 0.11.2 and 0.12.0.1 do not. No fixed release is known, so every later version is treated
# as affected. GPU and TPU runs are not touched (not measured).
CPU_MULTIPROCESS_CACHE_HANGS = (0, 12, 1)


def _multi_process_env() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COVIDMT_MULTIHOST") == "1":
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def maybe_initialize_distributed() -> bool:
    """Initialise multi-process JAX when the environment says there are several processes."""
    if not _multi_process_env():
        return False
    if jax.distributed.is_initialized():
        _avoid_cache_hang()
        return True
    # SLURM and Cloud TPU are auto-detected; elsewhere JAX_COORDINATOR_ADDRESS (host:port of
    # process 0) with JAX_NUM_PROCESSES and JAX_PROCESS_ID name the processes.
    kwargs = {k: int(os.environ[env]) for k, env in (("num_processes", "JAX_NUM_PROCESSES"),
                                                      ("process_id", "JAX_PROCESS_ID"))
              if os.environ.get(env)}
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    _avoid_cache_hang()
    return True


def compilation_cache_hangs(version: tuple, backend: str, process_count: int) -> bool:
    """Whether reading programs back from the persistent compilation cache would hang this run
    (see ``CPU_MULTIPROCESS_CACHE_HANGS``): CPU, several processes, an affected JAX."""
    return backend == "cpu" and process_count > 1 and tuple(version) >= CPU_MULTIPROCESS_CACHE_HANGS


def _avoid_cache_hang() -> None:
    """Turn the persistent compilation cache off, with a warning, where it would hang the run."""
    cache_dir = jax.config.jax_compilation_cache_dir
    if not cache_dir or not compilation_cache_hangs(jax.__version_info__, jax.default_backend(),
                                                    jax.process_count()):
        return
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    logging.warning(
        "persistent compilation cache %s turned off for this run: with jax %s on CPU, a "
        "multi-process program read back from it never completes (covidmt_jax.parallel."
        "CPU_MULTIPROCESS_CACHE_HANGS); every program is compiled afresh", cache_dir, jax.__version__)


def make_mesh(model_axis: int = 1, devices=None) -> Mesh:
    """``Mesh`` of ``devices`` (default: all), shape ``(n // model_axis, model_axis)``."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model_axis < 1 or n % model_axis:
        raise ValueError(f"model_axis={model_axis} must divide the device count {n}")
    devices = np.asarray(devices).reshape(n // model_axis, model_axis)
    return Mesh(devices, (DATA, MODEL))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"``, the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _param_spec(shape: tuple[int, ...], model_axis: int) -> P:
    if model_axis <= 1 or not shape:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % model_axis == 0 and shape[i] >= model_axis:
            spec = [None] * len(shape)
            spec[i] = MODEL
            return P(*spec)
    return P()


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A sharding for every leaf of a (model, optimiser) state pytree."""
    model_axis = mesh.shape[MODEL]
    return jax.tree.map(lambda x: NamedSharding(mesh, _param_spec(tuple(np.shape(x)), model_axis)), state)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA]
    if global_batch_size % n:
        raise ValueError(f"the global batch of {global_batch_size} samples does not split over "
                         f"{n} data-parallel devices; change the per-task batch size so that "
                         f"it divides (e.g. --config.data.per_task_batch)")


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host-local numpy arrays (this process's share) -> global, data-sharded ``jax.Array``s.

    Non-array entries (e.g. ``ids``) are dropped.
    """
    out = {}
    for k, v in local.items():
        if isinstance(v, np.ndarray) and v.dtype != object:
            out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def local_rows(tree: Any) -> Any:
    """Global data-sharded outputs -> this process's rows as numpy (its share of the batch)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.global_array_to_host_local_array(
        tree, _mesh_of(tree), P(DATA)))


def _mesh_of(tree: Any) -> Mesh:
    leaf = jax.tree.leaves(tree)[0]
    return leaf.sharding.mesh


def allgather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenate every process's ``[n_p, ...]`` rows (process order); identity on one host.

    Processes may hold different row counts (eval shards): rows are padded to the largest
    count for the collective and the padding removed again.
    """
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils
    counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(x)]))).reshape(-1)
    pad = int(counts.max()) - len(x)
    padded = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    every = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([every[p, :int(c)] for p, c in enumerate(counts)])


def allgather_ragged(items: list[np.ndarray]) -> list[np.ndarray]:
    """All-gather a list of variable-length ``[k_i, d]`` arrays (e.g. per-image boxes)."""
    if jax.process_count() == 1:
        return list(items)
    lengths = np.asarray([len(a) for a in items], np.int64)
    width = int(items[0].shape[1]) if items and items[0].ndim > 1 else 0
    k = int(allgather_rows(np.asarray([lengths.max() if len(lengths) else 0])).max())
    shape = (len(items), k, width) if width else (len(items), k)
    dense = np.zeros(shape, np.float32)
    for i, a in enumerate(items):
        dense[i, :len(a)] = a
    all_dense, all_len = allgather_rows(dense), allgather_rows(lengths)
    return [all_dense[i, :int(n)] for i, n in enumerate(all_len)]
