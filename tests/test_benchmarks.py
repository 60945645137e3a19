"""benchmarks/train_throughput.py at a tiny size: the real JAX train step and the PyTorch
reference both run, train (the loss changes) and produce a table. No timing asserts."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return load_script("train_throughput")


def _check(m, framework, batch):
    assert m.framework == framework and m.batch == batch
    assert len(m.step_s) == 1 and m.step_s[0] > 0 and m.images_per_s > 0
    assert len(m.losses) == 2 and all(math.isfinite(v) for v in m.losses)
    assert m.losses[0] != m.losses[1], "the second step saw the same parameters: no update"


def test_parse_model(bench):
    m = bench.parse_model("covidmt_resnext50")
    assert (m.backbone, m.multitask, len(m.task_specs)) == ("resnext50_32x4d", True, 6)
    b = bench.parse_model("resnet50")
    assert (b.backbone, b.multitask, [t.name for t in b.task_specs]) == ("resnet50", False, ["covid"])
    x = bench.parse_model("xception")
    assert (x.backbone, x.multitask) == ("xception", False) and x.backbone in bench.JAX_ONLY
    with pytest.raises(ValueError, match="unknown benchmark model 'vgg16'"):
        bench.parse_model("vgg16")


def test_synthetic_batch_layout(bench):
    m = bench.parse_model("covidmt_resnet18")
    b = bench.synthetic_batch(m, 32, 6)
    assert b["image"].shape == (6, 32, 32, 1) and b["labels"].shape == (6, 5)
    # covidx rows 0-1 carry covid (column 0), rsna rows 2-3 the boxes, nih rows 4-5 columns 1-4
    np.testing.assert_array_equal(b["label_weight"][:, 0], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["label_weight"][:, 1:].sum(1), [0, 0, 0, 0, 4, 4])
    np.testing.assert_array_equal(b["box_weight"], [0, 0, 1, 1, 0, 0])
    assert (b["box_valid"][2:4].sum(1) >= 1).all() and b["box_valid"][[0, 1, 4, 5]].sum() == 0
    boxes = b["boxes"][b["box_valid"] > 0]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes.min() >= 0 and boxes.max() <= 32
    with pytest.raises(ValueError, match="multiple of the 3 task datasets"):
        bench.synthetic_batch(m, 32, 4)


@pytest.mark.parametrize("name,batch", [("resnet18", 2), ("covidmt_resnet18", 3)])
def test_jax_step_runs_and_trains(bench, name, batch):
    m = bench.bench_jax(bench.parse_model(name), 32, batch, steps=1, warmup=1)
    _check(m, "jax", batch)
    assert m.compile_s > 0


@pytest.mark.torch
@pytest.mark.parametrize("name,batch", [("resnet18", 2), ("covidmt_resnet18", 3)])
def test_torch_reference_runs_and_trains(bench, name, batch):
    if not bench.torch_available():
        pytest.skip("torch/torchvision not installed")
    m = bench.bench_torch(bench.parse_model(name), 32, batch, steps=1, warmup=1)
    _check(m, "torch", batch)
    table = bench.format_table([bench.bench_jax(bench.parse_model(name), 32, batch, steps=1,
                                                warmup=1), m])
    lines = table.splitlines()
    assert len(lines) == 4 and "jax/torch" in lines[0]
    ratio = lines[2].split("|")[-2].strip()
    assert float(ratio) > 0 and lines[3].split("|")[-2].strip() == ""


def test_cli_flags(bench):
    a = bench.parse_args(["--models", "covidmt_resnext50,resnet50", "--sizes", "224,512",
                          "--device", "gpu"])
    assert [m.name for m in a.models] == ["covidmt_resnext50", "resnet50"]
    assert a.sizes == [224, 512] and a.dtype == "bfloat16" and a.batch == 12
    with pytest.raises(SystemExit):
        bench.parse_args(["--frameworks", "tf"])


def test_conv_probe(bench):
    rows = bench.conv_probe(16, 1, width=8, groups=4, repeats=1, with_torch=False)
    assert [r["groups"] for r in rows] == [4, 1]
    assert all(r[k] > 0 for r in rows for k in ("jax_fwd_ms", "jax_dx_ms", "jax_dw_ms"))
    # XLA expresses the grouped conv's weight gradient as an lhs-dilated convolution
    assert rows[0]["dilated_convs_in_dw"] >= 1 and rows[1]["dilated_convs_in_dw"] == 0
    text = bench.format_probe(rows)
    assert text.count("\n") == 3 and "groups=4" in text


def test_data_throughput_runs_tiny(tmp_path, monkeypatch, capsys):
    """benchmarks/data_throughput.py end to end on 3 phantoms (files and a tfds build)."""
    monkeypatch.setenv("COVIDMT_NO_MALLOC_TUNING", "1")  # never re-exec the test process
    mod = load_script("data_throughput")
    assert mod.main(["--n", "3", "--repeats", "1", "--size", "64", "--source_size", "96", "--no_real",
                     "--workdir", str(tmp_path)]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("files ", "tfds "))]
    assert [r.split()[0] for r in rows] == ["files", "tfds"]
    assert all(float(r.split()[-5]) > 0 for r in rows)  # images/s/worker


# ----------------------------------------------------------------------------- gradcam_throughput.py

@pytest.fixture(scope="module")
def cam_bench():
    return load_script("gradcam_throughput")


def test_gradcam_benchmark_runs_every_method_and_tabulates(cam_bench):
    rows = cam_bench.bench_jax(32, 2, backbone="resnet18", steps=2, warmup=1)
    assert [r["method"] for r in rows] == ["explain.gradcam", "explain.make_cam_fn"]
    if cam_bench.torch_available():
        rows.append(cam_bench.bench_torch(32, 2, backbone="resnet18", steps=1, warmup=1))
    for r in rows:
        assert r["first_s"] > 0 and all(t > 0 for t in r["call_s"])
    table = cam_bench.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| explain.gradcam | 32 | 2 |")
    with pytest.raises(SystemExit):
        cam_bench.parse_args(["--sizes", "x"])


# ----------------------------------------------------------------------------- paired_ab.py

@pytest.fixture(scope="module")
def paired(bench):  # after bench: paired_ab imports train_throughput
    return load_script("paired_ab")


def test_sign_test_interval_uses_binomial_order_statistics(paired):
    x = list(range(1, 13))  # n = 12: P(Bin(12, 1/2) <= 2) = 0.019 <= 0.025 < P(<= 3) = 0.073 -> k = 3
    assert paired.sign_test_interval(x[::-1]) == (3, 10)
    assert paired.sign_test_interval(list(range(6))) == (0, 5)  # n = 6: k = 1, the extremes
    lo, hi = paired.sign_test_interval([1.0] * 5)  # n = 5: no 95 % interval exists
    assert math.isnan(lo) and math.isnan(hi)


def test_paired_summary_ratios(paired):
    a = [100.0, 110, 90, 100, 105, 95, 100, 98]
    s = paired.paired_summary(a, [2 * v for v in a])
    assert s["ratios"] == [2.0] * 8 and s["median_ratio"] == 2.0 and s["ratio_ci95"] == [2.0, 2.0]
    s = paired.paired_summary(a, [v * (1.1 if i % 2 else 1 / 1.1) for i, v in enumerate(a)])  # log-symmetric
    assert s["ratio_ci95"][0] < 1 < s["ratio_ci95"][1] and s["wilcoxon_p"] > 0.05
    s = paired.paired_summary(a, [v * (1.05 + 0.01 * i) for i, v in enumerate(a)])  # B always slower
    assert 1.05 <= s["ratio_ci95"][0] and s["ratio_ci95"][1] <= 1.12 and s["wilcoxon_p"] < 0.01
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        paired.paired_summary([1.0], [])


def test_paired_run_times_both_switch_settings(paired):
    res = paired.run("resnet18", 32, 2, ("on", "off"), rounds=2, steps=1, warmup=0, log=lambda m: None)
    assert res["arms"] == ["on", "off"] and res["rounds"] == 2
    assert all(len(v) == 2 and min(v) > 0 for v in res["per_round_ms"].values())
    assert res["ratios"] == pytest.approx([b / a for a, b in zip(res["per_round_ms"]["on"], res["per_round_ms"]["off"])])
    assert "paired ratio off / on" in paired.format_result(res)


def test_vjp_arm_swaps_the_differentiation_rule_only(paired):
    """Under the ``vjp`` arm the kernels are a custom_vjp (forward mode refused: the swap is in
    force) with the same values and gradients as lax; outside it, the package's custom_jvp."""
    import jax
    import jax.numpy as jnp
    from covidmt_jax.models import cpu_conv, layers
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU conv kernels run on the CPU backend only")
    dn = ("NHWC", "HWIO", "NHWC")
    x = jax.random.normal(jax.random.key(0), (2, 40, 40, 16))
    ws = {"grouped": jax.random.normal(jax.random.key(1), (3, 3, 2, 16)),   # elementwise + chunked dW
          "dense": jax.random.normal(jax.random.key(2), (3, 3, 16, 8))}     # XLA fwd + chunked dW
    for name, w in ws.items():
        groups = 16 // w.shape[2]

        def f(x, w, conv=layers.conv_general_dilated):
            return (conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn, feature_group_count=groups) ** 2).sum()
        ref = jax.grad(lambda x, w: f(x, w, jax.lax.conv_general_dilated), argnums=(0, 1))(x, w)
        with paired.arm_context("vjp"):
            assert cpu_conv.enabled_paths() == frozenset(cpu_conv.PATHS)
            got = jax.grad(f, argnums=(0, 1))(x, w)
            with pytest.raises(TypeError, match="forward-mode"):
                jax.jvp(lambda w: f(x, w), (w,), (w,))
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-3 * float(jnp.abs(r).max()), err_msg=name)
    jax.jvp(lambda w: f(x, w), (w,), (w,))  # the package's custom_jvp is back


