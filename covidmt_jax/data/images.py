"""The one robust image decoder of the project.

Everything that reads a chest X-ray goes through :func:`open_image` (or its array wrappers
:func:`load_grey` / :func:`load_mask`):

* the format is detected from the magic bytes (the file name is ignored: WaCXR's transmitted
  files are JPEG named ``.png``): PNG, JPEG, DICOM, BMP, TIFF, GIF, WebP;
* DICOM goes through pydicom (the ``dicom`` extra): modality LUT (rescale slope/intercept),
  VOI LUT or window centre/width when present, MONOCHROME1 inverted, first frame of
  multi-frame files;
* EXIF orientation is applied;
* the image is fully decoded here, so a truncated or corrupt file fails with a
  :class:`~covidmt_jax.data.records.DataError` naming the file, not later in a worker;
* a decompression-bomb limit (``max_pixels``) is enforced before any pixel is decoded;
* modes are normalised: the result is ``"L"`` (8-bit grey), ``"RGB"`` (8-bit colour) or
  ``"F"`` (float32 grey in [0, 1] for data deeper than 8 bits, scaled by the real bit depth:
  a 16-bit PNG by 65535, a 12-bit DICOM by 4095). Alpha (RGBA, LA, palette transparency) is
  composited on BLACK: radiographs are white-on-black, so transparent padding becomes the
  dark background rather than a bright frame. CMYK / YCbCr / LAB / HSV become RGB, palette
  images RGB (or L when every palette entry is grey), 1-bit images L.

Arrays follow the project's conventions: grey images are float32 ``[H, W]`` in [0, 1].
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from covidmt_jax.data.records import DataError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FORMATS",
    "sniff_format",
    "read_bytes",
    "open_image",
    "load_grey",
    "load_mask",
    "to_uint8",
    "encode_png",
    "encode_jpeg",
    "image_size",
]

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

#: Default pixel limit: Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 178_956_970

FORMATS = ("png", "jpeg", "dicom", "bmp", "tiff", "gif", "webp")

# ITU-R 601-2 luma weights, the ones PIL uses for "RGB" -> "L".
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF", "webp": "WEBP"}

# Everything Pillow (and the codecs under it) raises for a broken file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError,
                  KeyError, TypeError, ZeroDivisionError, MemoryError)


def _label(src: ImageSource, name: str | None) -> str:
    if name is not None:
        return str(name)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return os.fspath(src)


def _reason(e: BaseException) -> str:
    """Short text of a decoder exception (Pillow's "cannot identify" names a BytesIO object)."""
    if isinstance(e, Image.UnidentifiedImageError):
        return "the decoder cannot parse the file structure"
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if not text or isinstance(e, (KeyError, IndexError, struct.error)) else text


def _bare_dicom(head: bytes) -> bool:
    """Whether ``head`` starts like a DICOM data set written without the 128-byte preamble and
    "DICM" (older or non-conformant writers): a group 0x0002 / 0x0008 element first, with an
    explicit two-letter upper-case VR or a 4-byte length (implicit VR little endian)."""
    if len(head) < 12 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    if head[4:6].isalpha() and head[4:6].isupper():
        return True
    element, length = struct.unpack_from("<HI", head, 2)
    return element < 0x0100 and length < 1024 and length % 2 == 0


def sniff_format(data: bytes, *, name: str | None = None) -> str:
    """Image format of encoded ``data`` from its magic bytes.

    Returns one of :data:`FORMATS`; raises :class:`DataError` (naming ``name``) otherwise.
    """
    head = bytes(data[:132])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if _bare_dicom(head):
        return "dicom"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM") and len(head) >= 18:
        # BITMAPFILEHEADER: the DIB header size at offset 14 is 12, 40, 52, 56, 64, 108 or 124.
        if struct.unpack_from("<I", head, 14)[0] in (12, 40, 52, 56, 64, 108, 124):
            return "bmp"
    if not head:
        raise DataError(name, "empty file")
    raise DataError(name, f"not a recognised image format (first bytes {head[:8]!r}); "
                          f"expected one of {', '.join(FORMATS)}")


def read_bytes(src: ImageSource, *, name: str | None = None) -> bytes:
    """The encoded bytes of ``src`` (a path or bytes); missing/unreadable files -> DataError."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    path = Path(src)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(_label(src, name), "file not found") from None
    except IsADirectoryError:
        raise DataError(_label(src, name), "is a directory, not an image file") from None
    except OSError as e:
        raise DataError(_label(src, name), f"cannot read file: {e.strerror or e}") from e


def open_image(src: ImageSource, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file or encoded bytes into a fully loaded PIL image.

    Args:
      src: path or encoded bytes.
      name: what error messages call the image (default: the path, or ``"<bytes>"``).
      max_pixels: decompression-bomb limit on width x height (DataError above it).

    Returns:
      A loaded ``PIL.Image.Image`` of mode ``"L"``, ``"RGB"`` or ``"F"`` (float32 in [0, 1]),
      EXIF orientation applied. See the module docstring for the conversions.
    """
    label = _label(src, name)
    data = read_bytes(src, name=label)
    fmt = sniff_format(data, name=label)
    if fmt == "dicom":
        return _open_dicom(data, label, max_pixels)
    return _open_pil(data, fmt, label, max_pixels)


def _check_pixels(size: tuple[int, int], label: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise DataError(label, f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise DataError(label, f"image of {w}x{h} = {w * h} pixels exceeds the decompression-bomb "
                               f"limit max_pixels={max_pixels}")


def _open_pil(data: bytes, fmt: str, label: str, max_pixels: int) -> Image.Image:
    try:
        # (no warnings.catch_warnings here: it is not thread-safe, and grain may use threads)
        im = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]])
    except Image.DecompressionBombError as e:
        raise DataError(label, f"decompression bomb: {e}") from None
    except _DECODE_ERRORS as e:
        raise DataError(label, f"truncated or corrupt {fmt.upper()} header: {_reason(e)}") from e
    _check_pixels(im.size, label, max_pixels)
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        im.load()
        bits = _bit_depth(im, fmt, data)
        im = ImageOps.exif_transpose(im)
    except _DECODE_ERRORS as e:
        raise DataError(label, f"truncated or corrupt image ({fmt.upper()}): {_reason(e)}") from e
    return _normalise_mode(im, bits, label)


