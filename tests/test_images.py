"""The robust decoder: formats by magic bytes, bad inputs, mode conversions, DICOM."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from covidmt_jax.data import images as I
from covidmt_jax.data.records import DataError


def _gradient(h=48, w=64) -> np.ndarray:
    """float32 [h, w]: left-to-right ramp plus a bright top-left block (orientation marker)."""
    x = np.tile(np.linspace(0.0, 1.0, w, dtype=np.float32), (h, 1)) * 0.5
    x[: h // 4, : w // 4] = 1.0
    return x


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --- sniffing --------------------------------------------------------------------------
def test_sniff_all_formats():
    im = Image.fromarray(I.to_uint8(_gradient()))
    for fmt, pil in [("png", "PNG"), ("jpeg", "JPEG"), ("bmp", "BMP"), ("tiff", "TIFF"), ("gif", "GIF"),
                     ("webp", "WEBP")]:
        assert I.sniff_format(_save(im, pil)) == fmt
    assert I.sniff_format(b"\0" * 128 + b"DICM" + b"\0" * 8) == "dicom"
    with pytest.raises(DataError, match="x.bin: not a recognised image format"):
        I.sniff_format(b"hello world, not an image", name="x.bin")
    with pytest.raises(DataError, match="empty file"):
        I.sniff_format(b"", name="e.png")


def test_extension_is_ignored(tmp_path):
    """A JPEG named .png (WaCXR's transmitted files) decodes as JPEG."""
    p = tmp_path / "transmitted.png"
    p.write_bytes(I.encode_jpeg(_gradient(), quality=90))
    assert I.sniff_format(p.read_bytes()) == "jpeg"
    g = I.load_grey(p)
    assert g.shape == (48, 64) and g.dtype == np.float32
    assert np.abs(g - _gradient()).mean() < 0.02


def test_missing_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: file not found"):
        I.open_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="is a directory"):
        I.open_image(tmp_path)
    (tmp_path / "text.png").write_text("not an image at all")
    with pytest.raises(DataError, match=r"text\.png: not a recognised image format"):
        I.open_image(tmp_path / "text.png")


# --- bad files -------------------------------------------------------------------------
def test_truncated_png_names_file(tmp_path):
    data = I.encode_png(np.random.default_rng(0).random((64, 64)))
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png: truncated or corrupt image") as ei:
        I.open_image(p)
    assert ei.value.path == str(p)


def test_corrupt_png_checksum():
    data = bytearray(I.encode_png(np.random.default_rng(1).random((64, 64))))
    data[60] ^= 0xFF  # inside the IDAT stream
    with pytest.raises(DataError, match="b.png: truncated or corrupt"):
        I.open_image(bytes(data), name="b.png")


def test_truncated_and_corrupt_jpeg(tmp_path):
    data = I.encode_jpeg(np.random.default_rng(2).random((64, 64)), quality=90)
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg: truncated or corrupt image \(JPEG\)"):
        I.load_grey(p)
    bad = data[:4] + b"\x00" * 200 + data[204:]  # header segments destroyed
    with pytest.raises(DataError, match="c.jpg: truncated or corrupt JPEG header"):
        I.open_image(bad, name="c.jpg")


def test_decompression_bomb_limit():
    data = I.encode_png(np.zeros((100, 100), np.uint8))
    with pytest.raises(DataError, match="bomb.png: image of 100x100 = 10000 pixels exceeds"):
        I.open_image(data, name="bomb.png", max_pixels=9_999)
    assert I.open_image(data, max_pixels=10_000).size == (100, 100)


# --- modes -----------------------------------------------------------------------------
def test_16bit_png_scaled_by_65535():
    a = np.array([[0, 1, 4095], [32768, 65534, 65535]], np.uint16)
    data = I.encode_png(a)
    assert data[24] == 16  # really a 16-bit PNG
    im = I.open_image(data)
    assert im.mode == "F"
    np.testing.assert_allclose(np.asarray(im), a / 65535.0, rtol=0, atol=1e-7)
    g = I.load_grey(data)
    assert g[0, 1] > 0 and g[0, 1] < 1 / 255  # sub-8-bit precision kept
    # 16-bit float round trip through encode_png(bits=16)
    x = _gradient()
    np.testing.assert_allclose(I.load_grey(I.encode_png(x, bits=16)), x, atol=1 / 65535)


def test_rgba_composited_on_black():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:4, :, 3] = 255  # top half opaque, bottom half transparent
    rgba[4:, :, 3] = 0
    im = I.open_image(_save(Image.fromarray(rgba), "PNG"))
    assert im.mode == "RGB"
    arr = np.asarray(im)
    assert (arr[:4] == 200).all() and (arr[4:] == 0).all()
    la = np.stack([np.full((8, 8), 100, np.uint8), np.full((8, 8), 128, np.uint8)], -1)
    im = I.open_image(_save(Image.fromarray(la, "LA"), "PNG"))
    assert im.mode == "L" and (np.asarray(im) == 50).all()


