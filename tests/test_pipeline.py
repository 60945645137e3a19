"""Grain pipelines: batch layout and per-task weights, mixing counts, reproducibility,
iterator-state round trip (JSON and orbax), sharding, evaluation padding, errors, pairs."""
from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest

from covidmt_jax.data import images
from covidmt_jax.data import pipeline as P
from covidmt_jax.data.records import DataError, Source
from covidmt_jax.data.sources.synthetic import (SyntheticCOVIDx, SyntheticLungs, SyntheticNIH, SyntheticPairs,
                                                SyntheticRSNA)
from covidmt_jax.tasks import LUNG_TASK, PAPER_TASKS, TaskSpec, paper_tasks

SIZE = 32


@pytest.fixture(scope="module")
def sources():
    return {"covidx": SyntheticCOVIDx(14, size=48, seed=1),
            "rsna": SyntheticRSNA(10, size=48, seed=2, positive_fraction=0.7),
            "nih": SyntheticNIH(18, size=48, seed=3)}


def _train(sources, tasks=PAPER_TASKS, **kw):
    kw.setdefault("image_size", SIZE)
    kw.setdefault("seed", 0)
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return P.make_train_iterator(sources, tasks, **kw)


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_normalise_constants_and_inverse():
    assert (P.GREY_MEAN, P.GREY_STD) == (0.449, 0.226)
    x = np.linspace(0, 1, 11, dtype=np.float32)
    y = P.normalise(x)
    assert y.dtype == np.float32 and y[0] == pytest.approx(-0.449 / 0.226)
    np.testing.assert_allclose(P.denormalise(y), x, atol=1e-6)
    assert float(P.normalise(0.449)) == pytest.approx(0.0, abs=1e-7)


def test_paper_mixing_gives_4_4_4_with_the_task_weight_pattern(sources):
    it = _train(sources)
    assert it.datasets == ("covidx", "rsna", "nih") and it.batch_size == 12
    b = next(it)
    assert b["image"].shape == (12, SIZE, SIZE, 1) and b["image"].dtype == np.float32
    assert b["labels"].shape == b["label_weight"].shape == (12, 5)
    assert b["boxes"].shape == (12, 8, 4) and b["box_valid"].shape == (12, 8) and b["box_weight"].shape == (12,)
    assert "mask" not in b
    lw = b["label_weight"]
    # columns: covid | infiltration effusion atelectasis nodule
    np.testing.assert_array_equal(lw[:4], [[1, 0, 0, 0, 0]] * 4)
    np.testing.assert_array_equal(lw[4:8], 0)
    np.testing.assert_array_equal(lw[8:], [[0, 1, 1, 1, 1]] * 4)
    np.testing.assert_array_equal(b["box_weight"], [0] * 4 + [1] * 4 + [0] * 4)
    assert b["box_valid"][:4].sum() == 0 and b["box_valid"][8:].sum() == 0
    assert set(np.unique(b["labels"])) <= {0.0, 1.0}
    assert np.all(b["labels"][lw == 0] == 0)
    # images are normalised grey images
    assert b["image"].min() >= P.normalise(0.0) - 1e-5 and b["image"].max() <= P.normalise(1.0) + 1e-5
    it.close()


def test_one_task_uses_only_the_covidx_loader(sources):
    it = _train(sources, paper_tasks(1))
    assert it.datasets == ("covidx",)
    b = next(it)
    assert b["image"].shape[0] == 4 and b["labels"].shape == (4, 1)
    np.testing.assert_array_equal(b["label_weight"], 1)
    np.testing.assert_array_equal(b["box_weight"], 0)
    # two tasks: covidx + the rsna box loader
    b = next(_train(sources, paper_tasks(2)))
    assert b["image"].shape[0] == 8 and b["labels"].shape == (8, 1)
    np.testing.assert_array_equal(b["label_weight"][:, 0], [1] * 4 + [0] * 4)
    np.testing.assert_array_equal(b["box_weight"], [0] * 4 + [1] * 4)


def test_configured_per_task_counts(sources):
    it = _train(sources, per_task_batch={"covidx": 2, "rsna": 3, "nih": 5})
    for _ in range(3):
        b = next(it)
        assert b["image"].shape[0] == 10
        np.testing.assert_array_equal(b["label_weight"][:, 0], [1] * 2 + [0] * 8)
        np.testing.assert_array_equal(b["box_weight"], [0] * 2 + [1] * 3 + [0] * 5)
        np.testing.assert_array_equal(b["label_weight"][:, 1:].sum(1), [0] * 5 + [4] * 5)
    with pytest.raises(ValueError, match="lacks"):
        _train(sources, per_task_batch={"covidx": 2})
    with pytest.raises(ValueError, match="no source"):
        _train({"covidx": sources["covidx"]})


