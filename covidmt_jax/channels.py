"""Messaging-channel simulator: the R(x) of the PI score.

A :class:`Channel` reproduces what a messaging app does to a photo before the recipient sees
it: decode to an 8-bit bitmap, apply the EXIF orientation, cap the long side, re-encode as a
baseline JPEG at a fixed quality with 4:2:0 chroma subsampling, and drop the metadata.

Presets (``PRESETS`` / :func:`get_channel`):

* ``whatsapp``    — long side capped at 1600 px, JPEG quality 80 (an ESTIMATE, see below);
* ``whatsapp_hd`` — the "HD" send option: long side capped at 4096 px, same estimate;
* ``telegram``    — long side capped at 1280 px, quality 80 (from the Android client source);
* ``jpeg(q, max_side=None, subsampling="4:2:0")`` — plain JPEG recompression.

Calibrate before you trust a number: the apps do not publish their encoder settings, and
they change between client versions. If you hold files that really went through the app
(WaCXR's ``covid_binary_test_whatsapp`` folder, for instance), run
:func:`estimate_jpeg_quality` on a few of them and pass the result as ``quality=``::

    q = np.median([estimate_jpeg_quality(p) for p in received_files])
    channel = get_channel("whatsapp", quality=round(q))

Colour: a phone sends an RGB (YCbCr, 3-component) JPEG even for a grey radiograph, so grey
input is encoded as RGB with 4:2:0 subsampling by default (``color_mode="RGB"``); for a grey
image the chroma planes are flat and the decoded image stays grey, but the file has the
structure (and the luminance table) of what the app sends. ``color_mode="L"`` writes a
one-component grey JPEG instead.

Bit depth: the apps only accept 8-bit bitmaps, so 16-bit and float images are reduced to 8
bits first, with the decoder's scaling (:mod:`covidmt_jax.data.images`: a 16-bit PNG by
65535, a 12-bit DICOM by 4095, float in [0, 1]).
"""
from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from covidmt_jax.data import images as _images
from covidmt_jax.data.records import DataError

__all__ = [
    "Channel",
    "PRESETS",
    "SUBSAMPLINGS",
    "JPEG_MAGIC",
    "STD_LUMINANCE_QTABLE",
    "WHATSAPP_DEFAULT_QUALITY",
    "whatsapp",
    "whatsapp_hd",
    "telegram",
    "jpeg",
    "get_channel",
    "available",
    "estimate_jpeg_quality",
    "ijg_quantization_table",
    "is_jpeg",
]

ImageInput = Union[Image.Image, bytes, bytearray, memoryview, str, os.PathLike]

#: Every JPEG file starts with SOI (FF D8) followed by a marker (FF xx).
JPEG_MAGIC = b"\xff\xd8\xff"

#: Chroma subsampling names -> Pillow's ``subsampling`` codes.
SUBSAMPLINGS = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}

#: ITU-T T.81 (JPEG) Annex K, Table K.1: the luminance quantisation table, natural
#: (row-major) order. libjpeg/IJG scales it by the quality factor (``jpeg_quality_scaling``).
STD_LUMINANCE_QTABLE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
], dtype=np.float64)

#: Default WhatsApp quality. WhatsApp does not publish it: this is an estimate (see
#: :func:`whatsapp`). Calibrate with :func:`estimate_jpeg_quality` on real received files.
WHATSAPP_DEFAULT_QUALITY = 80


