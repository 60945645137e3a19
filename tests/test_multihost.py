"""Multi-process (multi-host) training on one machine: 2 JAX processes x 2 CPU devices each,
joined through ``jax.distributed`` (coordinator on localhost, gloo collectives), as on a
2-host cluster.

1. A train step on a global batch assembled from each process's rows
   (``parallel.global_batch`` -> ``make_array_from_process_local_data``) equals the same
   step in ONE process over 4 devices: loss, gradient norm, every parameter and BatchNorm
   statistic; the eval all-gathers (``allgather_rows`` with unequal row counts,
   ``allgather_ragged``, ``local_rows``) return every process's rows in process order.
   ``parallel.put_global`` places the state with each process filling its own devices, and
   refuses a state that differs between the processes; ``allgather_json`` hands host objects
   of differing sizes around, ``on_process0`` hands process 0's result, or its failure, to
   every process.
2. ``covidmt_jax.train.train`` runs end to end in the 2 processes on one workdir: the
   processes agree on every logged loss, one summary/export is written, checkpoints resume;
   a process that starts 35 s late (longer than gloo's fixed 30 s connection set-up) is
   waited for at a barrier instead of failing the run.
3. The scoring job (``covidmt_jax.scoring.job``) in the 2 processes: every process's rows reach
   the one row store that process 0 writes, the gallery maps are computed by both processes
   together, a partial job resumes, and the rows equal those of ONE process over 4 devices.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from covidmt_jax.cpu_malloc import MALLOC_ENV
import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BASE_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **MALLOC_ENV}
for _k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
           "TPU_WORKER_HOSTNAMES", "COVIDMT_MULTIHOST"):
    BASE_ENV.pop(_k, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(script: Path, n_proc: int, devices_per_proc: int, args: list[str],
                   timeout: int = 600, extra_env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``script`` as ``n_proc`` JAX processes (1 = a plain single process)."""
    env = {**BASE_ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_proc}",
           **(extra_env or {})}
    if n_proc > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(n_proc))
    procs = [subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, text=True,
                              env={**env, **({"JAX_PROCESS_ID": str(i)} if n_proc > 1 else {})},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(n_proc)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


STEP_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    from flax import nnx
    sys.path.insert(0, TESTS_DIR)
    from test_train import equivalence_setup
    from covidmt_jax import parallel
    from covidmt_jax.train import make_train_step

    multi = parallel.maybe_initialize_distributed()
    pid, n_proc = jax.process_index(), jax.process_count()
    assert jax.device_count() == 4 and n_proc == (2 if multi else 1), (jax.devices(), n_proc)
    batch, tasks, new_state = equivalence_setup()
    B = batch["image"].shape[0]
    per = B // n_proc
    local = {k: v[pid * per:(pid + 1) * per] for k, v in batch.items()}  # this host's rows
    gd, state = new_state()
    mesh = parallel.make_mesh(1)
    ssh, bsh = parallel.state_shardings(state, mesh), parallel.data_sharding(mesh)
    state = parallel.put_global(state, ssh)
    try:  # a tree that is not the same in every process is refused, naming it
        parallel.put_global({"w": np.full(3, pid, np.float32)}, parallel.replicated(mesh), "tree w")
        mismatch = "accepted"
    except ValueError as e:
        mismatch = str(e)
    gb = parallel.global_batch(local, bsh)
    assert gb["image"].shape[0] == B and len(gb["image"].sharding.device_set) == 4
    step = parallel.CompiledTogether(
        jax.jit(make_train_step(gd, tasks), in_shardings=(ssh, bsh), donate_argnums=0), "step")
    state, metrics = step(state, gb)
    params = nnx.state(nnx.merge(gd, state)[0], nnx.Any(nnx.Param, nnx.BatchStat))
    flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}

    # the eval collectives: unequal row counts, ragged per-image arrays, global -> local rows
    rows = parallel.allgather_rows(np.full((pid + 1, 2), pid, np.int32))
    ragged = parallel.allgather_ragged([np.full((k + pid, 4), 10 * pid + k, np.float32)
                                        for k in range(2)])
    mine = parallel.local_rows(gb["image"])
    np.testing.assert_array_equal(mine, local["image"])
    # host objects: lengths that differ per process (over the 1 KiB bucket), numpy values, NaN
    objs = parallel.allgather_json({"pid": pid, "v": np.float32(0.5), "a": np.arange(2) + pid,
                                    "nan": float("nan"), "s": "é" * (700 * pid)}, "test objects")
    objs = [{**o, "nan": repr(o["nan"]), "s": len(o["s"])} for o in objs]
    plan = parallel.on_process0(lambda: {"todo": [1, 2]} if pid == 0 else None, "test plan")
    def fail():
        raise KeyError("known to process 0 only")
    try:
        parallel.on_process0(fail, "test failure")
        failed = ""
    except Exception as e:
        failed = f"{type(e).__name__}: {e}"
    if pid == 0:
        np.savez(sys.argv[1], **flat)
    print("RESULT " + json.dumps({
        "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
        "rows": rows.tolist(), "ragged": [a.tolist() for a in ragged], "mismatch": mismatch,
        "objs": objs, "plan": plan, "failed": failed}))
