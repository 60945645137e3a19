"""Dataset sources: real label files (exact counts) and written fixtures for every layout."""
from __future__ import annotations

import gzip
import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from covidmt_jax.data import images as I
from covidmt_jax.data.records import DataError, patient_holdout
from covidmt_jax.data.sources import SOURCES, get_source, register_source
from covidmt_jax.data.sources.covidx import COVIDxSource, parse_covidx
from covidmt_jax.data.sources.folder import ImageFolderSource
from covidmt_jax.data.sources.lungs import LungMaskSource
from covidmt_jax.data.sources.nih import NIHSource, parse_bbox_list
from covidmt_jax.data.sources.rsna import RSNASource
from covidmt_jax.data.sources.wacxr import PairFolderSource, WaCXRSource

RNG = np.random.default_rng(0)


def _png(path: Path, value: float | np.ndarray = 0.5, size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(size, value, np.float32) if np.isscalar(value) else value
    path.write_bytes(I.encode_png(arr))
    return path


def _jpeg(path: Path, size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(I.encode_jpeg(RNG.random(size)))
    return path


# --- registry --------------------------------------------------------------------------
def test_registry():
    assert {"covidx", "nih", "rsna", "wacxr", "pairs", "lungs", "folder"} <= set(SOURCES)
    with pytest.raises(ValueError, match="already registered"):
        register_source("covidx")(type("Other", (), {}))
    with pytest.raises(KeyError, match="unknown source"):
        get_source("nope")


# --- COVIDx ----------------------------------------------------------------------------
def test_covidx3_train_exact_counts(shared_data):
    src = COVIDxSource(shared_data / "labels/covidx/train_COVIDx3.txt")
    assert len(src) == 13670
    assert src.class_counts == {"normal": 7966, "pneumonia": 5451, "COVID-19": 253}
    labels = np.stack([r["labels"] for r in src])
    assert labels.shape == (13670, 1) and labels.sum() == 253
    up = COVIDxSource(shared_data / "labels/covidx/train_COVIDx3.txt", upsample_covid=True, seed=3)
    assert len(up) == 7966 + 5451 * 2 and sum(r["labels"][0] for r in up) == 5451
    again = COVIDxSource(shared_data / "labels/covidx/train_COVIDx3.txt", upsample_covid=True, seed=3)
    assert up.ids == again.ids  # deterministic


def test_covidx_every_version(shared_data):
    files = sorted((shared_data / "labels/covidx").glob("*.txt"))
    assert len(files) == 15
    totals = {}
    for f in files:
        rows = parse_covidx(f)
        totals[f.name] = (len(rows), Counter(r.cls for r in rows))
    assert totals["test_COVIDx.txt"][0] == 210
    assert totals["test_COVIDx8B.txt"][1] == {"positive": 200, "negative": 200}
    assert totals["train_COVIDx9B.txt"][1] == {"negative": 13992, "positive": 16490}  # COVIDx.md table
    # patient ids with spaces, parsed from the right
    rows7 = {r.filename: r for r in parse_covidx(shared_data / "labels/covidx/test_COVIDx7A.txt")}
    assert rows7["COVID(70).png"].patient_id == "COVID 70" and rows7["COVID(70).png"].data_source == "sirm"
    # 3-column rows (no source) next to 4-column rows
    rows3 = parse_covidx(shared_data / "labels/covidx/test_COVIDx3.txt")
    assert Counter(bool(r.data_source) for r in rows3) == {False: 197, True: 103}
    # the 'rnsa' typo
    srcs9 = Counter(r.data_source for r in parse_covidx(shared_data / "labels/covidx/train_COVIDx9B.txt"))
    assert "rnsa" not in srcs9 and srcs9["rsna"] == 13389 + 199
    sev = COVIDxSource(shared_data / "labels/covidx/test_COVIDxSev.txt", label_names=("COVID-19", "level2"))
    assert np.stack([r["labels"] for r in sev]).sum(0).tolist() == [150, 98]


def test_covidx_fixture_images_labels_and_errors(tmp_path):
    lab = tmp_path / "train_COVIDx3.txt"
    lab.write_text("p1 a.png normal rsna\nCOVID 7 COVID(7).png COVID-19 sirm\np3 c.jpeg pneumonia\n"
                   "p4 d.png COVID-19 cohen\n")
    for n in ("a.png", "COVID(7).png", "d.png"):
        _png(tmp_path / "train" / n)
    _jpeg(tmp_path / "train" / "c.jpeg")
    src = COVIDxSource.from_root(tmp_path, version="3", split="train",
                                 label_names=("COVID-19", "pneumonia", "normal"))
    assert len(src) == 4 and src.name == "covidx:train_COVIDx3"
    r = src[1]
    assert r["id"] == "COVID(7).png" and r["meta"]["patient_id"] == "COVID 7"
    assert r["labels"].tolist() == [1, 0, 0] and src[2]["labels"].tolist() == [0, 1, 0]
    assert I.load_grey(r["image"]).shape == (16, 16)
    # upsampling to an explicit count: 2 positives -> 5 = 2 whole copies + 1 seeded extra
    up = COVIDxSource(lab, tmp_path / "train", upsample_covid=5)
    assert sum(x["labels"][0] for x in up) == 5 and len(up) == 7
    assert sorted(x["meta"]["replica"] for x in up if x["labels"][0]) == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="needs pneumonia rows"):
        bin_lab = tmp_path / "b.txt"
        bin_lab.write_text("p1 a.png positive x\n")
        COVIDxSource(bin_lab, upsample_covid=True)
    with pytest.raises(ValueError, match="binary class"):
        COVIDxSource(bin_lab, label_names=("pneumonia",))
    # a missing image is an error naming the label line
    (tmp_path / "train" / "d.png").unlink()
    with pytest.raises(DataError, match=r"d\.png: image listed on line 4 of .* not found"):
        COVIDxSource(lab, tmp_path / "train")
    with pytest.warns(UserWarning, match="skipped 1 bad item"):
        s = COVIDxSource(lab, tmp_path / "train", on_error="skip")
    assert len(s) == 3 and s.skipped[0][0].endswith("d.png")


@pytest.mark.parametrize("line, problem", [
    ("p1 a.png", "line 2: expected 'patientid filename class"),
    ("p1 a.png covid", "line 2: unknown class 'covid'"),
    ("p1 a.txt normal rsna", "line 2: no image file name"),
    ("p9 ok.png normal rsna", "line 2: file 'ok.png' already listed on line 1"),
])
def test_covidx_malformed_rows_name_file_and_line(tmp_path, line, problem):
    lab = tmp_path / "bad.txt"
    lab.write_text(f"p0 ok.png normal rsna\n{line}\n\np2 b.png pneumonia rsna\n")
    with pytest.raises(DataError, match="bad.txt: " + problem) as ei:
        parse_covidx(lab)
    assert ei.value.path == str(lab)
    with pytest.warns(UserWarning, match="skipped 1"):
        src = COVIDxSource(lab, on_error="skip")
    assert len(src) == 2 and src.skipped == [(str(lab), ei.value.problem)]
    assert "skipped 1 bad item" in src.skip_report()


# --- NIH -------------------------------------------------------------------------------
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def test_nih_real_counts(shared_data):
    src = NIHSource(data_entry=shared_data / "labels/nih/Data_Entry_2017_v2020.csv.gz",
                    bbox_file=shared_data / "labels/nih/BBox_List_2017.csv.gz")
    assert len(src) == 112120
    assert src.label_names == ("Infiltration", "Effusion", "Atelectasis", "Nodule", "Normal")
    y = np.stack([r["labels"] for r in src])
    # every image is either No Finding or has at least one finding; Normal excludes the rest
    assert y[:, 4].sum() == sum(1 for r in src if not r["meta"]["findings"])
    assert not (y[:, 4:5] * y[:, :4]).any()
    boxes = parse_bbox_list(shared_data / "labels/nih/BBox_List_2017.csv.gz")
    assert sum(len(v) for v in boxes.values()) == 984
    assert Counter(f for v in boxes.values() for f, _ in v)["Infiltration"] == 123  # 'Infiltrate'
    boxed = [r for r in src if "boxes" in r]
    assert sum(len(r["boxes"]) for r in boxed) == 984
    assert all((r["boxes"] >= 0).all() and (r["boxes"] <= 1).all() for r in boxed)


def test_nih_task_set_with_the_papers_normal_count(shared_data):
    """The paper's NIH task set: images with one of the four findings, plus a fixed
    pseudo-random subset of the "No Finding" ones (Table 1: 5,000 + 800)."""
    entry = shared_data / "labels/nih/Data_Entry_2017_v2020.csv.gz"
    src = NIHSource(data_entry=entry, drop_unlabelled=True, max_normal=5800)
    y = np.stack([r["labels"] for r in src])
    assert y.sum(0).tolist() == [19894, 13317, 11559, 6331, 5800]  # every finding image kept
    assert len(src) == 45136 and y.any(1).all()
    normals = {r["id"] for r in src if r["labels"][4]}
    fewer = NIHSource(data_entry=entry, drop_unlabelled=True, max_normal=100)
    assert {r["id"] for r in fewer if r["labels"][4]} < normals  # the same order: nested subsets
    with pytest.raises(ValueError, match="max_normal needs a 'Normal'"):
        NIHSource(data_entry=entry, label_names=("Nodule",), max_normal=10)


def test_covidx3_train_and_validation_lists_share_no_patient_or_file(shared_data):
    tr = parse_covidx(shared_data / "labels/covidx/train_COVIDx3.txt")
    va = parse_covidx(shared_data / "labels/covidx/test_COVIDx3.txt")
    assert not {r.patient_id for r in tr} & {r.patient_id for r in va}
    assert not {r.filename for r in tr} & {r.filename for r in va}
    assert Counter(r.cls for r in va) == {"normal": 100, "pneumonia": 100, "COVID-19": 100}


def test_paper_data_config_uses_both_covidx3_lists_and_the_nih_task_set():
    from covidmt_jax import config_lib
    c = config_lib.base_config()
    config_lib.paper_data(c, "/data")
    tr, va = c.data.train, c.data.val
    assert tr.covidx.kwargs.label_file == "/data/covidx/train_COVIDx3.txt" and tr.covidx.holdout == 0
    assert va.covidx.kwargs.label_file == "/data/covidx/test_COVIDx3.txt" and va.covidx.holdout == 0
    assert va.covidx.kwargs.image_dir == "/data/covidx/test" and tr.covidx.kwargs.upsample_covid
    assert tr.nih.kwargs.to_dict() == va.nih.kwargs.to_dict()
    assert tr.nih.kwargs.drop_unlabelled and tr.nih.kwargs.max_normal == 5800
    assert (tr.nih.holdout, tr.nih.holdout_part, va.nih.holdout_part) == (0.125, "keep", "hold")
    assert (tr.rsna.holdout_part, va.rsna.holdout_part) == ("keep", "hold")


def test_nih_64px_extract_with_path_column(shared_data):
    src = NIHSource(data_entry=shared_data / "nih_64px/labels_Data_Entry_2017_v2020_rows.csv",
                    label_names=("Effusion", "Infiltration", "No Finding"))
    assert len(src) == 1004
    # MANIFEST.md: Effusion 170, Infiltration 162, No Finding 501 (the 4 extra 128-px files have other findings)
    assert np.stack([r["labels"] for r in src]).sum(0).tolist() == [170, 162, 501]
    assert len({r["id"] for r in src}) == 1004  # the same Image Index in two folders: ids are paths
    assert Path(src[0]["image"]).is_file() and I.load_grey(src[0]["image"]).shape == (64, 64)


def test_nih_fixture_layouts_splits_and_errors(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    (root / "Data_Entry_2017.csv").write_text(
        NIH_HEADER.rstrip("\n") + ",\n"
        "00000001_000.png,Cardiomegaly|Effusion,0,1,57,M,PA,2682,2749,0.143,0.143,\n"
        "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,\n"
        "00000003_000.png,Infiltration|Nodule,0,3,77,F,AP,2048,2500,0.168,0.168,\n")
    with gzip.open(root / "BBox_List_2017.csv.gz", "wt") as f:
        f.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000003_000.png,Infiltrate,512,256,256,128\n")
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000003_000.png\n")
    (root / "test_list.txt").write_text("00000002_000.png\n")
    # the Kaggle release's nested layout
    _png(root / "images_001" / "images" / "00000001_000.png")
    _png(root / "images_001" / "images" / "00000002_000.png")
    _png(root / "images_002" / "images" / "00000003_000.png")
    src = NIHSource(root, split="train_val", bbox_file=root / "BBox_List_2017.csv.gz")
    assert src.ids == ["00000001_000.png", "00000003_000.png"]
    assert src[0]["labels"].tolist() == [0, 1, 0, 0, 0] and src[1]["labels"].tolist() == [1, 0, 0, 1, 0]
    np.testing.assert_allclose(src[1]["boxes"], [[0.5, 0.25, 0.75, 0.375]])
    assert src[1]["meta"]["box_findings"] == ["Infiltration"] and "images_002" in src[1]["image"]
    test = NIHSource(root, split="test")
    assert test.ids == ["00000002_000.png"] and test[0]["labels"].tolist() == [0, 0, 0, 0, 1]
    assert len(NIHSource(root, label_names=("Cardiomegaly",), drop_unlabelled=True)) == 1
    (root / "images_002" / "images" / "00000003_000.png").unlink()
    with pytest.raises(DataError, match=r"00000003_000\.png: image of line 4 of Data_Entry_2017.csv not found"):
        NIHSource(root)
    with pytest.raises(ValueError, match="unknown NIH label"):
        NIHSource(root, label_names=("Covid",))
    (root / "test_list.txt").write_text("00000002_000.png\n00000001_000.png\n00000002_000.png\n")
    with pytest.raises(DataError, match=r"test_list\.txt: line 3: 00000002_000\.png is listed twice \(first on line 1\)"):
        NIHSource(root, split="test")


@pytest.mark.parametrize("row, problem", [
    ("00000009_000.png,Effusion,0,9,50,M,PA,2048,2048,0.1", "line 3: expected 11 values"),
    ("00000009_000.png,Effusio,0,9,50,M,PA,2048,2048,0.1,0.1", "line 3: unknown finding"),
    ("00000009_000.png,No Finding|Mass,0,9,50,M,PA,2048,2048,0.1,0.1", "line 3: 'No Finding' combined"),
    ("00000009_000.png,Mass,zero,9,50,M,PA,2048,2048,0.1,0.1", "line 3: non-numeric field"),
    ("00000001_000.png,Mass,0,9,50,M,PA,2048,2048,0.1,0.1", "line 3: image '00000001_000.png' already listed on line 2"),
])
def test_nih_malformed_rows(tmp_path, row, problem):
    p = tmp_path / "Data_Entry_2017_v2020.csv"
    p.write_text(NIH_HEADER + "00000001_000.png,Mass,0,1,57,M,PA,2682,2749,0.143,0.143\n" + row + "\n")
    with pytest.raises(DataError, match="Data_Entry_2017_v2020.csv: " + problem):
        NIHSource(data_entry=p)
    with pytest.warns(UserWarning):
        assert len(NIHSource(data_entry=p, on_error="skip")) == 1


# --- RSNA ------------------------------------------------------------------------------
RSNA_HEADER = "patientId,x,y,width,height,Target\n"


def test_rsna_real_counts(shared_data):
    src = RSNASource(shared_data / "labels/rsna/stage_2_train_labels.csv.zip")
    assert src.n_rows == 30227 and len(src) == 26684
    assert sum(int(r["labels"][0]) for r in src) == 6012 and src.n_boxes == 9555
    assert all(len(r["boxes"]) == 0 for r in src if r["labels"][0] == 0)
    b = np.concatenate([r["boxes"] for r in src])
    assert b.shape == (9555, 4) and (b[:, 2:] > b[:, :2]).all() and b.min() >= 0 and b.max() <= 1
    keep, hold = patient_holdout([r["meta"]["patient_id"] for r in src], 0.25, seed=0)
    assert len(keep) + len(hold) == 26684 and abs(len(hold) - 6671) <= 1
    val = src.subset(hold, name="rsna:val")
    assert len(val) == len(hold) and val.name == "rsna:val"


@pytest.mark.dicom
def test_rsna_fixture_zip_images_and_groups(tmp_path):
    rows = (RSNA_HEADER + "a,,,,,0\nb,100,200,300,400,1\nb,512,0,512,1024,1\nc,,,,,0\n")
    z = tmp_path / "stage_2_train_labels.csv.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("stage_2_train_labels.csv", rows)
    imgs = tmp_path / "imgs"
    _png(imgs / "a.png")
    _jpeg(imgs / "sub" / "b.jpg")
    (imgs / "c.dcm").write_bytes(_tiny_dicom())
    src = RSNASource(z, imgs)
    assert src.ids == ["a", "b", "c"] and src.n_rows == 4
    np.testing.assert_allclose(src[1]["boxes"], [[100 / 1024, 200 / 1024, 400 / 1024, 600 / 1024],
                                                  [0.5, 0.0, 1.0, 1.0]])
    assert src[1]["labels"].tolist() == [1.0] and src[1]["meta"]["lines"] == [3, 4]
    assert src[0]["boxes"].shape == (0, 4)
    for r in src:
        assert I.load_grey(r["image"]).ndim == 2  # png, jpeg and dicom all decode
    (imgs / "a.png").unlink()
    with pytest.raises(DataError, match=r"a\.dcm: no image \(\.dcm/\.png/\.jpg\) for patient on line 2"):
        RSNASource(z, imgs)


def _tiny_dicom() -> bytes:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("row, problem", [
    ("z,1,2,3,4,0", "line 3: Target 0 row has box coordinates"),
    ("z,,,,,1", "line 3: Target 1 row needs numeric"),
    ("z,1000,0,100,10,1", "line 3: box .* outside the 1024-px image"),
    ("z,1,2,3,4,2", "line 3: Target must be 0 or 1"),
    ("a,1,2,3,4,1", "line 3: patient a has Target 1 here but 0 on line 2"),
    ("a,,,,,0", "line 3: patient a has a second Target 0 row"),
    ("z,1,2,3", "line 3: expected 6 values"),
])
def test_rsna_malformed_rows(tmp_path, row, problem):
    p = tmp_path / "stage_2_train_labels.csv"
    p.write_text(RSNA_HEADER + "a,,,,,0\n" + row + "\n")
    with pytest.raises(DataError, match="stage_2_train_labels.csv: " + problem):
        RSNASource(p)
    with pytest.warns(UserWarning):
        assert RSNASource(p, on_error="skip").skipped[0][1].startswith("line 3")


def test_label_file_missing_and_bad_header(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        RSNASource(tmp_path / "nope.csv")
    p = tmp_path / "x.csv"
    p.write_text("id,x\n1,2\n")
    with pytest.raises(DataError, match=r"x\.csv: line 1: header lacks column"):
        RSNASource(p)


# --- WaCXR pairs -----------------------------------------------------------------------
def _wacxr(root: Path) -> Path:
    for cls, names in (("0_NON_COVID", ["n1.png", "n2.png"]), ("1_COVID-19", ["c1.png", "c2.jpg", "c3.png"])):
        for n in names:
            _png(root / "covid_binary_test" / cls / n, RNG.random((16, 16)))
            _jpeg(root / "covid_binary_test_whatsapp" / cls / n)  # JPEG even when named .png
    return root


def test_wacxr_pairs(tmp_path):
    src = WaCXRSource(_wacxr(tmp_path))
    assert len(src) == 5 and src.label_names == ("COVID-19",)
    assert src.class_counts() == {"0_NON_COVID": 2, "1_COVID-19": 3}
    r = src.ids.index("1_COVID-19/c1.png")
    rec = src[r]
    assert rec["labels"].tolist() == [1.0]
    assert rec["meta"]["original_format"] == "png" and rec["meta"]["transmitted_format"] == "jpeg"
    assert rec["transmitted"].endswith("covid_binary_test_whatsapp/1_COVID-19/c1.png")
    assert I.load_grey(rec["transmitted"]).shape == I.load_grey(rec["original"]).shape
    assert src[src.ids.index("0_NON_COVID/n1.png")]["labels"].tolist() == [0.0]
    assert src.unpaired == []


def test_wacxr_missing_duplicated_and_bad_pairs(tmp_path):
    root = _wacxr(tmp_path)
    (root / "covid_binary_test_whatsapp/1_COVID-19/c3.png").unlink()
    _jpeg(root / "covid_binary_test_whatsapp/0_NON_COVID/extra.png")
    with pytest.raises(DataError, match="2 unpaired file"):
        WaCXRSource(root)
    with pytest.warns(UserWarning, match="skipped 2"):
        src = WaCXRSource(root, on_error="skip")
    assert len(src) == 4
    assert sorted(Path(p).name for p, _ in src.unpaired) == ["c3.png", "extra.png"]
    assert {why for _, why in src.unpaired} == {"no transmitted counterpart", "no original counterpart"}
    # duplicated: two transmitted files map to one original when pairing by stem
    o, t = tmp_path / "o", tmp_path / "t"
    _png(o / "x.png")
    _jpeg(t / "x.jpg")
    _jpeg(t / "x.jpeg")
    with pytest.raises(DataError, match="duplicated transmitted file"):
        PairFolderSource(o, t, match="stem")
    # a file named like an image that is not one
    (root / "covid_binary_test/0_NON_COVID/broken.png").write_text("not an image")
    with pytest.raises(DataError, match=r"broken\.png: not a recognised image format"):
        WaCXRSource(root, on_error="raise")
    (root / "covid_binary_test/0_NON_COVID/broken.png").unlink()
    (root / "covid_binary_test_whatsapp/0_NON_COVID/extra.png").unlink()
    _jpeg(root / "covid_binary_test_whatsapp/1_COVID-19/c3.png")
    _png(root / "covid_binary_test/2_OTHER/z.png")
    _jpeg(root / "covid_binary_test_whatsapp/2_OTHER/z.png")
    with pytest.raises(DataError, match=r"z\.png: unknown WaCXR class folder '2_OTHER'"):
        WaCXRSource(root)
    with pytest.raises(DataError, match="WaCXR folder not found"):
        WaCXRSource(tmp_path / "elsewhere")


def test_pair_folder_stem_matching_and_labels(tmp_path):
    o, t = tmp_path / "orig", tmp_path / "sent"
    _png(o / "a" / "x.png")
    _png(o / "b" / "y.png")
    _jpeg(t / "a" / "x.jpg")
    _jpeg(t / "b" / "y.jpg")
    src = PairFolderSource(o, t, match="stem", labels_from_subfolders=True)
    assert src.label_names == ("a", "b") and len(src) == 2
    assert src[0]["labels"].tolist() == [1, 0] and src[0]["transmitted"].endswith("x.jpg")
    with pytest.raises(DataError, match="4 unpaired"):
        PairFolderSource(o, t)  # by exact path, x.png and x.jpg do not pair


# --- lungs -----------------------------------------------------------------------------
def test_lungs_mc_sz_512(shared_data):
    src = LungMaskSource(shared_data / "lungs_mc_sz_512")
    assert len(src) == 704 and src.layout == "images_masks" and not src.unpaired
    assert Counter(r["meta"]["set"] for r in src) == {"CHNCXR": 566, "MCUCXR": 138}
    for i in (0, 300, 703):
        r = src[i]
        m = I.load_mask(r["mask"])
        assert m.dtype == bool and m.shape == (512, 512)
        assert 0.1 < m.mean() < 0.5  # lungs cover a sensible part of a CXR
        assert I.load_grey(r["image"]).shape == (512, 512)


def test_lungs_flat_sample(shared_data):
    src = LungMaskSource(shared_data / "samples/imlab_lungs_4/Demo/Data")
    assert src.layout == "flat" and src.ids == ["1", "2", "3", "4"]
    assert all(0.1 < I.load_mask(r["mask"]).mean() < 0.5 for r in src)


def test_lungs_montgomery_union(tmp_path):
    left = np.zeros((32, 32), np.uint8)
    left[8:24, 2:12] = 255
    right = np.zeros((32, 32), np.uint8)
    right[8:24, 20:30] = 255
    _png(tmp_path / "CXR_png" / "MCUCXR_0001_0.png", RNG.random((32, 32)))
    _png(tmp_path / "CXR_png" / "MCUCXR_0002_1.png", RNG.random((32, 32)))  # no mask: unpaired
    _png(tmp_path / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png", left)
    _png(tmp_path / "ManualMask" / "rightMask" / "MCUCXR_0001_0.png", right)
    with pytest.warns(UserWarning, match="1 image"):
        src = LungMaskSource(tmp_path)
    assert src.layout == "montgomery" and len(src) == 1
    assert src.unpaired[0][0].endswith("MCUCXR_0002_1.png")
    r = src[0]
    assert isinstance(r["mask"], bytes) and r["meta"]["tb"] == 0
    np.testing.assert_array_equal(I.load_mask(r["mask"]), (left > 127) | (right > 127))
    (tmp_path / "ManualMask" / "rightMask" / "MCUCXR_0001_0.png").unlink()
    with pytest.raises(DataError, match="left and right lung masks must come together"):
        LungMaskSource(tmp_path)


def test_lungs_kaggle_mask_suffix_and_errors(tmp_path):
    _png(tmp_path / "CXR_png" / "CHNCXR_0001_0.png")
    _png(tmp_path / "CXR_png" / "MCUCXR_0001_0.png")
    _png(tmp_path / "masks" / "CHNCXR_0001_0_mask.png", 1.0)
    _png(tmp_path / "masks" / "MCUCXR_0001_0.png", 1.0)  # Montgomery masks keep the image name
    src = LungMaskSource(tmp_path)
    assert src.layout == "images_masks" and src.ids == ["CHNCXR_0001_0", "MCUCXR_0001_0"]
    assert src[0]["mask"].endswith("CHNCXR_0001_0_mask.png") and I.load_mask(src[0]["mask"]).all()
    _png(tmp_path / "masks" / "CHNCXR_0009_0_mask.png")  # a mask without its image
    with pytest.raises(DataError, match="CHNCXR_0009_0_mask.png: lung mask without a matching image"):
        LungMaskSource(tmp_path)
    (tmp_path / "masks" / "CHNCXR_0009_0_mask.png").unlink()
    _png(tmp_path / "masks" / "CHNCXR_0001_0_mask.png", 1.0, size=(8, 8))  # wrong size
    with pytest.raises(DataError, match="mask size 8x8 differs"):
        LungMaskSource(tmp_path)


# --- generic folder --------------------------------------------------------------------
def test_image_folder(tmp_path, shared_data):
    src = ImageFolderSource(shared_data / "nih_64px" / "NIH1000" / "test", labels_from_subfolders=True,
                            label_names=("1_abnormal",))
    assert len(src) == 200 and sum(r["labels"][0] for r in src) == 100
    _png(tmp_path / "a" / "x.png")
    _jpeg(tmp_path / "b" / "deep" / "y.jpeg")
    (tmp_path / "notes.md").write_text("# not an image")
    (tmp_path / "noext").write_bytes(I.encode_png(np.zeros((4, 4))))
    (tmp_path / ".hidden.png").write_text("ignored")
    plain = ImageFolderSource(tmp_path)
    assert plain.ids == ["a/x.png", "b/deep/y.jpeg", "noext"] and "labels" not in plain[0]
    with pytest.raises(DataError, match="noext: image is not inside a class sub-folder"):
        ImageFolderSource(tmp_path, labels_from_subfolders=True)
    (tmp_path / "noext").unlink()
    lab = ImageFolderSource(tmp_path, labels_from_subfolders=True)
    assert lab.label_names == ("a", "b") and lab[1]["labels"].tolist() == [0, 1]
    (tmp_path / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # header only: caught on decode
    (tmp_path / "a" / "text.jpg").write_text("plain text")
    with pytest.warns(UserWarning, match="skipped 1"):
        s = ImageFolderSource(tmp_path, on_error="skip")
    assert s.skipped[0][0].endswith("text.jpg")
    with pytest.raises(DataError, match="truncated or corrupt"):
        I.open_image(s[s.ids.index("a/bad.png")]["image"])
    with pytest.raises(DataError, match="folder not found"):
        ImageFolderSource(tmp_path / "missing")