def _bit_depth(im: Image.Image, fmt: str, data: bytes) -> int:
    """Bits per sample of the stored data (for scaling >8-bit grey to [0, 1])."""
    if fmt == "png" and len(data) >= 25:
        return int(data[24])  # IHDR bit depth
    if fmt == "tiff":
        bps = im.tag_v2.get(258) if hasattr(im, "tag_v2") else None
        if isinstance(bps, (tuple, list)):
            bps = bps[0]
        if bps:
            return int(bps)
    if im.mode.startswith("I;16"):
        return 16
    if im.mode == "I":
        return 32
    return 8


def _composite_on_black(im: Image.Image) -> Image.Image:
    """RGBA / LA -> RGB / L with alpha composited on black (documented project choice)."""
    if im.mode in ("RGBa", "La"):  # premultiplied already
        return im.convert("RGB" if im.mode == "RGBa" else "L")
    arr = np.asarray(im, dtype=np.float32)
    alpha = arr[..., -1:] / 255.0
    out = np.clip(np.round(arr[..., :-1] * alpha), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(out[..., 0] if im.mode == "LA" else out))


def _normalise_mode(im: Image.Image, bits: int, label: str) -> Image.Image:
    mode = im.mode
    if mode in ("L", "RGB"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        if has_alpha:
            im = _composite_on_black(im)
        arr = np.asarray(im)
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
            return Image.fromarray(np.ascontiguousarray(arr[..., 0]))
        return im
    if mode in ("RGBA", "RGBa", "LA", "La"):
        return _composite_on_black(im)
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return im.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if mode == "I" and arr.size and arr.min() < 0:
            raise DataError(label, f"signed integer pixels (min {arr.min()}) are not supported")
        bits = min(max(bits, 1), 32)
        scale = float(2 ** bits - 1)
        if arr.size and arr.max() > scale:
            raise DataError(label, f"pixel value {arr.max()} exceeds the declared {bits}-bit depth")
        return Image.fromarray((arr.astype(np.float64) / scale).astype(np.float32))
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise DataError(label, "float image contains NaN or infinite values")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        if lo < 0.0 or hi > 1.0:  # arbitrary float range: min-max normalise per image
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.float32))
    raise DataError(label, f"unsupported image mode {mode!r}")