def test_labels_and_boxes_come_from_the_records(sources):
    nih = sources["nih"]
    ev = P.make_eval_iterator(nih, dataset="nih", tasks=PAPER_TASKS, image_size=SIZE, batch_size=8)
    rows = {i: r for b in ev for r in zip(b["ids"], b["labels"], b["label_weight"]) for i in [r[0]] if i}
    for k in range(len(nih)):
        rec = nih[k]
        _, labels, weight = rows[rec["id"]]
        # columns 1..4 = Infiltration, Effusion, Atelectasis, Nodule = label_names[0..3]
        np.testing.assert_array_equal(labels[1:], rec["labels"][:4])
        np.testing.assert_array_equal(weight, [0, 1, 1, 1, 1])
    rsna = sources["rsna"]
    ev = P.make_eval_iterator(rsna, dataset="rsna", tasks=PAPER_TASKS, image_size=(SIZE, 2 * SIZE), batch_size=4)
    seen = 0
    for b in ev:
        assert b["image"].shape[1:] == (SIZE, 2 * SIZE, 1)
        for i, rid in enumerate(b["ids"]):
            if rid is None:
                continue
            rec = rsna[int(rid.rsplit("-", 1)[1])]
            n = len(rec["boxes"])
            expect = rec["boxes"] * np.array([2 * SIZE, SIZE, 2 * SIZE, SIZE], np.float32)
            np.testing.assert_allclose(b["boxes"][i, :n], expect, rtol=1e-6)
            assert b["box_valid"][i].tolist() == [1.0] * n + [0.0] * (8 - n)
            seen += n
    assert seen > 0


def test_training_boxes_follow_the_augmented_content():
    # bright rectangles at the boxes of a custom box dataset: after augmentation the box must
    # still enclose the bright pixels
    class Rects(Source):
        name, label_names = "rects", ("pneumonia",)

        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            for i in range(8):
                x0, y0 = rng.integers(16, 29, 2)
                px = np.array([x0, y0, x0 + rng.integers(13, 20), y0 + rng.integers(13, 20)])
                img = np.zeros((64, 64), np.float32)
                img[px[1]:px[3], px[0]:px[2]] = 1.0
                self._records.append({"id": f"r{i}", "image": images.encode_png(img),
                                      "boxes": px[None].astype(np.float32) / 64, "labels": np.ones(1, np.float32)})

    src = Rects()
    ds = P.task_dataset(src, dataset="rsna", tasks=paper_tasks(2), image_size=64, batch_size=8, train=True,
                        seed=3, shard_index=0, shard_count=1)
    b = next(iter(ds))
    img = P.denormalise(b["image"][..., 0])
    for i in range(8):
        assert b["box_valid"][i, 0] == 1
        ys, xs = np.nonzero(img[i] > 0.5)
        bright = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        box = b["boxes"][i, 0]
        ix = max(0, min(box[2], bright[2]) - max(box[0], bright[0]))
        iy = max(0, min(box[3], bright[3]) - max(box[1], bright[1]))
        inter = ix * iy
        union = np.prod(box[2:] - box[:2]) + np.prod(bright[2:] - bright[:2]) - inter
        assert inter / union > 0.8


def test_segmentation_task_adds_aligned_masks(sources):
    lungs = SyntheticLungs(6, size=48, seed=4)
    tasks = [PAPER_TASKS[0], LUNG_TASK]
    it = _train({"covidx": sources["covidx"], "lungs": lungs}, tasks, per_task_batch=3)
    b = next(it)
    assert b["mask"].shape == (6, SIZE, SIZE, 1)
    np.testing.assert_array_equal(b["mask_weight"], [0] * 3 + [1] * 3)
    assert b["mask"][:3].sum() == 0 and b["mask"][3:].sum() > 0
    # without augmentation the mask is the decoded lung mask
    ev = P.make_eval_iterator(lungs, dataset="lungs", tasks=tasks, image_size=SIZE, batch_size=6)
    b = next(iter(ev))
    for i in range(6):
        ref = images.load_mask(lungs[i]["mask"], size=SIZE)
        np.testing.assert_array_equal(b["mask"][i, ..., 0] > 0.5, ref)


def test_same_seed_same_batches_other_seed_other_batches(sources):
    a, b, c = _train(sources, seed=7), _train(sources, seed=7), _train(sources, seed=8)
    ba, bb, bc = [next(a) for _ in range(2)], [next(b) for _ in range(2)], [next(c) for _ in range(2)]
    assert all(_equal(x, y) for x, y in zip(ba, bb))
    assert not np.array_equal(ba[0]["image"], bc[0]["image"])


