"""The shipped lung segmenter: a U-Net trained on real lung masks, ready for OLS scoring.

``lung_segmenter()`` loads the weights stored inside the package
(``covidmt_jax/assets/lung_unet``: ``model.json`` + ``params.safetensors``, no pickle); see
the README's model card for the data, licences and validation Dice. ``lung_masks(images)``
takes PIL images or arrays of any size and aspect (8/16-bit integers, floats in [0, 1],
grey or RGB), resizes each to the network's square input (aspect NOT kept, as in the
training data, whose images were squashed to 512 x 512), predicts, and maps the probability
map back to that image's own pixel size.
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

__all__ = ["SHIPPED_DIR", "LungSegmenter", "load_lung_segmenter", "lung_segmenter"]

SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "lung_unet"


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


class LungSegmenter:
    """A U-Net plus its input handling. ``model`` is the NNX U-Net (for fused jitted steps:
    feed it normalised ``[B, S, S, 1]`` images and apply a sigmoid)."""

    def __init__(self, model: nnx.Module, input_size: int, metadata: dict | None = None):
        self.model = model
        self.input_size = int(input_size)
        self.metadata = metadata or {}
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
            x = np.stack([normalise(_resize(g, (s, s))) for g in chunk])[..., None]
            n = len(chunk)
            if n < batch_size:  # static batch shape: one compilation
                x = np.concatenate([x, np.zeros((batch_size - n, s, s, 1), np.float32)])
            probs = np.asarray(self.predict_normalised(jnp.asarray(x)))[:n]
            out.extend(np.clip(_resize(p, g.shape), 0.0, 1.0) for p, g in zip(probs, chunk))
        return out

    def __repr__(self) -> str:
        return f"LungSegmenter(input_size={self.input_size}, {self.metadata.get('summary', '')})"


def load_lung_segmenter(directory: str | os.PathLike) -> LungSegmenter:
    """A :class:`LungSegmenter` from an exported U-Net (``train`` exports ``export/best``)."""
    spec = read_spec(directory)
    if spec["name"] != "unet":
        raise ValueError(f"{directory}: holds a {spec['name']!r} model, not a lung U-Net")
    size = spec.get("metadata", {}).get("image_size")
    if not size:
        raise ValueError(f"{directory}/model.json: metadata.image_size (the U-Net's input size) missing")
    return LungSegmenter(load_model(directory), int(size), spec.get("metadata"))


def lung_segmenter(directory: str | os.PathLike | None = None) -> LungSegmenter:
    """The shipped lung U-Net (or one exported to ``directory``)."""
    directory = Path(directory) if directory else SHIPPED_DIR
    if not (directory / "model.json").is_file():
        raise FileNotFoundError(
            f"{directory}: no lung U-Net there. The package ships one in {SHIPPED_DIR}; if it is "
            "missing, train it with configs/unet_lungs.py and pass WORKDIR/export/best")
    return load_lung_segmenter(directory)
