"""The lung segmenter API (any size / bit depth / colour in, per-image maps out) and the
shipped U-Net's quality on real, independent lung masks."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from covidmt_jax import models
from covidmt_jax.export import save_model
from covidmt_jax.lungs import SHIPPED_DIR, LungSegmenter, load_lung_segmenter, lung_segmenter


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory) -> LungSegmenter:
    d = tmp_path_factory.mktemp("unet")
    kw = {"depth": 2, "base_width": 4, "in_channels": 1, "num_classes": 1}
    save_model(d, models.create("unet", rngs=0, **kw), name="unet", model_kwargs=kw,
               metadata={"image_size": 32})
    return load_lung_segmenter(d)


def test_any_size_depth_and_colour(tiny_segmenter):
    rng = np.random.RandomState(0)
    grey8 = (rng.rand(40, 57) * 255).astype(np.uint8)
    inputs = [
        grey8,                                              # uint8 array, non-square
        (rng.rand(64, 48) * 65535).astype(np.uint16),       # 16-bit array
        rng.rand(30, 30, 3).astype(np.float32),             # float RGB in [0, 1]
        Image.fromarray(grey8),                             # PIL 8-bit grey
        Image.fromarray((rng.rand(20, 70, 3) * 255).astype(np.uint8)),  # PIL RGB
        Image.fromarray((rng.rand(33, 21) * 65535).astype(np.uint16)),  # PIL 16-bit
    ]
    masks = tiny_segmenter.lung_masks(inputs, batch_size=4)
    expected = [(40, 57), (64, 48), (30, 30), (40, 57), (20, 70), (33, 21)]
    assert [m.shape for m in masks] == expected
    assert all(m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1 for m in masks)
    # the same image as array and as PIL gives the same map
    np.testing.assert_allclose(masks[0], masks[3], atol=1e-5)


def test_encoded_files_and_bad_inputs(tiny_segmenter, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24), 128, np.uint8)).save(buf, format="PNG")
    (tmp_path / "x.png").write_bytes(buf.getvalue())
    out = tiny_segmenter.lung_masks([str(tmp_path / "x.png"), buf.getvalue()])
    assert [m.shape for m in out] == [(24, 24), (24, 24)]
    with pytest.raises(ValueError, match="image 0.*\\[0, 1\\]"):
        tiny_segmenter.lung_masks([np.full((8, 8), 3.0, np.float32)])
    with pytest.raises(ValueError, match="image 1"):
        tiny_segmenter.lung_masks([np.zeros((8, 8), np.uint8), np.zeros((2, 8, 8, 8), np.uint8)])
    with pytest.raises(FileNotFoundError, match="no lung U-Net"):
        lung_segmenter(tmp_path)


def _dice(pred: np.ndarray, true: np.ndarray) -> float:
    inter = np.logical_and(pred, true).sum()
    return float(2 * inter / max(pred.sum() + true.sum(), 1))


@pytest.mark.skipif(not (SHIPPED_DIR / "model.json").is_file(), reason="no shipped lung U-Net in this checkout")
def test_shipped_unet_on_independent_pairs(shared_data):
    """Dice of the shipped U-Net on the 4 imlab pairs (never seen in training)."""
    import csv
    from covidmt_jax.data.images import load_grey, load_mask
    folder = shared_data / "samples" / "imlab_lungs_4" / "Demo"
    with open(folder / "idx.csv") as f:
        pairs = [(row["img"], row["mask"]) for row in csv.DictReader(f)]
    assert len(pairs) == 4
    seg = lung_segmenter()
    probs = seg.lung_masks([load_grey(folder / "Data" / img) for img, _ in pairs])
    dices = [_dice(p >= 0.5, load_mask(folder / "Data" / m)) for p, (_, m) in zip(probs, pairs)]
    assert np.mean(dices) > 0.85, dices
