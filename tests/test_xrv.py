"""torchxrayvision conventions and classifiers, proven equal to the installed torchxrayvision.

Its models are built with random weights and no download (``DenseNet(weights=None)``; the
ResNet wrapper, which always downloads in its constructor, is assembled from its parts the way
its constructor does), with the network blocked; their state dicts are saved to .pt and
.safetensors, imported, and both sides score the same images after their own preprocessing.
Small sizes: the models' native resolution is set to 64 px on both sides.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import jax.numpy as jnp

from covidmt_jax import xrv as jx
from covidmt_jax.normalisation import normalise
from covidmt_jax import models
from torch_helpers import randomise_batchnorm

RES = 64


@pytest.fixture(scope="module")
def tx():
    """(torch, torchxrayvision) with every download path blocked."""
    torch = pytest.importorskip("torch", reason="torch extra not installed: pip install '.[torch]'")
    xrv = pytest.importorskip("torchxrayvision", reason="pip install '.[torch]' (torchxrayvision)")
    import requests
    torch.set_num_threads(2)
    mp = pytest.MonkeyPatch()

    def no_network(*a, **k):
        raise AssertionError("torchxrayvision tried the network")

    mp.setattr(xrv.utils, "download", no_network)
    mp.setattr(requests, "get", no_network)
    yield torch, xrv
    mp.undo()


def _calibrate_head(torch, linear, feats, op_threshs):
    """Rescale the random head so each output's logits spread by ~1.5 across the batch around
    logit(threshold): the calibrated outputs then fall on both sides of 0.5 instead of
    saturating (random images give near-identical features), so the op_norm check is not trivial."""
    with torch.no_grad():
        scale = 1.5 / linear(feats).std(0).clamp_min(1e-12)
        linear.weight.mul_(scale[:, None])
        centre = torch.logit(torch.nan_to_num(op_threshs, nan=0.5))
        linear.bias.add_(centre - linear(feats).mean(0))


def _spread(calibrated):
    """Calibrated outputs on both sides of 0.5, not saturated."""
    c = calibrated[:, ~np.isclose(calibrated, 0.5).all(0)]
    return (c > 0.55).any() and (c < 0.45).any() and ((c > 0.02) & (c < 0.98)).mean() > 0.5


def _images(seed, n, shape=(80, 100)):
    """``n`` distinct 8-bit images (stripes of random frequency, phase and contrast, plus noise):
    different enough that the random networks' features differ between images."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]] / max(shape)
    out = []
    for _ in range(n):
        f = rng.uniform(0.5, 3, 2)
        base = 127 + 120 * np.sin(2 * np.pi * (f[0] * yy + f[1] * xx + rng.uniform()))
        img = base * rng.uniform(0.3, 1.0) + rng.randint(0, 30, shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _their_preprocess(xrv, img, maxval, size):
    import torchvision
    x = xrv.datasets.normalize(img, maxval)
    if x.ndim == 3:
        x = x.mean(2)
    x = x[None]
    return torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(size)])(x)


@pytest.mark.torch
def test_published_tables_equal_torchxrayvision(tx):
    _, xrv = tx
    assert jx.PATHOLOGIES == tuple(xrv.datasets.default_pathologies)
    assert jx.PATHOLOGIES == tuple(xrv.models.DenseNet.targets) == tuple(xrv.models.ResNet.targets)
    for name, entry in jx.WEIGHTS.items():
        theirs = xrv.models.model_urls[name]
        assert entry["labels"] == tuple(theirs["labels"]), name
        np.testing.assert_array_equal(np.asarray(entry["op_threshs"], np.float32),
                                      np.asarray(theirs["op_threshs"], np.float32))
        assert jx.ARCHS[entry["arch"]] == theirs["input_resolution"], name
    assert set(jx.WEIGHTS) == {k for k in xrv.models.model_urls if "-res" in k}


@pytest.mark.torch
@pytest.mark.parametrize("shape,maxval,size", [((90, 70, 3), 255, 64), ((90, 70), 4095, 96),
                                               ((40, 50), 255, 64), ((64, 64), 65535, 64)])