def test_cmyk_jpeg_converted():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    data = _save(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    im = I.open_image(data)
    assert im.mode == "RGB"
    r, g, b = np.asarray(im, np.float32).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_palette_images():
    grey = Image.fromarray(I.to_uint8(_gradient())).convert("P")
    im = I.open_image(_save(grey, "PNG"))
    assert im.mode == "L"  # all-grey palette -> L
    np.testing.assert_array_equal(np.asarray(im), np.asarray(grey.convert("L")))
    colour = Image.new("RGB", (8, 8), (255, 0, 0)).convert("P")
    assert I.open_image(_save(colour, "PNG")).mode == "RGB"
    gif = I.open_image(_save(grey, "GIF"))
    assert gif.mode == "L"


def test_palette_transparency_on_black():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    data = _save(p, "PNG", transparency=1)
    im = I.open_image(data)
    assert im.mode == "L" and (np.asarray(im) == 0).all()


def test_exif_orientation_applied():
    x = I.to_uint8(_gradient(32, 64))  # landscape, bright block top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = _save(Image.fromarray(x), "JPEG", quality=95, exif=exif.tobytes())
    g = I.load_grey(data)
    assert g.shape == (64, 32)  # portrait after rotation
    # 90 CW: the top-left block moves to the top-right
    assert g[:8, -8:].mean() > 0.9 and g[:8, :8].mean() < 0.7


def test_one_bit_and_rgb_luma():
    im = I.open_image(_save(Image.new("1", (8, 8), 1), "PNG"))
    assert im.mode == "L" and (np.asarray(im) == 255).all()
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    g = I.load_grey(I.encode_png(rgb))
    np.testing.assert_allclose(g, 0.299, atol=1e-6)


def test_float_tiff_and_16bit_tiff():
    f = np.linspace(-3, 5, 64, dtype=np.float32).reshape(8, 8)
    g = I.load_grey(_save(Image.fromarray(f), "TIFF"))
    assert g.min() == 0.0 and g.max() == 1.0
    a = np.full((8, 8), 1000, np.uint16)
    im = I.open_image(_save(Image.fromarray(a), "TIFF"))
    assert im.mode == "F"
    np.testing.assert_allclose(np.asarray(im), 1000 / 65535, rtol=1e-6)


def test_resize_and_size_argument():
    data = I.encode_png(_gradient(48, 64))
    assert I.load_grey(data, size=32).shape == (32, 32)
    g = I.load_grey(data, size=(24, 40))
    assert g.shape == (24, 40) and 0.0 <= g.min() and g.max() <= 1.0
    assert I.image_size(data) == (48, 64)
    with pytest.raises(ValueError):
        I.load_grey(data, size=0)


def test_load_mask_threshold():
    m = np.array([[0, 127, 128, 255]], np.uint8)
    np.testing.assert_array_equal(I.load_mask(I.encode_png(m)), [[False, False, True, True]])
    m16 = m.astype(np.uint16) * 257
    np.testing.assert_array_equal(I.load_mask(I.encode_png(m16)), [[False, False, True, True]])
    big = np.zeros((32, 32), np.uint8)
    big[8:24, 8:24] = 255
    r = I.load_mask(I.encode_png(big), size=16)
    assert r.dtype == bool and r.shape == (16, 16) and r.sum() == 64


def test_encode_helpers_shapes():
    x = _gradient()
    assert I.load_grey(I.encode_png(x[..., None])).shape == x.shape
    assert I.sniff_format(I.encode_jpeg(np.stack([x] * 3, -1))) == "jpeg"
    assert I.sniff_format(I.encode_jpeg(Image.fromarray(x))) == "jpeg"  # mode F input
    with pytest.raises(ValueError, match="expected an image array"):
        I.encode_png(np.zeros((4, 4, 2)))


# --- DICOM -----------------------------------------------------------------------------
def _dicom(arr: np.ndarray, *, bits_stored: int, photometric="MONOCHROME2", **elements) -> bytes:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.dicom
def test_dicom_12bit_scaled_by_bits_stored():
    a = np.array([[0, 1024], [2048, 4095]], np.uint16)
    data = _dicom(a, bits_stored=12)
    assert I.sniff_format(data) == "dicom"
    im = I.open_image(data, name="x.dcm")
    assert im.mode == "F"
    np.testing.assert_allclose(np.asarray(im), a / 4095.0, atol=1e-7)


@pytest.mark.dicom
def test_dicom_monochrome1_inverted():
    a = np.array([[0, 4095]], np.uint16)
    g = I.load_grey(_dicom(a, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_allclose(g, [[1.0, 0.0]], atol=1e-7)
    a8 = np.array([[0, 255]], np.uint8)
    assert (np.asarray(I.open_image(_dicom(a8, bits_stored=8, photometric="MONOCHROME1"))) == [[255, 0]]).all()


@pytest.mark.dicom
def test_dicom_window_and_rescale():
    a = np.array([[0, 1000, 1500, 2000, 4000]], np.uint16)
    # rescale: HU = raw - 1000; window centre 500, width 1001 -> [0, 1] over HU [0, 1000]
    g = I.load_grey(_dicom(a, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1000,
                           WindowCenter=500, WindowWidth=1001))
    np.testing.assert_allclose(g, [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-3)
    # rescale without window: scaled over the rescaled range of the 12-bit data
    g2 = I.load_grey(_dicom(a, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000))
    np.testing.assert_allclose(g2, a / 4095.0, atol=1e-6)


@pytest.mark.dicom
def test_dicom_voi_lut_sequence():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = (np.arange(4096) // 16).astype("<u2").tobytes()  # output 0..255
    a = np.array([[0, 1024, 4095]], np.uint16)
    g = I.load_grey(_dicom(a, bits_stored=12, VOILUTSequence=Sequence([item])))
    np.testing.assert_allclose(g, [[0.0, 64 / 255, 1.0]], atol=1e-6)


@pytest.mark.dicom
def test_dicom_bad_inputs():
    a = np.zeros((64, 64), np.uint16)
    data = _dicom(a, bits_stored=12)
    with pytest.raises(DataError, match="d.dcm: image of 64x64"):
        I.open_image(data, name="d.dcm", max_pixels=100)
    with pytest.raises(DataError, match="d.dcm: .*(DICOM|truncated)"):
        I.open_image(data[: len(data) - 4000], name="d.dcm")


# --- real files ------------------------------------------------------------------------
@pytest.mark.dicom
def test_all_shared_samples_decode(shared_data):
    root = shared_data / "samples"
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".dcm")]
    assert len(files) >= 14
    kinds = set()
    for p in files:
        kinds.add(I.sniff_format(p.read_bytes()[:200]))
        im = I.open_image(p)
        assert im.mode in ("L", "RGB", "F")
        g = I.load_grey(p, size=64)
        assert g.shape == (64, 64) and g.dtype == np.float32
        assert 0.0 <= g.min() < g.max() <= 1.0, p
    assert kinds == {"png", "jpeg", "dicom"}
    dcm = next(root.glob("*.dcm"))
    assert I.image_size(dcm) == (1024, 1024)


def test_data_error_pickles_and_formats():
    import pickle

    e = pickle.loads(pickle.dumps(DataError("a/b.png", "truncated")))
    assert isinstance(e, ValueError) and str(e) == "a/b.png: truncated"
    assert (e.path, e.problem) == ("a/b.png", "truncated")


@pytest.mark.dicom
def test_dicom_palette_colour_is_looked_up_not_read_as_grey():
    """PALETTE COLOR pixels are indices into a colour table: white, black, black, white here."""
    lut = np.array([65535, 0, 0, 65535], "<u2").tobytes()
    a = np.array([[0, 1], [2, 3]], np.uint8)
    data = _dicom(a, bits_stored=8, photometric="PALETTE COLOR",
                  RedPaletteColorLookupTableDescriptor=[4, 0, 16], RedPaletteColorLookupTableData=lut,
                  GreenPaletteColorLookupTableDescriptor=[4, 0, 16], GreenPaletteColorLookupTableData=lut,
                  BluePaletteColorLookupTableDescriptor=[4, 0, 16], BluePaletteColorLookupTableData=lut)
    np.testing.assert_allclose(I.load_grey(data), [[1.0, 0.0], [0.0, 1.0]], atol=1e-3)
    with pytest.raises(DataError, match="p.dcm: unsupported DICOM PhotometricInterpretation 'YBR_ICT'"):
        I.open_image(_dicom(a, bits_stored=8, photometric="YBR_ICT"), name="p.dcm")


@pytest.mark.dicom
def test_dicom_without_preamble_is_recognised():
    pydicom = pytest.importorskip("pydicom")
    a = np.array([[0, 1024], [2048, 4095]], np.uint16)
    ds = pydicom.dcmread(io.BytesIO(_dicom(a, bits_stored=12)))
    ds.preamble = None
    del ds.file_meta  # a bare data set: no preamble, no "DICM", no file meta group
    for implicit in (False, True):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False, implicit_vr=implicit, little_endian=True)
        data = buf.getvalue()
        assert data[128:132] != b"DICM" and I.sniff_format(data) == "dicom"
        np.testing.assert_allclose(np.asarray(I.open_image(data, name="bare")), a / 4095.0, atol=1e-7)
    # a text file that happens to start with the same two bytes is still refused
    with pytest.raises(DataError, match="not a recognised image format"):
        I.sniff_format(b"\x08\x00" + b"hello world, not an image", name="t.txt")
