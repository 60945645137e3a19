"""ImageNet-weight import proven equal to torchvision / timm (code nobody here wrote).

Torch models get seeded random weights (BatchNorm running statistics randomised too, so the
mapping of every tensor matters), are saved as .pth and .safetensors, imported, and compared
on random inputs at 224x224 and at a non-square size: logits and the last conv feature map.
"""
from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp

from covidmt_jax import models
from covidmt_jax.weights import (WeightImportError, load_torch_weights, read_state_dict, torch_key,
                                 xrv_state_dict)
from torch_helpers import randomise_batchnorm

REL_TOL = 1e-4


def _rel_err(out, ref):
    return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


def _torch_model(name):
    torch = pytest.importorskip("torch", reason="torch extra not installed: pip install '.[torch]'")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if name == "xception":
        timm = pytest.importorskip("timm")
        tm = timm.create_model("legacy_xception", pretrained=False, num_classes=1000)
        last = tm.forward_features
        source = "timm"
    else:
        tv = pytest.importorskip("torchvision")
        tm = getattr(tv.models, name)(weights=None, num_classes=1000)
        source = "torchvision"
        if name.startswith("vgg"):
            last = tm.features
        else:
            def last(x, m=tm):
                x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
                return m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return randomise_batchnorm(tm), last, source


def _save_both(tm, tmp_path):
    import torch
    from safetensors.torch import save_file
    pth = tmp_path / "w.pth"
    st = tmp_path / "w.safetensors"
    torch.save(tm.state_dict(), pth)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(st))
    return pth, st


@pytest.mark.torch
@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "vgg19", "vgg19_bn", "xception"])
def test_parity_with_reference(name, tmp_path):
    import torch
    tm, last_conv_ref, source = _torch_model(name)
    pth, st = _save_both(tm, tmp_path)
    jm_pth = models.create(name, num_classes=1000, in_channels=3)
    report = load_torch_weights(jm_pth, pth, source=source)
    assert not report["missing"] and not report["unexpected"] and not report["mismatched"]
    jm_st = models.create(name, num_classes=1000, in_channels=3, rngs=7)
    load_torch_weights(jm_st, st, source=source)
    rng = np.random.RandomState(0)
    for hw in [(224, 224), (160, 200)]:
        x = rng.randn(2, 3, *hw).astype(np.float32)
        with torch.no_grad():
            ref = tm(torch.from_numpy(x)).numpy()
            ref_last = last_conv_ref(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
        xj = jnp.asarray(x.transpose(0, 2, 3, 1))
        for jm in (jm_pth, jm_st):
            assert _rel_err(jm(xj), ref) < REL_TOL, (name, hw)
            assert _rel_err(jm.features(xj)["last_conv"], ref_last) < REL_TOL, (name, hw)


@pytest.mark.torch
def test_grey_model_sums_rgb_stem_kernels():
    """A 1-channel model on a grey image == the RGB model on that image replicated to RGB."""
    import torch
    tm, _, _ = _torch_model("resnet50")
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    grey = models.create("resnet50", num_classes=1000, in_channels=1)
    load_torch_weights(grey, sd)
    x = np.random.RandomState(3).rand(1, 1, 96, 112).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(np.repeat(x, 3, axis=1))).numpy()
    assert _rel_err(grey(jnp.asarray(x.transpose(0, 2, 3, 1))), ref) < REL_TOL


@pytest.mark.torch
def test_pth_checkpoint_wrappers_and_dataparallel_prefix(tmp_path):
    import torch
    tm = pytest.importorskip("torchvision").models.resnet18(weights=None, num_classes=4)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tm.state_dict().items()}, "epoch": 3}, path)
    sd = read_state_dict(path)
    assert "conv1.weight" in sd and not any(k.startswith("module.") for k in sd)
    jm = models.create("resnet18", num_classes=4, in_channels=3)
    load_torch_weights(jm, path)


def _numpy_resnet18_state(num_classes=1000):
    """A complete resnet18 state dict built from our own key mapping (no torch needed)."""
    from flax import nnx
    ref = models.create("resnet18", num_classes=num_classes, in_channels=3, rngs=5)
    flat = nnx.to_flat_state(nnx.state(ref, nnx.Any(nnx.Param, nnx.BatchStat)))
    sd = {}
    for path, var in flat:
        v = np.asarray(var[...])
        if path[-1] == "kernel":
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        sd[torch_key(ref, path)] = np.ascontiguousarray(v)
    return ref, sd


def test_safetensors_needs_no_torch_and_round_trips(tmp_path):
    from safetensors.numpy import save_file
    ref, sd = _numpy_resnet18_state()
    save_file(sd, str(tmp_path / "r18.safetensors"))
    jm = models.create("resnet18", num_classes=1000, in_channels=3, rngs=9)
    load_torch_weights(jm, tmp_path / "r18.safetensors")
    x = jnp.asarray(np.random.RandomState(0).rand(1, 40, 40, 3), jnp.float32)
    np.testing.assert_allclose(jm(x), ref(x), rtol=1e-6, atol=1e-6)


