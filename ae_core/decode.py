"""Bytes -> uint8 pixels at the model's input size, or a DecodeError with a reason.

Content decides what an object is, never its name. This module imports only Pillow and numpy,
so decode worker processes start fast.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError

from ae_core.errors import DecodeError

# Pillow's own bomb check only warns below twice its limit; we enforce our limit explicitly.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

DECOMPRESSION_BOMB = "decompression_bomb"  # the reject reason of an image over the pixel limit
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_BACKGROUND = 255  # transparent pixels are composited onto white, as viewers show them


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input; stored in the checkpoint so encoding never drifts."""

    image_size: int
    channels: Literal[1, 3]
    resize: Literal["stretch", "crop", "pad"] = "stretch"
    max_image_pixels: int = 100_000_000

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Header:
    width: int
    height: int
    mode: str
    format: str


@dataclass
class Decoded:
    pixels: np.ndarray  # (channels, size, size) uint8
    width: int
    height: int
    mode: str
    format: str


def fingerprint(data: bytes) -> str:
    """Content fingerprint of an object's bytes (BLAKE2b, 128 bits, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise DecodeError("empty", "the object has 0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise DecodeError("not_an_image", "content is not an image format Pillow can read") from err
    except Image.DecompressionBombError as err:
        raise DecodeError(DECOMPRESSION_BOMB, str(err)) from err
    except Exception as err:  # noqa: BLE001 - any other failure of a header parse is per-object
        raise DecodeError("corrupt_header", f"{type(err).__name__}: {err}") from err
    if img.width * img.height > max_pixels:
        w, h = _displayed_size(img, _orientation(img))  # as the table's width and height give it
        raise DecodeError(DECOMPRESSION_BOMB, f"{w}x{h} pixels exceeds the limit of "
                          f"{max_pixels} (max_image_pixels; ae run --max-image-pixels)")
    if img.width < 1 or img.height < 1:
        raise DecodeError("corrupt_header", f"invalid size {img.width}x{img.height}")
    return img


def might_be_image(head: bytes) -> bool:
    """Whether an object whose first bytes are `head` could be an image Pillow reads: Pillow
    opens the head, or one of its formats recognises the signature (a JPEG or a TIFF whose
    metadata runs past the head). False for a video or an archive, which need not be read whole."""
    try:
        with Image.open(io.BytesIO(head)):
            return True
    except Exception:  # noqa: BLE001 - anything Pillow raises on a prefix means "not from this part"
        pass
    Image.init()
    return any(accept is not None and accept(head[:16]) for _, accept in Image.OPEN.values())


def _orientation(img: Image.Image) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": Pillow's warning, printed raw on stderr
            return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block should not reject a readable image
        return 1


def read_header(data: bytes, max_pixels: int = 100_000_000) -> Header:
    """Size (as displayed, EXIF orientation applied) and mode, without decoding pixels."""
    img = _open(data, max_pixels)
    w, h = _displayed_size(img, _orientation(img))
    return Header(w, h, img.mode, img.format or "unknown")


def _displayed_size(img: Image.Image, orientation: int) -> tuple[int, int]:
    """(width, height) as shown, EXIF orientation applied. Pillow's TIFF reader reports that
    already (its stored size, `_tile_size`, is then the other way round): not swapped twice."""
    w, h = img.size
    if orientation in _ROTATED_ORIENTATIONS and tuple(getattr(img, "_tile_size", img.size)) == (w, h):
        w, h = h, w
    return w, h


def _to_8bit(img: Image.Image) -> Image.Image:
    """High bit-depth and float modes -> 'L' with a fixed or per-image scale. 32-bit integer
    ('I', as from a TIFF or PGM) holding 0..255 is taken as 8-bit values (a 16-bit image that
    dark is black at 8 bits anyway); holding up to 65535, as 16-bit."""
    arr = np.asarray(img)
    lo, hi = (int(arr.min(initial=0)), int(arr.max(initial=0))) if img.mode == "I" else (0, 0)
    if img.mode == "I" and 0 <= lo and hi <= 255:
        out = arr.astype(np.uint8)
    elif img.mode.startswith("I;16") or (img.mode == "I" and 0 <= lo and hi <= 65535):
        out = (arr >> 8).astype(np.uint8)  # in the array's own type: no 4-byte copy of a large image
    else:
        # NaN and +-inf ("no reading" in a depth map) are black, and left out of the range: one
        # inf made the whole image black (its range overflowed); float32 throughout, not float64
        arr = np.where(np.isfinite(arr), arr, np.float32(np.nan)).astype(np.float32, copy=False)
        if arr.size and np.isnan(arr).all():
            raise DecodeError("decode_error", f"every pixel of this {img.mode} image is NaN or infinite: no reading")
        lo, hi = (float(np.nanmin(arr)), float(np.nanmax(arr))) if arr.size else (0.0, 0.0)
        if img.mode == "F" and 0.0 <= lo and hi <= 1.0:
            lo, hi = 0.0, 1.0  # already on the [0, 1] scale: kept, not stretched
        elif hi <= lo:
            hi = lo + 1.0  # one value: black (where it is 0 on that scale, as a flat 0..1 image)
        arr -= lo
        arr *= 255.0 / (hi - lo)
        arr += 0.5
        out = np.clip(np.nan_to_num(arr, copy=False), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _normalise_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> 'L' or 'RGB', alpha composited onto a white background; so is a
    transparent colour (a PNG's tRNS key) in palette, gray, 16-bit gray and RGB images."""
    key = img.info.get("transparency")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        clear = np.asarray(img) == key if isinstance(key, int) else None
        img = _to_8bit(img)
        if clear is not None and clear.any():
            img = Image.merge("LA", (img, Image.fromarray(np.where(clear, 0, 255).astype(np.uint8), "L")))
    elif img.mode == "P" or (key is not None and img.mode in ("L", "RGB")):
        img = img.convert("RGBA" if key is not None else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa", "RGBA") or "A" in img.getbands():
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (_BACKGROUND,) * 3 + (255,))
        img = Image.alpha_composite(bg, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


_EARLY_GAP = 4  # a large image is reduced first to no less than this many times the input side


def _reduce_early(img: Image.Image, size: int) -> Image.Image:
    """A large float (all finite; an integer image's range picks its scale) or alpha image averaged down (Pillow's reduce, in its own mode)
    before the conversions to 8 bits and the compositing onto white, which copy it at full size
    in wider types: a 10,000 x 10,000 float image took 2.9 GB to decode, an RGBA one 2 GB.
    Alpha is averaged premultiplied, which commutes with compositing. The resize after it
    reduces the rest of the way, as it would have."""
    factor = min(img.size) // (size * _EARLY_GAP)
    if factor < 2 or "transparency" in img.info:
        return img
    if img.mode == "F" and np.isfinite(np.asarray(img)).all():  # a NaN or inf would spread over its block
        return img.reduce(factor)
    if img.mode in ("RGBA", "LA"):
        premultiplied = {"RGBA": "RGBa", "LA": "La"}[img.mode]
        return img.convert(premultiplied).reduce(factor).convert(img.mode)
    return img


def _resize(img: Image.Image, size: int, how: str) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img  # already the model's size: any resize mode is the identity
    if how == "stretch":
        return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if how == "crop":  # the centred square straight to the model's size: never the whole image
        side = min(w, h)  # scaled up first (a 1 x 200,000 strip would take gigabytes)
        left, top = (w - side) // 2, (h - side) // 2
        return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                          reducing_gap=3.0)
    scale = size / max(w, h)  # pad: whole image inside, centred on black
    rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((rw, rh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    canvas = Image.new(img.mode, (size, size))
    canvas.paste(img, ((size - rw) // 2, (size - rh) // 2))
    return canvas


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_RAWMODES = {0: "L", 2: "RGB"}  # 8-bit greyscale and truecolour, no alpha, no palette
# Chunks Pillow reads that cannot change the pixels, with the shortest body Pillow accepts.
# Every other chunk Pillow reads (text, iCCP, tRNS, PLTE, eXIf, animation) sends the image to
# Image.open: those can carry an orientation, fail Pillow's own checks, or change the pixels.
_PNG_CHECKED = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9}
_PILLOW_READS = {name[6:].encode() for name in dir(PngImagePlugin.PngStream) if name.startswith("chunk_")}


@dataclass(frozen=True)
class _PlainPng:
    rawmode: str
    width: int
    height: int
    stream: bytes  # the zlib stream of the image data (all IDAT chunks)


def _plain_png(data: bytes, max_pixels: int) -> _PlainPng | None:
    """The image data of a plain PNG: 8-bit greyscale or RGB, not interlaced, and no chunk that
    Pillow reads other than the four in `_PNG_CHECKED` (so no transparency, palette, animation,
    text or orientation). None for anything else, and for anything damaged, so that
    `Image.open` handles and classifies it."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR" \
            or int.from_bytes(data[8:12], "big") < 13:
        return None
    width, height, depth, ctype, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    rawmode = _PNG_RAWMODES.get(ctype)
    if (rawmode is None or depth != 8 or compression or filtering or interlace or not 0 < width * height <= max_pixels):
        return None
    idat: list[bytes] = []
    pos, end, idat_end = 8, len(data), 0
    while True:
        if pos + 12 > end:
            return None  # truncated
        length, kind = struct.unpack_from(">I4s", data, pos)
        body_end = pos + 8 + length
        if body_end + 4 > end:
            return None
        if kind == b"IDAT":
            if idat and idat_end != pos:
                return None  # image data split by another chunk: Pillow stops at the first gap
            idat.append(data[pos + 8:body_end])
            idat_end = body_end + 4
        elif kind == b"IEND":
            break
        elif (kind == b"IHDR" and pos == 8 or kind in _PNG_CHECKED and length >= _PNG_CHECKED[kind]
              or kind[:1].islower() and kind.isalpha() and kind not in _PILLOW_READS):
            # the header, a checked chunk, or a private one Pillow skips: Pillow verifies their CRC
            if zlib.crc32(data[pos + 4:body_end]) != struct.unpack_from(">I", data, body_end)[0]:
                return None
        else:
            return None
        pos = body_end + 4
    return _PlainPng(rawmode, width, height, b"".join(idat))


def _png_pixels(png: _PlainPng) -> np.ndarray | None:
    """(height, width[, 3]) uint8 straight from Pillow's C zlib decoder and raw encoder, the two
    steps `Image.open(...).tobytes()` runs, without its plugin machinery: ~5 us instead of ~25 us
    for a 28x28 digit. None when the stream is damaged (or Pillow's core API differs)."""
    try:
        size = (png.width, png.height)
        im = Image.core.new(png.rawmode, size)
        decoder = Image.core.zip_decoder(png.rawmode, png.rawmode, 0)
        decoder.setimage(im, (0, 0, *size))
        consumed, status = decoder.decode(png.stream)
        if consumed >= 0 or status:
            return None  # not enough image data, or a zlib/filter error
        encoder = Image.core.raw_encoder(png.rawmode, png.rawmode)
        encoder.setimage(im, (0, 0, *size))
        chunks = []
        while True:
            _, status, chunk = encoder.encode(max(65536, png.width * 4))
            chunks.append(chunk)
            if status:
                break
    except Exception:  # noqa: BLE001 - the general path decodes it, or says why it cannot
        return None
    if status < 0:
        return None
    shape = (png.height, png.width) if png.rawmode == "L" else (png.height, png.width, 3)
    return np.frombuffer(b"".join(chunks), np.uint8).reshape(shape)


def decode_image(data: bytes, spec: Preprocess) -> Decoded:
    """Decode one object into (channels, size, size) uint8 pixels, or raise DecodeError."""
    png = _plain_png(data, spec.max_image_pixels)
    if png is not None:
        decoded = _decode_plain_png(png, spec)
        if decoded is not None:
            return decoded
    img = _open(data, spec.max_image_pixels)
    fmt, mode = img.format or "unknown", img.mode
    orientation = _orientation(img)
    width, height = _displayed_size(img, orientation)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd-but-readable metadata
            if fmt == "JPEG":  # decode at reduced scale when the target is small (draft mode)
                img.draft(None, (spec.image_size, spec.image_size))
            img.seek(0)  # first frame of animated / multi-page files
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            return _finish(img, spec, width, height, mode, fmt)
    except DecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is this object's, not the run's
        raise _decode_error(err) from err


def _decode_plain_png(png: _PlainPng, spec: Preprocess) -> Decoded | None:
    """A plain PNG at the model's input: pixels straight from the decoder when it already has
    the model's mode and size, else through a Pillow image to convert and resize. None when its
    data is damaged: Image.open then says why."""
    if png.rawmode == ("L" if spec.channels == 1 else "RGB") and png.width == png.height == spec.image_size:
        arr = _png_pixels(png)
        return None if arr is None else _as_channels_first(arr, spec, png.width, png.height, png.rawmode, "PNG")
    try:
        img = Image.frombytes(png.rawmode, (png.width, png.height), png.stream, "zip", png.rawmode)
    except Exception:  # noqa: BLE001 - damaged image data
        return None
    try:
        return _finish(img, spec, png.width, png.height, png.rawmode, "PNG")
    except Exception as err:  # noqa: BLE001 - as the general path would report it
        raise _decode_error(err) from err


def _decode_error(err: Exception) -> DecodeError:
    """What a failure while decoding one object says about it."""
    reason = "truncated" if isinstance(err, OSError) and "truncated" in str(err).lower() else "decode_error"
    return DecodeError(reason, f"{type(err).__name__}: {err}")


def _finish(img: Image.Image, spec: Preprocess, width: int, height: int, mode: str, fmt: str) -> Decoded:
    """The model's mode and size, as a (channels, size, size) uint8 array."""
    if (img.mode != ("L" if spec.channels == 1 else "RGB") or img.size != (spec.image_size,) * 2
            or "transparency" in img.info):
        img = _resize(_normalise_mode(_reduce_early(img, spec.image_size), spec.channels), spec.image_size, spec.resize)
    return _as_channels_first(np.frombuffer(img.tobytes(), np.uint8), spec, width, height, mode, fmt)


def _as_channels_first(arr: np.ndarray, spec: Preprocess, width: int, height: int, mode: str,
                       fmt: str) -> Decoded:
    """Pixels in row order ((h, w) or (h, w, 3), or flat) as (channels, size, size)."""
    if spec.channels == 1:
        arr = arr.reshape(1, spec.image_size, spec.image_size)
    else:
        arr = np.ascontiguousarray(arr.reshape(spec.image_size, spec.image_size, 3).transpose(2, 0, 1))
    return Decoded(arr, width, height, mode, fmt)