""")


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT.replace("TESTS_DIR", repr(str(TESTS))))
    (one,) = _run_processes(script, 1, 4, [str(tmp_path / "one.npz")])
    two = _run_processes(script, 2, 2, [str(tmp_path / "two.npz")])
    for p in two:
        assert p.returncode == 0, p.stderr[-3000:]
    r1, r2 = _result(one), _result(two[0])
    assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
    assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)
    p1, p2 = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert sorted(p1.files) == sorted(p2.files) and len(p1.files) > 50
    # SGD with lr 1: the parameter change is the gradient, so every gradient and every
    # (globally averaged) BatchNorm statistic is compared here
    worst = max(float(np.max(np.abs(p1[k] - p2[k]))) for k in p1.files)
    assert worst < 1e-4
    # process 0's rows, then process 1's; padding for the collective removed
    assert r2["rows"] == [[0, 0], [1, 1], [1, 1]]
    assert [len(a) for a in r2["ragged"]] == [0, 1, 1, 2]
    assert r2["ragged"][3] == [[11.0] * 4] * 2
    assert r1["rows"] == [[0, 0]]
    assert r1["mismatch"] == "accepted"  # one process: nothing to disagree with
    assert r2["mismatch"].startswith("tree w: process(es) [1] hold different values"), r2["mismatch"]
    # allgather_json: every process's object in process order, on every process
    objs = [{"pid": q, "v": 0.5, "a": [q, q + 1], "nan": "nan", "s": 700 * q} for q in range(2)]
    assert r1["objs"] == objs[:1] and r2["objs"] == objs and _result(two[1])["objs"] == objs
    # on_process0: process 0's result everywhere; its failure raised everywhere, not waited for
    assert r1["plan"] == r2["plan"] == _result(two[1])["plan"] == {"todo": [1, 2]}
    assert r1["failed"] == r2["failed"] == "KeyError: 'known to process 0 only'"
    assert _result(two[1])["failed"] == (
        "RuntimeError: process 0 failed in test failure: KeyError: 'known to process 0 only'")


TRAIN_SCRIPT = textwrap.dedent("""
    import json, logging, sys, time
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, {tests!r})
    import jax
    from test_train import tiny_config
    from covidmt_jax import parallel
    from covidmt_jax.train import train
    parallel.maybe_initialize_distributed()
    if jax.process_index() == 1:  # a slow host: train() must wait for it, however long
        time.sleep(float(sys.argv[3]))
    c = tiny_config(steps=int(sys.argv[2]), n=16)
    c.checkpoint.every_steps = 2
    summary = train(c, sys.argv[1])
    print("RESULT " + json.dumps({{"process": jax.process_index(), "count": jax.process_count(),
                                  "steps": summary["steps"],
                                  "final_eval": summary["final_eval"]}}, default=float))
