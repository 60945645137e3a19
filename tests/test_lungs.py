"""The lung segmenter API (any size / bit depth / colour in, per-image maps out) and the
shipped U-Net's quality on real, independent lung masks."""
from __future__ import annotations

import io
from pathlib import Path

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


# --------------------------------------------------------------------------------------------
# two conventions: resize policies, augmentation, masked heads, the shipped pair
# --------------------------------------------------------------------------------------------
def test_letterbox_round_trip_and_policy():
    from covidmt_jax.lungs import letterbox_geometry, resize_from_input, resize_to_input
    x = np.zeros((40, 80), np.float32)
    x[10:30, 20:60] = 1.0
    assert letterbox_geometry((40, 80), 32) == (16, 32, 8, 0)
    lb = resize_to_input(x, 32, "letterbox")
    assert lb.shape == (32, 32) and lb[:8].max() == 0 and lb[24:].max() == 0  # black bands
    back = resize_from_input(lb, (40, 80), "letterbox")
    assert back.shape == (40, 80) and np.abs(back - x).mean() < 0.08
    sq = resize_to_input(x, 32, "squash")
    assert sq[:8].max() > 0  # stretched: the film fills the square
    with pytest.raises(ValueError, match="resize policy"):
        resize_to_input(x, 32, "crop")


def test_opacity_augmentation_keeps_the_mask_and_only_brightens_lung():
    from covidmt_jax.data.lung_augment import OPACITY_KINDS, LungAugment, add_opacities, jpeg_roundtrip
    rng = np.random.default_rng(0)
    img = np.full((64, 64), 0.3, np.float32)
    mask = np.zeros((64, 64), bool)
    mask[10:54, 8:28] = mask[10:54, 36:56] = True
    for kind in OPACITY_KINDS:
        out = add_opacities(img, mask, np.random.default_rng(1), kind=kind)
        assert out.shape == img.shape and (out >= img - 1e-6).all()
        assert out[mask].mean() > img[mask].mean() + 0.01, kind   # denser lung
        assert np.abs(out[:2] - img[:2]).max() < 1e-3             # far from the lung: unchanged
    with pytest.raises(ValueError, match="opacity kind"):
        add_opacities(img, mask, rng, kind="nodule")
    j = jpeg_roundtrip(img, 50, scale=0.5)
    assert j.shape == img.shape and np.abs(j - img).max() < 0.05
    x, m = LungAugment()(img, mask, rng)
    assert x.shape == m.shape == (64, 64) and m.dtype == bool and 0 <= x.min() and x.max() <= 1


def test_masked_convention_loss_trains_only_the_own_head():
    import jax
    import jax.numpy as jnp
    from covidmt_jax.lung_training import masked_convention_loss
    logits = jnp.asarray(np.random.RandomState(0).randn(3, 8, 8, 2).astype(np.float32))
    target = jnp.asarray((np.random.RandomState(1).rand(3, 8, 8) > 0.5).astype(np.float32))
    conv = jnp.asarray([0, 1, 1], jnp.int32)
    g = np.asarray(jax.grad(masked_convention_loss)(logits, target, conv))
    assert np.abs(g[0, ..., 1]).max() == 0 and np.abs(g[1, ..., 0]).max() == 0 and np.abs(g[2, ..., 0]).max() == 0
    assert np.abs(g[0, ..., 0]).max() > 0 and np.abs(g[1, ..., 1]).max() > 0


def test_export_convention_slices_one_head(tmp_path):
    import jax
    from covidmt_jax.lung_training import export_convention
    kw = {"depth": 2, "base_width": 4, "in_channels": 1, "num_classes": 2}
    two = models.create("unet", rngs=3, **kw)
    save_model(tmp_path / "two", two, name="unet", model_kwargs=kw,
               metadata={"image_size": 32, "outputs": ["fields", "anatomical"]})
    with pytest.raises(ValueError, match="single-output"):
        load_lung_segmenter(tmp_path / "two")
    x = np.random.RandomState(0).randn(2, 32, 32, 1).astype(np.float32)
    two.eval()
    for k, conv in enumerate(["fields", "anatomical"]):
        seg = load_lung_segmenter(export_convention(tmp_path / "two", tmp_path / conv, conv, resize="letterbox"))
        assert seg.convention == conv and seg.resize == "letterbox"
        np.testing.assert_allclose(np.asarray(seg.predict_normalised(x)),
                                   np.asarray(jax.nn.sigmoid(two(x)))[..., k], atol=1e-6)
    with pytest.raises(ValueError, match="no 'ribs'"):
        export_convention(tmp_path / "two", tmp_path / "r", "ribs")
    with pytest.raises(ValueError, match="unknown lung segmenter"):
        lung_segmenter("heart")


