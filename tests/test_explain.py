"""covidmt_jax.explain: parity with pytorch-grad-cam, zoo shapes, targets, layers, jit."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from covidmt_jax import explain
from covidmt_jax.models.layers import BasicBlock
from covidmt_jax.models.registry import create
from covidmt_jax.models.resnet import ResNet
from covidmt_jax.weights import load_torch_weights

METHODS = explain.METHODS
TOL = 1e-3  # issue 5: max |diff| of the [0, 1] maps against pytorch-grad-cam


def smooth_images(seed: int, n: int, h: int, w: int, c: int) -> np.ndarray:
    """``[n, h, w, c]`` smooth random images (7x7 noise, bilinearly upsampled) plus fine noise."""
    r = np.random.default_rng(seed)
    lo = jnp.asarray(r.standard_normal((n, 7, 7, c)), jnp.float32)
    up = jax.image.resize(lo, (n, h, w, c), "linear")
    return np.asarray(up + 0.3 * r.standard_normal((n, h, w, c)), np.float32)


# ----------------------------------------------------------------------------- torch references
class ResNetFromC4(ResNet):
    """ResNet exposing ``features_from("c4", act)`` so Grad-CAM can target ``layer3``."""

    def features_from(self, layer: str, act: jax.Array) -> dict[str, jax.Array]:
        if layer != "c4":
            raise ValueError(f"features_from supports 'c4', not {layer!r}")
        x = act
        for blk in self.layer4:
            x = blk(x)
        return {"c5": x, "last_conv": x}


def _torch_model(torch, torchvision, arch: str, seed: int):
    """A torchvision ``arch`` with seeded random weights AND random BatchNorm statistics, eval mode."""
    torch.manual_seed(seed)
    tm = getattr(torchvision.models, arch)(weights=None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return tm.eval()


def _state_dict(tm) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in tm.state_dict().items()}


@pytest.fixture(scope="module")
def torch_mods():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    pgc = pytest.importorskip("pytorch_grad_cam")
    torch.set_num_threads(1)
    from pytorch_grad_cam.utils import model_targets
    return torch, torchvision, pgc, model_targets


@pytest.fixture(scope="module")
def resnet50_pair(torch_mods):
    torch, torchvision, _, _ = torch_mods
    tm = _torch_model(torch, torchvision, "resnet50", seed=0)
    jm = create("resnet50", num_classes=1000, in_channels=3)
    load_torch_weights(jm, _state_dict(tm), source="torchvision")
    return tm, jm


@pytest.fixture(scope="module")
def resnet18_c4_pair(torch_mods):
    torch, torchvision, _, _ = torch_mods
    tm = _torch_model(torch, torchvision, "resnet18", seed=3)
    jm = ResNetFromC4(BasicBlock, (2, 2, 2, 2), num_classes=1000, in_channels=3, rngs=nnx.Rngs(0))
    load_torch_weights(jm, _state_dict(tm), source="torchvision")
    return tm, jm


def _torch_cam(torch_mods, tm, target_layer, method: str, x_nhwc: np.ndarray, targets):
    torch, _, pgc, mt = torch_mods
    cls = {"gradcam": pgc.GradCAM, "gradcampp": pgc.GradCAMPlusPlus, "hirescam": pgc.HiResCAM}[method]
    x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())
    tgts = None if targets is None else [mt.ClassifierOutputTarget(int(c)) for c in targets]
    with cls(model=tm, target_layers=[target_layer]) as cam:
        return cam(input_tensor=x, targets=tgts)


@pytest.mark.parametrize("size", [(224, 224), (160, 224)])
@pytest.mark.parametrize("method", METHODS)
def test_parity_resnet50_last_conv(torch_mods, resnet50_pair, method, size):
    tm, jm = resnet50_pair
    x = smooth_images(0, 2, *size, 3)
    targets = np.array([3, 17])
    ref = _torch_cam(torch_mods, tm, tm.layer4[-1], method, x, targets)
    ours = np.asarray(explain.gradcam(jm, jnp.asarray(x), targets, method=method))
    assert ours.shape == ref.shape == (2, *size) and ours.dtype == np.float32
    assert ref.max() > 0.99 and ref.std() > 0.05  # the reference map is not trivial
    np.testing.assert_array_less(np.abs(ours - ref).max(), TOL)


def test_parity_resnet50_predicted_class(torch_mods, resnet50_pair):
    tm, jm = resnet50_pair
    x = smooth_images(1, 2, 224, 224, 3)
    ref = _torch_cam(torch_mods, tm, tm.layer4[-1], "gradcam", x, None)
    ours = np.asarray(explain.gradcam(jm, jnp.asarray(x)))
    np.testing.assert_array_less(np.abs(ours - ref).max(), TOL)
    # and it is not the CAM of some other class
    other = np.asarray(explain.gradcam(jm, jnp.asarray(x), 5))
    assert np.abs(other - ref).max() > 0.1


@pytest.mark.parametrize("method", METHODS)
def test_parity_resnet18_named_stage(torch_mods, resnet18_c4_pair, method):
    """layer="c4" (torch layer3) through features_from: gradients vary over space here, so this
    also tells Grad-CAM, Grad-CAM++ and HiResCAM apart."""
    tm, jm = resnet18_c4_pair
    x = smooth_images(2, 2, 96, 128, 3)
    targets = np.array([7, 500])
    ref = _torch_cam(torch_mods, tm, tm.layer3[-1], method, x, targets)
    ours = np.asarray(explain.gradcam(jm, jnp.asarray(x), targets, "c4", method=method))
    assert ref.std() > 0.05
    np.testing.assert_array_less(np.abs(ours - ref).max(), TOL)


def test_methods_differ_on_named_stage(resnet18_c4_pair):
    _, jm = resnet18_c4_pair
    x = jnp.asarray(smooth_images(2, 2, 96, 128, 3))
    cams = {m: np.asarray(explain.gradcam(jm, x, 7, "c4", method=m)) for m in METHODS}
    assert np.abs(cams["gradcam"] - cams["hirescam"]).max() > 1e-2
    assert np.abs(cams["gradcam"] - cams["gradcampp"]).max() > 1e-2


# ----------------------------------------------------------------------------- formula level
@pytest.mark.parametrize("method", METHODS)
def test_cam_formulas_match_pytorch_grad_cam(torch_mods, method):
    """Random activations and gradients (some exactly zero) through pytorch-grad-cam's own
    weight / image / scaling functions vs cam_from_grads + finalize_cam."""
    _, _, pgc, _ = torch_mods
    from pytorch_grad_cam.utils.image import scale_cam_image
    r = np.random.default_rng(0)
    acts = np.maximum(r.standard_normal((3, 8, 6, 5)), 0).astype(np.float32)   # NCHW
    grads = (r.standard_normal((3, 8, 6, 5)) * (r.random((3, 8, 6, 5)) > 0.3)).astype(np.float32)
    if method == "hirescam":
        ref_raw = pgc.HiResCAM.get_cam_image(None, None, None, None, acts, grads, False)
    else:
        cls = pgc.GradCAM if method == "gradcam" else pgc.GradCAMPlusPlus
        w = cls.get_cam_weights(None, None, None, None, acts, grads)
        ref_raw = (w[:, :, None, None] * acts).sum(axis=1)
    ours_raw = explain.cam_from_grads(jnp.asarray(acts.transpose(0, 2, 3, 1)),
                                      jnp.asarray(grads.transpose(0, 2, 3, 1)), method)
    np.testing.assert_allclose(np.asarray(ours_raw), ref_raw, rtol=1e-5, atol=1e-5)
    ref = scale_cam_image(scale_cam_image(np.maximum(ref_raw, 0), (45, 37)))  # (W, H) as cv2
    ours = np.asarray(explain.finalize_cam(ours_raw, (37, 45)))
    assert ours.shape == ref.shape == (3, 37, 45)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("src,dst", [((7, 7), (224, 224)), ((5, 7), (160, 224)), ((3, 3), (71, 71)),
                                     ((1, 1), (32, 32)), ((16, 16), (7, 9)), ((9, 5), (100, 37)),
                                     ((4, 4), (4, 4))])
def test_resize_matches_cv2(src, dst):
    cv2 = pytest.importorskip("cv2")
    m = np.random.default_rng(1).random(src, dtype=np.float32)
    ref = cv2.resize(m, dst[::-1], interpolation=cv2.INTER_LINEAR)
    ours = np.asarray(explain.resize_bilinear(jnp.asarray(m)[None], dst))[0]
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_flat_or_negative_raw_cam_gives_zeros():
    raw = jnp.stack([jnp.full((4, 4), 3.0), -jnp.ones((4, 4)), jnp.zeros((4, 4))])
    out = np.asarray(explain.finalize_cam(raw, (16, 12)))
    assert out.shape == (3, 16, 12) and np.all(np.isfinite(out)) and np.all(out == 0)


# ----------------------------------------------------------------------------- zoo models
ZOO = [("resnet18", {}, 32), ("resnet18", {}, 64), ("vgg19", {}, 64), ("xception", {}, 71),
       ("covidnet", {}, 64)]


@pytest.fixture(scope="module")
def zoo_models():
    cache: dict[str, nnx.Module] = {}

    def get(name: str, **kw):
        key = name + repr(sorted(kw.items()))
        if key not in cache:
            cache[key] = create(name, num_classes=3, in_channels=1, rngs=0, **kw)
        return cache[key]
    return get


@pytest.mark.parametrize("name,kw,px", ZOO)
def test_zoo_shapes_and_range(zoo_models, name, kw, px):
    model = zoo_models(name, **kw)
    x = jnp.asarray(smooth_images(4, 2, px, px + 8, 1))
    cams, raw = explain.gradcam(model, x, return_raw=True)
    cams = np.asarray(cams)
    assert cams.shape == (2, px, px + 8) and cams.dtype == np.float32
    assert np.all(np.isfinite(cams)) and cams.min() >= 0 and cams.max() <= 1
    h, w = model.features(x)["last_conv"].shape[1:3]
    assert raw.shape == (2, h, w)
    for b in range(2):  # a non-flat raw CAM is normalised to exactly span [0, 1)
        if float(jnp.max(raw[b]) - jnp.min(jnp.maximum(raw[b], 0))) > 1e-3:
            assert cams[b].min() == 0 and cams[b].max() > 0.99


def test_bfloat16_model_gives_float32_maps():
    model = create("resnet18", num_classes=3, in_channels=1, dtype=jnp.bfloat16, rngs=0)
    x = jnp.asarray(smooth_images(13, 2, 64, 64, 1))
    cams = np.asarray(explain.gradcam(model, x, [0, 1]))
    assert cams.dtype == np.float32 and cams.shape == (2, 64, 64)
    assert np.all(np.isfinite(cams)) and cams.min() == 0 and cams.max() > 0.99


def test_constant_input_no_nan(zoo_models):
    model = zoo_models("resnet18")
    for px in (32, 64):  # 32 px: a 1x1 last_conv map, so the CAM is flat -> all zeros
        x = jnp.full((2, px, px, 1), 0.7)
        cams = np.asarray(explain.gradcam(model, x))
        assert np.all(np.isfinite(cams)) and cams.min() >= 0 and cams.max() <= 1
        if px == 32:
            assert np.all(cams == 0)


def test_multilabel_targets(zoo_models):
    model = zoo_models("resnet18")
    x = jnp.asarray(smooth_images(5, 2, 64, 64, 1))
    t = np.array([[0, 2], [1, 1]])
    cams = np.asarray(explain.gradcam(model, x, t, method="gradcampp"))
    assert cams.shape == (2, 2, 64, 64)
    for k in range(2):
        single = np.asarray(explain.gradcam(model, x, t[:, k], method="gradcampp"))
        np.testing.assert_allclose(cams[:, k], single, atol=1e-5)
    assert np.abs(cams[0, 0] - cams[0, 1]).max() > 1e-2  # different classes, different maps
    np.testing.assert_allclose(cams[1, 0], cams[1, 1], atol=1e-6)


def test_target_forms_agree(zoo_models):
    model = zoo_models("resnet18")
    x = jnp.asarray(smooth_images(6, 2, 64, 64, 1))
    a = np.asarray(explain.gradcam(model, x, 2))
    for t in ([2, 2], (2, 2), np.array([2, 2]), jnp.array([2, 2], jnp.int32), np.int64(2)):
        np.testing.assert_array_equal(np.asarray(explain.gradcam(model, x, t)), a)
    pred = np.asarray(jnp.argmax(model(x), axis=1))
    np.testing.assert_array_equal(np.asarray(explain.gradcam(model, x)),
                                  np.asarray(explain.gradcam(model, x, pred)))


def test_binary_head_uses_predicted_decision():
    model = create("resnet18", num_classes=1, in_channels=1, rngs=1)
    x = jnp.asarray(smooth_images(7, 8, 64, 64, 1))
    model.fc.bias[...] = model.fc.bias[...] - float(np.median(np.asarray(model(x))))
    logit = np.asarray(model(x))[:, 0]
    assert (logit >= 0).any() and (logit < 0).any(), "test needs both decisions"
    auto = np.asarray(explain.gradcam(model, x))
    pos = np.asarray(explain.gradcam(model, x, 0))
    neg = np.asarray(explain.gradcam(model, x, 0, output=lambda z: -z))
    expect = np.where((logit >= 0)[:, None, None], pos, neg)
    np.testing.assert_array_equal(auto, expect)
    assert np.abs(pos - neg).max() > 0.1


def test_output_selector(zoo_models):
    model = create("resnet18", num_classes=5, in_channels=1, rngs=2)
    x = jnp.asarray(smooth_images(8, 2, 64, 64, 1))
    sel = np.asarray(explain.gradcam(model, x, [1, 0], output=lambda z: z[:, 3:]))
    full = np.asarray(explain.gradcam(model, x, [4, 3]))
    np.testing.assert_array_equal(sel, full)
    with pytest.raises(ValueError, match="output="):
        explain.gradcam(model, x, output=lambda z: {"covid": z})


def test_layer_alias_and_unsupported_layer(zoo_models):
    model = zoo_models("resnet18")
    x = jnp.asarray(smooth_images(9, 2, 64, 64, 1))
    np.testing.assert_array_equal(np.asarray(explain.gradcam(model, x, 1, "c5")),
                                  np.asarray(explain.gradcam(model, x, 1)))
    with pytest.raises(ValueError, match="features_from"):
        explain.gradcam(model, x, 1, "c4")
    with pytest.raises(ValueError, match="unknown Grad-CAM layer 'c9'"):
        explain.gradcam(model, x, 1, "c9")


def test_bad_input(zoo_models):
    model = zoo_models("resnet18")
    x = jnp.zeros((2, 32, 32, 1))
    with pytest.raises(ValueError, match="unknown CAM method"):
        explain.gradcam(model, x, method="scorecam")
    with pytest.raises(ValueError, match="NHWC"):
        explain.gradcam(model, jnp.zeros((2, 1, 32, 32)))
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        explain.gradcam(model, x, 3)
    with pytest.raises(ValueError, match="B = 2"):
        explain.gradcam(model, x, [0, 1, 2])
    with pytest.raises(ValueError, match="integer"):
        explain.gradcam(model, x, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="integer"):
        explain.gradcam(model, x, True)
    with pytest.raises(ValueError, match="rectangular"):
        explain.gradcam(model, x, [[0, 1], [2]])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        explain.make_cam_fn(model)(x, [0, 5])


# ----------------------------------------------------------------------------- jit
def test_make_cam_fn_equals_eager(zoo_models):
    model = zoo_models("resnet18")
    x = jnp.asarray(smooth_images(10, 2, 64, 64, 1))
    for method in METHODS:
        fn = explain.make_cam_fn(model, method=method)
        for t in (None, 1, [0, 2], [[0, 1], [2, 2]]):
            np.testing.assert_allclose(np.asarray(fn(x, t)),
                                       np.asarray(explain.gradcam(model, x, t, method=method)),
                                       atol=1e-5)
    raw_fn = explain.make_cam_fn(model, return_raw=True)
    cams, raw = raw_fn(x)
    e_cams, e_raw = explain.gradcam(model, x, return_raw=True)
    np.testing.assert_allclose(np.asarray(cams), np.asarray(e_cams), atol=1e-5)
    np.testing.assert_allclose(np.asarray(raw), np.asarray(e_raw), rtol=1e-4, atol=1e-5)


def test_make_cam_fn_sees_weight_updates():
    model = create("resnet18", num_classes=3, in_channels=1, rngs=0)
    x = jnp.asarray(smooth_images(11, 2, 64, 64, 1))
    fn = explain.make_cam_fn(model)
    before = np.asarray(fn(x, 0))
    model.fc.kernel[...] = -model.fc.kernel[...]
    after = np.asarray(fn(x, 0))
    np.testing.assert_allclose(after, np.asarray(explain.gradcam(model, x, 0)), atol=1e-5)
    assert np.abs(after - before).max() > 0.1


def test_plain_jax_jit_of_partial(zoo_models):
    model = zoo_models("covidnet")
    x = jnp.asarray(smooth_images(12, 2, 64, 64, 1))
    jitted = jax.jit(partial(explain.gradcam, model, method="hirescam"))
    np.testing.assert_allclose(np.asarray(jitted(x, jnp.array([1, 2]))),
                               np.asarray(explain.gradcam(model, x, [1, 2], method="hirescam")),
                               atol=1e-5)
