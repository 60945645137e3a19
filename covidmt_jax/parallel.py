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
- ``put_global``: a state every process holds alike (same seed, same files) -> global arrays,
  each process filling its own devices; one all-gathered fingerprint checks the processes
  agree (``jax.device_put`` would all-gather every leaf with a program of its own).
- ``barrier(name)`` waits for every process at the coordinator (no collective, generous
  timeout); ``CompiledTogether(jitted, name)`` compiles a program in every process, then waits
  at a barrier before its first run, and ``allgather_rows`` waits at one before its collective.
  XLA:CPU's gloo collectives set up their connections at the first collective over a group of
  devices and give the other processes a fixed 30 s to arrive; a process still compiling, or
  slowed by a busy host, would otherwise fail the run with "Gloo context initialization failed".
- ``allgather_json`` / ``on_process0``: small host data between processes (a process's scored
  rows to the one writer; a plan or an error that only process 0 can compute, to every process).

BatchNorm statistics under ``jax.jit`` over a data-sharded global batch are computed over
the *global* batch (XLA inserts the cross-device reductions), i.e. averaged over the data axis.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from typing import Any, Callable, Mapping

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

# How long ``barrier`` waits for the slowest process (a process may still be compiling a
# large program, restoring a checkpoint or reading its first batch).
BARRIER_TIMEOUT_S = 1800
_barrier_ids = itertools.count()


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