def test_init_from_a_narrower_export_widens_to_the_same_function_and_breaks_symmetry(tmp_path):
    import jax
    import optax
    from flax import nnx
    from covidmt_jax.lung_training import init_from_export, masked_convention_loss
    kw = {"depth": 2, "base_width": 4, "in_channels": 1, "num_classes": 1, "batch_norm": True}
    narrow = models.create("unet", rngs=5, **kw)
    narrow.train()  # move the BatchNorm running statistics away from their initial values
    narrow(np.random.RandomState(1).randn(4, 32, 32, 1).astype(np.float32) * 2 + 1)
    save_model(tmp_path / "narrow", narrow, name="unet", model_kwargs=kw, metadata={"image_size": 32})
    wide = models.create("unet", rngs=0, **dict(kw, base_width=8, num_classes=2))
    names = init_from_export(wide, tmp_path / "narrow", seed=3)
    assert "dec/0/conv1/kernel" in names and "up/0/kernel" in names
    x = np.random.RandomState(0).randn(3, 32, 32, 1).astype(np.float32)
    narrow.eval(), wide.eval()
    want = np.asarray(narrow(x))[..., 0]
    got = np.asarray(wide(x))
    for k in range(2):  # both heads start as the narrow net's single head: the same function
        np.testing.assert_allclose(got[..., k], want, rtol=1e-4, atol=1e-4)
    k1 = np.asarray(wide.down[1].conv1.kernel.get_value())  # [3, 3, 8, 16]: inputs copied twice
    assert not np.allclose(k1[:, :, :4], k1[:, :, 4:])  # the copies' weights differ (zero-sum noise)
    np.testing.assert_allclose(k1[:, :, :4] + k1[:, :, 4:], np.tile(np.asarray(narrow.down[1].conv1.kernel.get_value()),
                               (1, 1, 1, 2)), rtol=1e-5, atol=1e-6)
    # one training step later the duplicated channels have diverged
    wide.train()
    opt = nnx.Optimizer(wide, optax.adam(1e-2), wrt=nnx.Param)
    batch_mask = (np.random.RandomState(2).rand(3, 32, 32) > 0.5).astype(np.float32)
    conv = np.array([0, 1, 0], np.int32)
    grads = nnx.grad(lambda m: masked_convention_loss(m(x), batch_mask, conv))(wide)
    opt.update(wide, grads)
    k0 = np.asarray(wide.down[0].conv1.kernel.get_value())  # [3, 3, 1, 8]
    assert not np.allclose(k0[..., :4], k0[..., 4:])
    assert np.isfinite(np.asarray(jax.tree.leaves(nnx.state(wide))[0])).all()
    # an all-zero kernel widens to zeros (no noise to split)
    from covidmt_jax.models.unet import widen_tensor
    z = widen_tensor(("dec", 0, "conv1", "kernel"), np.zeros((3, 3, 8, 4)), (3, 3, 16, 8), np.random.default_rng(0))
    assert z.shape == (3, 3, 16, 8) and not z.any()
    # a width that is not a whole multiple is refused, naming the tensor
    with pytest.raises(ValueError, match=r"narrow: .*cannot be widened"):
        init_from_export(models.create("unet", rngs=0, **dict(kw, base_width=6)), tmp_path / "narrow")