# ----------------------------------------------------------------------------- model_load.py

@pytest.mark.torch
def test_model_load_benchmark_fills_every_tensor_in_child_processes_and_tabulates(tmp_path):
    load = load_script("model_load")
    rows = load.run(["resnet18"], ["jax unfilled+load", "torch"], 1, tmp_path)
    assert [(r["model"], r["method"], r["rounds"]) for r in rows] == [
        ("resnet18", "jax unfilled+load", 1), ("resnet18", "torch", 1)]
    assert all(0 < r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows)
    table = load.format_table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| resnet18 | jax unfilled+load | ") and table[3].endswith(" 1.0x |")
    # a child that cannot fill the model fails the row, with the child's error
    short = tmp_path / "short.safetensors"
    from safetensors.numpy import load_file, save_file
    sd = load_file(str(tmp_path / "resnet18.safetensors"))
    del sd["fc.bias"]
    save_file(sd, str(short))
    with pytest.raises(RuntimeError, match=r"(?s)jax unfilled\+load resnet18: child failed.*1 missing:\n    fc\.bias"):
        load.measure("jax unfilled+load", "resnet18", short)
    args = load.parse_args(["--frameworks", "jax", "--models", "resnet50,densenet121"])
    assert args.methods == ["jax create+load", "jax unfilled+load"] and args.models == ["resnet50", "densenet121"]
    with pytest.raises(SystemExit):
        load.parse_args(["--frameworks", "tf"])