def test_eval_pipeline_without_augmentation_is_deterministic(sources):
    src = sources["covidx"]
    run = lambda: [b["image"] for b in P.make_eval_iterator(src, dataset="covidx", tasks=PAPER_TASKS,
                                                            image_size=SIZE, batch_size=5)]
    for x, y in zip(run(), run()):
        np.testing.assert_array_equal(x, y)
    first = P.make_eval_iterator(src, dataset="covidx", tasks=PAPER_TASKS, image_size=SIZE, batch_size=5)
    img = next(iter(first))["image"][0, ..., 0]
    np.testing.assert_allclose(img, P.normalise(images.load_grey(src[0]["image"], size=SIZE)), atol=1e-6)


def test_one_epoch_is_a_permutation_and_the_next_is_reshuffled(sources):
    src = sources["covidx"]  # 14 records
    ds = P.task_dataset(src, dataset="covidx", tasks=PAPER_TASKS, image_size=SIZE, batch_size=7, train=True,
                        seed=0, shard_index=0, shard_count=1, with_ids=True)
    it = iter(ds)
    e1 = next(it)["ids"] + next(it)["ids"]
    e2 = next(it)["ids"] + next(it)["ids"]
    assert sorted(e1) == sorted(e2) == sorted(src.ids)
    assert e1 != e2 and e1 != src.ids


def test_state_round_trip_gives_the_identical_next_batch(sources):
    it = _train(sources, seed=3)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    a = next(it)
    fresh = _train(sources, seed=3)
    fresh.set_state(state)
    b = next(fresh)
    assert _equal(a, b)
    assert _equal(next(it), next(fresh))
    # wrong states are refused
    with pytest.raises(ValueError, match="datasets"):
        _train(sources, paper_tasks(1)).set_state(state)
    with pytest.raises(ValueError, match="not a"):
        fresh.set_state({"loaders": {}})


def test_orbax_checkpoints_the_iterator_with_the_model_state(sources, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tasks = paper_tasks(2)
    it = _train(sources, tasks, seed=4)
    next(it), next(it)
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(3.0)}),
                                             data=P.checkpoint_save_args(it)))
        mngr.wait_until_finished()
    a = next(it)
    fresh = _train(sources, tasks, seed=4)
    with ocp.CheckpointManager(tmp_path) as mngr:
        out = mngr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore({"w": np.zeros(3)}),
                                                      data=P.checkpoint_restore_args(fresh)))
    np.testing.assert_array_equal(out["state"]["w"], [0, 1, 2])
    assert _equal(a, next(fresh))


def _first_batches(src, num_workers: int, k: int = 3):
    ds = P.task_dataset(src, dataset="rsna", tasks=PAPER_TASKS, image_size=SIZE, batch_size=4, train=True,
                        seed=5, shard_index=0, shard_count=1, num_workers=num_workers, with_ids=True)
    it = iter(ds)
    out = [next(it) for _ in range(k)]
    state = it.get_state()
    after = next(it)
    it.close()
    return out, state, after


def test_batches_do_not_depend_on_the_number_of_workers(sources):
    # 2 spawned worker processes cost ~2-3 s; the comparison is the point of the test
    src = sources["rsna"]
    a, _, _ = _first_batches(src, 0)
    b, state, after = _first_batches(src, 2)
    for x, y in zip(a, b):
        assert x["ids"] == y["ids"]
        assert _equal({k: v for k, v in x.items() if k != "ids"}, {k: v for k, v in y.items() if k != "ids"})
    # state round trip with workers too
    ds = P.task_dataset(src, dataset="rsna", tasks=PAPER_TASKS, image_size=SIZE, batch_size=4, train=True,
                        seed=5, shard_index=0, shard_count=1, num_workers=2, with_ids=True)
    it = iter(ds)
    it.set_state(json.loads(json.dumps(state)))
    again = next(it)
    it.close()
    assert again["ids"] == after["ids"] and np.array_equal(again["image"], after["image"])