def test_soup_averages_every_tensor_and_refuses_other_architectures(tmp_path):
    from safetensors.numpy import load_file
    from covidmt_jax.export import average_models
    from covidmt_jax.lung_training import soup
    kw = {"depth": 2, "base_width": 4, "in_channels": 1, "num_classes": 2, "batch_norm": True}
    members = []
    for seed in (1, 2, 3):
        m = models.create("unet", rngs=seed, **kw)
        m.train()  # one forward pass in training mode moves the BatchNorm running statistics
        m(np.random.RandomState(seed).randn(2, 32, 32, 1).astype(np.float32) * seed)
        members.append(save_model(tmp_path / f"m{seed}", m, name="unet", model_kwargs=kw,
                                  metadata={"image_size": 32, "outputs": ["fields", "anatomical"],
                                            "step": 100 * seed, "val_dice": {"a": 0.1 * seed}}))
    params = [load_file(str(m / "params.safetensors")) for m in members]
    stats = [k for k in params[0] if k.endswith("mean")]
    assert stats and not np.allclose(params[0][stats[0]], params[1][stats[0]])  # they differ, and are averaged
    out = average_models(members, tmp_path / "avg")
    avg = load_file(str(out / "params.safetensors"))
    assert set(avg) == set(params[0])
    for k in avg:
        np.testing.assert_allclose(avg[k], (params[0][k] + params[1][k] + params[2][k]) / 3, rtol=1e-6, atol=1e-7)
    spec = __import__("json").loads((out / "model.json").read_text())
    assert "step" not in spec["metadata"] and [r["step"] for r in spec["metadata"]["averaged_from"]] == [100, 200, 300]
    # the soup of one convention is a single-output segmenter whose head is the mean of that channel
    seg = load_lung_segmenter(soup(members, tmp_path / "fields", convention="fields"))
    assert seg.convention == "fields"
    head = load_file(str(tmp_path / "fields" / "params.safetensors"))["head/kernel"]
    np.testing.assert_allclose(head, np.mean([p["head/kernel"][..., :1] for p in params], 0), rtol=1e-6)
    assert [r["directory"] for r in seg.metadata["averaged_from"]] == [str(m) for m in members]
    x = np.random.RandomState(0).randn(2, 32, 32, 1).astype(np.float32)
    assert np.isfinite(np.asarray(seg.predict_normalised(x))).all()
    # the command line does the same for the other convention; the two soups share their body
    from covidmt_jax.lung_training import main
    main(["soup", "--members", ",".join(map(str, members)), "--convention", "anatomical",
          "--out", str(tmp_path / "anatomical")])
    anat = load_file(str(tmp_path / "anatomical" / "params.safetensors"))
    fields = load_file(str(tmp_path / "fields" / "params.safetensors"))
    assert load_lung_segmenter(tmp_path / "anatomical").convention == "anatomical"
    assert all(np.array_equal(anat[k], fields[k]) for k in anat if not k.startswith("head"))
    np.testing.assert_allclose(anat["head/bias"], np.mean([p["head/bias"][1:] for p in params], 0), rtol=1e-6)
    # an averaged single-head member of the other convention, another width, or one export alone: refused
    with pytest.raises(ValueError, match="neither a multi-head export"):
        soup([tmp_path / "fields", members[0]], tmp_path / "x", convention="anatomical")
    wide = dict(kw, base_width=8)
    save_model(tmp_path / "wide", models.create("unet", rngs=0, **wide), name="unet", model_kwargs=wide,
               metadata={"image_size": 32})
    with pytest.raises(ValueError, match="only the same architecture averages"):
        average_models([members[0], tmp_path / "wide"], tmp_path / "y")
    with pytest.raises(ValueError, match="at least two"):
        average_models([members[0]], tmp_path / "z")


_SHIPPED_BOTH = all((d / "model.json").is_file() for d in __import__("covidmt_jax.lungs", fromlist=["x"]).SEGMENTERS.values())


@pytest.mark.skipif(not _SHIPPED_BOTH, reason="the two shipped segmenters are not in this checkout")
def test_both_shipped_segmenters_load_and_run():
    from covidmt_jax.lungs import SEGMENTERS
    img = (np.random.RandomState(0).rand(90, 70) * 255).astype(np.uint8)
    for name in SEGMENTERS:
        seg = lung_segmenter(name)
        assert seg.convention == name
        (m,) = seg.lung_masks([img])
        assert m.shape == (90, 70) and m.dtype == np.float32
    assert lung_segmenter().convention == "fields"


