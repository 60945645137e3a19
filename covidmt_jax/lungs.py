"""The shipped lung segmenters: U-Nets trained on real lung masks, ready for OLS scoring.

Two conventions, chosen by name with :func:`lung_segmenter`:

* ``"fields"`` (the default): visible lung fields, heart and mediastinum excluded (the
  Montgomery / Shenzhen / COVID-QU-Ex convention);
* ``"anatomical"``: both lungs including the retrocardiac lung down to the posterior
  recesses (the V7 Labs convention).

Each is an exported single-output U-Net in ``covidmt_jax/assets/`` (:data:`SEGMENTERS`;
``model.json`` + ``params.safetensors``, no
pickle); see the README's model cards for data, licences and validation Dice.
``lung_masks(images)`` takes PIL images, paths, encoded bytes or arrays of any size and
aspect (8/16-bit integers, floats in [0, 1], grey or RGB), resizes each to the network's
square input by the model's resize policy (``metadata.resize``: ``"squash"`` = stretch, as
in the square training sets, the default; ``"letterbox"`` = long side to the input size,
black padding), predicts, and maps the probability map back to that image's own pixel size.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from covidmt_jax.data.images import load_grey
from covidmt_jax.export import load_model, read_spec
from covidmt_jax.normalisation import normalise

__all__ = ["SHIPPED_DIR", "SEGMENTERS", "RESIZE_POLICIES", "LungSegmenter", "load_lung_segmenter",
           "lung_segmenter", "letterbox_geometry", "resize_to_input", "resize_from_input"]

_ASSETS = Path(__file__).resolve().parent / "assets"
#: The shipped segmenters by convention name (the first is the default).
SEGMENTERS = {"fields": _ASSETS / "lung_unet_fields", "anatomical": _ASSETS / "lung_unet_anatomical"}
SHIPPED_DIR = SEGMENTERS["fields"]
RESIZE_POLICIES = ("squash", "letterbox")


def _to_grey01(image: Any, index: int) -> np.ndarray:
    """One input image -> float32 ``[H, W]`` in [0, 1]."""
    if isinstance(image, (str, os.PathLike, bytes)):
        return load_grey(image)
    if isinstance(image, Image.Image):
        return load_grey(_pil_bytes(image), name=f"image {index}")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        arr = arr.astype(np.float32) if np.asarray(image).dtype.kind == "f" else arr
        kind_source = np.asarray(image).dtype
    else:
        kind_source = arr.dtype
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"image {index}: expected [H, W], [H, W, 1] or [H, W, 3], got {np.shape(image)}")
    if kind_source == np.uint8:
        return (arr / 255.0).astype(np.float32)
    if kind_source == np.uint16:
        return (arr / 65535.0).astype(np.float32)
    if kind_source.kind == "f":
        a = arr.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"image {index}: contains NaN or Inf")
        if a.min() < -1e-3 or a.max() > 1 + 1e-3:
            raise ValueError(f"image {index}: float images must be in [0, 1] (got {a.min():.3g}..{a.max():.3g})")
        return np.clip(a, 0, 1)
    raise ValueError(f"image {index}: unsupported dtype {kind_source}")


def _pil_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG" if image.mode not in ("CMYK",) else "TIFF")
    return buf.getvalue()


def _resize(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if x.shape == tuple(hw):
        return x.astype(np.float32)
    return np.asarray(Image.fromarray(x.astype(np.float32), mode="F").resize(
        (hw[1], hw[0]), Image.BILINEAR), np.float32)


def letterbox_geometry(hw: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """``(new_h, new_w, top, left)``: an ``[H, W]`` film scaled so its long side is ``size``,
    placed in the centre of a ``size x size`` square."""
    h, w = hw
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    return nh, nw, (size - nh) // 2, (size - nw) // 2


def resize_to_input(x: np.ndarray, size: int, policy: str = "squash", *, nearest: bool = False) -> np.ndarray:
    """``[H, W]`` (float, or uint8 kept uint8) -> ``[size, size]`` by ``policy``: ``"squash"``
    stretches, ``"letterbox"`` keeps the aspect ratio and pads with 0 (black).
    Bilinear, or nearest neighbour for masks."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"resize_to_input expects [H, W], got {arr.shape}")
    keep8 = arr.dtype == np.uint8
    im = Image.fromarray(arr if keep8 else arr.astype(np.float32))
    res = Image.NEAREST if nearest else Image.BILINEAR
    if policy == "squash":
        return np.asarray(im.resize((size, size), res) if im.size != (size, size) else im)
    nh, nw, top, left = letterbox_geometry(arr.shape, size)
    out = np.zeros((size, size), np.uint8 if keep8 else np.float32)
    out[top:top + nh, left:left + nw] = np.asarray(im.resize((nw, nh), res))
    return out