# --- DICOM ---------------------------------------------------------------------------
def _import_pydicom():
    try:
        import pydicom  # noqa: F401
        from pydicom import pixels  # noqa: F401  (pydicom >= 3)
    except ImportError as e:
        raise ImportError("reading DICOM files needs pydicom >= 3: pip install 'covidmt_jax[dicom]'") from e
    return pydicom


def _set_read_transfer_syntax(ds) -> None:
    """A data set without a file meta group (no preamble) names no transfer syntax, which the
    pixel decoders need: use the encoding it was read with (uncompressed, as such files are)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = ds.original_encoding
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _open_dicom(data: bytes, label: str, max_pixels: int) -> Image.Image:
    pydicom = _import_pydicom()
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:  # force: a data set without the preamble (sniff_format accepted its first element)
        ds = pydicom.dcmread(io.BytesIO(data), force=bytes(data[128:132]) != b"DICM")
    except Exception as e:  # pydicom raises many types (InvalidDicomError, struct.error ...)
        raise DataError(label, f"truncated or corrupt DICOM header: {type(e).__name__}: {e}") from e
    if "PixelData" not in ds:
        raise DataError(label, "DICOM file has no pixel data")
    _set_read_transfer_syntax(ds)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        spp = int(ds.get("SamplesPerPixel", 1))
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    except (AttributeError, TypeError, ValueError) as e:
        raise DataError(label, f"DICOM lacks valid image attributes: {e}") from e
    _check_pixels((cols, rows), label, max_pixels)
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing codec, truncated pixel data ...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        tsname = getattr(ts, "name", ts)
        raise DataError(label, f"cannot decode DICOM pixel data (transfer syntax {tsname}): "
                               f"{type(e).__name__}: {e}") from e
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    if photometric == "PALETTE COLOR":  # indices into a colour table: look them up (RGB)
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise DataError(label, f"cannot apply the DICOM palette (PALETTE COLOR): {type(e).__name__}: {e}") from e
        if arr.dtype != np.uint8:  # 16-bit palette entries
            arr = to_uint8(arr.astype(np.float64) / 65535.0)
        return Image.fromarray(np.ascontiguousarray(arr))
    if arr.ndim == 2 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(label, f"unsupported DICOM PhotometricInterpretation {photometric!r} for a "
                               "single-sample image (expected MONOCHROME1, MONOCHROME2 or PALETTE COLOR)")
    if spp == 3 or arr.ndim == 3:
        if arr.dtype != np.uint8:
            arr = to_uint8(arr.astype(np.float64) / float(2 ** bits_stored - 1))
        return Image.fromarray(np.ascontiguousarray(arr))
    if arr.ndim != 2:
        raise DataError(label, f"unexpected DICOM pixel array shape {arr.shape}")

    lo_raw = -(2 ** (bits_stored - 1)) if signed else 0
    hi_raw = 2 ** (bits_stored - 1) - 1 if signed else 2 ** bits_stored - 1
    has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    try:
        if not has_rescale and not has_voi and not signed and bits_stored <= 8:
            out = arr.astype(np.uint8)
            if photometric == "MONOCHROME1":
                out = 255 - out
            return Image.fromarray(np.ascontiguousarray(out))
        values = apply_modality_lut(arr, ds).astype(np.float64) if has_rescale else arr.astype(np.float64)
        if has_voi:
            if "VOILUTSequence" in ds:
                # LUT tables index integer stored values; output range = the table's own range
                lut_in = np.rint(values).astype(np.int64) if has_rescale else arr
                out = apply_voi_lut(lut_in, ds, index=0).astype(np.float64)
                span = np.arange(lo_raw, hi_raw + 1)
                if has_rescale:
                    span = np.rint(apply_modality_lut(span, ds)).astype(np.int64)
                table = apply_voi_lut(span, ds, index=0)
                lo, hi = float(table.min()), float(table.max())
            else:
                center = float(_first(ds.WindowCenter))
                width = float(_first(ds.WindowWidth))
                if width < 1:
                    raise DataError(label, f"invalid DICOM WindowWidth {width}")
                # DICOM PS3.3 C.11.2.1.2 linear window, output in [0, 1].
                out = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
                lo, hi = 0.0, 1.0
        else:
            out = values
            ends = np.array([lo_raw, hi_raw], np.float64)
            if has_rescale:
                ends = apply_modality_lut(np.array([lo_raw, hi_raw]), ds).astype(np.float64)
            lo, hi = float(ends.min()), float(ends.max())
    except DataError:
        raise
    except Exception as e:
        raise DataError(label, f"cannot apply DICOM LUT / windowing: {type(e).__name__}: {e}") from e
    if hi <= lo:
        raise DataError(label, f"degenerate DICOM value range [{lo}, {hi}]")
    grey = np.clip((out - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        grey = 1.0 - grey
    return Image.fromarray(np.ascontiguousarray(grey))


def _first(v):
    """First value of a possibly multi-valued DICOM element."""
    try:
        return v[0]
    except (TypeError, IndexError):
        return v


# --- arrays --------------------------------------------------------------------------
def image_hw(size: int | Sequence[int], *, what: str = "image_size", minimum: int = 1) -> tuple[int, int]:
    """``(H, W)`` from an int (a square) or an ``(H, W)`` pair; every size in the package
    goes through here. Raises ValueError naming ``what`` unless both are integers
    ``>= minimum``."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be an int or (height, width), got {size!r}") from None
    if h < minimum or w < minimum:
        raise ValueError(f"{what} must be at least {minimum} px, got {size!r}")
    return h, w


