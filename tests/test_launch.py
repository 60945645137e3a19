"""Launching: the launch scripts' contract with JAX's cluster detection (no cluster needed), and the helper CLIs' usage."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def test_slurm_script_leaves_gpu_choice_to_jax():
    """JAX on SLURM restricts each process to GPU SLURM_LOCALID (jax_cuda_visible_devices);
    a script that also narrows CUDA_VISIBLE_DEVICES to that one GPU renumbers it 0, and every
    local rank >= 1 then asks for a GPU it cannot see."""
    cluster = pytest.importorskip("jax._src.clusters")
    script = (LAUNCH / "slurm_multinode.sbatch").read_text()
    assert not re.search(r"^\s*(export\s+)?CUDA_VISIBLE_DEVICES=", script, re.M)
    env = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
           "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_NODELIST": "node[07-08]"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        if not cluster.SlurmCluster.is_env_present():
            pytest.skip("this JAX's SLURM detection needs other variables")
        addr, n, pid, local = cluster.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, None)
    assert (n, pid, local) == (16, 11, [3])
    assert addr.startswith("node07:")


def test_helper_clis_answer_help_and_missing_arguments(capsys, tmp_path):
    from covidmt_jax import lung_training
    from covidmt_jax.data import splits
    for main in (lung_training.main, splits.main):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0 and "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # no command: a usage error, not an AttributeError
        lung_training.main([])
    assert e.value.code == 2 and "a command is needed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a folder without any lung set: said so, not silence
        splits.main([str(tmp_path)])
    assert e.value.code == 2 and "no lung set found under" in capsys.readouterr().err
