"""Messaging-channel simulator (covidmt_jax.channels) and its pair-making CLI (channel.py)."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from covidmt_jax import channel as cli
from covidmt_jax import channels as ch
from covidmt_jax.data import images
from covidmt_jax.data.records import DataError
from covidmt_jax.data.synthetic import render_phantom


def _grey(h: int, w: int, seed: int = 0) -> Image.Image:
    """A smooth grey test image (cheap at any size)."""
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    rng = np.random.default_rng(seed)
    a = 0.5 + 0.3 * np.sin(6 * x + 3 * y) * np.cos(4 * y) + 0.02 * rng.standard_normal((h, w))
    return Image.fromarray(images.to_uint8(np.clip(a, 0, 1)))


def _open(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.fixture(scope="module")
def phantom_png() -> bytes:
    return images.encode_png(render_phantom(3, 128, ("COVID-19",)).image)


# --- presets ---------------------------------------------------------------------------------
def test_preset_settings():
    wa = ch.get_channel("whatsapp")
    assert (wa.max_side, wa.quality, wa.subsampling, wa.keep_metadata, wa.progressive, wa.upscale) == \
        (1600, ch.WHATSAPP_DEFAULT_QUALITY, "4:2:0", False, False, False)
    assert ch.get_channel("whatsapp_hd").max_side == 4096
    tg = ch.get_channel("telegram")
    assert (tg.max_side, tg.quality) == (1280, 80)
    j = ch.jpeg(60, max_side=512, subsampling="4:4:4")
    assert (j.name, j.quality, j.max_side, j.subsampling) == ("jpeg60", 60, 512, "4:4:4")
    assert ch.get_channel("jpeg75").quality == 75
    assert ch.get_channel("whatsapp", quality=70, max_side=None).quality == 70
    assert set(ch.PRESETS) == {"whatsapp", "whatsapp_hd", "telegram", "jpeg"}
    for factory in (ch.whatsapp, ch.whatsapp_hd, ch.telegram, ch.jpeg):
        assert factory.__doc__ and len(factory.__doc__) > 60  # each preset documents its sources


def test_bad_channel_settings():
    with pytest.raises(KeyError, match="unknown channel preset"):
        ch.get_channel("signal")
    with pytest.raises(ValueError, match="needs a quality"):
        ch.get_channel("jpeg")
    with pytest.raises(ValueError, match="quality"):
        ch.get_channel("whatsapp", quality=0)
    with pytest.raises(ValueError, match="subsampling"):
        ch.jpeg(80, subsampling="4:1:1")
    with pytest.raises(TypeError, match="unknown channel field"):
        ch.get_channel("whatsapp", colour="red")


@pytest.mark.parametrize("preset,size,expected", [
    ("whatsapp", (1700, 900), (1600, 847)),
    ("whatsapp", (850, 1800), (756, 1600)),
    ("telegram", (1400, 700), (1280, 640)),
    ("whatsapp", (300, 200), (300, 200)),      # never upscaled
    ("whatsapp_hd", (1700, 900), (1700, 900)),
])
def test_long_side_capped_never_upscaled(preset, size, expected):
    c = ch.get_channel(preset)
    assert c.output_size(*size) == expected
    out = c.transmit(_grey(size[1], size[0]))
    assert _open(out).size == expected


def test_upscale_option():
    c = ch.jpeg(90, max_side=128, upscale=True)
    assert _open(c.transmit(_grey(40, 64))).size == (128, 80)


def test_output_is_baseline_jpeg_420_rgb(phantom_png):
    out = ch.get_channel("whatsapp").transmit(phantom_png)
    assert out[:3] == ch.JPEG_MAGIC and ch.is_jpeg(out)
    im = _open(out)
    assert im.format == "JPEG" and im.mode == "RGB"
    assert not im.info.get("progressive") and not im.info.get("progression")
    assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
    # A grey radiograph stays grey after the RGB round trip.
    a = np.asarray(im).astype(int)
    assert np.abs(a[..., 0] - a[..., 1]).max() <= 3 and np.abs(a[..., 2] - a[..., 1]).max() <= 3
    grey = ch.get_channel("whatsapp", color_mode="L").transmit(phantom_png)
    assert _open(grey).mode == "L"
    prog = ch.get_channel("whatsapp", progressive=True).transmit(phantom_png)
    assert _open(prog).info.get("progressive") or _open(prog).info.get("progression")


def _jpeg_with_metadata(w: int = 60, h: int = 40) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"   # Make
    exif[0x0112] = 6              # Orientation: rotate 90 CW to display
    buf = io.BytesIO()
    _grey(h, w).convert("RGB").save(buf, "JPEG", quality=95, exif=exif.tobytes(),
                                    icc_profile=b"\x00" * 128, comment=b"hello")
    return buf.getvalue()


def test_metadata_stripped_and_orientation_applied():
    src = _jpeg_with_metadata()
    assert _open(src).getexif().get(0x010F) == "PhoneMaker"
    out = _open(ch.get_channel("whatsapp").transmit(src))
    assert out.size == (40, 60)  # EXIF orientation 6 applied before the metadata is dropped
    assert len(out.getexif()) == 0
    assert "exif" not in out.info and "icc_profile" not in out.info and "comment" not in out.info


def test_keep_metadata_option():
    out = _open(ch.get_channel("whatsapp", keep_metadata=True).transmit(_jpeg_with_metadata()))
    exif = out.getexif()
    assert exif.get(0x010F) == "PhoneMaker" and 0x0112 not in exif
    assert out.info.get("icc_profile") == b"\x00" * 128


def test_png_and_16bit_become_8bit_jpeg(tmp_path):
    a16 = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(a16).save(p)
    out = ch.jpeg(95, subsampling="4:4:4").transmit(p)
    assert ch.is_jpeg(out)
    got = images.load_grey(out)
    assert got.shape == (48, 64)
    assert np.abs(got - a16 / 65535.0).mean() < 0.01  # scaled by 65535, not clipped at 255
    f = Image.fromarray(np.full((20, 30), 0.25, np.float32))
    assert abs(images.load_grey(ch.jpeg(95).transmit(f)).mean() - 0.25) < 0.01


def test_size_reduction_on_phantom():
    big = render_phantom(0, 1024).image
    png = images.encode_png(big, bits=16)
    out = ch.get_channel("whatsapp").transmit(png)
    assert len(out) < 0.2 * len(png)
    assert np.abs(images.load_grey(out) - big).mean() < 0.02


def test_transmit_array_round_trip():
    x = render_phantom(1, 96).image
    for c in (ch.get_channel("whatsapp"), ch.jpeg(30)):
        y = c.transmit_array(x)
        assert y.shape == x.shape and y.dtype == np.float32
        assert 0.0 <= y.min() and y.max() <= 1.0
        assert 0 < np.abs(y - x).mean() < 0.03
    assert np.abs(ch.jpeg(30).transmit_array(x) - x).mean() > np.abs(ch.jpeg(95).transmit_array(x) - x).mean()
    small = ch.jpeg(90, max_side=48)
    assert small.transmit_array(x).shape == (48, 48)
    assert small.transmit_array(x, keep_size=True).shape == (96, 96)
    assert small.transmit_array(x[..., None]).shape == (48, 48, 1)
    with pytest.raises(ValueError, match="grey image"):
        small.transmit_array(np.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="NaN"):
        small.transmit_array(np.full((8, 8), np.nan))


def test_bad_input_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(DataError, match="broken.png"):
        ch.get_channel("whatsapp").transmit(bad)
    with pytest.raises(DataError, match="missing.jpg: file not found"):
        ch.get_channel("whatsapp").transmit(tmp_path / "missing.jpg")
    with pytest.raises(DataError, match="not a recognised image"):
        ch.get_channel("whatsapp").transmit(b"hello world, not an image")
    with pytest.raises(TypeError):
        ch.get_channel("whatsapp").transmit(12345)


# --- quality estimation ------------------------------------------------------------------------
@pytest.mark.parametrize("quality", [50, 75, 90])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_estimate_jpeg_quality_recovers_pillow_quality(quality, mode):
    buf = io.BytesIO()
    _grey(64, 64).convert(mode).save(buf, "JPEG", quality=quality)
    assert abs(ch.estimate_jpeg_quality(buf.getvalue()) - quality) <= 2


def test_estimate_jpeg_quality_of_channel_output(tmp_path):
    out = ch.get_channel("whatsapp", quality=72).transmit(_grey(64, 64))
    p = tmp_path / "received.png"  # WaCXR-style: a JPEG named .png
    p.write_bytes(out)
    assert abs(ch.estimate_jpeg_quality(p) - 72) <= 2
    for q in (10, 30, 97):
        assert abs(ch.estimate_jpeg_quality(ch.jpeg(q).transmit(_grey(32, 32))) - q) <= 2
    np.testing.assert_allclose(ch.ijg_quantization_table(50), ch.STD_LUMINANCE_QTABLE)


def test_estimate_jpeg_quality_errors(tmp_path):
    png = tmp_path / "x.png"
    _grey(8, 8).save(png)
    with pytest.raises(DataError, match="x.png: not a JPEG"):
        ch.estimate_jpeg_quality(png)
    with pytest.raises(DataError, match="nope.jpg: file not found"):
        ch.estimate_jpeg_quality(tmp_path / "nope.jpg")


# --- CLI ------------------------------------------------------------------------------------------
def _make_src(root: Path) -> dict[str, bytes]:
    files = {}
    for i, (cls, finding) in enumerate([("0_NON_COVID", ()), ("0_NON_COVID", ()), ("1_COVID-19", ("COVID-19",))]):
        data = images.encode_png(render_phantom(i, 96, finding).image)
        files[f"{cls}/img{i}.png"] = data
    buf = io.BytesIO()
    _grey(80, 100).save(buf, "JPEG", quality=98)
    files["1_COVID-19/photo.jpg"] = buf.getvalue()
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "README.txt").write_text("not an image")
    return files


def test_cli_writes_wacxr_layout(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = _make_src(src)
    rc = cli.main(["--preset", "whatsapp", "--quality", "70", str(src), str(dst)])
    out = capsys.readouterr().out
    assert rc == 0
    orig, tx = dst / "covid_binary_test", dst / "covid_binary_test_whatsapp"
    assert sorted(p.relative_to(orig).as_posix() for p in orig.rglob("*") if p.is_file()) == sorted(files)
    assert sorted(p.relative_to(tx).as_posix() for p in tx.rglob("*") if p.is_file()) == sorted(files)
    total_in = total_out = 0
    for rel, data in files.items():
        assert (orig / rel).read_bytes() == data                 # originals unchanged
        sent = (tx / rel).read_bytes()                           # same name, even .png
        assert ch.is_jpeg(sent) and abs(ch.estimate_jpeg_quality(sent) - 70) <= 2
        total_in, total_out = total_in + len(data), total_out + len(sent)
    m = re.search(r"size reduction (-?[\d.]+) %", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(100 * (1 - total_out / total_in), abs=0.06)
    assert "ignored 1 non-image file" in out
    # A second run refuses to write into the non-empty folders unless --overwrite.
    assert cli.main([str(src), str(dst)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["--overwrite", "--preset", "telegram", "--transmitted-name", "tg", str(src), str(dst)]) == 0
    assert ch.is_jpeg((dst / "tg" / "0_NON_COVID" / "img0.png").read_bytes())
    with pytest.raises(SystemExit) as e:  # the plain-JPEG preset names the flag it needs
        cli.main(["--preset", "jpeg", str(src), str(tmp_path / "j")])
    assert e.value.code == 2 and "--preset jpeg needs --quality Q" in capsys.readouterr().err


def test_cli_bad_files(tmp_path, capsys):
    src = tmp_path / "src"
    _make_src(src)
    (src / "1_COVID-19" / "zz_truncated.png").write_bytes(images.encode_png(np.zeros((32, 32)))[:40])
    rc = cli.main([str(src), str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "zz_truncated.png" in err and "--skip-bad" in err
    rc = cli.main(["--skip-bad", str(src), str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert rc == cli.EXIT_SKIPPED
    assert "skipped 1 bad file(s)" in out and "zz_truncated.png" in out
    tx = tmp_path / "b" / "covid_binary_test_whatsapp"
    assert not (tx / "1_COVID-19" / "zz_truncated.png").exists()
    assert len([p for p in tx.rglob("*") if p.is_file()]) == 4
    assert cli.main([str(tmp_path / "nowhere"), str(tmp_path / "c")]) == 2
    assert "source folder not found" in capsys.readouterr().err


def test_cli_as_module(tmp_path):
    src = tmp_path / "src"
    _make_src(src)
    r = subprocess.run([sys.executable, "-m", "covidmt_jax.channel", "--preset", "jpeg50", "--workers", "2",
                        str(src), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "size reduction" in r.stdout
    assert ch.is_jpeg((tmp_path / "out" / "covid_binary_test_jpeg50" / "1_COVID-19" / "img2.png").read_bytes())


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_overwrite_replaces_the_output_set(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = _make_src(src)
    assert cli.main([str(src), str(dst)]) == 0
    orig, tx = dst / "covid_binary_test", dst / "covid_binary_test_whatsapp"
    (src / "0_NON_COVID" / "img0.png").unlink()                 # one image fewer in the new source
    del files["0_NON_COVID/img0.png"]
    (orig / "stale.png").write_bytes(b"left over")               # and a file nobody asked for
    (dst / "notes.txt").write_text("not part of the output set")
    assert cli.main(["--overwrite", str(src), str(dst)]) == 0
    assert _files(orig) == files                                 # exactly the new set, no stale pairs
    assert sorted(_files(tx)) == sorted(files)
    assert (dst / "notes.txt").read_text() == "not part of the output set"
    assert sorted(p.name for p in dst.iterdir()) == ["covid_binary_test", "covid_binary_test_whatsapp", "notes.txt"]
    # a failed run (a bad image, no --skip-bad) leaves the previous output untouched
    (src / "1_COVID-19" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    assert cli.main(["--overwrite", str(src), str(dst)]) == 2
    assert "zz_bad.png" in capsys.readouterr().err
    assert _files(orig) == files
    assert sorted(p.name for p in dst.iterdir()) == ["covid_binary_test", "covid_binary_test_whatsapp", "notes.txt"]


def test_cli_never_writes_through_symlinks(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_src(src)
    assert cli.main([str(src), str(dst)]) == 0
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    link = dst / "covid_binary_test_whatsapp" / "0_NON_COVID" / "img0.png"
    link.unlink()
    link.symlink_to(victim)                                      # a link in DST leading outside it
    assert cli.main(["--overwrite", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert str(link) in err and "outside" in err and err.count("\n") == 1
    assert victim.read_bytes() == b"precious" and link.is_symlink()
    # a link that stays inside DST is replaced by a real file; its target is not written
    keep = dst / "keep.bin"
    keep.write_bytes(b"keep me")
    link.unlink()
    link.symlink_to(keep)
    assert cli.main(["--overwrite", str(src), str(dst)]) == 0
    assert keep.read_bytes() == b"keep me"
    assert not link.is_symlink() and ch.is_jpeg(link.read_bytes())
    # a symbolic link loop in DST is refused, not a traceback
    loop = dst / "loop"
    loop.symlink_to(loop)
    assert cli.main(["--overwrite", str(src), str(dst)]) == 2
    assert "symbolic link loop" in capsys.readouterr().err
    loop.unlink()
    # DST itself a symbolic link
    alias = tmp_path / "alias"
    alias.symlink_to(dst)
    assert cli.main(["--overwrite", str(src), str(alias)]) == 2
    assert "is a symbolic link" in capsys.readouterr().err


def test_cli_refuses_every_overlap_of_src_and_dst(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    _make_src(src)
    (tmp_path / "outer").mkdir()
    (tmp_path / "to_src").symlink_to(src)
    nested_src = tmp_path / "outer" / "data"
    _make_src(nested_src)
    (tmp_path / "to_outer").symlink_to(tmp_path / "outer")
    before = _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    cases = [
        (src, src, "same folder"),
        ("src", "./src/../src", "same folder"),                  # relative paths
        (src, tmp_path / "to_src", "same folder"),               # through a symlink
        (src, src / "out", "inside SRC_DIR"),
        ("src", "to_src/out", "inside SRC_DIR"),
        (nested_src, tmp_path / "outer", "inside DST_DIR"),
        (tmp_path / "to_outer" / "data", "outer", "inside DST_DIR"),
    ]
    for s, d, what in cases:
        assert cli.main([str(s), str(d)]) == 2, (s, d)
        err = capsys.readouterr().err
        assert what in err and err.count("\n") == 1, (s, d, err)
    # an image in SRC that is a link into DST
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "x.png").write_bytes((src / "0_NON_COVID" / "img0.png").read_bytes())
    (src / "0_NON_COVID" / "linked.png").symlink_to(dst / "x.png")
    assert cli.main([str(src), str(dst)]) == 2
    assert "symbolic link into DST_DIR" in capsys.readouterr().err
    (src / "0_NON_COVID" / "linked.png").unlink()
    (dst / "x.png").unlink()
    dst.rmdir()
    assert _files(tmp_path) == before                            # nothing was written anywhere


def test_cli_file_system_errors_are_one_line_naming_the_path(tmp_path):
    src = tmp_path / "src"
    _make_src(src)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(a_file, "exists and is not a folder"), (a_file / "sub", "Not a directory")]
    if os.geteuid() != 0:  # permissions do not bind root
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(0o500)
        cases.append((ro, "Permission denied"))
    for dst, problem in cases:
        r = subprocess.run([sys.executable, "-m", "covidmt_jax.channel", str(src), str(dst)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert str(dst if problem != "Not a directory" else a_file) in r.stderr and problem in r.stderr, r.stderr


def test_cli_file_system_error_while_writing(tmp_path, capsys, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_src(src)

    def full_disk(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cli, "_write_new", full_disk)
    assert cli.main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "No space left on device" in err and "img0.png" in err
    assert err.count("\n") == 1
    assert list(dst.iterdir()) == []                             # the staging folder is gone
