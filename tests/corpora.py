"""Test corpora built from the real shared images: every format and mode, and broken files."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _real(coil: Path, mnist: Path) -> tuple[Image.Image, Image.Image, Image.Image]:
    obj = Image.open(coil / "obj1__0.png").convert("L")
    digit = Image.open(mnist / "00000.png").convert("L")
    # A colour image from three real gray photos as channels (the shared data holds no colour photo).
    rgb = Image.merge("RGB", [Image.open(coil / f"obj{i}__0.png").convert("L") for i in (2, 3, 4)])
    return obj, digit, rgb


def png_with_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG header claiming the given size (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def good_files(coil: Path, mnist: Path) -> dict[str, bytes]:
    obj, digit, rgb = _real(coil, mnist)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(128 * 128).reshape(128, 128) % 256).astype(np.uint8)))
    sixteen = Image.fromarray(np.asarray(obj).astype(np.uint16) * 257)
    rotated = rgb.resize((128, 96))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    frames = [digit, digit.rotate(90)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return {
        "jpeg/rgb.jpg": _save(rgb, "JPEG", quality=90),
        "jpeg/gray.jpeg": _save(obj, "JPEG"),
        "jpeg/cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "jpeg/exif-rotated.jpg": _save(rotated, "JPEG", exif=exif),
        "png/rgba.png": _save(rgba, "PNG"),
        "png/palette.png": _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "png/palette-transparent.png": _save(obj.convert("P"), "PNG", transparency=0),
        "png/gray16.png": _save(sixteen, "PNG"),
        "png/la.png": _save(obj.convert("LA"), "PNG"),
        "png/bilevel.png": _save(digit.convert("1"), "PNG"),
        "webp/photo.webp": _save(rgb, "WEBP"),
        "tiff/photo.tif": _save(rgb, "TIFF"),
        "tiff/float.tiff": _save(Image.fromarray(np.asarray(obj, np.float32) / 255.0), "TIFF"),
        "gif/anim.gif": gif.getvalue(),
        "bmp/digit.bmp": _save(digit, "BMP"),
        "pgm/face-like.pgm": _save(obj.resize((92, 112)), "PPM"),  # the format of classic face sets
        "ppm/photo.ppm": _save(rgb, "PPM"),
        "no-extension-jpeg": _save(rgb, "JPEG"),
        "misnamed.txt": _save(obj, "PNG"),
        "tiny/1x1.png": _save(Image.new("L", (1, 1), 128), "PNG"),
        "wide/strip.png": _save(obj.resize((512, 16)), "PNG"),
    }


def broken_files(coil: Path, mnist: Path) -> dict[str, tuple[bytes, str]]:
    """key -> (content, expected reason)."""
    obj = _real(coil, mnist)[0]
    jpeg = _save(obj, "JPEG")
    png = _save(obj, "PNG")
    return {
        "broken/empty.png": (b"", "empty"),
        "broken/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "broken/truncated.png": (png[: len(png) // 2], "truncated"),
        "broken/notes.txt": (b"these are not the pixels you are looking for\n" * 10, "not_an_image"),
        "broken/fake.png": (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "corrupt_header"),
        "broken/bomb.png": (png_with_size(100_000, 100_000), "decompression_bomb"),
        "broken/document.pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "not_an_image"),
    }


def make_mixed_corpus(folder: Path, coil: Path, mnist: Path) -> tuple[dict[str, bytes], dict[str, tuple[bytes, str]]]:
    good, broken = good_files(coil, mnist), broken_files(coil, mnist)
    for key, data in list(good.items()) + [(k, v[0]) for k, v in broken.items()]:
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    # a file name that is not UTF-8 (a Latin-1 zip unpacked on Linux): keyed with the byte as \xe9
    latin = os.fsencode(folder) + b"/names/caf\xe9.png"
    os.makedirs(os.path.dirname(latin), exist_ok=True)
    with open(latin, "wb") as f:
        f.write(good["png/la.png"])
    good["names/caf\\xe9.png"] = good["png/la.png"]
    return good, broken
