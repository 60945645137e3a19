"""torchxrayvision's classifiers in JAX: its conventions, preprocessing and weight import.

torchxrayvision (Cohen et al. 2022, ``pip install torchxrayvision``) ships the de-facto public
chest-X-ray classifiers: DenseNet-121s at 224 px (``xrv.models.DenseNet``) and a ResNet-50 at
512 px (``xrv.models.ResNet``, ``resnet50-res512-all``). Its conventions, reproduced here:

- **Pixels**: one channel scaled to [-1024, 1024]: ``normalize(img, maxval)`` =
  ``(2 * img / maxval - 1) * 1024`` (:func:`normalize`); RGB files are averaged over channels
  (its README's ``img.mean(2)``).
- **Geometry**: ``XRayCenterCrop`` (square crop of the long side, :func:`center_crop`) then
  ``XRayResizer(size)`` (scikit-image ``resize``: Gaussian anti-aliasing when shrinking,
  bilinear, constant border, :func:`resize`). :func:`preprocess` chains the three, equal to
  torchxrayvision's own transforms (tests/test_xrv.py).
- **Resolution**: its models resize a square input to their native resolution
  (``utils.fix_resolution``: ``F.interpolate(bilinear, antialias=True)``); :class:`XrvClassifier`
  does the same with ``jax.image.resize(linear, antialias=True)`` (the same triangle filter).
- **Outputs**: 18 logits in :data:`PATHOLOGIES` order ('' where a weight set was not trained for
  a pathology). With operating thresholds ``op_threshs`` (a ``[18]`` buffer in the state
  dict, NaN where absent) ``forward`` returns ``op_norm(sigmoid(logits), op_threshs)``: a
  piecewise-linear recalibration that maps each threshold to 0.5 (:func:`op_norm`), so
  ``op_norm(p) >= 0.5  <=>  p >= op_thresh``: a decision at 0.5 of the calibrated output is
  the decision ``sigmoid(logit) >= op_thresh`` (what the scoring ``xrv`` kind uses).

Weight files. ``.pth`` / ``.pt`` state dicts (``torch.save(model.state_dict(), f)``) and
``.safetensors`` files are read without pickle. torchxrayvision's DenseNet release files are
pickled whole modules, which this package does not unpickle; convert one once with
torchxrayvision itself::

    python -c "import torch, torchxrayvision as xrv; \\
        m = xrv.models.DenseNet(weights='densenet121-res224-all'); \\
        torch.save(m.state_dict(), 'densenet121-res224-all.pt')"

(its state dict carries ``op_threshs``). The ResNet-50 release file is a plain state dict of
the inner torchvision ResNet and loads as is; its thresholds come from :data:`WEIGHTS` when the
weight-set name is given (``resnet50-res512-all``).

Not imported: torchxrayvision's PSPNet chest-anatomy segmenter
(``xrv.baseline_models.chestx_det.PSPNet``, 14 structures incl. left/right lung at 512 px). It
is a ResNet-101-depth encoder with a 3-conv stem, dilated (rate 2 and 4) stages kept at stride 8,
a pyramid-pooling module and a bilinear upsampling head: the zoo's conv layer has no dilation,
there is no PSP module to reuse, and at 512 px it costs several times a 512-px ResNet-50 per
image, which would dominate a CPU scoring step. The shipped U-Nets stay the lung-mask choices.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from covidmt_jax import models
from covidmt_jax.models.base import Backbone
from covidmt_jax.normalisation import denormalise
from covidmt_jax.weights import WeightImportError, load_torch_weights, read_state_dict, xrv_state_dict

#: ``xrv.datasets.default_pathologies``: the 18 outputs of every torchxrayvision classifier.
PATHOLOGIES = ('Atelectasis', 'Consolidation', 'Infiltration', 'Pneumothorax', 'Edema', 'Emphysema',
               'Fibrosis', 'Effusion', 'Pneumonia', 'Pleural_Thickening', 'Cardiomegaly', 'Nodule',
               'Mass', 'Hernia', 'Lung Lesion', 'Fracture', 'Lung Opacity',
               'Enlarged Cardiomediastinum')

#: Architectures: zoo model name and native input resolution.
ARCHS = {"densenet121": 224, "resnet50": 512}

_NAN = float("nan")


def _labels(trained: str) -> tuple[str, ...]:
    """The 18 labels with '' where ``trained`` (a string of 18 '1'/'0') has '0'."""
    return tuple(p if t == "1" else "" for p, t in zip(PATHOLOGIES, trained))


#: torchxrayvision 1.5.7's published weight sets (``xrv.models.model_urls``): architecture,
#: labels ('' = not trained for it) and operating thresholds (NaN = none). Used when a weight
#: set is named in a spec (``xrv:densenet121-res224-rsna@FILE``); thresholds carried by the
#: file take precedence. tests/test_xrv.py checks this table against the installed package.
WEIGHTS: dict[str, dict[str, Any]] = {
    "densenet121-res224-all": {"arch": "densenet121", "labels": _labels("1" * 18), "op_threshs": (
        0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724,
        0.103246614, 0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766,
        0.053369623, 0.035975814, 0.20204692, 0.05015312)},
    "densenet121-res224-nih": {"arch": "densenet121", "labels": _labels("1" * 14 + "0" * 4), "op_threshs": (
        0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932, 0.012037827,
        0.038744126, 0.0037213727, 0.014730946, 0.016149804, 0.054241467, 0.037198864, 0.0004403434,
        _NAN, _NAN, _NAN, _NAN)},
    "densenet121-res224-pc": {"arch": "densenet121", "labels": _labels("1" * 14 + "0100"), "op_threshs": (
        0.031012505, 0.013347598, 0.081435576, 0.001262615, 0.002587246, 0.0035944257, 0.0023071,
        0.055412333, 0.044385884, 0.042766232, 0.043258056, 0.037629247, 0.005658899, 0.0091741895,
        _NAN, 0.026507627, _NAN, _NAN)},
    "densenet121-res224-chex": {"arch": "densenet121", "labels": _labels("110110011010001111"), "op_threshs": (
        0.1988969, 0.05710573, _NAN, 0.0531293, 0.1435217, _NAN, _NAN, 0.27212676, 0.07749717, _NAN,
        0.19712369, _NAN, _NAN, _NAN, 0.09932402, 0.09273402, 0.3270967, 0.10888247)},
    "densenet121-res224-rsna": {"arch": "densenet121", "labels": _labels("0" * 8 + "1" + "0" * 7 + "10"),
                                "op_threshs": tuple(0.13486601 if i == 8 else 0.13511065 if i == 16 else _NAN
                                                    for i in range(18))},
    "densenet121-res224-mimic_nb": {"arch": "densenet121", "labels": _labels("110110011010001111"), "op_threshs": (
        0.08558747, 0.011884617, _NAN, 0.0040595434, 0.010733786, _NAN, _NAN, 0.118761964, 0.022924708,
        _NAN, 0.06358637, _NAN, _NAN, _NAN, 0.022143636, 0.017476924, 0.1258702, 0.014020768)},
    "densenet121-res224-mimic_ch": {"arch": "densenet121", "labels": _labels("110110011010001111"), "op_threshs": (
        0.09121389, 0.010573786, _NAN, 0.005023008, 0.003698257, _NAN, _NAN, 0.08001232, 0.037242252,
        _NAN, 0.05006329, _NAN, _NAN, _NAN, 0.019866971, 0.03823637, 0.11303808, 0.0069147074)},
    "resnet50-res512-all": {"arch": "resnet50", "labels": _labels("1" * 18), "op_threshs": (
        0.51570356, 0.50444704, 0.53787947, 0.50723547, 0.5025118, 0.5035252, 0.5038076, 0.51862943,
        0.5078151, 0.50724894, 0.5056339, 0.510706, 0.5053923, 0.5020846, _NAN, 0.5080557, 0.5138526,
        _NAN)},
}


# ============================================================================ preprocessing
def normalize(img: np.ndarray, maxval: float) -> np.ndarray:
    """``xrv.utils.normalize``: pixels in [0, maxval] -> float32 ``(2 * img / maxval - 1) * 1024``
    (any shape). Raises ``ValueError`` when the image exceeds ``maxval`` (as theirs)."""
    img = np.asarray(img)
    if img.max() > maxval:
        raise ValueError(f"max image value ({img.max()}) higher than expected bound ({maxval}).")
    return (2 * (img.astype(np.float32) / maxval) - 1.0) * 1024


def center_crop(img: np.ndarray) -> np.ndarray:
    """``XRayCenterCrop``: ``[..., H, W] -> [..., s, s]``, ``s = min(H, W)``, centred as theirs
    (start ``W // 2 - s // 2``)."""
    y, x = img.shape[-2:]
    s = min(y, x)
    sx, sy = x // 2 - s // 2, y // 2 - s // 2
    return img[..., sy:sy + s, sx:sx + s]


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """``XRayResizer(size)`` (scikit-image engine): ``[1, H, W] -> float32 [1, size, size]``.

    ``skimage.transform.resize(img, (1, size, size), mode="constant", preserve_range=True)``
    spelled out with scipy: Gaussian anti-aliasing (sigma ``max(0, (H / size - 1) / 2)`` per
    axis, zero border) when shrinking, bilinear ``ndimage.zoom(grid_mode=True)``, then clipping
    to the input range.
    """
    from scipy import ndimage
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[0] != 1:
        raise ValueError(f"resize expects one image [1, H, W], got shape {img.shape}")
    if img.dtype.char not in "fd":
        img = img.astype(np.float64)
    out_shape = (1, size, size)
    factors = np.divide(img.shape, out_shape)
    if any(o < i for o, i in zip(out_shape, img.shape)):
        filtered = ndimage.gaussian_filter(img, np.maximum(0, (factors - 1) / 2), cval=0, mode="grid-constant")
    else:
        filtered = img
    out = ndimage.zoom(filtered, [1 / f for f in factors], order=1, mode="grid-constant", cval=0, grid_mode=True)
    lo, hi = np.min(img), np.max(img)
    if not lo <= 0 <= hi and np.min(out) <= 0 <= np.max(out):  # skimage keeps cval in range
        lo, hi = min(lo, img.dtype.type(0)), max(hi, img.dtype.type(0))
    np.clip(out, lo, hi, out=out)
    return out.astype(np.float32)


def preprocess(img: np.ndarray, *, maxval: float = 255, size: int = 224) -> np.ndarray:
    """torchxrayvision's input pipeline: ``[H, W]`` or ``[H, W, C]`` pixels in [0, maxval] ->
    float32 ``[1, size, size]`` in [-1024, 1024].

    ``normalize(img, maxval)`` -> channel mean for colour images -> ``XRayCenterCrop()`` ->
    ``XRayResizer(size)``, as torchxrayvision's README. Feed ``[B, size, size, 1]`` batches
    (``x.transpose(0, 2, 3, 1)``) to an :class:`XrvClassifier` with ``input_scale="xrv"``.
    """
    x = normalize(img, maxval)
    if x.ndim == 3:
        x = x.mean(2)
    if x.ndim != 2:
        raise ValueError(f"preprocess expects an image [H, W] or [H, W, C], got shape {np.shape(img)}")
    return resize(center_crop(x[None]), size)


def from_pipeline(x: jax.Array) -> jax.Array:
    """Images normalised by the data pipeline (``normalisation.normalise`` of grey values in
    [0, 1]) -> torchxrayvision's scale ``(2 * grey - 1) * 1024`` (any shape)."""
    return (2 * denormalise(x) - 1) * 1024


def op_norm(probs: jax.Array, op_threshs: jax.Array) -> jax.Array:
    """``xrv.models.op_norm``: ``[B, K]`` probabilities -> calibrated ``[B, K]``.

    ``p < t``: ``p / (2 t)``; ``p >= t``: ``1 - (1 - p) / (2 (1 - t))``; NaN threshold: 0.5.
    """
    t = jnp.broadcast_to(op_threshs, probs.shape)
    has = ~jnp.isnan(t)
    ts = jnp.where(has, t, 0.5)  # keeps NaN out of the unused branch (and its gradient)
    low = probs / (ts * 2)
    high = 1.0 - (1.0 - probs) / ((1 - ts) * 2)
    return jnp.where(has, jnp.where(probs < ts, low, high), 0.5).astype(probs.dtype)


# ============================================================================ models
INPUT_SCALES = ("xrv", "pipeline")


class XrvClassifier(Backbone):
    """A torchxrayvision classifier: a zoo DenseNet-121 / ResNet-50 with its conventions.

    ``__call__(x) -> [B, 18]`` logits, ``predict(x) -> [B, 18]`` = torchxrayvision's
    ``forward`` (``op_norm(sigmoid(logits))`` when thresholds are known, else the logits).
    ``features`` / ``pool_and_classify`` are the wrapped network's (Grad-CAM: the DenseNet's
    norm5 output, the ResNet's layer4), after the input adaptation:

    - ``input_scale="xrv"``: inputs ``[B, H, W, 1]`` already in [-1024, 1024] (:func:`preprocess`);
      ``"pipeline"``: inputs normalised by this package's data pipeline (scoring), rescaled by
      :func:`from_pipeline`;
    - square inputs of another size are resized to ``resolution`` (as torchxrayvision's
      ``fix_resolution``); non-square inputs raise, as theirs.

    ``classification_tasks`` = the labels (so a scoring entry's ``task`` names the output)
    and ``decision_thresholds`` = ``op_threshs`` (NaN where absent) or None.
    """

    def __init__(self, net: nnx.Module, *, arch: str, labels: Sequence[str],
                 op_threshs: Sequence[float] | None, resolution: int, input_scale: str = "xrv"):
        if input_scale not in INPUT_SCALES:
            raise ValueError(f"input_scale must be one of {INPUT_SCALES}, got {input_scale!r}")
        self.net = net
        self.arch = arch
        self.labels = tuple(labels)
        self.classification_tasks = self.labels
        self.num_classes = len(self.labels)
        self.in_channels = 1
        self.feature_channels = dict(net.feature_channels)
        self.decision_thresholds = None if op_threshs is None else tuple(float(t) for t in op_threshs)
        self.resolution = int(resolution)
        self.input_scale = input_scale

    def adapt_input(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, 1]`` -> ``[B, r, r, 1]`` on torchxrayvision's scale at its resolution."""
        self._check_input(x)
        if x.shape[1] != x.shape[2]:
            raise ValueError(f"torchxrayvision models need square images, got {x.shape[1]}x{x.shape[2]}: "
                             "centre-crop first (covidmt_jax.xrv.center_crop)")
        if self.input_scale == "pipeline":
            x = from_pipeline(x)
        r = self.resolution
        if x.shape[1] != r:
            x = jax.image.resize(x, (x.shape[0], r, r, x.shape[3]), method="linear", antialias=True)
        return x

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        return self.net.features(self.adapt_input(x))

    def pool_and_classify(self, last_conv: jax.Array) -> jax.Array:
        return self.net.pool_and_classify(last_conv)

    def pooled(self, x: jax.Array) -> jax.Array:
        return self.net.pooled(self.adapt_input(x))

    def predict(self, x: jax.Array) -> jax.Array:
        """torchxrayvision's ``forward``: ``[B, H, W, 1] -> [B, 18]`` calibrated probabilities
        (:func:`op_norm` of the sigmoid) when thresholds are known, else the logits."""
        logits = self(x)
        if self.decision_thresholds is None:
            return logits
        return op_norm(jax.nn.sigmoid(logits.astype(jnp.float32)),
                       jnp.asarray(self.decision_thresholds, jnp.float32))


@dataclasses.dataclass(frozen=True)
class XrvSpec:
    """A parsed ``xrv:NAME@FILE`` model spec: architecture, optional weight-set name, native
    resolution (None: the architecture's or weight set's), file."""
    arch: str
    weights: str | None
    path: str
    resolution: int | None = None


def parse_name(name: str) -> tuple[str, str | None, int | None]:
    """A torchxrayvision model name -> ``(arch, weight set or None, resolution or None)``.

    Names: a weight set of :data:`WEIGHTS` (``densenet121-res224-rsna``), an architecture of
    :data:`ARCHS` (``densenet121``), or an architecture with its input resolution in
    torchxrayvision's naming (``densenet121-res64``: a model run at 64 px).
    """
    if name in WEIGHTS:
        return WEIGHTS[name]["arch"], name, None
    arch, _, res = name.partition("-res")
    if arch in ARCHS and (not res or (res.isdigit() and int(res) >= 32)):
        return arch, None, int(res) if res else None
    raise ValueError(f"unknown torchxrayvision model {name!r}; use an architecture {sorted(ARCHS)} "
                     f"(optionally ARCH-resN, N >= 32) or a weight set {sorted(WEIGHTS)}")


def parse_spec(spec: str) -> XrvSpec:
    """``"xrv:NAME@FILE"`` (``NAME``: see :func:`parse_name`) -> :class:`XrvSpec`."""
    body = spec[len("xrv:"):] if spec.startswith("xrv:") else spec
    name, sep, path = body.partition("@")
    if not sep or not name or not path:
        raise ValueError(f"model spec {spec!r}: expected xrv:NAME@FILE, NAME one of "
                         f"{sorted(ARCHS) + sorted(WEIGHTS)} (or ARCH-resN)")
    try:
        arch, weights, res = parse_name(name)
    except ValueError as e:
        raise ValueError(f"model spec {spec!r}: {e}") from None
    return XrvSpec(arch, weights, path, res)


def read_op_threshs(path: str | os.PathLike | Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The ``op_threshs`` buffer (``[K]`` float32, NaN = none) of a torchxrayvision state dict
    file, or None when the file has none."""
    sd = dict(path) if isinstance(path, Mapping) else read_state_dict(path)
    return xrv_state_dict(sd)[1]


def load(arch: str, path: str | os.PathLike, *, weights: str | None = None, resolution: int | None = None,
         input_scale: str = "xrv", dtype: Any = jnp.float32) -> XrvClassifier:
    """A torchxrayvision classifier from a weight file.

    Args:
      arch: ``"densenet121"`` or ``"resnet50"`` (:data:`ARCHS`).
      path: ``.pt`` / ``.pth`` state dict (``weights_only`` loading) or ``.safetensors`` file of
        ``xrv.models.DenseNet`` / ``xrv.models.ResNet`` (with or without the ``model.`` prefix).
      weights: a weight-set name of :data:`WEIGHTS`: its labels, and its thresholds when the
        file carries none.
      resolution: native input size (default: the architecture's, 224 / 512).
      input_scale: see :class:`XrvClassifier`.
      dtype: compute dtype.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown torchxrayvision architecture {arch!r}; known: {sorted(ARCHS)}")
    if weights is not None and (weights not in WEIGHTS or WEIGHTS[weights]["arch"] != arch):
        raise ValueError(f"weight set {weights!r} is not one of the {arch} sets "
                         f"{sorted(k for k, v in WEIGHTS.items() if v['arch'] == arch)}")
    try:
        sd = read_state_dict(path)
    except WeightImportError as e:
        raise WeightImportError(
            f"{e}\n  torchxrayvision's DenseNet release files are pickled modules: save the state dict "
            "once with torchxrayvision (see covidmt_jax.xrv's docstring)") from e
    weights_sd, thresholds = xrv_state_dict(sd)
    head = "classifier.weight" if arch.startswith("densenet") else "fc.weight"
    if head not in weights_sd:
        raise WeightImportError(f"{path}: no {head!r}: not a torchxrayvision {arch} state dict")
    n_out = int(weights_sd[head].shape[0])
    labels = WEIGHTS[weights]["labels"] if weights else (PATHOLOGIES if n_out == len(PATHOLOGIES) else
                                                          tuple(f"output_{i}" for i in range(n_out)))
    if thresholds is None and weights:
        thresholds = np.asarray(WEIGHTS[weights]["op_threshs"], np.float32)
    if len(labels) != n_out or (thresholds is not None and thresholds.shape != (n_out,)):
        raise WeightImportError(f"{path}: {n_out} outputs, but {len(labels)} labels / thresholds of shape "
                                f"{None if thresholds is None else thresholds.shape}")
    net = models.create_unfilled(arch, num_classes=n_out, in_channels=1, dtype=dtype)
    load_torch_weights(net, sd, source="xrv", strict=True)  # writes every tensor, or raises
    models.check_filled(net, str(path))
    return XrvClassifier(net, arch=arch, labels=labels, op_threshs=thresholds,
                         resolution=resolution or ARCHS[arch], input_scale=input_scale)


def load_spec(spec: str, **kw: Any) -> XrvClassifier:
    """:func:`load` from an ``xrv:NAME@FILE`` spec (:func:`parse_spec`)."""
    s = parse_spec(spec)
    kw.setdefault("resolution", s.resolution)
    return load(s.arch, s.path, weights=s.weights, **kw)


def decision_threshold(model: XrvClassifier, target: str, default: float) -> float:
    """The sigmoid threshold of output ``target``: its operating threshold when the model has
    one (finite), else ``default``."""
    if target not in model.labels:
        raise ValueError(f"{model.arch}: no output {target!r}; its outputs are "
                         f"{[l for l in model.labels if l]}")
    t = None if model.decision_thresholds is None else model.decision_thresholds[model.labels.index(target)]
    return float(t) if t is not None and math.isfinite(t) else float(default)


# ============================================================================ scoring kind
def load_entry(entry: Mapping[str, Any], dtype: Any = jnp.float32) -> XrvClassifier:
    """The classifier of a scoring ``kind="xrv"`` entry, reading the data pipeline's
    normalised images (``input_scale="pipeline"``)."""
    arch, weights, res = parse_name(entry["model"])
    return load(arch, entry["path"], weights=weights, resolution=res, input_scale="pipeline", dtype=dtype)


def entry_from_spec(spec: str, target: str) -> dict[str, str]:
    """``("xrv:NAME@FILE", "Pneumonia")`` -> the keyword arguments of a scoring
    ``classifier_entry`` (``kind="xrv"``, ``model=NAME``, ``path=FILE``, ``task=target``)."""
    s = parse_spec(spec)
    name = spec[len("xrv:"):].partition("@")[0]
    return {"kind": "xrv", "path": s.path, "model": name, "task": target}
