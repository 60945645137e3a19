"""TFDS builds (data.tfds_builders) and reading them back (sources.tfds_source.TFDSSource):
round trips of every record field, pairs, the real lung set, bad input, and no TensorFlow."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from covidmt_jax.data import images as I
from covidmt_jax.data.records import DataError, Source
from covidmt_jax.data.sources import SOURCES, get_source
from covidmt_jax.data.sources.tfds_source import TFDSSource, find_build
from covidmt_jax.data.tfds_builders import build_tfds, main, meta_json, read_build_metadata

REPO = Path(__file__).resolve().parents[1]
PHANTOM_PX, BUILD_PX = 96, 64

# Builds and reads a synthetic dataset with `import tensorflow` made impossible, then checks
# that TensorFlow was never imported. Prints the build folder.
_NO_TF_SCRIPT = textwrap.dedent("""
    import sys

    class _HideTensorFlow:
        # Wraps a meta-path finder so TensorFlow looks not installed, even where it is:
        # importlib.util.find_spec("tensorflow") is None and `import tensorflow` fails.

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [_HideTensorFlow(f) for f in sys.meta_path]
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("tensorflow importable despite the blocker")

    from covidmt_jax.data.sources import get_source
    from covidmt_jax.data.tfds_builders import build_tfds
    from covidmt_jax.data import images

    data_dir = sys.argv[1]
    kw = dict(size=%(px)d, with_mask=True)
    splits = {"train": get_source("synthetic_rsna", n=8, split="train", positive_fraction=0.5, **kw),
              "test": get_source("synthetic_rsna", n=4, split="test", positive_fraction=0.5, **kw)}
    path = build_tfds(splits=splits, name="phantoms", data_dir=data_dir, image_size=%(size)d)
    back = get_source("tfds", dataset="phantoms", split="test", data_dir=data_dir)
    assert images.load_grey(back[0]["image"]).shape == (%(size)d, %(size)d)
    loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
    assert not loaded, loaded
    print(path)
