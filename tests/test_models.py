"""Zoo models: shapes, dtypes, the shared backbone interface, jit, bf16, orbax round trip."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from covidmt_jax import models
from covidmt_jax.models.heads import decode_boxes, detect, encode_boxes, make_anchors, match_anchors, nms
from covidmt_jax.tasks import PAPER_TASKS, build_tasks, paper_tasks, total_loss

# (name, input size, model kwargs) small enough for CPU tests
CLASSIFIERS = [
    ("resnet18", 64, {}),
    ("resnet50", 64, {}),
    ("resnext50_32x4d", 64, {}),
    ("vgg19", 64, {}),
    ("vgg19_bn", 64, {}),
    ("xception", 80, {}),
    ("covidnet", 64, {"widths": (16, 32, 48, 64), "modules_per_stage": (1, 1, 2, 1)}),
    ("resnet18", 64, {"stage_widths": (8, 16, 32, 64)}),
    ("resnext50_32x4d", 64, {"stage_widths": (16, 32, 64, 128)}),
]


def test_available_lists_every_family():
    names = set(models.available())
    assert {"resnet18", "resnet50", "resnext50_32x4d", "vgg19", "vgg19_bn", "xception",
            "covidnet", "unet", "covidmt"} <= names


def test_unknown_model_and_bad_channels_fail_clearly():
    with pytest.raises(ValueError, match="unknown model 'resnet5'"):
        models.create("resnet5")
    with pytest.raises(ValueError, match="in_channels"):
        models.create("resnet18", in_channels=2)


@pytest.mark.parametrize("name,size,kw", CLASSIFIERS)
def test_classifier_shapes_and_interface(name, size, kw):
    m = models.create(name, num_classes=3, in_channels=1, **kw)
    x = jnp.asarray(np.random.RandomState(0).randn(2, size, size, 1), jnp.float32)
    logits = m(x)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    feats = m.features(x)
    assert set(feats) == {"c3", "c4", "c5", "last_conv"}
    for k, v in feats.items():
        assert v.shape[0] == 2 and v.shape[-1] == m.feature_channels[k], k
    # strides grow along the pyramid
    assert feats["c3"].shape[1] > feats["c4"].shape[1] >= feats["c5"].shape[1]
    # the Grad-CAM decomposition reproduces the forward pass
    np.testing.assert_allclose(m.pool_and_classify(feats["last_conv"]), logits, rtol=1e-5, atol=1e-5)
    assert m.pooled(x).shape == (2, m.feature_channels["last_conv"])


def test_narrow_resnet_has_the_torchvision_layout_at_scaled_widths():
    full = models.create("resnet50", num_classes=2)
    narrow = models.create("resnet50", num_classes=2, stage_widths=(8, 16, 32, 64))
    shapes = lambda m: {"/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    f, n = shapes(full), shapes(narrow)
    assert set(f) == set(n)  # same modules, same names: only channel counts differ
    assert n["layer4/2/conv3/kernel"] == (1, 1, 64, 256) and f["layer4/2/conv3/kernel"] == (1, 1, 512, 2048)
    assert n["conv1/kernel"] == (7, 7, 1, 8) and narrow.feature_channels["c3"] == 64
    with pytest.raises(ValueError, match="stage_widths must be 4 positive"):
        models.create("resnet18", stage_widths=(8, 16, 32))
    with pytest.raises(ValueError, match="every stage needs >= 16 planes"):
        models.create("resnext50_32x4d", stage_widths=(8, 16, 32, 64))


def test_rgb_and_nonsquare_inputs():
    m = models.create("resnet18", num_classes=2, in_channels=3)
    assert m(jnp.zeros((1, 48, 80, 3))).shape == (1, 2)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        m(jnp.zeros((1, 3, 48, 48)))


def test_everything_jits_and_bf16_compute_runs():
    m = models.create("resnet18", num_classes=2, dtype=jnp.bfloat16)
    x = jnp.ones((2, 64, 64, 1))

    @nnx.jit
    def fwd(model, x):
        return model(x)

    y = fwd(m, x)
    assert y.shape == (2, 2) and y.dtype == jnp.bfloat16
    leaves = jax.tree.leaves(nnx.state(m, nnx.Param))
    assert all(leaf.dtype == jnp.float32 for leaf in leaves), "parameters must stay float32"
    f32 = models.create("resnet18", num_classes=2)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(f32(x)), rtol=0.1, atol=0.1)


def test_train_mode_updates_batch_stats():
    m = models.create("resnet18", num_classes=1)
    before = np.asarray(m.bn1.mean[...]).copy()
    m.train()
    m(jnp.asarray(np.random.RandomState(1).rand(4, 32, 32, 1) + 3.0, jnp.float32))
    m.eval()
    assert not np.allclose(before, np.asarray(m.bn1.mean[...]))


@pytest.mark.parametrize("size", [64, 256])
def test_unet_shapes(size):
    u = models.create("unet", depth=4, base_width=8)
    x = jnp.zeros((1, size, size, 1))
    assert u(x).shape == (1, size, size, 1)
    p = u.predict(x)
    assert p.shape == (1, size, size) and float(p.min()) >= 0 and float(p.max()) <= 1
    with pytest.raises(ValueError, match="divisible by 16"):
        u(jnp.zeros((1, 60, 64, 1)))


def test_unet_without_batchnorm_and_depth():
    u = models.create("unet", depth=2, base_width=4, batch_norm=False)
    assert u(jnp.zeros((2, 32, 32, 1))).shape == (2, 32, 32, 1)
    assert not jax.tree.leaves(nnx.state(u, nnx.BatchStat))


@pytest.mark.parametrize("n_tasks", [1, 2, 6])
def test_covidmt_outputs_follow_tasks(n_tasks):
    tasks = paper_tasks(n_tasks)
    m = models.create("covidmt", backbone="resnet18", tasks=tasks, transition_channels=(32,),
                      fpn_channels=32)
    x = jnp.zeros((2, 64, 64, 1))
    out = m(x)
    assert set(out) == {t.name for t in tasks}
    for t in tasks:
        if t.kind == "classification":
            assert out[t.name].shape == (2,)
        else:
            n_anchors = m.anchors((64, 64)).shape[0]
            assert out[t.name]["regression"].shape == (2, n_anchors, 4)
            assert out[t.name]["objectness"].shape == (2, n_anchors)
    # one head per dataset group: NIH's findings share one head
    if n_tasks == 6:
        assert set(m.groups) == {"covidx", "nih"} and len(m.groups["nih"]) == 4
    assert m.pool_and_classify(m.features(x)["last_conv"]).shape == (2, len(m.classification_tasks))


def test_create_unfilled_holds_shapes_only_until_a_loader_fills_every_weight(tmp_path):
    """Loaders (exports, torch/xrv weights) build the model with ``create_unfilled``: every
    parameter and BatchNorm statistic is a shape only, other state (VGG's dropout RNG) is what
    ``create`` makes; ``check_filled`` names what was left unwritten; an export loads back to
    the same function, dropout key included (an export stores no seed: create's default)."""
    from covidmt_jax.export import load_model, save_model
    kw = {"num_classes": 3, "hidden": 16}
    ref = models.create("vgg19", rngs=7, **kw)
    empty = models.create_unfilled("vgg19", rngs=7, **kw)
    weights = nnx.to_flat_state(nnx.state(empty, models.registry.WEIGHTS))
    assert len(weights) == len(nnx.to_flat_state(nnx.state(ref, models.registry.WEIGHTS))) > 30
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for _, v in weights)
    rest_e, rest_r = (jax.tree.leaves(nnx.state(m, nnx.Not(models.registry.WEIGHTS))) for m in (empty, ref))
    assert len(rest_e) == len(rest_r) == 2  # the dropout stream's key and count: concrete, equal
    for a, b in zip(rest_e, rest_r):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"where: 38 variable\(s\) of the model were not loaded: convs/0/bias"):
        models.check_filled(empty, "where")
    ref = models.create("vgg19", **kw)  # an export keeps no seed: it loads with create's default
    save_model(tmp_path / "m", ref, name="vgg19", model_kwargs=kw)
    back = load_model(tmp_path / "m")
    assert models.check_filled(back, "x") is back
    x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 1))
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(ref(x)))
    inference = np.asarray(ref(x))
    back.train(), ref.train()  # dropout on: the same key draws the same masks
    dropped = np.asarray(back(x))
    np.testing.assert_array_equal(dropped, np.asarray(ref(x)))
    assert not np.array_equal(dropped, inference)