@pytest.mark.skipif(not _SHIPPED_BOTH, reason="the two shipped segmenters are not in this checkout")
def test_anatomical_mask_larger_and_contains_fields_on_films_annotated_both_ways(shared_data):
    """Validation films of the ieee8023 patients that carry both a QU-Ex (fields) and a V7
    (anatomical) mask: the anatomical prediction is larger and holds most of the fields one."""
    import csv
    from covidmt_jax.data.images import load_grey
    from covidmt_jax.data.splits import folder_splits
    root = shared_data / "lungs_diseased"
    if not (root / "v7_covid_anatomical").is_dir():
        pytest.skip("lungs_diseased sets absent")
    with open(root / "v7_covid_anatomical" / "pairs.csv") as f:
        v7 = {r["ieee8023_filename"]: r["stem"] for r in csv.DictReader(f)}
    with open(root / "quex_covid_fields" / "pairs.csv") as f:
        both = [(r["stem"], v7[r["ieee8023_filename"]]) for r in csv.DictReader(f) if r["ieee8023_filename"] in v7]
    val = folder_splits(root / "quex_covid_fields")
    films = [v for q, v in both if val[q] == "val"][:6]
    assert len(films) >= 3
    imgs = [load_grey(root / "v7_covid_anatomical" / "images" / f"{s}.png") for s in films]
    fields = [m >= 0.5 for m in lung_segmenter("fields").lung_masks(imgs)]
    anat = [m >= 0.5 for m in lung_segmenter("anatomical").lung_masks(imgs)]
    for s, f, a in zip(films, fields, anat):
        assert a.sum() > f.sum(), s
        assert (f & a).sum() / f.sum() > 0.8, s