def test_preprocess_equals_theirs(tx, shape, maxval, size):
    _, xrv = tx
    img = np.random.RandomState(sum(shape)).randint(0, maxval + 1, shape).astype(np.uint16)
    ref = _their_preprocess(xrv, img, maxval, size)
    ours = jx.preprocess(img, maxval=maxval, size=size)
    assert ours.shape == ref.shape == (1, size, size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)  # [-1024, 1024] scale
    np.testing.assert_array_equal(jx.normalize(img, maxval), xrv.utils.normalize(img, maxval))
    with pytest.raises(ValueError, match="higher than expected bound"):
        jx.normalize(np.full((4, 4), maxval + 1), maxval)


@pytest.mark.torch
def test_op_norm_equals_theirs(tx):
    torch, xrv = tx
    rng = np.random.RandomState(0)
    thr = rng.uniform(0.01, 0.6, 18).astype(np.float32)
    thr[[3, 14]] = np.nan
    probs = rng.uniform(0, 1, (5, 18)).astype(np.float32)
    probs[0] = np.nan_to_num(thr, nan=0.3)  # exactly at the thresholds -> 0.5
    ref = xrv.models.op_norm(torch.from_numpy(probs), torch.from_numpy(thr)).numpy()
    ours = np.asarray(jx.op_norm(jnp.asarray(probs), jnp.asarray(thr)))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours[0], 0.5, atol=1e-6)


def _their_densenet(torch, xrv, *, with_thresholds=True):
    thr = torch.rand(18, generator=torch.Generator().manual_seed(2)) * 0.3 + 0.02
    thr[[2, 14]] = float("nan")
    tm = xrv.models.DenseNet(weights=None, op_threshs=thr if with_thresholds else None)
    assert not hasattr(tm, "input_resolution")  # weights=None: nothing was loaded
    tm.input_resolution = RES  # its forward resizes to this, like the 224-px release models
    return randomise_batchnorm(tm, affine=False), thr


def _their_resnet(torch, xrv):
    """``xrv.models.ResNet("resnet50-res512-all")`` minus the download: the same attributes
    its constructor sets, random torchvision weights."""
    import torchvision
    tm = xrv.models.ResNet.__new__(xrv.models.ResNet)
    torch.nn.Module.__init__(tm)
    name = "resnet50-res512-all"
    tm.weights, tm.apply_sigmoid = name, False
    tm.weights_dict = xrv.models.model_urls[name]
    tm.targets = tm.pathologies = tm.weights_dict["labels"]
    torch.manual_seed(3)
    tm.model = torchvision.models.resnet50(num_classes=18, weights=None)
    tm.model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    tm.register_buffer("op_threshs", torch.tensor(tm.weights_dict["op_threshs"]))
    tm.input_resolution = RES
    return tm.eval()


def _batch(xrv, seed, size, n=2):
    return np.stack([_their_preprocess(xrv, im, 255, size) for im in _images(seed, n)])


@pytest.mark.torch
def test_densenet_import_equals_torchxrayvision(tx, tmp_path):
    torch, xrv = tx
    from safetensors.torch import save_file
    tm, thr = _their_densenet(torch, xrv)
    x = _batch(xrv, 0, RES, n=3)
    xt = torch.from_numpy(x)
    _calibrate_head(torch, tm.classifier, tm.features2(xt), thr)
    with torch.no_grad():
        ref = tm(xt).numpy()
        ref_logits = tm.classifier(tm.features2(xt)).numpy()
        ref_last = torch.relu(tm.features(xt)).numpy().transpose(0, 2, 3, 1)
    assert _spread(ref) and np.isclose(ref[:, 2], 0.5).all()  # NaN threshold -> 0.5
    torch.save(tm.state_dict(), tmp_path / "d.pt")
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(tmp_path / "d.safetensors"))
    for f in ("d.pt", "d.safetensors"):
        m = jx.load("densenet121", tmp_path / f, resolution=RES)
        assert m.labels == jx.PATHOLOGIES
        np.testing.assert_array_equal(np.asarray(m.decision_thresholds, np.float32), thr.numpy())
        xj = jnp.asarray(x.transpose(0, 2, 3, 1))
        np.testing.assert_allclose(np.asarray(m.predict(xj)), ref, rtol=0, atol=1e-4)
        logits = np.asarray(m(xj))
        assert np.abs(logits - ref_logits).max() / np.abs(ref_logits).max() < 1e-4
        last = np.asarray(m.features(xj)["last_conv"])
        assert np.abs(last - ref_last).max() / np.abs(ref_last).max() < 1e-4
    # a larger square input is resized to the native resolution on both sides
    x96 = _batch(xrv, 1, 96)
    with torch.no_grad():
        ref96 = tm(torch.from_numpy(x96)).numpy()
    np.testing.assert_allclose(np.asarray(m.predict(jnp.asarray(x96.transpose(0, 2, 3, 1)))), ref96,
                               rtol=0, atol=1e-4)


