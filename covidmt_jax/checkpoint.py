"""Training checkpoints: model, optimiser, step, RNG and data-iterator state saved together.

One orbax ``CheckpointManager`` in ``WORKDIR/checkpoints`` with three items per step:
``state`` (the NNX state of ``(model, optimizer)``: parameters, BatchNorm statistics, Adam
moments, optimiser step and the models' RNG stream counters), ``data`` (the grain iterators'
positions, JSON) and ``meta`` (step, epoch, best metric so far, JSON). Saves are atomic
(orbax writes to a temporary directory and renames), so a run killed mid-save resumes from
the previous complete checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _to_saveable(state: Any) -> Any:
    """Typed PRNG keys -> raw uint32 key data (orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x)
                        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                        else x, state)


def _abstract(x: Any) -> Any:
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


class TrainCheckpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for the trainer."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=True),
            item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict, *, force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, state_like: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restore into the structure, dtypes and shardings of ``state_like``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        abstract = jax.tree.map(_abstract, state_like)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        restored = jax.tree.map(
            lambda like, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(like))
            if jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key) else new,
            state_like, out["state"])
        return restored, out["data"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