def test_shards_are_disjoint_and_cover_the_source(sources):
    src = sources["nih"]  # 18 records
    ids = []
    for shard in (0, 1):
        ds = P.task_dataset(src, dataset="nih", tasks=PAPER_TASKS, image_size=SIZE, batch_size=4, train=True,
                            seed=0, shard_index=shard, shard_count=2, repeat=False, drop_remainder=False,
                            with_ids=True)
        ids.append([i for b in ds for i in b["ids"]])
    assert len(ids[0]) == len(ids[1]) == 9
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(src.ids)
    # and the mixed iterators of two processes read disjoint records
    it0 = _train(sources, paper_tasks(1), shard_index=0, shard_count=2)
    it1 = _train(sources, paper_tasks(1), shard_index=1, shard_count=2)
    assert not np.array_equal(next(it0)["image"], next(it1)["image"])
    with pytest.raises(ValueError, match="shard_index"):
        _train(sources, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="both"):
        _train(sources, shard_index=0, shard_count=None)
    one = SyntheticCOVIDx(1, size=32, name="one")
    with pytest.raises(ValueError, match=r"no records in shard 1 of 2 of dataset 'covidx' \(source 'one', 1 records"):
        _train({"covidx": one}, paper_tasks(1), shard_index=1, shard_count=2)


def test_default_shard_is_the_jax_process(sources):
    pytest.importorskip("jax")
    ds = P.task_dataset(sources["covidx"], dataset="covidx", tasks=PAPER_TASKS, image_size=SIZE, batch_size=14,
                        train=False, seed=0, repeat=False, shuffle=False, with_ids=True)
    assert next(iter(ds))["ids"] == sources["covidx"].ids  # one process: everything


def test_eval_pads_with_zero_weights_and_covers_every_record_once(sources):
    src = sources["rsna"]  # 10 records
    tasks = paper_tasks(6) + (LUNG_TASK,)
    ev = P.make_eval_iterator(src, dataset="rsna", tasks=tasks, image_size=SIZE, batch_size=4)
    batches = list(ev)
    assert len(batches) == len(ev) == 3
    for b in batches:
        assert b["image"].shape == (4, SIZE, SIZE, 1) and b["mask"].shape == (4, SIZE, SIZE, 1)
    ids = [i for b in batches for i in b["ids"]]
    assert ids == src.ids + [None, None]
    last = batches[-1]
    np.testing.assert_array_equal(last["valid"], [1, 1, 0, 0])
    np.testing.assert_array_equal(last["box_weight"], [1, 1, 0, 0])
    assert last["label_weight"].sum() == 0 and last["mask_weight"].sum() == 0
    assert last["box_valid"][2:].sum() == 0 and np.all(last["image"][2:] == 0)
    # sharded evaluation: every shard yields the same number of batches, together every record
    parts = [P.make_eval_iterator(src, dataset="rsna", tasks=tasks, image_size=SIZE, batch_size=4,
                                  shard_index=s, shard_count=3) for s in range(3)]
    assert {len(p) for p in parts} == {1}
    got = [i for p in parts for b in p for i in b["ids"] if i is not None]
    assert sorted(got) == sorted(src.ids)


def test_steps_per_epoch_counts_the_largest_dataset():
    assert P.steps_per_epoch({"a": 10, "b": 25, "c": 7}, 4) == 7
    assert P.steps_per_epoch({"a": 10, "b": 25, "c": 7}, 4, shard_count=2) == 4
    assert P.steps_per_epoch({"a": 10, "b": 25}, {"a": 1, "b": 5}) == 10
    assert P.steps_per_epoch([SyntheticCOVIDx(9, size=32)], 4) == 3


class _Bad(Source):
    """Three good phantom images and one broken one (bytes or a truncated file)."""
    name, label_names = "bad", ("COVID-19",)

    def __init__(self, broken):
        super().__init__()
        good = SyntheticCOVIDx(3, size=32)
        for i in range(3):
            self._records.append({"id": f"g{i}", "image": good[i]["image"], "labels": np.zeros(1, np.float32)})
        self._records.append({"id": "broken", "image": broken, "labels": np.ones(1, np.float32)})