@pytest.mark.skipif(not _SHIPPED_BOTH, reason="the two shipped segmenters are not in this checkout")
def test_score_with_both_conventions_end_to_end(tmp_path):
    """``lungs=both``: each row holds IOL under both conventions (``iol``, ``iol_anatomical``)."""
    import csv
    from covidmt_jax import score
    from covidmt_jax.scoring.loading import lung_dirs
    from covidmt_jax.lungs import SEGMENTERS
    assert list(lung_dirs("both")) == ["fields", "anatomical"] and lung_dirs("both") == SEGMENTERS
    d = tmp_path / "resnet18"
    save_model(d, models.create("resnet18", rngs=0, num_classes=1, in_channels=1), name="resnet18",
               model_kwargs={"num_classes": 1, "in_channels": 1})
    demo = Path(__file__).resolve().parents[1] / "configs" / "score_demo.py"
    work = tmp_path / "run"
    argv = ["score", f"--config={demo}:model={d},lungs=both,n=4,size=64,name=resnet18", f"--workdir={work}",
            "--config.batch_size=4", "--config.progress=False"]
    assert score.main(argv) == 0
    with open(work / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {"iol_orig", "iol_trans", "iol_orig_anatomical", "lung_frac_orig_anatomical"} <= set(rows[0])
    ok = [r for r in rows if not r["error"]]
    assert ok and all(0 < float(r["lung_frac_orig_anatomical"]) < 1 for r in ok)
    import json
    summary = json.loads((work / "summary.json").read_text())
    assert summary["job"]["lung_conventions"] == ["fields", "anatomical"]
    by = summary["models"]["resnet18"]["ols_by_convention"]  # OLS under each lung definition
    assert list(by) == ["fields", "anatomical"] and set(by["anatomical"]) == {"original", "transmitted"}
    assert by["anatomical"]["original"]["n_total"] == len(ok)
    assert set(summary["models"]["resnet18"]["ols_convention_difference"]["anatomical"]) == {"original", "transmitted"}
    assert "### OLS by lung definition" in (work / "report.md").read_text()


def _tiny_lung_sets(size: int = 32):
    """Two in-memory sets (one per convention) as ``lung_training.load_sets`` returns them."""
    rng = np.random.default_rng(0)

    def one_set(n, convention):
        masks = np.zeros((n, size, size), np.uint8)
        masks[:, 6:26, 5:14] = masks[:, 6:26, 18:27] = 1
        images = (rng.random((n, size, size)) * 80 + 100 * (1 - masks)).astype(np.uint8)
        return {"images": images, "masks": masks, "convention": np.full(n, convention, np.int32),
                "ids": [f"f{i}" for i in range(n)], "meta": [{} for _ in range(n)]}

    train = {"a": one_set(6, 0), "b": one_set(6, 1)}
    val = {"a": one_set(2, 0), "b": one_set(2, 1)}
    return train, val


def _lung_run_config(**over):
    import ml_collections
    c = ml_collections.ConfigDict({
        "data_root": "unused", "sets": ("a", "b"), "weights": {"a": 0.5, "b": 0.5}, "image_size": 32,
        "width": 2, "resize": "squash", "steps": 6, "lr": 1e-3, "batch_size": 2, "init": "", "seed": 0,
        "eval_every": 3, "checkpoint_every": 2, "log_every": 1})
    c.update(over)
    return c


def _checkpoint_params(workdir):
    from safetensors.numpy import load_file
    return load_file(str(Path(workdir) / "export" / "best" / "params.safetensors"))


def test_lung_training_resumes_as_if_never_interrupted(tmp_path, monkeypatch):
    """Killed after step 5 (last checkpoint: step 4), rerun with the same workdir: the same
    final weights and metrics as one uninterrupted run; other settings are refused."""
    import json

    from covidmt_jax import lung_training as lt
    sets = _tiny_lung_sets()
    ref = lt.train(_lung_run_config(), tmp_path / "ref", sets=sets)

    real_info = lt.log.info

    def die_after_step_5(msg, *args):
        if msg.startswith("step") and args[0] == 5:
            raise KeyboardInterrupt("simulated kill after step 5")
        real_info(msg, *args)

    monkeypatch.setattr(lt.log, "info", die_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        lt.train(_lung_run_config(), tmp_path / "killed", sets=sets)
    monkeypatch.setattr(lt.log, "info", real_info)
    with pytest.raises(ValueError, match=r"other settings \(lr"):
        lt.train(_lung_run_config(lr=2e-3), tmp_path / "killed", sets=sets)
    with pytest.raises(ValueError, match=r"other settings \(augment"):
        lt.train(_lung_run_config(augment={"p_opacity": 0.9}), tmp_path / "killed", sets=sets)
    with pytest.raises(ValueError, match=r"config.augment: unknown key\(s\) \['p_opacty'\]"):
        lt.train(_lung_run_config(augment={"p_opacty": 0.9}), tmp_path / "other", sets=sets)
    resumed = lt.train(_lung_run_config(), tmp_path / "killed", sets=sets)

    assert resumed["best_step"] == ref["best_step"]
    assert resumed["best_mean_dice"] == pytest.approx(ref["best_mean_dice"], abs=1e-6)
    a, b = _checkpoint_params(tmp_path / "ref"), _checkpoint_params(tmp_path / "killed")
    assert set(a) == set(b)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-6
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6]
    # a finished workdir: nothing to do, same answer
    again = lt.train(_lung_run_config(), tmp_path / "killed", sets=sets)
    assert again["best_step"] == ref["best_step"]


def test_lung_config_trains_a_subset_of_sets_and_refuses_unknown_names(tmp_path):
    """``sets=`` picks the sets (their draw weights kept); training one convention's set only
    leaves the other head as it started."""
    from flax import nnx
    from safetensors.numpy import load_file

    from covidmt_jax import lung_training as lt
    from covidmt_jax.data.splits import SOURCES
    config = str(Path(__file__).resolve().parents[1] / "configs" / "unet_lungs_conventions.py")
    full = lt.load_config(config)
    assert set(full.sets) == set(SOURCES) and set(full.weights) == set(full.sets)
    one = lt.load_config(config + ":sets=v7_covid_anatomical")
    assert one.sets == ("v7_covid_anatomical",) and dict(one.weights) == {"v7_covid_anatomical": 0.3}
    two = lt.load_config(config + ":sets=quex_covid_fields+lungs_mc_sz_512")
    assert two.sets == ("lungs_mc_sz_512", "quex_covid_fields")
    for bad in ("v7", "lungs_mc_sz_512+lungs_mc_sz_512", "+"):
        with pytest.raises(ValueError, match="known: .*joined with '\\+'"):
            lt.load_config(config + ":sets=" + bad)

    train, val = _tiny_lung_sets()
    cfg = _lung_run_config(sets=("b",), weights={"b": 1.0}, steps=3, eval_every=3)
    lt.train(cfg, tmp_path, sets=({"b": train["b"]}, {"b": val["b"]}))
    start = models.create("unet", rngs=nnx.Rngs(0), depth=4, base_width=2, batch_norm=True, num_classes=2,
                          in_channels=1)  # what train() builds from seed 0 with no init
    save_model(tmp_path / "start", start, name="unet", model_kwargs={})
    init = load_file(str(tmp_path / "start" / "params.safetensors"))
    trained = _checkpoint_params(tmp_path)
    head = next(k for k in trained if k.startswith("head") and k.endswith("kernel"))
    k0 = init[head]
    np.testing.assert_array_equal(trained[head][..., 0], k0[..., 0])  # fields head: no fields set
    assert not np.array_equal(trained[head][..., 1], k0[..., 1])


def test_lung_training_stops_on_a_non_finite_loss(tmp_path, monkeypatch):
    from covidmt_jax import lung_training as lt
    from covidmt_jax.checkpoint import TrainCheckpointer
    real = lt.masked_convention_loss
    monkeypatch.setattr(lt, "masked_convention_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 1;"):
        lt.train(_lung_run_config(), tmp_path, sets=_tiny_lung_sets())
    ck = TrainCheckpointer(tmp_path)
    assert ck.latest_step() is None
    ck.close()


@pytest.mark.skipif(not _SHIPPED_BOTH, reason="the two shipped segmenters are not in this checkout")
def test_evaluate_reports_dice_with_a_patient_clustered_interval(shared_data):
    """``lung_training.evaluate`` on the 10 validation COVID films (6 patients) of
    ``quex_covid_fields``: per-film Dice against the reference, group mean with the
    cluster-robust interval over patients; a convention without a segmenter gets no Dice."""
    from covidmt_jax.lung_training import evaluate
    from covidmt_jax.metrics import clustered_mean_ci
    if not (shared_data / "lungs_diseased" / "quex_covid_fields").is_dir():
        pytest.skip("lungs_diseased sets absent")
    res = evaluate({"fields": lung_segmenter("fields")}, shared_data, split="val", channel=None,
                   sets=("quex_covid_fields",))
    rows, g = res["rows"], res["groups"]["quex_covid_fields"]
    assert g["n"] == len(rows) >= 3 and 2 <= g["patients"] < g["n"]  # several films per patient
    dice = np.array([r["dice"] for r in rows])
    assert np.all((dice > 0.5) & (dice <= 1.0))
    mean, lo, hi = clustered_mean_ci(dice, [r["patient"] for r in rows])
    assert g["dice_mean"] == pytest.approx(dice.mean()) and mean == pytest.approx(dice.mean())
    assert (g["dice_ci95_lo"], g["dice_ci95_hi"]) == pytest.approx((lo, hi))
    assert lo < mean < hi and g["dice_min"] == pytest.approx(dice.min())
    # an anatomical-convention set scored by the fields segmenter alone: no own-convention Dice
    res = evaluate({"fields": lung_segmenter("fields")}, shared_data, split="val", channel=None,
                   sets=("v7_covid_anatomical",))
    g = res["groups"]["v7_covid_anatomical"]
    assert "dice_mean" not in g and g["n"] >= 3
    assert all(0.0 <= r["dice_fields_vs_ref"] <= 1.0 for r in res["rows"])


def test_figures_of_both_conventions_and_of_a_sets_worst_films(shared_data, tmp_path, capsys):
    """``lung_training figure``: the worst films of a set are the lowest-Dice ones of
    ``evaluate``; the conventions figure draws films annotated both ways; bad names are errors."""
    from covidmt_jax import lung_training as LT
    if not (shared_data / "lungs_diseased" / "quex_covid_fields").is_dir():
        pytest.skip("lungs_diseased sets absent")
    segs = {c: lung_segmenter(c) for c in ("fields", "anatomical")}
    out = LT.worst_films_figure(shared_data, tmp_path / "worst.png", n=2, segmenters=segs)
    assert Image.open(out).size[0] > Image.open(out).size[1] > 100
    rows = LT.evaluate({"fields": segs["fields"]}, shared_data, split="val", channel=None,
                       sets=("quex_covid_fields",))["rows"]
    worst = sorted(rows, key=lambda r: r["dice"])[:2]
    assert worst[0]["dice"] < 0.9  # the set's hardest film (documented in the README)
    shown = dict(item.split("=") for item in Image.open(out).info["Description"].split())
    assert list(shown) == [r["id"] for r in worst]
    assert [float(v) for v in shown.values()] == pytest.approx([r["dice"] for r in worst], abs=1e-4)
    out = LT.conventions_figure(shared_data, tmp_path / "conv.png", n=1, segmenters=segs)
    assert Image.open(out).size[1] > 100
    with pytest.raises(ValueError, match="set 'nope' not under"):
        LT.worst_films_figure(shared_data, tmp_path / "x.png", set_name="nope", segmenters=segs)
    with pytest.raises(SystemExit):
        LT.main(["figure", "nonsense", "--out", str(tmp_path / "y.png")])
    assert "invalid choice" in capsys.readouterr().err
