"""DenseNet-121/169/201: torchvision weight import proven equal, Grad-CAM layer equal to
pytorch-grad-cam's DenseNet convention, the backbone interface, bf16 and jit.

Torch models get seeded random weights with randomised BatchNorm statistics, are saved as
.pth and .safetensors, imported, and compared on random inputs at 64x64 and 96x80.
"""
from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from covidmt_jax import explain, models
from covidmt_jax.weights import load_torch_weights, torch_key
from torch_helpers import randomise_batchnorm

REL_TOL = 1e-4
SIZES = [(64, 64), (96, 80)]


def _rel_err(out, ref):
    return float(np.max(np.abs(np.asarray(out, np.float32) - ref)) / np.max(np.abs(ref)))


def _torch_densenet(name, num_classes=10):
    torch = pytest.importorskip("torch", reason="torch extra not installed: pip install '.[torch]'")
    tv = pytest.importorskip("torchvision")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tm = getattr(tv.models, name)(weights=None, num_classes=num_classes)
    return randomise_batchnorm(tm)


@pytest.fixture(scope="module")
def densenet121_files(tmp_path_factory):
    import_torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    tm = _torch_densenet("densenet121")
    d = tmp_path_factory.mktemp("d121")
    import_torch.save(tm.state_dict(), d / "w.pth")
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(d / "w.safetensors"))
    return tm, d / "w.pth", d / "w.safetensors"


@pytest.mark.torch
def test_densenet121_parity_pth_and_safetensors(densenet121_files):
    import torch
    tm, pth, st = densenet121_files
    jms = []
    for path, seed in ((pth, 0), (st, 7)):
        jm = models.create("densenet121", num_classes=10, in_channels=3, rngs=seed)
        report = load_torch_weights(jm, path)
        assert not report["missing"] and not report["unexpected"] and not report["mismatched"]
        jms.append(jm)
    rng = np.random.RandomState(0)
    for hw in SIZES:
        x = rng.randn(2, 3, *hw).astype(np.float32)
        with torch.no_grad():
            ref = tm(torch.from_numpy(x)).numpy()
            ref_last = torch.relu(tm.features(torch.from_numpy(x))).numpy().transpose(0, 2, 3, 1)
        xj = jnp.asarray(x.transpose(0, 2, 3, 1))
        for jm in jms:
            feats = jm.features(xj)
            assert _rel_err(jm(xj), ref) < REL_TOL, hw
            assert _rel_err(feats["last_conv"], ref_last) < REL_TOL, hw
            assert _rel_err(jm.pool_and_classify(feats["last_conv"]), ref) < REL_TOL


@pytest.mark.torch
@pytest.mark.parametrize("name", ["densenet169", "densenet201"])
def test_deeper_densenets_parity(name):
    import torch
    tm = _torch_densenet(name, num_classes=4)
    jm = models.create(name, num_classes=4, in_channels=3)
    load_torch_weights(jm, {k: v.numpy() for k, v in tm.state_dict().items()})
    x = np.random.RandomState(1).randn(1, 3, 64, 64).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    assert _rel_err(jm(jnp.asarray(x.transpose(0, 2, 3, 1))), ref) < REL_TOL


def _smooth(seed, n, c, h, w):
    """Smooth random images ``[n, c, h, w]`` (7x7 noise upsampled) plus fine noise."""
    import torch
    r = np.random.default_rng(seed)
    lo = torch.from_numpy(r.standard_normal((n, c, 7, 7)).astype(np.float32))
    x = torch.nn.functional.interpolate(lo, size=(h, w), mode="bilinear").numpy()
    return (x + 0.1 * r.standard_normal(x.shape)).astype(np.float32)