""")


# XLA:CPU's gloo collectives wait this long (fixed) for every process at the first collective
# over a group of devices
GLOO_SETUP_WAIT_S = 30


def test_trainer_runs_and_resumes_in_two_processes(tmp_path):
    script = tmp_path / "train2.py"
    script.write_text(TRAIN_SCRIPT.format(tests=str(TESTS)))
    workdir = tmp_path / "run"
    first = _run_processes(script, 2, 2, [str(workdir), "4", str(GLOO_SETUP_WAIT_S + 5)])
    res = [_result(p) for p in first]
    assert [r["process"] for r in res] == [0, 1] and all(r["count"] == 2 for r in res)
    assert all(r["steps"] == 4 for r in res)
    # evaluation gathers every process's shard: both processes report the same metrics
    assert res[0]["final_eval"] == res[1]["final_eval"] and "covid/roc_auc" in res[0]["final_eval"]
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]  # process 0 writes
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 4
    assert (workdir / "export" / "final" / "params.safetensors").is_file()
    # a second launch with more steps resumes from the shared checkpoint (not from step 0)
    second = _run_processes(script, 2, 2, [str(workdir), "6", "0"])
    assert all(_result(p)["steps"] == 6 for p in second)
    assert "resumed from" in second[0].stderr
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


CACHE_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO)
    import jax, jax.numpy as jnp, numpy as np
    from covidmt_jax import parallel
    assert parallel.maybe_initialize_distributed()
    pid = jax.process_index()
    mesh = parallel.make_mesh(1)
    x = parallel.global_batch({"x": np.arange(4, dtype=np.float32)[2 * pid:2 * pid + 2]},
                              parallel.data_sharding(mesh))["x"]
    total = jax.jit(lambda a: jnp.sum(a * a))(x)  # a reduction across both processes
    print("RESULT " + json.dumps({"total": float(total),
                                  "cache_on": bool(jax.config.jax_compilation_cache_dir)}))
""")


def test_a_warm_compilation_cache_never_hangs_a_multi_process_cpu_run(tmp_path):
    """Two launches of a 2-process run on one persistent compilation cache: the second reads
    its programs back (or, on a JAX in ``CPU_MULTIPROCESS_CACHE_HANGS``, runs with the cache
    turned off, saying so) and completes; jax 0.12.1 hung here forever without the guard."""
    import jax

    from covidmt_jax import parallel
    script = tmp_path / "cache.py"
    script.write_text(CACHE_SCRIPT)
    cache = tmp_path / "xla_cache"
    affected = parallel.compilation_cache_hangs(jax.__version_info__, "cpu", 2)
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for launch in range(2):
        procs = _run_processes(script, 2, 2, [], timeout=240, extra_env=env)
        res = [_result(p) for p in procs]
        assert [r["total"] for r in res] == [14.0, 14.0]  # 0 + 1 + 4 + 9
        assert all(r["cache_on"] is not affected for r in res)
        warned = ["compilation cache" in p.stderr and "turned off" in p.stderr for p in procs]
        assert warned == [affected, affected]
        if launch == 0:  # the first launch filled the cache the second one reads
            assert affected or any(cache.iterdir())
    if affected:
        assert not cache.exists() or not any(cache.iterdir())
    # the decision itself: several CPU processes on an affected JAX only
    first_bad = parallel.CPU_MULTIPROCESS_CACHE_HANGS
    assert parallel.compilation_cache_hangs(first_bad, "cpu", 2)
    assert not parallel.compilation_cache_hangs((0, 12, 0, 1), "cpu", 2)
    assert not parallel.compilation_cache_hangs(first_bad, "cpu", 1)
    assert not parallel.compilation_cache_hangs(first_bad, "gpu", 2)