@pytest.mark.torch
def test_densenet_without_thresholds_returns_logits_like_theirs(tx, tmp_path):
    torch, xrv = tx
    tm, _ = _their_densenet(torch, xrv, with_thresholds=False)
    assert "op_threshs" not in tm.state_dict()
    torch.save(tm.state_dict(), tmp_path / "d.pt")
    m = jx.load("densenet121", tmp_path / "d.pt", resolution=RES)
    assert m.decision_thresholds is None
    x = _batch(xrv, 2, RES)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    out = np.asarray(m.predict(jnp.asarray(x.transpose(0, 2, 3, 1))))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4
    # a named weight set supplies its labels and thresholds
    m_rsna = jx.load_spec(f"xrv:densenet121-res224-rsna@{tmp_path / 'd.pt'}", resolution=RES)
    assert m_rsna.labels[8] == "Pneumonia" and m_rsna.labels[0] == ""
    assert jx.decision_threshold(m_rsna, "Pneumonia", 0.5) == pytest.approx(0.13486601)
    with pytest.raises(ValueError, match="no output 'Atelectasis'"):
        jx.decision_threshold(m_rsna, "Atelectasis", 0.5)


@pytest.mark.torch
def test_resnet50_import_equals_torchxrayvision(tx, tmp_path):
    torch, xrv = tx
    tm = _their_resnet(torch, xrv)
    x = _batch(xrv, 3, 96)  # resized to 64 inside both models
    xt = torch.from_numpy(x)
    with torch.no_grad():
        small = torch.nn.functional.interpolate(xt, size=(RES, RES), mode="bilinear", antialias=True)
        m_ = tm.model
        feats = torch.flatten(m_.avgpool(m_.layer4(m_.layer3(m_.layer2(m_.layer1(
            m_.maxpool(m_.relu(m_.bn1(m_.conv1(small))))))))), 1)
    _calibrate_head(torch, tm.model.fc, feats, tm.op_threshs)
    with torch.no_grad():
        ref = tm(xt).numpy()
    assert _spread(ref)
    # the wrapper's state dict (model.* + op_threshs) and the release file's form (inner state
    # dict, thresholds from the named weight set)
    torch.save(tm.state_dict(), tmp_path / "wrapper.pt")
    torch.save(tm.model.state_dict(), tmp_path / "release.pt")
    for spec in (f"xrv:resnet50@{tmp_path / 'wrapper.pt'}", f"xrv:resnet50-res512-all@{tmp_path / 'release.pt'}"):
        m = jx.load_spec(spec, resolution=RES)
        xj = jnp.asarray(x.transpose(0, 2, 3, 1))
        # the random ResNet's features barely differ between images, so _calibrate_head scales
        # the head up a lot and the logits become differences of large numbers: float noise of
        # ~1e-4 on the calibrated outputs and logits (the pooled features: < 1e-4 relative, below)
        np.testing.assert_allclose(np.asarray(m.predict(xj)), ref, rtol=0, atol=1e-3)
        pooled = np.asarray(m.pooled(xj))  # layer4 pooled: untouched by the head rescaling
        assert np.abs(pooled - feats.numpy()).max() / np.abs(feats.numpy()).max() < 1e-4
    no_thr = jx.load("resnet50", tmp_path / "release.pt", resolution=RES)
    assert no_thr.decision_thresholds is None


