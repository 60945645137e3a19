"""Import torchvision / timm / torchxrayvision weights into zoo models (no pickle).

``load_torch_weights(model, path)`` reads a ``.safetensors`` file (no torch needed) or a
``.pth``/``.pt``/``.bin`` file through ``torch.load(weights_only=True)``, maps every tensor
onto the NNX model and fails with the complete list of missing, unexpected and mis-shaped
keys when anything does not fit.

Mapping (mechanical, because zoo modules carry torchvision/timm names):
- our path ``layer1.0.conv1.kernel`` -> torch key ``layer1.0.conv1.weight``; modules whose
  children are named differently declare ``torch_renames()`` (e.g. ``downsample.conv -> 0``);
- conv kernels OIHW -> HWIO (grouped and depthwise convs alike: ``[O, I/g, kh, kw]`` ->
  ``[kh, kw, I/g, O]``); dense ``[out, in]`` -> ``[in, out]``;
- BatchNorm ``weight``/``bias``/``running_mean``/``running_var`` -> ``scale``/``bias``/``mean``/
  ``var``; ``num_batches_tracked`` is ignored;
- grey input (``in_channels=1``): the RGB kernels of the first conv are SUMMED over the
  input-channel axis. With grey pixels replicated to RGB, ``sum_c w_c * x = (sum_c w_c) * x``,
  so a grey model sees exactly the activations the RGB model sees on the replicated image
  (normalise grey pixels with the mean of the RGB means and stds, as the data pipeline does).

``source="xrv"``: torchxrayvision's classifiers are torchvision layouts (its DenseNet keeps
torchvision's module names; its ResNet wraps a torchvision ResNet as ``model``), with a
1-channel stem and an ``op_threshs`` buffer. :func:`xrv_state_dict` strips the wrapper's
``model.`` prefix and sets the thresholds aside (reported under ``"skipped"``; read them with
:func:`covidmt_jax.xrv.read_op_threshs`); everything else maps as for torchvision.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from flax import nnx

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
_IGNORED_SUFFIXES = ("num_batches_tracked",)
SOURCES = ("torchvision", "timm", "xrv")
#: torchxrayvision's buffer of per-output operating thresholds (not a weight).
XRV_THRESHOLDS_KEY = "op_threshs"
_LAYOUT = {"xrv": "torchvision"}  # source -> the layout its state dicts use


class WeightImportError(ValueError):
    """Raised when a state dict does not fit the model; lists every problem."""


def _child(node: Any, key: Any) -> Any:
    return node[key] if isinstance(key, int) else getattr(node, key)


def torch_key(model: nnx.Module, path: tuple) -> str:
    """The PyTorch ``state_dict`` key of the NNX variable at ``path`` in ``model``."""
    out: list[str] = []
    node, i = model, 0
    while i < len(path) - 1:
        renames = node.torch_renames() if hasattr(node, "torch_renames") else {}
        for k in range(len(path) - 1 - i, 0, -1):
            dotted = ".".join(str(p) for p in path[i:i + k])
            if dotted in renames:
                out.append(renames[dotted])
                for p in path[i:i + k]:
                    node = _child(node, p)
                i += k
                break
        else:
            out.append(str(path[i]))
            node = _child(node, path[i])
            i += 1
    leaf = path[-1]
    if leaf not in _LEAF_NAMES:
        raise WeightImportError(f"no PyTorch equivalent for variable {'.'.join(map(str, path))}")
    out.append(_LEAF_NAMES[leaf])
    return ".".join(out)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a ``.safetensors`` or ``.pth`` file as float32 numpy arrays (no pickle).

    ``.pth`` checkpoints that wrap the weights (``{"state_dict": ...}`` or ``{"model": ...}``)
    are unwrapped, and a DataParallel ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        out = {}
        try:
            with safe_open(str(path), framework="numpy") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types
            raise WeightImportError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{path}: reading .pth files needs torch (pip install "
                              "'covidmt_jax[torch]'), or convert the file to .safetensors") from e
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightImportError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
        if not isinstance(obj, Mapping):
            raise WeightImportError(f"{path}: expected a state dict, found {type(obj).__name__}")
        out = {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
               for k, v in obj.items() if hasattr(v, "detach")}
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return {k: np.asarray(v) for k, v in out.items()}


def xrv_state_dict(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """A torchxrayvision classifier state dict -> (torchvision-layout weights, ``op_threshs`` or None).

    ``xrv.models.ResNet`` keeps its torchvision ResNet under ``model.`` (its release files are
    that inner state dict, without the prefix); ``xrv.models.DenseNet`` uses torchvision's
    names directly. ``op_threshs`` (``[K]``, NaN where the weights give no threshold) is
    returned separately.
    """
    sd = dict(state_dict)
    thresholds = sd.pop(XRV_THRESHOLDS_KEY, None)
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    return sd, None if thresholds is None else np.asarray(thresholds, np.float32)


def _convert(value: np.ndarray, target_shape: tuple, leaf: str) -> np.ndarray | None:
    """PyTorch tensor -> NNX layout, or None when the shapes cannot be reconciled."""
    v = np.asarray(value, np.float32)
    if leaf == "kernel" and v.ndim == 4:
        v = v.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if v.shape[2] == 3 and target_shape[2] == 1:
            v = v.sum(axis=2, keepdims=True)  # RGB stem -> grey stem (documented above)
    elif leaf == "kernel" and v.ndim == 2:
        v = v.T
    return v if tuple(v.shape) == tuple(target_shape) else None


def load_torch_weights(model: nnx.Module, path: str | os.PathLike | Mapping[str, np.ndarray], *,
                       source: str = "torchvision", strict: bool = True,
                       skip_head: bool = False) -> dict[str, list[str]]:
    """Load a torchvision/timm state dict into ``model`` in place.

    Args:
      model: a zoo model, or a model exposing ``torch_import_target()`` (COVIDMT: its backbone).
      path: ``.safetensors`` / ``.pth`` file, or an already-read ``{key: array}`` mapping.
      source: ``"torchvision"``, ``"timm"`` or ``"xrv"`` (torchxrayvision: a torchvision layout,
        see the module docstring); checked against the model's supported sources.
      strict: raise :class:`WeightImportError` listing all missing, unexpected and mis-shaped
        keys; with ``strict=False`` the report is returned and matching tensors are loaded.
      skip_head: leave the classifier head (e.g. 1000 ImageNet classes) initialised and ignore
        the file's head tensors.

    Returns ``{"loaded", "missing", "unexpected", "mismatched", "skipped"}`` key lists.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    target = model.torch_import_target() if hasattr(model, "torch_import_target") else model
    supported = getattr(target, "torch_sources", SOURCES)
    if _LAYOUT.get(source, source) not in supported:
        raise ValueError(f"{type(target).__name__} imports weights from {supported}, not {source!r}")
    name = str(path) if not isinstance(path, Mapping) else "<state dict>"
    state_dict = dict(path) if isinstance(path, Mapping) else read_state_dict(path)
    set_aside: list[str] = []
    if source == "xrv":
        state_dict, thresholds = xrv_state_dict(state_dict)
        set_aside = [XRV_THRESHOLDS_KEY] if thresholds is not None else []
    head_prefixes: Iterable[str] = target.torch_head_prefixes() if hasattr(target, "torch_head_prefixes") else ()
    head_prefixes = tuple(head_prefixes)

    def is_head(key: str) -> bool:
        return any(key.startswith(p) for p in head_prefixes)

    flat = nnx.to_flat_state(nnx.state(target, nnx.Any(nnx.Param, nnx.BatchStat)))
    report: dict[str, list[str]] = {"loaded": [], "missing": [], "unexpected": [], "mismatched": [],
                                    "skipped": list(set_aside)}
    used: set[str] = set()
    new_values: list[tuple[tuple, np.ndarray]] = []
    for p, var in flat:
        key = torch_key(target, p)
        if skip_head and is_head(key):
            report["skipped"].append(key)
            continue
        if key not in state_dict:
            report["missing"].append(key)
            continue
        used.add(key)
        arr = _convert(state_dict[key], tuple(var.shape), p[-1])
        if arr is None:
            report["mismatched"].append(
                f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(var.shape)} ({'.'.join(map(str, p))})")
            continue
        new_values.append((p, arr))
        report["loaded"].append(key)
    for key in state_dict:
        if key in used or key.endswith(_IGNORED_SUFFIXES):
            continue
        if skip_head and is_head(key):
            report["skipped"].append(key)
            continue
        report["unexpected"].append(key)
    problems = [(k, report[k]) for k in ("missing", "unexpected", "mismatched") if report[k]]
    if problems and strict:
        lines = [f"{name}: state dict does not fit {type(target).__name__} (source={source}):"]
        for kind, keys in problems:
            lines.append(f"  {len(keys)} {kind}:")
            lines.extend(f"    {k}" for k in keys)
        if not skip_head and head_prefixes and any(is_head(k.split(':')[0]) for _, ks in problems for k in ks):
            lines.append("  (the classifier head differs: pass skip_head=True to keep ours initialised)")
        raise WeightImportError("\n".join(lines))
    _assign(target, new_values)
    return report


def _assign(model: nnx.Module, values: list[tuple[tuple, np.ndarray]]) -> None:
    """Write arrays into the model's variables (dtype of each variable kept)."""
    import jax.numpy as jnp
    for p, arr in values:
        node = model
        for k in p[:-1]:
            node = _child(node, k)
        var = getattr(node, p[-1])
        var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))  # a shape-only value too