def _grey_image(im: Image.Image) -> Image.Image:
    """Mode "F" grey image in [0, 1] from an "L" / "RGB" / "F" image (601 luma for RGB)."""
    if im.mode == "F":
        return im
    arr = np.asarray(im, dtype=np.float32)
    if im.mode == "RGB":
        arr = arr @ _LUMA
    elif im.mode != "L":
        raise ValueError(f"expected mode L, RGB or F, got {im.mode!r}")
    return Image.fromarray((arr / 255.0).astype(np.float32))


def load_grey(src: ImageSource, *, name: str | None = None, size: int | tuple[int, int] | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``src`` to a grey float32 array ``[H, W]`` in [0, 1].

    RGB becomes grey with the ITU-R 601-2 luma weights (0.299, 0.587, 0.114, as PIL's "L",
    without its rounding); >8-bit data keeps its precision. ``size`` (int or ``(height,
    width)``) resizes with PIL's antialiased bilinear filter on the float image.
    """
    im = _grey_image(open_image(src, name=name, max_pixels=max_pixels))
    if size is not None:
        h, w = image_hw(size, what="size")
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
    return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)


def load_mask(src: ImageSource, *, name: str | None = None, threshold: float = 127,
              size: int | tuple[int, int] | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a lung-mask image to bool ``[H, W]``: lung where value > ``threshold`` on the
    8-bit scale (0-255; >8-bit masks are compared on the same scale). With ``size`` the grey
    mask is resized (antialiased bilinear) before thresholding."""
    im = open_image(src, name=name, max_pixels=max_pixels)
    if size is None and im.mode == "L":
        return np.asarray(im) > threshold
    if size is None and im.mode == "RGB":
        return np.asarray(im.convert("L")) > threshold
    g = _grey_image(im)
    if size is not None:
        h, w = image_hw(size, what="size")
        if g.size != (w, h):
            g = g.resize((w, h), Image.BILINEAR)
    # Half a grey level above the threshold so 8-bit data round-trips exactly.
    return np.asarray(g, dtype=np.float32) * 255.0 > threshold + 0.5 - 1e-3


def image_size(src: ImageSource, *, name: str | None = None) -> tuple[int, int]:
    """(height, width) of an image without decoding its pixels (DICOM: Rows, Columns)."""
    label = _label(src, name)
    data = read_bytes(src, name=label)
    fmt = sniff_format(data, name=label)
    if fmt == "dicom":
        pydicom = _import_pydicom()
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        except Exception as e:
            raise DataError(label, f"truncated or corrupt DICOM header: {type(e).__name__}: {e}") from e
    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]]) as im:
            w, h = im.size
    except _DECODE_ERRORS + (Image.DecompressionBombError,) as e:
        raise DataError(label, f"truncated or corrupt {fmt.upper()} header: {_reason(e)}") from e
    return h, w


