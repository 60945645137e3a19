"""Self-describing, pickle-free model files: ``model.json`` + ``params.safetensors``.

A training run exports its final and best models this way (``WORKDIR/export/{final,best}``),
the shipped lung U-Net is stored this way, and the scoring job loads any of them with
:func:`load_model`. ``model.json`` holds the zoo name and the keyword arguments of
``models.create`` (tasks included), so the file alone rebuilds the model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

FORMAT_VERSION = 1


def _flat_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    return {"/".join(map(str, p)): np.ascontiguousarray(np.asarray(v[...], np.float32)) for p, v in flat}


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    import dataclasses
    out = {}
    for k, v in kwargs.items():
        if k == "tasks":
            v = [dataclasses.asdict(t) if dataclasses.is_dataclass(t) else t for t in v]
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    json.dumps(out)  # fail here, with the offending key in the traceback, if not serialisable
    return out


def save_model(directory: str | os.PathLike, model: nnx.Module, *, name: str,
               model_kwargs: dict[str, Any], metadata: dict[str, Any] | None = None) -> Path:
    """Write ``directory/model.json`` and ``directory/params.safetensors`` (atomic rename)."""
    from safetensors.numpy import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = dict(model_kwargs)
    kwargs.pop("dtype", None)
    spec = {"format": "covidmt_jax.model", "version": FORMAT_VERSION, "name": name,
            "model_kwargs": _jsonable(kwargs), "metadata": metadata or {}}
    tmp = directory / "params.safetensors.tmp"
    save_file(_flat_arrays(model), str(tmp))
    os.replace(tmp, directory / "params.safetensors")
    (directory / "model.json.tmp").write_text(json.dumps(spec, indent=2))
    os.replace(directory / "model.json.tmp", directory / "model.json")
    return directory


def read_spec(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    spec_path = directory / "model.json"
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path}: no model.json (not an exported covidmt_jax model)")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{spec_path}: malformed JSON ({e})") from e
    if spec.get("format") != "covidmt_jax.model":
        raise ValueError(f"{spec_path}: not a covidmt_jax model description")
    return spec


def load_model(directory: str | os.PathLike, *, dtype: Any = jnp.float32) -> nnx.Module:
    """Rebuild an exported model (inference mode). Fails naming any missing/extra tensor."""
    from safetensors import safe_open
    from covidmt_jax import models
    directory = Path(directory)
    spec = read_spec(directory)
    params_path = directory / "params.safetensors"
    if not params_path.is_file():
        raise FileNotFoundError(f"{params_path}: parameter file missing")
    model = models.create_unfilled(spec["name"], dtype=dtype, **spec["model_kwargs"])  # filled below
    with safe_open(str(params_path), framework="numpy") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    expected = {"/".join(map(str, p)): v for p, v in flat}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    bad = [f"{k}: file {stored[k].shape} vs model {tuple(expected[k].shape)}"
           for k in sorted(set(expected) & set(stored)) if stored[k].shape != tuple(expected[k].shape)]
    if missing or extra or bad:
        raise ValueError(f"{params_path}: does not fit {spec['name']} "
                         f"(missing {missing}, unexpected {extra}, mis-shaped {bad})")
    for k, var in expected.items():
        var.set_value(jnp.asarray(stored[k], var.get_value().dtype))
    return models.check_filled(model, str(params_path))


#: metadata of an export that describes its own training run, moved per member by average_models
_ONE_RUN_KEYS = ("step", "val_dice", "train_s", "train_command", "val_dice_at_input_size")


def average_models(directories: list[str | os.PathLike], out: str | os.PathLike,
                   metadata: dict[str, Any] | None = None, *, names: list[str] | None = None) -> Path:
    """Export the element-wise mean of several exports' tensors (a uniform "model soup",
    Wortsman et al. 2022): parameters and BatchNorm running statistics alike.

    Meaningful for models fine-tuned from one starting point, which stay in one basin of
    the loss; the result is one model of the same size and speed as each member. Every member
    must hold the same zoo name and ``model_kwargs`` (and tensors that fit them,
    :func:`load_model`). ``model.json`` keeps the first member's metadata except what
    describes one run (:data:`_ONE_RUN_KEYS`), which goes to ``averaged_from`` with each
    member's name (``names``, default: its directory); ``metadata`` entries are applied last.
    """
    if len(directories) < 2:
        raise ValueError(f"average_models needs at least two exports, got {len(directories)}")
    specs = [read_spec(d) for d in directories]
    first = specs[0]
    total: dict[str, np.ndarray] = {}
    model = None  # the first member, which then holds the mean
    for d, spec in zip(directories, specs):
        if (spec["name"], spec["model_kwargs"]) != (first["name"], first["model_kwargs"]):
            raise ValueError(f"{d}: a {spec['name']} with {spec['model_kwargs']}, but {directories[0]} holds a "
                             f"{first['name']} with {first['model_kwargs']}; only the same architecture averages")
        member = load_model(d)
        if model is None:
            model = member
        for k, v in _flat_arrays(member).items():
            total[k] = total.get(k, 0.0) + v.astype(np.float64)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
        var[...] = jnp.asarray(total["/".join(map(str, path))] / len(directories), var[...].dtype)
    meta = {k: v for k, v in first.get("metadata", {}).items() if k not in _ONE_RUN_KEYS}
    meta["averaged_from"] = [
        dict({k: s["metadata"][k] for k in _ONE_RUN_KEYS if k in s.get("metadata", {})}, directory=str(n))
        for n, s in zip(names or directories, specs)]
    meta.update(metadata or {})
    return save_model(out, model, name=first["name"], model_kwargs=first["model_kwargs"], metadata=meta)