def test_scoring_torch_classifier_is_the_files_weights_and_refuses_a_short_file(tmp_path):
    """The scoring job's ``kind="torch"`` entry: the model is built without random weights and
    every tensor comes from the file (the same function as the model that wrote it); a file
    that lacks one tensor is refused, naming the file and the key."""
    from safetensors.numpy import save_file
    from covidmt_jax.scoring import loading
    from covidmt_jax.scoring.config import classifier_entry
    ref, sd = _numpy_resnet18_state(num_classes=2)
    save_file(sd, str(tmp_path / "r18.safetensors"))

    def entry(name):
        return classifier_entry("torch", tmp_path / name, model="resnet18", num_classes=2,
                                in_channels=3, covid_index=1).to_dict()
    model, head = loading.load_classifier("r18", entry("r18.safetensors"), default_threshold=0.5)
    assert (head.column, head.in_channels, head.threshold) == (1, 3, 0.5)
    x = jnp.asarray(np.random.RandomState(0).rand(2, 40, 40, 3), jnp.float32)
    np.testing.assert_allclose(model(x), ref(x), rtol=1e-6, atol=1e-6)
    del sd["layer1.0.bn1.running_var"]
    save_file(sd, str(tmp_path / "short.safetensors"))
    with pytest.raises(WeightImportError, match=r"short\.safetensors: .*\n  1 missing:\n    layer1\.0\.bn1\.running_var"):
        loading.load_classifier("r18", entry("short.safetensors"), default_threshold=0.5)


def test_mismatch_lists_every_missing_unexpected_and_misshaped_key():
    _, sd = _numpy_resnet18_state()
    del sd["layer1.0.conv1.weight"]
    sd["layer9.extra.weight"] = np.zeros(3, np.float32)
    sd["layer2.0.bn1.running_var"] = np.zeros(7, np.float32)
    jm = models.create("resnet18", num_classes=1000, in_channels=3)
    with pytest.raises(WeightImportError) as err:
        load_torch_weights(jm, sd)
    msg = str(err.value)
    assert "1 missing" in msg and "layer1.0.conv1.weight" in msg
    assert "1 unexpected" in msg and "layer9.extra.weight" in msg
    assert "1 mismatched" in msg and "layer2.0.bn1.running_var" in msg
    report = load_torch_weights(jm, sd, strict=False)
    assert report["missing"] == ["layer1.0.conv1.weight"]


def test_skip_head_keeps_our_head_for_other_class_counts():
    _, sd = _numpy_resnet18_state(num_classes=1000)
    jm = models.create("resnet18", num_classes=2, in_channels=3)
    with pytest.raises(WeightImportError, match="skip_head=True"):
        load_torch_weights(jm, sd)
    fc_before = np.asarray(jm.fc.kernel[...]).copy()
    report = load_torch_weights(jm, sd, skip_head=True)
    assert sorted(report["skipped"]) == ["fc.bias", "fc.bias", "fc.weight", "fc.weight"]
    np.testing.assert_array_equal(np.asarray(jm.fc.kernel[...]), fc_before)
    np.testing.assert_array_equal(np.asarray(jm.conv1.kernel[...]).transpose(3, 2, 0, 1), sd["conv1.weight"])


def test_covidmt_imports_into_its_backbone():
    _, sd = _numpy_resnet18_state()
    m = models.create("covidmt", backbone="resnet18", tasks=["covid"], in_channels=1,
                      transition_channels=(8,))
    report = load_torch_weights(m, sd, skip_head=True)
    assert not report["missing"]
    np.testing.assert_allclose(np.asarray(m.backbone.conv1.kernel[...])[:, :, 0, :],
                               sd["conv1.weight"].sum(axis=1).transpose(1, 2, 0), rtol=1e-6)


def test_source_checks_and_bad_files(tmp_path):
    jm = models.create("xception", num_classes=2)
    with pytest.raises(ValueError, match="timm"):
        load_torch_weights(jm, {}, source="torchvision")
    with pytest.raises(ValueError, match="source must be"):
        load_torch_weights(jm, {}, source="keras")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightImportError, match="broken.safetensors"):
        read_state_dict(bad)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")


def test_weights_source_xrv_strips_prefix_and_sets_thresholds_aside():
    _, sd = _numpy_resnet18_state(num_classes=1000)
    wrapped = {f"model.{k}": v for k, v in sd.items()}
    wrapped["op_threshs"] = np.full(1000, 0.5, np.float32)
    inner, thr = xrv_state_dict(wrapped)
    assert set(inner) == set(sd) and thr.shape == (1000,)
    jm = models.create("resnet18", num_classes=1000, in_channels=3)
    report = load_torch_weights(jm, wrapped, source="xrv")
    assert report["skipped"] == ["op_threshs"] and not report["missing"]
    np.testing.assert_array_equal(np.asarray(jm.conv1.kernel[...]).transpose(3, 2, 0, 1), sd["conv1.weight"])
    with pytest.raises(ValueError, match="not 'xrv'"):
        load_torch_weights(models.create("xception", num_classes=2), {}, source="xrv")