def _allgather_padded(x: np.ndarray, what: str, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(every, counts)``: every process's ``[n_p, ...]`` rows, each padded to the same row
    count for the collective (``every``: ``[P, L, ...]``), and the ``n_p``. Waits at a
    :func:`barrier` first, so a process that finished its share early does not time out in the
    collective. ``L`` is a power of two (at least ``min_rows``), so calls with varying row
    counts reuse a few compiled all-gathers instead of compiling one per count."""
    from jax.experimental import multihost_utils
    barrier(f"allgather {what}")
    counts = np.asarray(multihost_utils.process_allgather(
        np.asarray([len(x)], np.int32))).reshape(-1)
    rows = max(min_rows, 1 << (int(counts.max()) - 1).bit_length())
    padded = np.zeros((rows, *x.shape[1:]), x.dtype)
    padded[:len(x)] = x
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(counts), rows, *x.shape[1:])
    return every, counts


def allgather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenate every process's ``[n_p, ...]`` rows (process order); identity on one host.

    Processes may hold different row counts (eval shards): rows are padded for the collective
    and the padding removed again (:func:`_allgather_padded`).
    """
    if jax.process_count() == 1:
        return x
    every, counts = _allgather_padded(x, "rows", 1)
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


def allgather_bytes(data: bytes, what: str) -> list[bytes]:
    """Every process's ``data`` (any length), in process order; ``[data]`` on one host."""
    if jax.process_count() == 1:
        return [bytes(data)]
    every, counts = _allgather_padded(np.frombuffer(data, np.uint8), what, 1024)
    return [every[p, :int(c)].tobytes() for p, c in enumerate(counts)]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def allgather_json(obj: Any, what: str) -> list[Any]:
    """Every process's ``obj`` (JSON values; numpy scalars and arrays become numbers and
    lists, NaN is kept), in process order: small host data such as a process's scored rows."""
    data = json.dumps(obj, default=_json_default).encode()
    return [json.loads(b) for b in allgather_bytes(data, what)]


def on_process0(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` run on process 0 only (host work such as reading a file only it writes), its
    JSON result handed to every process. When ``fn`` raises on process 0, it re-raises there
    and every other process raises ``RuntimeError`` with its message instead of waiting for
    a collective that never comes."""
    if jax.process_count() == 1:
        return fn()
    failure, result = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:  # handed to the other processes, then re-raised here
            failure = e
    sent = {"error": f"{type(failure).__name__}: {failure}"} if failure is not None else {"ok": result}
    got = allgather_json(sent if jax.process_index() == 0 else None, what)[0]
    if failure is not None:
        raise failure
    if "error" in got:
        raise RuntimeError(f"process 0 failed in {what}: {got['error']}")
    return got["ok"]


# ----------------------------------------------------------------------------- process sync

def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process has reached this call (processes must call barriers in the
    same order); returns at once in a single-process run.

    Uses the ``jax.distributed`` coordinator's barrier, not a collective, so it waits as long
    as ``timeout_s`` and then fails naming ``name``. Without a coordinator client (a runtime
    that joins the processes itself) it falls back to ``sync_global_devices``.
    """
    if jax.process_count() == 1:
        return
    barrier_id = f"covidmt_jax/{next(_barrier_ids)}/{name}"
    try:
        from jax._src import distributed
        client = distributed.global_state.client
    except (ImportError, AttributeError):  # a JAX without the coordinator client
        client = None
    if client is None:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(barrier_id)
        return
    try:
        client.wait_at_barrier(barrier_id, timeout_in_ms=int(timeout_s * 1000))
    except Exception as e:  # the coordinator's status error: say which barrier
        raise RuntimeError(f"process {jax.process_index()} of {jax.process_count()}: barrier "
                           f"{name!r} ({barrier_id}) failed within {timeout_s:.0f} s; another "
                           f"process died or is stuck (see its log): {e}") from e


def fingerprint(tree: Any) -> bytes:
    """A 16-byte digest of every leaf's dtype, shape and bytes (host values, tree order)."""
    h = hashlib.blake2b(digest_size=16)
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    return h.digest()


def put_global(tree: Any, shardings: Any, what: str = "state") -> Any:
    """Place ``tree`` (host or local arrays, the SAME values in every process) on
    ``shardings`` (a matching tree of shardings, or one sharding for every leaf).

    One process: ``jax.device_put``. Several: every process fills the shards on its own devices
    from its copy (``jax.make_array_from_callback``, no collective), after checking at a
    :func:`barrier` that all processes hold the same values (one all-gather of
    :func:`fingerprint`); a mismatch raises ``ValueError`` naming ``what``.
    ``jax.device_put`` checks the same per leaf, with a compiled all-gather per leaf shape.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    from jax.experimental import multihost_utils
    leaves, treedef = jax.tree.flatten(tree)
    if isinstance(shardings, jax.sharding.Sharding):
        shards = [shardings] * len(leaves)
    else:
        shards = treedef.flatten_up_to(shardings)
    host = [np.asarray(x) for x in leaves]
    barrier(f"put_global {what}")
    mine = np.frombuffer(fingerprint(host), np.uint32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    differ = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
    if differ:
        raise ValueError(f"{what}: process(es) {differ} hold different values from process 0 "
                         f"({len(host)} arrays compared by fingerprint); every process must "
                         "build it from the same seed, config and files")
    out = [jax.make_array_from_callback(a.shape, s, lambda idx, a=a: np.asarray(a[idx]))
           for a, s in zip(host, shards)]
    return jax.tree.unflatten(treedef, out)


class CompiledTogether:
    """``CompiledTogether(jax.jit(f, ...), name)(*args)``: with several processes, the first
    call compiles the program ahead of time in every process (``jitted.lower(*args).compile()``,
    whose executable the jit then reuses), and all wait at a :func:`barrier` before its first
    run. Every call, that one included, goes through ``jitted`` itself, so steps keep jit's
    dispatch. A later call with another signature compiles inside the jit without a barrier;
    the train, eval and score steps keep one signature. One process: just ``jitted``.

    Compilation time differs between processes (a busy host, a cold or warm cache); the
    barrier keeps the first collective of the program from starting on one process while
    another is still compiling.
    """

    def __init__(self, jitted: Callable, name: str):
        self.jitted, self.name = jitted, name
        self._compiled_together = False

    def __call__(self, *args):
        if not self._compiled_together and jax.process_count() > 1:
            self.jitted.lower(*args).compile()
            barrier(f"compiled {self.name}")
            self._compiled_together = True
        return self.jitted(*args)