def test_box_head_group_norm_normalises_each_hidden_conv_and_round_trips(tmp_path):
    """``box_head_norm="group"``: GroupNorm after every hidden conv of both subnets, so each
    hidden activation has, per image and group, mean 0 and variance 1 before the ReLU whatever
    the input scale; the option survives export and load; a wrong name fails at build time."""
    from covidmt_jax.export import load_model, save_model
    from covidmt_jax.models.heads import RetinaSubnet
    sub = RetinaSubnet(16, 9, 1, norm="group", rngs=nnx.Rngs(0))
    assert len(sub.norms) == len(sub.convs) == 4
    x = 50.0 * jax.random.normal(jax.random.key(1), (2, 6, 6, 16)) + 7.0
    h = sub.norms[0](sub.convs[0](x))  # [2, 6, 6, 16], groups of 4 channels
    g = np.asarray(h).reshape(2, 36, 4, 4)
    np.testing.assert_allclose(g.mean(axis=(1, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(g.var(axis=(1, 3)), 1.0, rtol=1e-3)
    assert RetinaSubnet(16, 9, 1, rngs=nnx.Rngs(0)).norms == nnx.List([])
    kwargs = {"backbone": "resnet18", "tasks": ["covid", "box"], "transition_channels": (16,),
              "fpn_channels": 16, "box_head_norm": "group"}
    m = models.create("covidmt", **kwargs)
    xi = jax.random.uniform(jax.random.key(2), (2, 64, 64, 1))
    save_model(tmp_path / "m", m, name="covidmt", model_kwargs=kwargs)
    back = load_model(tmp_path / "m")
    assert len(back.box_head.objectness_subnet.norms) == 4
    np.testing.assert_allclose(np.asarray(back(xi)["box"]["objectness"]),
                               np.asarray(m(xi)["box"]["objectness"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="norm must be one of"):
        models.create("covidmt", backbone="resnet18", tasks=["box"], fpn_channels=16, box_head_norm="batch")


def test_covidmt_custom_task_dicts_and_errors():
    m = models.create("covidmt", backbone="resnet18", transition_channels=(16,),
                      tasks=[{"name": "tb", "kind": "classification", "dataset": "shenzhen", "label": "TB"}])
    assert set(m(jnp.zeros((1, 32, 32, 1)))) == {"tb"}
    with pytest.raises(ValueError, match="unknown task"):
        models.create("covidmt", backbone="resnet18", tasks=["covid", "pneumothorax"])
    with pytest.raises(ValueError, match="kind"):
        models.create("covidmt", backbone="resnet18", tasks=[{"name": "x", "kind": "regress", "dataset": "d"}])


def test_covidmt_total_loss_and_gradients_are_finite():
    tasks = paper_tasks(6)
    m = models.create("covidmt", backbone="resnet18", tasks=tasks, transition_channels=(16,),
                      fpn_channels=16)
    task_objs = build_tasks(tasks, anchors=m.anchors((64, 64)))
    rng = np.random.RandomState(0)
    batch = {"image": jnp.asarray(rng.rand(3, 64, 64, 1), jnp.float32),
             "labels": jnp.asarray(rng.randint(0, 2, (3, 5)), jnp.float32),
             "label_weight": jnp.asarray([[1, 0, 0, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], jnp.float32),
             "boxes": jnp.asarray([[[0, 0, 0, 0]], [[0, 0, 0, 0]], [[8, 8, 40, 50]]], jnp.float32),
             "box_valid": jnp.asarray([[0], [0], [1]], jnp.float32),
             "box_weight": jnp.asarray([0, 0, 1], jnp.float32)}

    def loss_fn(model):
        return total_loss(task_objs, model(batch["image"]), batch, model.task_weight_norms())

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m)
    assert np.isfinite(float(loss))
    # eq. 5: the mean of the six task losses
    per_task = [float(aux[f"{t.name}/loss"]) for t in tasks]
    assert float(loss) == pytest.approx(np.mean(per_task), rel=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_anchor_encode_decode_round_trip_and_matching():
    anchors = make_anchors((64, 64), sizes=(16, 32, 64))
    # 9 anchors per cell on 8x8 + 4x4 + 2x2 cells
    assert anchors.shape == (9 * (64 + 16 + 4), 4)
    boxes = jnp.asarray(np.tile([[10.0, 12.0, 40.0, 50.0]], (anchors.shape[0], 1)))
    deltas = encode_boxes(boxes, jnp.asarray(anchors))
    np.testing.assert_allclose(decode_boxes(deltas, jnp.asarray(anchors)), boxes, atol=1e-3)
    gt = jnp.asarray([[10.0, 12.0, 40.0, 50.0], [0, 0, 0, 0]])
    matched, label = match_anchors(jnp.asarray(anchors), gt, jnp.asarray([1.0, 0.0]))
    assert int((label == 1).sum()) >= 1
    assert np.all(np.asarray(matched)[np.asarray(label) == 1] == 0)


def test_nms_suppresses_overlaps_with_static_shapes():
    boxes = jnp.asarray([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], jnp.float32)
    scores = jnp.asarray([0.9, 0.8, 0.7, 0.95])
    idx, valid = jax.jit(lambda b, s: nms(b, s, iou_threshold=0.5, max_output=4))(boxes, scores)
    kept = [int(i) for i, v in zip(idx, valid) if v]
    assert kept == [3, 2]


def test_detect_returns_fixed_size_outputs():
    anchors = jnp.asarray(make_anchors((64, 64), sizes=(16, 32, 64)))
    n = anchors.shape[0]
    obj = jnp.full((2, n), -10.0).at[0, 5].set(5.0)
    det = detect(jnp.zeros((2, n, 4)), obj, anchors, max_detections=3)
    assert det["boxes"].shape == (2, 3, 4)
    assert bool(det["valid"][0, 0]) and not bool(det["valid"][1].any())
    np.testing.assert_allclose(det["boxes"][0, 0], anchors[5], atol=1e-4)


def test_orbax_round_trip_of_model_state(tmp_path):
    import orbax.checkpoint as ocp
    m = models.create("resnet18", num_classes=2, rngs=1)
    m.bn1.mean[...] = m.bn1.mean[...] + 0.5
    state = nnx.state(m)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "model", state)
    ckpt.wait_until_finished()
    fresh = models.create("resnet18", num_classes=2, rngs=2)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(fresh))
    restored = ckpt.restore(tmp_path / "model", abstract)
    nnx.update(fresh, restored)
    x = jnp.asarray(np.random.RandomState(0).rand(1, 32, 32, 1), jnp.float32)
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(m(x)))