@dataclass(frozen=True)
class Channel:
    """One messaging channel: resize rule + JPEG encoder settings.

    Attributes:
      name: preset name (used for folder names by the CLI).
      max_side: cap on the long side in pixels (aspect ratio kept); ``None`` = no cap.
      quality: IJG/libjpeg quality factor 1..100 (Pillow's ``quality``).
      subsampling: chroma subsampling, ``"4:2:0"``, ``"4:2:2"`` or ``"4:4:4"`` (RGB only).
      keep_metadata: keep EXIF (orientation tag removed, as it is applied) and the ICC
        profile; the messaging apps strip them, so presets use ``False``.
      progressive: progressive instead of baseline JPEG.
      upscale: also enlarge images whose long side is below ``max_side`` to ``max_side``
        (the apps never do; presets use ``False``).
      color_mode: ``"RGB"`` (3-component JPEG, what a phone sends) or ``"L"`` (grey JPEG).
      resample: resize filter: ``"bilinear"`` (default, close to Android's filtered bitmap
        scaling), ``"bicubic"``, ``"lanczos"``, ``"area"`` or ``"nearest"``.
    """

    name: str
    max_side: int | None
    quality: int
    subsampling: str = "4:2:0"
    keep_metadata: bool = False
    progressive: bool = False
    upscale: bool = False
    color_mode: str = "RGB"
    resample: str = "bilinear"

    def __post_init__(self):
        if isinstance(self.quality, bool) or int(self.quality) != self.quality or not 1 <= self.quality <= 100:
            raise ValueError(f"channel {self.name!r}: quality must be an integer in 1..100, got {self.quality!r}")
        object.__setattr__(self, "quality", int(self.quality))
        if self.max_side is not None:
            if int(self.max_side) != self.max_side or self.max_side < 1:
                raise ValueError(f"channel {self.name!r}: max_side must be a positive integer or None, "
                                 f"got {self.max_side!r}")
            object.__setattr__(self, "max_side", int(self.max_side))
        if self.subsampling not in SUBSAMPLINGS:
            raise ValueError(f"channel {self.name!r}: subsampling must be one of {sorted(SUBSAMPLINGS)}, "
                             f"got {self.subsampling!r}")
        if self.color_mode not in ("RGB", "L"):
            raise ValueError(f"channel {self.name!r}: color_mode must be 'RGB' or 'L', got {self.color_mode!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"channel {self.name!r}: resample must be one of {sorted(_RESAMPLE)}, "
                             f"got {self.resample!r}")
        if self.upscale and self.max_side is None:
            raise ValueError(f"channel {self.name!r}: upscale=True needs a max_side")

    # --- geometry ------------------------------------------------------------------------
    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the channel delivers for an input of ``width`` x ``height``."""
        if self.max_side is None:
            return width, height
        long_side = max(width, height)
        if long_side <= self.max_side and not (self.upscale and long_side < self.max_side):
            return width, height
        scale = self.max_side / long_side
        return max(1, round(width * scale)), max(1, round(height * scale))

    # --- the channel -----------------------------------------------------------------------
    def prepare(self, image: ImageInput, *, name: str | None = None) -> Image.Image:
        """The 8-bit bitmap the app would encode: decoded, oriented, 8-bit, resized, in
        ``color_mode``, without metadata. Paths / bytes go through :func:`covidmt_jax.data.images.open_image`
        (bad files raise :class:`DataError` naming the file)."""
        src = _open_any(image, name=name)
        im = _to_8bit(src)
        size = self.output_size(*im.size)
        if size != im.size:
            im = im.resize(size, _RESAMPLE[self.resample])
        if im.mode != self.color_mode:
            im = im.convert(self.color_mode)
        if im is src:
            im = im.copy()
        im.info = {}  # a bare bitmap: Pillow would otherwise re-save e.g. a JPEG comment
        return im

    def transmit(self, image: ImageInput, *, name: str | None = None) -> bytes:
        """JPEG bytes the recipient gets for ``image`` (a PIL image, encoded bytes or a path).

        Raises :class:`DataError` (naming the file, or ``name``) for unreadable input.
        """
        im = self.prepare(image, name=name)
        kwargs: dict = dict(quality=self.quality, progressive=self.progressive, optimize=False)
        if im.mode == "RGB":
            kwargs["subsampling"] = SUBSAMPLINGS[self.subsampling]
        if self.keep_metadata:
            kwargs.update(_metadata(image))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", **kwargs)
        return buf.getvalue()

    def transmit_array(self, x: np.ndarray, *, keep_size: bool = False) -> np.ndarray:
        """Round trip of a grey image through the channel.

        Args:
          x: float ``[H, W]`` (or ``[H, W, 1]``) grey in [0, 1]; uint8 is accepted as is.
          keep_size: resize the received image back to ``[H, W]`` (bilinear) when the
            channel changed its size; by default the received size is returned.

        Returns:
          float32 ``[H', W']`` (or ``[H', W', 1]``) in [0, 1]: the decoded received JPEG,
          grey by the ITU-R 601 luma weights (as :func:`~covidmt_jax.data.images.load_grey`).
        """
        a = np.asarray(x)
        squeeze = a.ndim == 3 and a.shape[-1] == 1
        if squeeze:
            a = a[..., 0]
        if a.ndim != 2:
            raise ValueError(f"transmit_array expects a grey image [H, W] or [H, W, 1], got shape {np.shape(x)}")
        if np.issubdtype(a.dtype, np.floating) and a.size and not np.isfinite(a).all():
            raise ValueError("transmit_array: image contains NaN or infinite values")
        if np.issubdtype(a.dtype, np.floating):
            a = np.clip(a, 0.0, 1.0)
        im = Image.fromarray(np.ascontiguousarray(_images.to_uint8(a)), mode="L")
        out = _images.load_grey(self.transmit(im), name=f"<{self.name} round trip>",
                                size=a.shape if keep_size else None)
        return out[..., None] if squeeze else out

    def describe(self) -> str:
        cap = f"long side <= {self.max_side} px" if self.max_side else "no resize"
        kind = "progressive" if self.progressive else "baseline"
        meta = "metadata kept" if self.keep_metadata else "metadata stripped"
        return f"{self.name}: {cap}, {kind} JPEG q={self.quality} {self.subsampling} {self.color_mode}, {meta}"


# --- helpers -------------------------------------------------------------------------------
def _open_any(image: ImageInput, *, name: str | None) -> Image.Image:
    if isinstance(image, Image.Image):
        try:
            image.load()
            return ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(name or "<PIL image>", f"cannot load image: {e}") from e
    if isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
        return _images.open_image(image, name=name)
    raise TypeError(f"expected a PIL image, encoded bytes or a path, got {type(image).__name__}")


def _to_8bit(im: Image.Image) -> Image.Image:
    """``L`` / ``RGB`` image from any PIL image (apps take 8-bit bitmaps only).

    ``F`` is taken as [0, 1] (the decoder's convention; clipped); 16-bit modes are scaled by
    65535; other modes go through the decoder's mode normalisation.
    """
    if im.mode in ("L", "RGB"):
        return im
    if im.mode == "F":
        return Image.fromarray(_images.to_uint8(np.clip(np.asarray(im, np.float32), 0.0, 1.0)))
    bits = 16 if (im.mode.startswith("I;16") or im.mode == "I") else 8
    return _to_8bit(_images._normalise_mode(im, bits, "<PIL image>"))


def _metadata(image: ImageInput) -> dict:
    """EXIF (orientation removed: it has been applied) and ICC profile of the input."""
    try:
        if isinstance(image, Image.Image):
            src = image
        else:
            src = Image.open(io.BytesIO(_images.read_bytes(image)))
        exif = src.getexif()
        icc = src.info.get("icc_profile")
    except (OSError, ValueError, SyntaxError):
        return {}
    out = {}
    if exif:
        exif.pop(0x0112, None)  # Orientation
        out["exif"] = exif.tobytes()
    if icc:
        out["icc_profile"] = icc
    return out


def is_jpeg(data: bytes) -> bool:
    """True when ``data`` starts with the JPEG SOI marker."""
    return bytes(data[:3]) == JPEG_MAGIC


# --- presets -------------------------------------------------------------------------------
def whatsapp(quality: int = WHATSAPP_DEFAULT_QUALITY, **overrides) -> Channel:
    """WhatsApp's standard image send.

    What is known (the behaviour is widely reported, not documented by WhatsApp, and changes
    with client versions):

    * the long side is scaled down to 1600 px, and small images are never enlarged;
    * every image is re-encoded as JPEG (a PNG arrives as a JPEG, with its original name when
      saved from a chat export, as in WaCXR), EXIF / ICC metadata are stripped;
    * 4:2:0 chroma subsampling, baseline (newer clients may send progressive JPEG, see US
      patent 11,178,079 B1 on WhatsApp's progressive scan script: pass ``progressive=True``);
    * the paper behind this project measured 6.7 GB of originals arriving as 351 MB (~95 %).

    The quality is NOT published. Image-forensics studies that read the quantisation tables
    of WhatsApp-received JPEGs report tables roughly equivalent to IJG quality 75-80,
    depending on platform and client version. We default to 80, the top of that range and
    the value Android apps conventionally pass to ``Bitmap.compress`` (Telegram does too):
    it is the milder end, so a PI score measured with it is, if anything, a lower bound. It
    is an estimate: calibrate with :func:`estimate_jpeg_quality` on files you received.
    """
    return dataclasses.replace(Channel("whatsapp", 1600, quality), **overrides)


def whatsapp_hd(quality: int = WHATSAPP_DEFAULT_QUALITY, **overrides) -> Channel:
    """WhatsApp's "HD" image send (2023+): long side capped at 4096 px instead of 1600.

    Reported by users and the press when the HD option shipped (August 2023); the quality
    is the same unpublished estimate as :func:`whatsapp` — calibrate with
    :func:`estimate_jpeg_quality`.
    """
    return dataclasses.replace(Channel("whatsapp_hd", 4096, quality), **overrides)


def telegram(quality: int = 80, **overrides) -> Channel:
    """Telegram's compressed photo send (not "send as file").

    Source: Telegram for Android (github.com/DrKLO/Telegram), ``SendMessagesHelper``
    (``generatePhotoSizes``) calls ``ImageLoader.scaleAndSaveImage(bitmap,
    AndroidUtilities.getPhotoSize(), AndroidUtilities.getPhotoSize(), 80, false, 101, 101)``
    and ``AndroidUtilities.getPhotoSize()`` returns 1280: the bitmap is scaled so that both
    sides fit 1280 px (never enlarged) and compressed with ``Bitmap.compress(JPEG, 80)``.
    Android's JPEG encoder (libjpeg-turbo via Skia) writes baseline 4:2:0 without EXIF.
    Newer clients add a high-quality option (2560 px) and may use other qualities:
    calibrate with :func:`estimate_jpeg_quality` when you have received files.
    """
    return dataclasses.replace(Channel("telegram", 1280, quality), **overrides)


def jpeg(quality: int, max_side: int | None = None, subsampling: str = "4:2:0", **overrides) -> Channel:
    """Plain JPEG recompression at IJG ``quality`` (Pillow/libjpeg), optional long-side cap."""
    return dataclasses.replace(Channel(f"jpeg{int(quality)}", max_side, quality, subsampling=subsampling),
                               **overrides)


#: Preset name -> factory (called with keyword overrides).
PRESETS = {"whatsapp": whatsapp, "whatsapp_hd": whatsapp_hd, "telegram": telegram, "jpeg": jpeg}


def available() -> list[str]:
    return sorted(PRESETS)


def get_channel(name: str, **overrides) -> Channel:
    """Build a preset by name with field overrides: ``get_channel("whatsapp", quality=75)``.

    ``"jpeg"`` needs ``quality=``; ``"jpegNN"`` (e.g. ``"jpeg75"``) is ``jpeg(NN)``.
    ``None`` overrides are ignored (convenient for CLIs).
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    key = name.lower()
    if key not in PRESETS and key.startswith("jpeg") and key[4:].isdigit():
        overrides.setdefault("quality", int(key[4:]))
        key = "jpeg"
    if key not in PRESETS:
        raise KeyError(f"unknown channel preset {name!r}; available: {available()} (or 'jpegNN')")
    if key == "jpeg" and "quality" not in overrides:
        raise ValueError("the 'jpeg' preset needs a quality (e.g. get_channel('jpeg', quality=75) or 'jpeg75')")
    fields = {f.name for f in dataclasses.fields(Channel)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown channel field(s) {sorted(unknown)}; fields: {sorted(fields)}")
    return PRESETS[key](**overrides)


# --- quality estimation ----------------------------------------------------------------------
def ijg_quantization_table(quality: float) -> np.ndarray:
    """The luminance table libjpeg writes at ``quality`` (float64 [64], natural order).

    IJG scaling (jcparam.c): S = 5000 / q for q < 50, 200 - 2 q otherwise; entry =
    clip(floor((base * S + 50) / 100), 1, 255) (baseline, 8-bit tables).
    """
    q = float(np.clip(quality, 1, 100))
    scale = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
    return np.clip(np.floor((STD_LUMINANCE_QTABLE * scale + 50.0) / 100.0), 1, 255)


def estimate_jpeg_quality(src: str | os.PathLike | bytes) -> float:
    """IJG-equivalent quality of a JPEG file, from its luminance quantisation table.

    Inverts libjpeg's scaling of the Annex K luminance table: the scale S (percent) is the
    least-squares fit of ``table ~ base * S / 100`` over the 64 entries (entries clipped at
    1 or 255 are left out when others remain), then q = 5000 / S for S > 100, (200 - S) / 2
    otherwise, clipped to [1, 100]. For files written by libjpeg-based encoders
    (Pillow, Android, most phones) the result is within about one unit of the quality used;
    for encoders with their own tables it is the IJG quality with the closest table.

    Raises :class:`DataError` for a missing file, a non-JPEG, or a JPEG without tables.
    """
    label = "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
    data = _images.read_bytes(src, name=label)
    if not is_jpeg(data):
        raise DataError(label, "not a JPEG file (no FF D8 FF start marker); cannot estimate its quality")
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            tables = dict(getattr(im, "quantization", None) or {})
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(label, f"truncated or corrupt JPEG header: {e}") from e
    if not tables:
        raise DataError(label, "JPEG has no quantisation table (DQT)")
    table = np.asarray(tables[min(tables)], dtype=np.float64)
    if table.shape != (64,):
        raise DataError(label, f"unexpected quantisation table of {table.size} entries")
    base = STD_LUMINANCE_QTABLE
    free = (table > 1) & (table < 255)
    use = free if free.sum() >= 8 else np.ones(64, bool)
    scale = 100.0 * float(np.dot(table[use], base[use]) / np.dot(base[use], base[use]))
    if scale <= 0:
        return 100.0
    q = 5000.0 / scale if scale > 100.0 else (200.0 - scale) / 2.0
    return float(np.clip(q, 1.0, 100.0))