def test_fingerprint_tells_apart_values_dtypes_and_shapes():
    """``put_global`` compares processes' states by this digest alone."""
    from covidmt_jax import parallel
    base = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.int32)}
    same = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.int32)}
    assert parallel.fingerprint(base) == parallel.fingerprint(same)
    one_value = {**base, "a": base["a"].copy()}
    one_value["a"][1, 2] = np.nextafter(np.float32(5), np.float32(6))
    as_int = {**base, "a": np.zeros((2, 3), np.int32)}
    as_float = {**base, "a": np.zeros((2, 3), np.float32)}  # the same bytes as as_int
    reshaped = {**base, "a": base["a"].reshape(3, 2)}
    digests = {parallel.fingerprint(t) for t in (base, one_value, as_int, as_float, reshaped)}
    assert len(digests) == 5
    # one process: plain placement and a plain jitted call
    import jax
    mesh = parallel.make_mesh(1, jax.devices()[:1])
    placed = parallel.put_global(base, parallel.replicated(mesh))
    np.testing.assert_array_equal(np.asarray(placed["a"]), base["a"])
    double = parallel.CompiledTogether(jax.jit(lambda t: t["a"] * 2), "double")
    np.testing.assert_array_equal(np.asarray(double(placed)), base["a"] * 2)


SCORE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax
    sys.path.insert(0, TESTS_DIR)
    from test_score import _cfg
    from covidmt_jax import parallel
    from covidmt_jax.scoring import job

    parallel.maybe_initialize_distributed()
    work, exported, limits = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    assert jax.device_count() == 4, jax.devices()
    cfg = _cfg({k: Path(v) for k, v in exported.items()}, names=("resnet18", "covidmt"), n=10)
    scored = []
    for limit in limits:  # limit 6, then all 10: the second run resumes the first
        cfg.pairs.limit = limit
        summary = job.run(cfg, work)
        assert (summary == {}) == (jax.process_index() != 0), sorted(summary)
        scored.append(summary.get("job", {}).get("scored_this_run"))
    cfg.cam.cam_threshold = 0.4  # another job in the same WORKDIR: refused in every process
    try:
        job.run(cfg, work)
        refused = ""
    except Exception as e:
        refused = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps({"scored": scored, "refused": refused}))
""")


def _rows_by_key(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["pair_id"], r["model"]): r for r in rows}
    assert len(by_key) == len(rows), "duplicate rows"
    return by_key


def test_scoring_job_in_two_processes_keeps_every_row_and_resumes(tmp_path):
    from test_score import export_tiny_models
    exported = json.dumps({k: str(v) for k, v in export_tiny_models(tmp_path / "models").items()})
    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT.replace("TESTS_DIR", repr(str(TESTS))))
    # batch_size 4: one process scores 10 pairs in batches of 4; two processes in global
    # batches of 8 (4 each), so process 1 has no pair in the last batch of each run
    (one,) = _run_processes(script, 1, 4, [str(tmp_path / "one"), exported, "[-1]"], timeout=420)
    two = _run_processes(script, 2, 2, [str(tmp_path / "two"), exported, "[6, -1]"], timeout=420)
    assert _result(one)["scored"] == [10]
    assert _result(two[0])["scored"] == [6, 4]
    # job.json is process 0's to check; process 1 gets its refusal instead of waiting for it
    assert _result(two[0])["refused"].startswith("ConfigError: ")
    assert "config cam" in _result(two[0])["refused"]
    assert _result(two[1])["refused"].startswith(
        "RuntimeError: process 0 failed in scoring plan: ConfigError: ")

    ref, got = _rows_by_key(tmp_path / "one" / "rows.csv"), _rows_by_key(tmp_path / "two" / "rows.csv")
    assert len(ref) == 20 and sorted(got) == sorted(ref)
    for key, r in ref.items():
        g = got[key]
        assert g["error"] == r["error"] == "", (key, g["error"], r["error"])
        for col, v in r.items():
            if col.startswith(("prob_", "iol_", "heat_frac_", "lung_frac_")):
                np.testing.assert_allclose(float(g[col]), float(v), rtol=1e-4, atol=1e-5,
                                           err_msg=f"{key} {col}")
            else:
                assert g[col] == v, (key, col, g[col], v)
    s_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    s_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for m in ("resnet18", "covidmt"):
        assert s_two["models"][m]["n_pairs"] == 10
        assert s_two["models"][m]["pi"] == s_one["models"][m]["pi"]
    for png in ("gallery_resnet18_random.png", "gallery_covidmt_random.png"):
        assert (tmp_path / "two" / png).stat().st_size > 1000, png