@pytest.mark.torch
@pytest.mark.parametrize("hw", SIZES)
def test_gradcam_equals_pytorch_grad_cam_on_features_norm5(densenet121_files, hw):
    """pytorch-grad-cam's DenseNet layer ``model.features[-1]``: its activations are post-ReLU
    (torch's in-place ReLU overwrites them), its gradients pre-ReLU; our last_conv matches."""
    import torch
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    tm, pth, _ = densenet121_files
    jm = models.create("densenet121", num_classes=10, in_channels=3)
    load_torch_weights(jm, pth)
    x = _smooth(0, 2, 3, *hw)
    targets = [3, 7]
    with pgc.GradCAM(model=tm, target_layers=[tm.features[-1]]) as cam:
        ref = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(c) for c in targets])
    assert ref.max() > 0.99 and ref.std() > 0.05  # not a trivial map
    ours = np.asarray(explain.gradcam(jm, jnp.asarray(x.transpose(0, 2, 3, 1)), np.array(targets)))
    assert ours.shape == ref.shape == (2, *hw)
    assert np.abs(ours - ref).max() < 1e-3
    # the CAM of the pre-ReLU norm5 map (what a naive port would use) is a different map
    pre = jm.trunk(jnp.asarray(x.transpose(0, 2, 3, 1)))["norm5"]
    _, vjp = jax.vjp(lambda a: jm.classifier(jnp.mean(nnx.relu(a), axis=(1, 2))), pre)
    (g,) = vjp(jax.nn.one_hot(jnp.array(targets), 10))
    naive = np.asarray(explain.finalize_cam(explain.cam_from_grads(pre, g, "gradcam"), hw))
    assert np.abs(naive - ref).max() > 0.05


def test_interface_shapes_channels_and_strides():
    m = models.create("densenet121", num_classes=3, in_channels=1)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 96, 1), jnp.float32)
    f = m.features(x)
    assert {k: v.shape for k, v in f.items()} == {
        "c3": (2, 8, 12, 512), "c4": (2, 4, 6, 1024), "c5": (2, 2, 3, 1024), "last_conv": (2, 2, 3, 1024)}
    assert m.feature_channels == {"c3": 512, "c4": 1024, "c5": 1024, "last_conv": 1024}
    assert f["c5"] is f["last_conv"]
    assert float(jnp.min(f["last_conv"])) >= 0.0
    np.testing.assert_allclose(m.pool_and_classify(f["last_conv"]), m(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.pooled(x), jnp.mean(f["last_conv"], axis=(1, 2)), rtol=1e-6, atol=1e-6)
    assert m(x).shape == (2, 3)
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
        m(jnp.zeros((1, 64, 64, 3)))
    backbone = models.create("densenet121", num_classes=0)
    with pytest.raises(ValueError, match="num_classes=0"):
        backbone.pool_and_classify(f["last_conv"])
    assert {"densenet121", "densenet169", "densenet201"} <= set(models.available())


def test_bfloat16_jit_matches_float32():
    m32 = models.create("densenet121", num_classes=2, in_channels=1, rngs=3)
    m16 = models.create("densenet121", num_classes=2, in_channels=1, rngs=3, dtype="bfloat16")
    x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 64, 1), jnp.float32)

    @nnx.jit
    def fwd(model, x):
        return model(x), model.features(x)["last_conv"]

    y32, l32 = fwd(m32, x)
    y16, l16 = fwd(m16, x)
    assert y16.dtype == jnp.bfloat16 and l16.dtype == jnp.bfloat16
    assert nnx.state(m16, nnx.Param)["classifier"]["kernel"][...].dtype == jnp.float32
    assert _rel_err(y16, np.asarray(y32)) < 0.05
    assert _rel_err(l16, np.asarray(l32)) < 0.05


def test_torch_keys_are_torchvisions():
    m = models.create("densenet121", num_classes=5)
    flat = nnx.to_flat_state(nnx.state(m, nnx.Any(nnx.Param, nnx.BatchStat)))
    keys = {torch_key(m, p) for p, _ in flat}
    assert len(keys) == len(flat)  # one distinct torch key per variable
    for k in ("features.conv0.weight", "features.norm0.running_var",
              "features.denseblock1.denselayer6.conv2.weight", "features.transition3.norm.bias",
              "features.denseblock4.denselayer16.norm1.weight", "features.norm5.running_mean",
              "classifier.weight", "classifier.bias"):
        assert k in keys, k