def test_bad_records_raise_the_data_error_naming_the_file(tmp_path):
    png = images.encode_png(np.full((32, 32), 0.5, np.float32))
    path = tmp_path / "cut.png"
    path.write_bytes(png[: len(png) // 2])
    for broken, where in ((b"not an image at all", "bad[broken]:image"), (str(path), str(path))):
        ds = P.task_dataset(_Bad(broken), dataset="covidx", tasks=PAPER_TASKS, image_size=SIZE, batch_size=4,
                            train=True, seed=0, shard_index=0, shard_count=1)
        with pytest.raises(DataError) as e:
            next(iter(ds))
        assert where in str(e.value)


def _skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "covidmt_jax.data" and "skipped" in r.getMessage()]


def test_skip_mode_leaves_bad_records_out_and_reports_them(caplog):
    src = _Bad(b"garbage")
    it = P.make_train_iterator({"covidx": src}, paper_tasks(1), per_task_batch=3, image_size=SIZE, seed=0,
                               shard_index=0, shard_count=1, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="covidmt_jax.data"):
        batches = [next(it) for _ in range(5)]  # 15 samples of 3 good ones: the broken one met 5 times
    assert all(b["image"].shape[0] == 3 for b in batches)
    assert np.all(np.concatenate([b["labels"] for b in batches]) == 0)  # the broken one had label 1
    assert it.skipped == [("bad[broken]:image", it.skipped[0][1])] and it.skip_logs["covidx"].occurrences == 5
    assert _skip_lines(caplog) == [f"bad: skipped unreadable record bad[broken]:image: {it.skipped[0][1]}"]
    assert "skipped 1 bad record" in it.skip_report()
    # evaluation: the bad record becomes a zero-weight pad and is logged, once per shared log
    caplog.clear()
    shared = P.SkipLog("val")
    for _ in range(2):
        ev = P.make_eval_iterator(src, dataset="covidx", tasks=PAPER_TASKS, image_size=SIZE, batch_size=4,
                                  on_error="skip", skip_log=shared)
        with caplog.at_level(logging.WARNING, logger="covidmt_jax.data"):
            (b,) = list(ev)
        np.testing.assert_array_equal(b["valid"], [1, 1, 1, 0])
        np.testing.assert_array_equal(b["label_weight"][:, 0], [1, 1, 1, 0])
        assert ev.skip_log is shared and len(ev.skip_log) == 1
    assert len(_skip_lines(caplog)) == 1 and shared.occurrences == 2
    # all records bad: a clear error instead of an endless loop
    class AllBad(Source):
        name, label_names = "allbad", ("COVID-19",)

        def __init__(self):
            super().__init__()
            self._records = [{"id": f"b{i}", "image": b"xx", "labels": np.zeros(1, np.float32)} for i in range(3)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="in a row"):
            next(P.make_train_iterator({"covidx": AllBad()}, paper_tasks(1), image_size=SIZE, seed=0,
                                       shard_index=0, shard_count=1, on_error="skip"))


def test_iterator_state_carries_the_skip_log(caplog):
    """A resumed iterator reports the files skipped before the checkpoint without logging
    them again, and its batches continue exactly as the uninterrupted ones."""
    def make():
        return P.make_train_iterator({"covidx": _Bad(b"garbage")}, paper_tasks(1), per_task_batch=3,
                                     image_size=SIZE, seed=0, shard_index=0, shard_count=1, on_error="skip")

    it = make()
    with caplog.at_level(logging.WARNING, logger="covidmt_jax.data"):
        for _ in range(2):
            next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["skipped"] == {"covidx": [list(it.skipped[0])]}
    caplog.clear()
    fresh = make()
    with caplog.at_level(logging.WARNING, logger="covidmt_jax.data"):
        fresh.set_state(state)
        for _ in range(3):
            assert _equal(next(it), next(fresh))
    assert fresh.skipped == it.skipped and _skip_lines(caplog) == []
    # states written before skip logs were part of them still restore
    old = {k: v for k, v in state.items() if k != "skipped"}
    again = make()
    again.set_state(old)
    assert again.skipped == []


def test_task_label_missing_from_the_source_is_a_clear_error(sources):
    tasks = [TaskSpec("covid", "classification", "covidx", "COVID-19"),
             TaskSpec("flu", "classification", "covidx", "Influenza")]
    with pytest.raises(ValueError, match="Influenza"):
        _train(sources, tasks)


def test_load_pair_decodes_both_sides_or_transmits_on_the_fly():
    pairs = SyntheticPairs(2, size=48, channel="jpeg75")
    rec = pairs[0]
    s = P.load_pair(rec, SIZE)
    assert s.original.shape == s.transmitted.shape == (SIZE, SIZE, 1)
    assert s.original_hw == s.transmitted_hw == (48, 48)
    np.testing.assert_allclose(s.original[..., 0], P.normalise(images.load_grey(rec["original"], size=SIZE)),
                               atol=1e-6)
    assert not np.array_equal(s.original, s.transmitted)  # JPEG changed it
    on_the_fly = P.load_pair({"id": rec["id"], "original": rec["original"]}, SIZE, channel=pairs.channel)
    np.testing.assert_array_equal(on_the_fly.transmitted, s.transmitted)
    with pytest.raises(ValueError, match="channel"):
        P.load_pair({"id": "x", "original": rec["original"]}, SIZE)
    with pytest.raises(DataError, match="x:transmitted"):
        P.load_pair({"id": "x", "original": rec["original"], "transmitted": b"junk"}, SIZE)
