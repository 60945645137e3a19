"""The real-film study: configs of every arm, channel augmentation, study sources, splits, and a
tiny end-to-end run on a handful of shared films."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from covidmt_jax import config_lib, study
from covidmt_jax.config_lib import ConfigError
from covidmt_jax.data import augment as aug
from covidmt_jax.data.channel_augment import channel_augment
from covidmt_jax.data.sources.study import hash_order, lung_boxes

ROOT = Path(__file__).resolve().parents[1]


def _config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["study_real", "study_real_512"])
def test_config_builds_every_arm_with_the_same_network_and_budget(name):
    cfg = _config(name, "root=/data/x")
    study.validate(cfg)
    arms = study.arm_configs(cfg)  # each one passes config_lib.validate
    assert list(arms) == list(study.ARMS)
    base = arms["baseline"]
    for arm, c in arms.items():
        multitask, channel = study.ARMS[arm]
        assert c.model.to_dict() == base.model.to_dict()
        assert (c.total_steps, c.data.per_task_batch, c.data.image_size) == \
               (base.total_steps, base.data.per_task_batch, base.data.image_size)
        assert c.optimizer.to_dict() == base.optimizer.to_dict()
        names = [t["name"] for t in c.tasks]
        assert names == (["covid", "tb", "lungbox"] if multitask else ["covid"])
        assert (c.data.augment.channel_p > 0) == channel
        assert c.data.train.covid.to_dict() == base.data.train.covid.to_dict()
        assert c.data.val.covid.kwargs.split == "val" and c.data.train.covid.kwargs.split == "train"
        assert c.data.train.covid.kwargs.root == "/data/x"
    if name == "study_real_512":
        assert cfg.image_size == 512 and cfg.backbone == "resnet50" and len(cfg.seeds) >= 3


def test_config_errors_name_the_key():
    cfg = _config("study_real")
    cfg.arms = ("baseline", "nope")
    with pytest.raises(ConfigError, match="arms.*nope"):
        study.validate(cfg)
    cfg = _config("study_real")
    cfg.score.qualities = (30, 101)
    with pytest.raises(ConfigError, match="qualities"):
        study.validate(cfg)
    with pytest.raises(ValueError, match="unknown config argument"):
        _config("study_real", "rooot=x")
    with pytest.raises(ConfigError, match="unknown arm"):
        study.arm_config(_config("study_real"), "triple", 0)
    assert _config("study_real", "seeds=0-4").seeds == (0, 1, 2, 3, 4)
    assert _config("study_real", "seeds=3;5").seeds == (3, 5)


# ----------------------------------------------------------------------------- channel augmentation
def _film(size=64):
    y, x = np.mgrid[0:size, 0:size] / size
    return (0.5 + 0.3 * np.sin(12 * x) * np.cos(9 * y)).astype(np.float32)


def test_channel_augment_is_a_seeded_jpeg_round_trip():
    img = _film()
    same = channel_augment(img, np.random.default_rng(0), p=0.0)
    np.testing.assert_array_equal(same, img)
    a = channel_augment(img, np.random.default_rng(1), p=1.0, quality=(10, 10), scale=(0.5, 0.5))
    b = channel_augment(img, np.random.default_rng(1), p=1.0, quality=(10, 10), scale=(0.5, 0.5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == img.shape and a.dtype == np.float32
    assert 0.005 < np.abs(a - img).mean() < 0.2  # lossy, but still the same film
    # three draws whatever p is: what follows does not depend on p
    r0, r1 = np.random.default_rng(5), np.random.default_rng(5)
    channel_augment(img, r0, p=0.0)
    channel_augment(img, r1, p=1.0)
    assert r0.uniform() == r1.uniform()
    for bad in (dict(p=1.5), dict(p=0.5, quality=(90, 30)), dict(p=0.5, scale=(0.0, 1.0))):
        with pytest.raises(ValueError, match="channel_"):
            channel_augment(img, np.random.default_rng(0), **bad)


def test_augment_config_carries_the_channel_option():
    cfg = aug.AugmentConfig.from_any({"translate": 0, "rotate_deg": 0, "zoom": 0, "hflip": False,
                                      "intensity_shift": 0, "channel_p": 1.0, "channel_quality": (20, 20)})
    assert cfg.enabled
    img = _film()
    out = aug.augment_sample({"image": img}, np.random.default_rng(0), cfg)["image"]
    assert np.abs(out - img).mean() > 0.005
    with pytest.raises(ValueError, match="channel_quality"):
        aug.AugmentConfig.from_any({"channel_quality": (0, 50)})


# ----------------------------------------------------------------------------- helpers
def test_lung_boxes_of_two_lungs():
    m = np.zeros((100, 200), bool)
    m[10:90, 20:80] = True
    m[20:80, 120:190] = True
    m[0:2, 0:2] = True  # speck below min_area
    b = lung_boxes(m)
    np.testing.assert_allclose(b, [[0.1, 0.1, 0.4, 0.9], [0.6, 0.2, 0.95, 0.8]])
    assert lung_boxes(np.zeros((8, 8), bool)).shape == (0, 4)


def test_cam_mass_fractions_and_border_band():
    band = study._border_band(10, 0.1)
    assert band.sum() == 100 - 64
    cams = np.zeros((2, 10, 10), np.float32)
    cams[0, 0, :] = 1.0          # all mass in the top row: border, outside the lungs
    cams[1, 4:6, 4:6] = 1.0      # all mass in the centre: inside the lungs
    lung = np.zeros((2, 10, 10), bool)
    lung[:, 3:7, 3:7] = True
    border, outside = study.cam_mass_fractions(cams, lung, band)
    np.testing.assert_allclose(border, [1.0, 0.0])
    np.testing.assert_allclose(outside, [1.0, 0.0])
    b2, o2 = study.cam_mass_fractions(np.zeros((1, 10, 10), np.float32), lung[:1], band)
    assert np.isnan(b2[0]) and np.isnan(o2[0])


def test_fit_logistic_separates_and_hash_order_is_stable():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-1, 1, (60, 3)), rng.normal(1, 1, (20, 3))])
    y = np.r_[np.zeros(60), np.ones(20)]
    w, b, mean, std = study.fit_logistic(x, y, steps=300)
    p = 1 / (1 + np.exp(-(((x - mean) / std) @ w + b)))
    assert ((p >= 0.5) == y).mean() > 0.85
    with pytest.raises(ValueError, match="both classes"):
        study.fit_logistic(x, np.zeros(80))
    assert hash_order(["a", "b", "c"]) == hash_order(["a", "b", "c"])
    assert sorted(hash_order(["a", "b", "c"])) == [0, 1, 2]


# ----------------------------------------------------------------------------- real films
def _lung_sets_or_skip(shared_data):
    from covidmt_jax.data import splits as S
    missing = set(S.SOURCES) - set(S.set_folders(shared_data))
    if missing:
        pytest.skip(f"lung sets missing under {shared_data}: {sorted(missing)}")


def test_splits_patient_disjoint_and_identical_across_arms(shared_data):
    from covidmt_jax.train import build_sources
    _lung_sets_or_skip(shared_data)
    cfg = _config("study_real", f"root={shared_data}")
    man = study.split_manifest(cfg)
    for ds in ("covid", "tb"):
        sides = {sp: {p for _, p in man[ds][sp]} for sp in ("train", "val", "test")}
        assert not (sides["train"] & sides["test"]) and not (sides["val"] & sides["test"])
        assert not (sides["train"] & sides["val"])
        assert all(man[ds][sp] for sp in sides)
    test_ids = {i for i, _ in man["covid"]["test"]}
    # every film once: no COVID film twice through the two COVID folders
    assert len(test_ids) == len(man["covid"]["test"])
    configs = study.arm_configs(cfg)
    for arm, c in configs.items():  # the same entries (hence films) for every arm
        assert c.data.train.covid.to_dict() == configs["baseline"].data.train.covid.to_dict()
        assert c.data.val.covid.to_dict() == configs["baseline"].data.val.covid.to_dict()
    ids = {}
    for arm in ("baseline", "multitask_channel"):
        srcs = build_sources(configs[arm].data.train, "train")
        ids[arm] = {ds: sorted(s.ids) for ds, s in srcs.items()}
        assert not test_ids & set(ids[arm]["covid"])
    assert ids["multitask_channel"]["covid"] == ids["baseline"]["covid"]
    tb_test = {i for i, _ in man["tb"]["test"]}
    assert ids["multitask_channel"]["tb"] and not tb_test & set(ids["multitask_channel"]["tb"])


def test_tiny_study_end_to_end_and_resume(shared_data, tmp_path):
    _lung_sets_or_skip(shared_data)
    cfg = _config("study_real", f"root={shared_data},size=32,steps=1,seeds=0")
    cfg.arms = ("baseline",)
    cfg.max_per_class = 2
    cfg.max_test_per_class = 2
    cfg.per_task_batch = 2
    cfg.eval_batch_size = 4
    cfg.score.qualities = (30,)
    cfg.score.batch_size = 4
    cfg.score.gallery = 1
    cfg.probe.size = 8
    cfg.probe.steps = 5
    out = study.run(cfg, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| baseline |" in report
    assert "Source-prediction probe" in report and "Reduced run" in report
    wa = tmp_path / "scores" / "seed0" / "whatsapp"
    rows = study.read_rows(wa / "rows_baseline.csv")
    assert len(rows["model"]) == 4 and set(rows["label"]) == {0.0, 1.0}
    shares = rows["cam_outside_orig"][np.isfinite(rows["cam_outside_orig"])]  # NaN: all-zero CAM
    assert np.all((shares >= 0) & (shares <= 1))
    assert (tmp_path / "scores" / "seed0" / "whatsapp" / "gallery_baseline.png").is_file()
    assert out["n_test"] == 4 and json.loads((tmp_path / "study.json").read_text())["arms"] == list(cfg.arms)
    # resume: nothing is trained or scored again
    marks = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")}
    marks.update({p: p.stat().st_mtime_ns for p in tmp_path.rglob("rows_*.csv")})
    assert len(marks) == 1 + 2
    study.run(cfg, tmp_path)
    assert all(p.stat().st_mtime_ns == t for p, t in marks.items())
    # an arm added later (multi-task, channel in the loop) is trained and scored on its own;
    # the finished arm is kept, and the paired comparison appears
    cfg.arms = ("baseline", "multitask_channel")
    study.run(cfg, tmp_path)
    assert all(p.stat().st_mtime_ns == t for p, t in marks.items())
    both = study.read_rows([wa / "rows_baseline.csv", wa / "rows_multitask_channel.csv"])
    assert list(both["pair_id"][:4]) == list(both["pair_id"][4:])  # the same test films
    assert "| baseline vs multitask_channel |" in (tmp_path / "report.md").read_text()
    cfg.image_size = 48  # other settings: refused, nothing is mixed
    with pytest.raises(ConfigError, match="image_size"):
        study.run(cfg, tmp_path)


def test_resume_refuses_other_settings(tmp_path):
    cfg = _config("study_real")
    study.check_resume(cfg, tmp_path)  # nothing there yet
    (tmp_path / "study_config.json").write_text(cfg.to_json_best_effort())
    cfg.arms, cfg.seeds = ("baseline",), (7,)
    study.check_resume(cfg, tmp_path)  # arms and seeds may change
    cfg.score.qualities = (50,)
    with pytest.raises(ConfigError, match="score.qualities"):
        study.check_resume(cfg, tmp_path)


def _synthetic_rows(arms, seed, n=40):
    """Scored rows of ``arms`` on the same ``n`` films, as ``score_seed`` writes them."""
    rng = np.random.default_rng(seed)
    label = np.arange(n) % 2
    cols = {c: [] for c in study.ROW_COLUMNS}
    for k, arm in enumerate(arms):
        p_orig = np.clip(0.5 + 0.3 * (label - 0.5) + rng.normal(0, 0.2, n), 0.01, 0.99)
        p_trans = np.clip(p_orig + rng.normal(0, 0.1, n), 0.01, 0.99)
        iol_o = rng.uniform(0, 1, n) ** (1 + k)  # later arms: lower IOL, more out-of-lung maps
        iol_t = np.clip(iol_o + rng.normal(0, 0.05, n), 0, 1)
        iol_t[seed % n] = np.nan  # an empty heat map: left out of OLS
        vals = {"model": [arm] * n, "pair_id": [f"f{i}" for i in range(n)], "patient": [f"p{i}" for i in range(n)],
                "error": [""] * n,
                "label": label, "source": ["s"] * n, "convention": ["fields"] * n, "prob_orig": p_orig,
                "prob_trans": p_trans, "iol_orig": iol_o, "iol_trans": iol_t, "iol_unet_orig": iol_o,
                "iol_unet_trans": np.clip(iol_t + 0.1, 0, 1), "lung_frac_orig": np.full(n, 0.3),
                "lung_frac_trans": np.full(n, 0.3), "unet_lung_frac_orig": np.full(n, 0.25),
                "unet_lung_frac_trans": np.full(n, 0.25), "cam_border_orig": np.full(n, 0.2),
                "cam_border_trans": np.full(n, 0.2), "cam_outside_orig": 1 - iol_o, "cam_outside_trans": 1 - iol_t}
        for c in study.ROW_COLUMNS:
            cols[c] += list(vals[c])
    return {c: np.array(v, dtype=object) if c in study._TEXT else np.array(v, np.float64) for c, v in cols.items()}


def test_across_seeds_pools_per_seed_figures_and_paired_differences(tmp_path):
    from scipy import stats as scipy_stats
    cfg = study.base_config()
    arms = ["baseline", "multitask"]
    seeds = [0, 1, 2]
    rows = {s: _synthetic_rows(arms, s) for s in seeds}
    st = {"arms": arms, "seeds": seeds, "n_test": 40, "n_test_covid": 20,
          "scores": {str(s): {"whatsapp": study.summarize_condition(rows[s], arms, cfg)} for s in seeds}}
    acr = study.across_seeds(st, arms, "whatsapp")
    assert acr["seeds"] == seeds

    def ols_by_hand(r, arm):  # % of films with IOL < eta after the channel, empty maps left out
        iol = r["iol_trans"][r["model"] == arm]
        iol = iol[np.isfinite(iol)]
        return 100.0 * np.mean(iol < cfg.score.eta)

    per_arm = {a: [ols_by_hand(rows[s], a) for s in seeds] for a in arms}
    for a in arms:
        got = acr["arms"][a]["ols_gt_trans"]
        assert got["per_seed"] == pytest.approx(per_arm[a])
        assert got["mean"] == pytest.approx(np.mean(per_arm[a]))
        assert got["sd"] == pytest.approx(np.std(per_arm[a], ddof=1))
    for a in arms:  # the channel's move of the COVID probability, PI's threshold-free companion
        dp = [np.mean(np.abs(rows[s]["prob_trans"] - rows[s]["prob_orig"])[rows[s]["model"] == a]) for s in seeds]
        assert acr["arms"][a]["dprob_mean"]["per_seed"] == pytest.approx(dp)
    d = np.subtract(per_arm["baseline"], per_arm["multitask"])
    cmp = acr["comparisons"][0]
    assert cmp["models"] == arms
    assert cmp["ols_gt_trans"]["per_seed"] == pytest.approx(d)
    lo, hi = scipy_stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy_stats.sem(d))
    assert (cmp["ols_gt_trans"]["lo"], cmp["ols_gt_trans"]["hi"]) == pytest.approx((lo, hi))
    assert d.mean() < 0  # the multitask rows were built with lower IOL: higher OLS
    ps = [st["scores"][str(s)]["whatsapp"]["truth"]["comparisons"][0]["ols"]["transmitted"]["p_value"] for s in seeds]
    assert cmp["ols_gt_trans"]["n_p_below_05_down"] == sum(p < 0.05 and x < 0 for p, x in zip(ps, d))
    assert cmp["ols_gt_trans"]["n_p_below_05_up"] == sum(p < 0.05 and x > 0 for p, x in zip(ps, d))
    # the report shows the pooled tables only with two or more seeds
    st["across_seeds"] = {"whatsapp": acr}
    report = study.write_report(cfg, tmp_path, st).read_text()
    assert "## Across seeds (whatsapp; seeds [0, 1, 2])" in report
    row = next(line for line in report.splitlines() if line.startswith("| baseline vs multitask | ")
               and "p < 0.05:" in line)  # the pooled table, not the per-seed one
    assert f"| {d.mean():+.3g} [{lo:+.3g}, {hi:+.3g}] (" in row  # the OLS GT column, after PI
    # no flips in either arm at any seed (e.g. PI after a gentle channel): the PI differences are
    # all 0, so there is no between-seed spread and no interval (not a zero-width "[+0, +0]")
    still = {s: dict(rows[s], prob_trans=rows[s]["prob_orig"]) for s in seeds}
    st0 = dict(st, scores={str(s): {"whatsapp": study.summarize_condition(still[s], arms, cfg)} for s in seeds})
    acr0 = study.across_seeds(st0, arms, "whatsapp")
    pi0 = acr0["comparisons"][0]["pi"]
    assert pi0["per_seed"] == [0.0, 0.0, 0.0] and pi0["n_seeds"] == 3 and pi0["sd"] == 0.0
    assert pi0["mean"] == 0.0 and np.isnan(pi0["lo"]) and np.isnan(pi0["hi"])
    st0["across_seeds"] = {"whatsapp": acr0}
    row0 = next(line for line in study.write_report(cfg, tmp_path, st0).read_text().splitlines()
                if line.startswith("| baseline vs multitask | ") and "p < 0.05:" in line)
    assert "| +0 [no between-seed spread] (+0, +0, +0; p < 0.05: 0 up, 0 down) |" in row0
    assert "[+0, +0]" not in row0
    one = dict(st, seeds=[0], scores={"0": st["scores"]["0"]})
    one["across_seeds"] = {"whatsapp": study.across_seeds(one, arms, "whatsapp")}
    assert np.isnan(one["across_seeds"]["whatsapp"]["comparisons"][0]["ols_gt_trans"]["lo"])  # one seed: no interval
    assert "## Across seeds" not in study.write_report(cfg, tmp_path, one).read_text()