# --- encoding ------------------------------------------------------------------------
def to_uint8(x: np.ndarray) -> np.ndarray:
    """uint8 from a float array in [0, 1] (rounded, clipped), bool (0/255) or uint8 (as is)."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if x.dtype == bool:
        return x.astype(np.uint8) * 255
    if np.issubdtype(x.dtype, np.floating):
        return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    raise TypeError(f"to_uint8 expects float in [0, 1], bool or uint8, got {x.dtype}")


def _to_pil(x: np.ndarray | Image.Image, *, bits: int = 8) -> Image.Image:
    """PIL image from ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` arrays (float [0, 1], bool,
    uint8, uint16) or a PIL image (returned as is)."""
    if isinstance(x, Image.Image):
        return x
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"expected an image array [H, W], [H, W, 1] or [H, W, 3], got shape {a.shape}")
    if a.dtype == np.uint16 or (bits == 16 and np.issubdtype(a.dtype, np.floating)):
        if a.ndim == 3:
            raise ValueError("16-bit encoding supports grey [H, W] arrays only")
        if a.dtype != np.uint16:
            a = np.clip(np.round(a * 65535.0), 0, 65535).astype(np.uint16)
        return Image.fromarray(a)
    a = to_uint8(a)
    return Image.fromarray(np.ascontiguousarray(a))


def encode_png(x: np.ndarray | Image.Image, *, bits: int = 8, compress_level: int = 6) -> bytes:
    """PNG bytes of an image array or PIL image. ``bits=16`` stores float grey as 16-bit."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    buf = io.BytesIO()
    _to_pil(x, bits=bits).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(x: np.ndarray | Image.Image, *, quality: int = 95, subsampling: int | str = 0,
                optimize: bool = False, progressive: bool = False) -> bytes:
    """Baseline JPEG bytes (no metadata) of an 8-bit grey / RGB array or PIL image.

    ``subsampling``: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0 (Pillow's convention), ignored for grey.
    Float/16-bit inputs are reduced to 8 bits first.
    """
    im = _to_pil(x)
    if im.mode == "F":
        im = Image.fromarray(to_uint8(np.clip(np.asarray(im), 0.0, 1.0)))
    elif im.mode.startswith("I;16"):
        im = Image.fromarray(to_uint8(np.asarray(im).astype(np.float64) / 65535.0))
    elif im.mode not in ("L", "RGB"):
        im = _normalise_mode(im, 8, "<image>")
    buf = io.BytesIO()
    kwargs = dict(quality=int(quality), optimize=optimize, progressive=progressive)
    if im.mode == "RGB":
        kwargs["subsampling"] = subsampling
    im.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()