@pytest.mark.torch
def test_pickled_module_file_is_refused_with_the_conversion_hint(tx, tmp_path):
    torch, xrv = tx
    tm, _ = _their_densenet(torch, xrv)
    torch.save(tm, tmp_path / "whole_module.pt")  # how torchxrayvision's DenseNet releases are stored
    with pytest.raises(ValueError, match="pickled modules"):
        jx.load("densenet121", tmp_path / "whole_module.pt")


# ---------------------------------------------------------------- no torch needed
def test_op_norm_maps_thresholds_to_one_half_and_is_monotone():
    thr = jnp.asarray([0.1, 0.5, 0.9, np.nan])
    p = jnp.linspace(0, 1, 101)[:, None] * jnp.ones((1, 4))
    out = np.asarray(jx.op_norm(p, thr))
    assert np.all(np.diff(out[:, :3], axis=0) > 0) and np.all(out[:, 3] == 0.5)
    np.testing.assert_allclose(out[[10, 50, 90], [0, 1, 2]], 0.5, atol=1e-6)
    assert out[0, 0] == 0 and out[-1, 0] == pytest.approx(1.0)
    for j, t in enumerate((0.1, 0.5, 0.9)):  # calibrated >= 0.5 <=> probability >= threshold
        pj = np.asarray(p[:, j])
        away = np.abs(pj - t) > 1e-6  # linspace's 0.1 is a float32 hair below the threshold
        np.testing.assert_array_equal((out[:, j] >= 0.5)[away], (pj >= t)[away])


def test_from_pipeline_is_xrvs_normalize_of_the_grey_image():
    img = np.random.RandomState(0).randint(0, 256, (16, 16)).astype(np.uint8)
    ours = np.asarray(jx.from_pipeline(jnp.asarray(normalise(img / 255.0))))
    np.testing.assert_allclose(ours, jx.normalize(img, 255), atol=2e-3)


def test_center_crop_and_resize_shapes():
    img = np.arange(6 * 9, dtype=np.float32).reshape(1, 6, 9)
    c = jx.center_crop(img)
    np.testing.assert_array_equal(c, img[:, :, 1:7])  # start 9 // 2 - 6 // 2 = 1, as theirs
    assert jx.resize(c, 4).shape == (1, 4, 4)
    with pytest.raises(ValueError, match=r"\[1, H, W\]"):
        jx.resize(img[0], 4)


def test_spec_parsing_and_errors(tmp_path):
    assert jx.parse_spec("xrv:densenet121@/w/f.pt") == jx.XrvSpec("densenet121", None, "/w/f.pt")
    assert jx.parse_spec("xrv:resnet50-res512-all@w.pt") == jx.XrvSpec("resnet50", "resnet50-res512-all", "w.pt")
    assert jx.parse_spec("xrv:densenet121-res64@f.pt") == jx.XrvSpec("densenet121", None, "f.pt", 64)
    for bad in ("xrv:densenet121", "xrv:@f.pt", "xrv:vit@f.pt", "xrv:densenet121-res8@f.pt"):
        with pytest.raises(ValueError, match="xrv:NAME@FILE|unknown torchxrayvision model"):
            jx.parse_spec(bad)
    with pytest.raises(ValueError, match="not one of the resnet50 sets"):
        jx.load("resnet50", tmp_path / "x.pt", weights="densenet121-res224-all")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        jx.load("densenet121", tmp_path / "missing.pt")


def _numpy_xrv_densenet_state(seed=0):
    """An xrv DenseNet state dict from our own key mapping (no torch), with thresholds."""
    from flax import nnx
    from covidmt_jax.weights import torch_key
    ref = models.create("densenet121", num_classes=18, in_channels=1, rngs=seed)
    sd = {}
    for path, var in nnx.to_flat_state(nnx.state(ref, nnx.Any(nnx.Param, nnx.BatchStat))):
        v = np.asarray(var[...])
        if path[-1] == "kernel":
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        sd[torch_key(ref, path)] = np.ascontiguousarray(v)
    sd["op_threshs"] = np.full(18, 0.2, np.float32)
    return ref, sd