""") % {"px": PHANTOM_PX, "size": BUILD_PX}


def _sources(split: str, n: int):
    return get_source("synthetic_rsna", n=n, split=split, positive_fraction=0.5, size=PHANTOM_PX, with_mask=True)


@pytest.fixture(scope="module")
def phantom_build(tmp_path_factory) -> Path:
    """12 RSNA-like phantoms (96 px, boxes + masks) built at 64 px in a subprocess where
    TensorFlow cannot be imported."""
    data_dir = tmp_path_factory.mktemp("tfds")
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(data_dir)}
    r = subprocess.run([sys.executable, "-c", _NO_TF_SCRIPT, str(data_dir)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path == data_dir / "phantoms" / f"{BUILD_PX}px" / "1.0.0"
    return data_dir


def _norm_meta(meta: dict) -> dict:
    return json.loads(meta_json(meta))


def test_build_without_tensorflow_round_trips_every_field(phantom_build):
    assert "tfds" in SOURCES
    meta = read_build_metadata(phantom_build / "phantoms" / f"{BUILD_PX}px" / "1.0.0")
    assert meta["kind"] == "image" and meta["image_keys"] == ["image", "mask"] and meta["has_boxes"]
    assert meta["image_size"] == BUILD_PX and meta["resize"] == "square" and meta["bits"] == 8
    n_boxes = 0
    for split, n in (("train", 8), ("test", 4)):
        src = _sources(split, n)
        back = TFDSSource("phantoms", split, phantom_build)
        assert len(back) == n and back.label_names == src.label_names == ("pneumonia",)
        assert back.image_size == BUILD_PX and back.config == f"{BUILD_PX}px"
        for i in range(n):
            r, o = back[i], src[i]
            assert r["id"] == o["id"]  # source order is kept
            np.testing.assert_array_equal(r["labels"], o["labels"])
            assert r["labels"].dtype == np.float32
            np.testing.assert_allclose(r["boxes"], o["boxes"], atol=1e-6)
            assert r["boxes"].shape == o["boxes"].shape and r["boxes"].dtype == np.float32
            n_boxes += len(o["boxes"])
            # images: PNG bytes that decode to the build size, = the source resized (8-bit)
            assert isinstance(r["image"], bytes) and I.sniff_format(r["image"]) == "png"
            img = I.load_grey(r["image"])
            assert img.shape == (BUILD_PX, BUILD_PX)
            np.testing.assert_allclose(img, I.load_grey(o["image"], size=BUILD_PX), atol=0.5 / 255 + 1e-6)
            np.testing.assert_array_equal(I.load_mask(r["mask"]), I.load_mask(o["mask"], size=BUILD_PX))
            assert r["meta"] == {**_norm_meta(o["meta"]), "threshold": 127, "source_size": [PHANTOM_PX] * 2}
    assert n_boxes > 0  # the phantoms did carry boxes


def test_tfds_source_subset_pickle_and_split_expressions(phantom_build):
    back = TFDSSource("phantoms", "train", phantom_build)
    sub = back.subset([5, 2])
    again = pickle.loads(pickle.dumps(sub))
    assert again._ds is None  # the reader reopens in the worker
    assert [again[0]["id"], again[1]["id"], again[-1]["id"]] == [back[5]["id"], back[2]["id"], back[2]["id"]]
    with pytest.raises(IndexError):
        again[2]
    half = get_source("tfds", dataset=f"phantoms/{BUILD_PX}px", split="train[:50%]", data_dir=phantom_build)
    assert half.ids == back.ids[:4]
    both = TFDSSource("phantoms", "train+test", phantom_build)
    assert len(both) == 12
    with pytest.raises(DataError, match="cannot open split 'nope'"):
        TFDSSource("phantoms", "nope", phantom_build)


def test_missing_builds_and_ambiguous_configs(phantom_build, tmp_path):
    with pytest.raises(DataError, match="no TFDS dataset 'absent'"):
        TFDSSource("absent", "train", phantom_build)
    with pytest.raises(DataError, match="not built"):
        TFDSSource("phantoms/128px", "train", phantom_build)
    with pytest.raises(FileExistsError, match="already built"):
        build_tfds(splits={"train": _sources("train", 8)}, name="phantoms", data_dir=phantom_build,
                   image_size=BUILD_PX)
    # a second config of the same dataset: reading must then name one
    build_tfds(_sources("train", 2), name="phantoms2", data_dir=tmp_path, image_size=32)
    build_tfds(_sources("train", 2), name="phantoms2", data_dir=tmp_path, image_size=40)
    with pytest.raises(DataError, match="several built configs"):
        TFDSSource("phantoms2", "train", tmp_path)
    assert TFDSSource("phantoms2", "train", tmp_path, config="40px").image_size == 40
    assert find_build("phantoms2/32px", tmp_path)[0] == "32px"
    for bad in (dict(name="Bad-Name"), dict(name="ok", image_size=4), dict(name="ok", bits=12),
                dict(name="ok", file_format="tfrecord")):
        with pytest.raises(ValueError):
            build_tfds(_sources("train", 1), data_dir=tmp_path, **{"image_size": 32, **bad})


def test_overwrite_rebuilds(tmp_path):
    build_tfds(_sources("train", 2), name="ow", data_dir=tmp_path, image_size=32)
    build_tfds(_sources("train", 3), name="ow", data_dir=tmp_path, image_size=32, overwrite=True)
    assert len(TFDSSource("ow", "train", tmp_path)) == 3


def test_pairs_build(tmp_path):
    src = get_source("synthetic_pairs", n=3, size=80, channel="jpeg75")
    build_tfds(splits={"test": src}, name="pairs", data_dir=tmp_path, image_size=48, num_workers=2)
    back = TFDSSource("pairs", "test", tmp_path)
    assert back.kind == "pairs" and back.image_keys == ("original", "transmitted")
    for i in range(3):
        r, o = back[i], src[i]
        assert r["id"] == o["id"] and "image" not in r
        np.testing.assert_array_equal(r["labels"], o["labels"])
        for k in ("original", "transmitted"):
            np.testing.assert_allclose(I.load_grey(r[k]), I.load_grey(o[k], size=48), atol=0.5 / 255 + 1e-6)
        # the transmitted side is not the original: channel artefacts survive the build
        assert np.abs(I.load_grey(r["original"]) - I.load_grey(r["transmitted"])).max() > 1 / 255
        assert r["meta"]["source_size"] == [80, 80] and r["meta"]["transmitted_size"] == [80, 80]
        assert r["meta"]["channel"] == _norm_meta(o["meta"])["channel"]


class _Listed(Source):
    """A source over hand-made records (for boxes present on some records, 16-bit, errors)."""

    def __init__(self, records, label_names=("a", "b"), name="listed"):
        super().__init__()
        self._records, self.label_names, self.name = list(records), tuple(label_names), name


def _grey16(seed: int, size=(20, 30)) -> np.ndarray:
    return np.random.default_rng(seed).random(size).astype(np.float32)


def test_optional_boxes_16bit_and_aspect(tmp_path):
    recs = [{"id": f"r{i}", "image": I.encode_png(_grey16(i), bits=16), "labels": np.array([i % 2, 1], np.float32),
             "meta": {"k": np.int64(i)}} for i in range(3)]
    recs[1]["boxes"] = np.array([[0.1, 0.2, 0.5, 0.9]], np.float32)
    recs[2]["boxes"] = np.zeros((0, 4), np.float32)  # annotated, no box: not the same as absent
    src = _Listed(recs)
    with pytest.raises(DataError, match=r"listed:r1: record has boxes.*with_boxes=True"):
        build_tfds(src, name="nobox", data_dir=tmp_path, image_size=16)
    path = build_tfds(src, name="boxes16", data_dir=tmp_path, image_size=16, bits=16, with_boxes=True)
    assert json.loads((path / "features.json").read_text())  # a regular TFDS build
    back = TFDSSource("boxes16", "train", tmp_path)
    assert "boxes" not in back[0]
    np.testing.assert_array_equal(back[1]["boxes"], recs[1]["boxes"])
    assert back[2]["boxes"].shape == (0, 4)
    for i in range(3):
        r = back[i]
        assert r["image"][24] == 16  # IHDR bit depth: 16-bit PNG kept
        # square resize of a 20 x 30 image; the original size is kept in meta
        np.testing.assert_allclose(I.load_grey(r["image"]), I.load_grey(recs[i]["image"], size=16), atol=1e-4)
        assert r["meta"] == {"k": i, "source_size": [20, 30]}


def test_bad_input_raises_naming_the_file_or_is_skipped_and_listed(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "good.png").write_bytes(I.encode_png(_grey16(0)))
    data = I.encode_png(_grey16(1, (64, 64)))
    (folder / "bad.png").write_bytes(data[: len(data) // 2])  # truncated: header fine, pixels cut
    src = get_source("folder", root=folder)
    bad = str(folder / "bad.png")
    with pytest.raises(DataError, match="truncated or corrupt") as e:
        build_tfds(src, name="bad", data_dir=tmp_path / "tfds", image_size=16)
    assert e.value.path == bad
    assert not (tmp_path / "tfds" / "bad" / "16px" / "1.0.0").exists()  # nothing half-built left
    with pytest.warns(UserWarning, match="skipped 1 bad record"):
        path = build_tfds(src, name="bad", data_dir=tmp_path / "tfds", image_size=16, on_error="skip",
                          num_workers=2)
    back = TFDSSource("bad", "train", tmp_path / "tfds")
    assert back.ids == ["good.png"]
    skipped = read_build_metadata(path)["skipped"]["train"]
    assert [p for p, _ in skipped] == [bad] and "truncated" in skipped[0][1]
    # records that break the schema name the record
    recs = [{"id": "x", "image": I.encode_png(_grey16(0)), "labels": np.array([1.0], np.float32)}]
    with pytest.raises(DataError, match=r"listed:x: labels must be finite float32 \[2\]"):
        build_tfds(_Listed(recs), name="badlabels", data_dir=tmp_path / "tfds", image_size=16)
    recs = [{"id": "y", "image": I.encode_png(_grey16(0)), "labels": np.zeros(2, np.float32),
             "boxes": np.array([[0.5, 0.5, 0.2, 0.9]], np.float32)}]
    with pytest.raises(DataError, match=r"listed:y: boxes must be xyxy"):
        build_tfds(_Listed(recs), name="badboxes", data_dir=tmp_path / "tfds", image_size=16)
    recs = [{"id": "z", "image": b"not an image at all", "labels": np.zeros(2, np.float32)}]
    with pytest.raises(DataError, match=r"listed:z\[image\]: not a recognised image format"):
        build_tfds(_Listed(recs), name="badbytes", data_dir=tmp_path / "tfds", image_size=16)
    with pytest.raises(DataError, match=r"all 1 record\(s\) were bad, e.g. listed:z\[image\]"):
        build_tfds(_Listed(recs), name="badbytes", data_dir=tmp_path / "tfds", image_size=16, on_error="skip")
    with pytest.raises(ValueError, match=r"\['val'\] have no records"):
        build_tfds(splits={"train": _Listed(recs), "val": _Listed([])}, name="empty", data_dir=tmp_path, image_size=16)


def test_real_lungs_subset(shared_data, tmp_path):
    root = shared_data / "lungs_mc_sz_512"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    lungs = get_source("lungs", root=root)
    src = lungs.subset(np.linspace(0, len(lungs) - 1, 8).astype(int))
    build_tfds(src, name="lungs8", data_dir=tmp_path, image_size=64, file_format="parquet")
    back = TFDSSource("lungs8", "train", tmp_path)
    assert back.label_names == () and back.image_keys == ("image", "mask")
    assert len(back) == 8
    for i in range(8):
        r, o = back[i], src[i]
        assert r["id"] == o["id"] and "labels" not in r
        assert r["meta"]["source_size"] == [512, 512] and r["meta"]["set"] == o["meta"]["set"]
        np.testing.assert_allclose(I.load_grey(r["image"]), I.load_grey(o["image"], size=64), atol=0.5 / 255 + 1e-6)
        mask = I.load_mask(r["mask"])
        np.testing.assert_array_equal(mask, I.load_mask(o["mask"], size=64))
        assert 0.1 < mask.mean() < 0.6  # real lungs, not an empty mask


def test_cli_synthetic(tmp_path, capsys):
    rc = main(["--dataset", "synthetic", "--kind", "nih", "--num_examples", "4", "--num_eval", "2",
               "--image_size", "32", "--data_dir", str(tmp_path), "--num_workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "train: 4 examples" in out and "val: 2 examples" in out, out
    back = TFDSSource("covidmt_synthetic_nih", "val", tmp_path)
    assert len(back) == 2 and back.label_names == ("Infiltration", "Effusion", "Atelectasis", "Nodule", "Normal")
    assert main(["--dataset", "lungs", "--data_dir", str(tmp_path)]) == 1  # no --manual_dir -> exit status
    assert "--manual_dir is required" in capsys.readouterr().err
    assert main(["--dataset", "folder", "--manual_dir", str(tmp_path / "nope"), "--data_dir", str(tmp_path)]) == 1
    assert "folder not found" in capsys.readouterr().err


def test_tfds_source_feeds_the_grain_pipeline(phantom_build):
    from covidmt_jax import tasks
    from covidmt_jax.data import pipeline

    back = TFDSSource("phantoms", "train", phantom_build)
    ds = pipeline.task_dataset(back, dataset="rsna", tasks=tasks.paper_tasks(2), image_size=BUILD_PX,
                               batch_size=8, train=False, seed=0, shard_index=0, shard_count=1, repeat=False,
                               shuffle=False, with_ids=True)
    batch = next(iter(ds))
    assert batch["image"].shape == (8, BUILD_PX, BUILD_PX, 1)
    assert batch["ids"] == back.ids
    n_boxes = [len(back[i].get("boxes", ())) for i in range(8)]
    np.testing.assert_array_equal(batch["box_valid"].sum(1) > 0, np.array(n_boxes) > 0)