def resize_from_input(p: np.ndarray, hw: tuple[int, int], policy: str = "squash") -> np.ndarray:
    """Inverse of :func:`resize_to_input` for a ``[S, S]`` map: -> float32 ``[H, W]`` (bilinear)."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    if policy == "letterbox":
        nh, nw, top, left = letterbox_geometry(hw, p.shape[0])
        p = p[top:top + nh, left:left + nw]
    return _resize(np.asarray(p, np.float32), hw)


class LungSegmenter:
    """A U-Net plus its input handling. ``model`` is the NNX U-Net (for fused jitted steps:
    feed it normalised ``[B, S, S, 1]`` images and apply a sigmoid)."""

    def __init__(self, model: nnx.Module, input_size: int, metadata: dict | None = None):
        if int(getattr(model, "num_classes", 1) or 1) != 1:
            raise ValueError(f"a LungSegmenter needs a single-output U-Net, got {model.num_classes} outputs "
                             "(export one convention's head: covidmt_jax.lung_training.export_convention)")
        self.model = model
        self.input_size = int(input_size)
        self.metadata = metadata or {}
        self.resize = self.metadata.get("resize", "squash")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"metadata.resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        self.convention = self.metadata.get("convention", "")
        graphdef, state = nnx.split(model)
        self._graphdef, self._state = graphdef, state

        @jax.jit
        def predict(state, x):
            return jax.nn.sigmoid(nnx.merge(graphdef, state)(x))[..., 0]

        self._predict = predict

    def predict_normalised(self, x: jax.Array) -> jax.Array:
        """``[B, S, S, 1]`` normalised images -> ``[B, S, S]`` lung probabilities."""
        return self._predict(self._state, x)

    def lung_masks(self, images: Sequence[Any], *, batch_size: int = 8) -> list[np.ndarray]:
        """One float32 lung-probability map per image, at that image's own ``[H, W]``."""
        if isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype != object:
            if images.ndim == 2 or images.shape[-1] in (1, 3, 4):
                images = [images]
        greys = [_to_grey01(im, i) for i, im in enumerate(images)]
        s = self.input_size
        out: list[np.ndarray] = []
        for start in range(0, len(greys), batch_size):
            chunk = greys[start:start + batch_size]
            x = np.stack([normalise(resize_to_input(g, s, self.resize)) for g in chunk])[..., None]
            n = len(chunk)
            if n < batch_size:  # static batch shape: one compilation
                x = np.concatenate([x, np.zeros((batch_size - n, s, s, 1), np.float32)])
            probs = np.asarray(self.predict_normalised(jnp.asarray(x)))[:n]
            out.extend(np.clip(resize_from_input(p, g.shape, self.resize), 0.0, 1.0)
                       for p, g in zip(probs, chunk))
        return out

    def __repr__(self) -> str:
        return (f"LungSegmenter({self.convention or 'custom'}, input_size={self.input_size}, "
                f"resize={self.resize}, {self.metadata.get('summary', '')})")


def load_lung_segmenter(directory: str | os.PathLike) -> LungSegmenter:
    """A :class:`LungSegmenter` from an exported U-Net (``train`` exports ``export/best``)."""
    spec = read_spec(directory)
    if spec["name"] != "unet":
        raise ValueError(f"{directory}: holds a {spec['name']!r} model, not a lung U-Net")
    size = spec.get("metadata", {}).get("image_size")
    if not size:
        raise ValueError(f"{directory}/model.json: metadata.image_size (the U-Net's input size) missing")
    return LungSegmenter(load_model(directory), int(size), spec.get("metadata"))


def lung_segmenter(name: str | os.PathLike | None = "fields") -> LungSegmenter:
    """A shipped segmenter by convention name (``"fields"``, the default, or
    ``"anatomical"``; see :data:`SEGMENTERS`), or one exported to a directory."""
    if name is None or name == "":
        name = "fields"
    if isinstance(name, str) and name in SEGMENTERS:
        directory = SEGMENTERS[name]
    elif isinstance(name, str) and os.sep not in name and "/" not in name and not Path(name).exists():
        raise ValueError(f"unknown lung segmenter {name!r}: use one of {sorted(SEGMENTERS)} or an export directory")
    else:
        directory = Path(name)
    if not (directory / "model.json").is_file():
        raise FileNotFoundError(
            f"{directory}: no lung U-Net there. The package ships {sorted(SEGMENTERS)} in {_ASSETS}; "
            "train one with covidmt_jax.lung_training (or configs/unet_lungs.py) and pass its export folder")
    return load_lung_segmenter(directory)