def test_safetensors_import_without_torch(tmp_path):
    from safetensors.numpy import save_file
    ref, sd = _numpy_xrv_densenet_state()
    save_file(sd, str(tmp_path / "d.safetensors"))
    m = jx.load("densenet121", tmp_path / "d.safetensors", resolution=RES)
    x = jnp.asarray(np.random.RandomState(0).uniform(-1024, 1024, (1, RES, RES, 1)), jnp.float32)
    np.testing.assert_allclose(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert m.decision_thresholds == (pytest.approx(0.2),) * 18
    assert math.isclose(jx.decision_threshold(m, "Pneumonia", 0.5), 0.2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="square"):
        m(jnp.zeros((1, RES, RES + 2, 1)))


@pytest.mark.torch
def test_audit_two_xrv_models_end_to_end_through_a_channel(tx, tmp_path):
    """The README's audit command at tiny size: a labelled image folder sent through WhatsApp,
    torchxrayvision's DenseNet-121 and ResNet-50 (their state dicts, thresholds inside) with
    random weights, run at 64 px (``-res64``), side by side; PI, OLS and accuracy per model;
    decisions at their operating thresholds."""
    import csv
    import json
    from PIL import Image
    from covidmt_jax import score
    from covidmt_jax.scoring import config as cfg, loading
    torch, xrv = tx
    from covidmt_jax.data.synthetic import render_phantom
    for k, (cls, findings) in enumerate((("0_normal", ()), ("1_pneumonia", ("Pneumonia",)))):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):  # phantom radiographs: the shipped lung U-Net finds their lungs
            img = render_phantom(10 * k + i, size=(96, 88), findings=findings).image
            Image.fromarray((img * 255).round().astype(np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
    dn, _ = _their_densenet(torch, xrv)
    torch.save(dn.state_dict(), tmp_path / "d121.pt")
    torch.save(_their_resnet(torch, xrv).state_dict(), tmp_path / "r50.pt")  # wrapper: thresholds inside
    work = tmp_path / "run"
    models_arg = f"xrv:densenet121-res64@{tmp_path / 'd121.pt'}+xrv:resnet50-res64@{tmp_path / 'r50.pt'}"
    cfg_file = Path(__file__).resolve().parents[1] / "configs" / "score_channel.py"
    argv = ["score", f"--config={cfg_file}:root={tmp_path / 'images'},model={models_arg},names=d121+r50,"
            "target=Pneumonia,labels=1,label=1_pneumonia,size=64,batch=4", f"--workdir={work}",
            "--config.progress=False", "--config.gallery.random=2"]
    assert score.main(argv) == 0
    with open(work / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["model"] for r in rows} == {"d121", "r50"}
    assert not any(r["error"] for r in rows)
    summary = json.loads((work / "summary.json").read_text())
    # the decision threshold of each model: its Pneumonia operating point
    _, head_d = loading.load_classifier("d121", cfg.classifier_entry(
        kind="xrv", path=str(tmp_path / "d121.pt"), model="densenet121-res64", task="Pneumonia"), default_threshold=0.5)
    _, head_r = loading.load_classifier("r50", cfg.classifier_entry(
        kind="xrv", path=str(tmp_path / "r50.pt"), model="resnet50-res64", task="Pneumonia"), default_threshold=0.5)
    assert head_d.column == head_r.column == jx.PATHOLOGIES.index("Pneumonia")
    assert head_d.threshold == pytest.approx(float(dn.op_threshs[8]))
    assert head_r.threshold == pytest.approx(jx.WEIGHTS["resnet50-res512-all"]["op_threshs"][8])
    for name, head in (("d121", head_d), ("r50", head_r)):
        mine = [r for r in rows if r["model"] == name]
        for r in mine:
            assert int(r["pred_orig"]) == int(float(r["prob_orig"]) >= head.threshold)
        assert {"pi", "ols"} <= set(summary["models"][name])
    assert "d121" in (work / "report.md").read_text()
    with pytest.raises(Exception, match="task must be the scored torchxrayvision output"):
        loading.load_classifier("bad", cfg.classifier_entry(
            kind="xrv", path=str(tmp_path / "d121.pt"), model="densenet121"), default_threshold=0.5)
