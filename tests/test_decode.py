"""Decoding real files of every format and mode, and rejecting broken ones with a reason."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ae_core.decode import Preprocess, decode_image, fingerprint, read_header
from ae_core.errors import DecodeError
from conftest import COIL, MNIST
from corpora import broken_files, good_files

GRAY64 = Preprocess(image_size=64, channels=1)
RGB32 = Preprocess(image_size=32, channels=3)


def test_real_mnist_png_round_trips_pixel_exact():
    data = (MNIST / "00000.png").read_bytes()
    dec = decode_image(data, Preprocess(image_size=28, channels=1))
    assert dec.pixels.shape == (1, 28, 28) and dec.pixels.dtype == np.uint8
    assert np.array_equal(dec.pixels[0], np.asarray(Image.open(MNIST / "00000.png")))
    assert (dec.width, dec.height, dec.mode, dec.format) == (28, 28, "L", "PNG")


def test_real_coil_photo_resized_to_input():
    dec = decode_image((COIL / "obj5__10.png").read_bytes(), GRAY64)
    assert dec.pixels.shape == (1, 64, 64)
    assert (dec.width, dec.height) == (128, 128)
    ref = np.asarray(Image.open(COIL / "obj5__10.png").convert("L").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(dec.pixels[0].astype(int) - ref).mean() < 2.0


@pytest.mark.parametrize("key", sorted(good_files(COIL, MNIST)))
@pytest.mark.parametrize("spec", [GRAY64, RGB32], ids=["gray64", "rgb32"])
def test_every_format_and_mode_decodes(key, spec):
    data = good_files(COIL, MNIST)[key]
    dec = decode_image(data, spec)
    assert dec.pixels.shape == (spec.channels, spec.image_size, spec.image_size)
    assert dec.pixels.dtype == np.uint8
    assert dec.width >= 1 and dec.height >= 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])
def test_exif_orientation_is_applied(fmt):
    jpeg = Image.open(io.BytesIO(good_files(COIL, MNIST)["jpeg/exif-rotated.jpg"]))
    buf = io.BytesIO()
    jpeg.save(buf, fmt, exif=jpeg.getexif())  # stored 128x96, orientation 6: shown 96x128
    data = buf.getvalue()
    head = read_header(data)
    assert (head.width, head.height) == (96, 128)
    dec = decode_image(data, Preprocess(image_size=32, channels=1, resize="pad"))
    assert (dec.width, dec.height) == (96, 128)  # Pillow's TIFF reader turns the size itself
    # Padded to a square: a portrait image leaves black columns left and right.
    assert dec.pixels[0, :, 0].max() == 0 and dec.pixels[0, :, 16].max() > 0


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    dec = decode_image(buf.getvalue(), Preprocess(image_size=16, channels=3))
    assert dec.pixels.min() == 255


def test_sixteen_bit_keeps_its_range():
    arr = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    dec = decode_image(buf.getvalue(), Preprocess(image_size=32, channels=1))
    assert dec.pixels.min() <= 1 and dec.pixels.max() >= 254


@pytest.mark.parametrize("scale", [1, 257])
def test_32_bit_integer_image_is_read_as_8_or_16_bit_by_its_range(scale):
    # a TIFF of int32 values: 0..255 is 8-bit data (was shifted to near-black), 0..65535 16-bit
    digit = np.asarray(Image.open(MNIST / "00000.png"))
    buf = io.BytesIO()
    Image.fromarray(digit.astype(np.int32) * scale).save(buf, "TIFF")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I"
    dec = decode_image(buf.getvalue(), Preprocess(image_size=28, channels=1))
    assert np.array_equal(dec.pixels[0], digit)


def _float_tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.float32), "F").save(buf, "TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_pixel_of_a_float_image_is_left_out_of_its_range(bad):
    # before: one +inf (a depth map's "no reading") made the whole image black
    depth = np.tile(np.linspace(0, 10, 64, dtype=np.float32), (64, 1))
    expected = decode_image(_float_tiff(depth), Preprocess(image_size=16, channels=1)).pixels
    assert expected.min() < 20 and expected.max() > 235  # the range stretched to 0..255
    depth[0, 0] = bad
    got = decode_image(_float_tiff(depth), Preprocess(image_size=16, channels=1)).pixels
    assert np.abs(got.astype(int) - expected).max() <= 16 and np.array_equal(got[0, 1:], expected[0, 1:])
    with pytest.raises(DecodeError, match="every pixel of this F image is NaN or infinite") as err:
        decode_image(_float_tiff(np.full((8, 8), bad)), Preprocess(image_size=16, channels=1))
    assert err.value.reason == "decode_error"


@pytest.mark.parametrize("key", sorted(broken_files(COIL, MNIST)))
def test_broken_files_raise_decode_error_with_reason(key):
    data, reason = broken_files(COIL, MNIST)[key]
    with pytest.raises(DecodeError) as info:
        decode_image(data, GRAY64)
    assert info.value.reason == reason
    assert info.value.detail


def test_pixel_limit_is_a_setting():
    data = (COIL / "obj1__0.png").read_bytes()
    with pytest.raises(DecodeError, match="decompression_bomb"):
        decode_image(data, Preprocess(image_size=32, channels=1, max_image_pixels=128 * 127))


def test_fingerprint_is_content_based():
    a = (MNIST / "00000.png").read_bytes()
    assert fingerprint(a) == fingerprint(bytes(a))
    assert fingerprint(a) != fingerprint(a + b"\0")
    assert len(fingerprint(a)) == 32


# --- The plain-PNG fast path against Pillow's own Image.open path -------------------------------

def _png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def _assemble(chunks: list[tuple[bytes, bytes]]) -> bytes:
    import zlib
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
        for kind, body in chunks)


def _png_variants() -> dict[str, bytes]:
    """Plain PNGs the fast path takes, and near misses it must hand to Image.open."""
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    v = {"gray": _png(gray), "rgb": _png(rgb), "gray-big": _png(gray.resize((64, 64))),
         "gray-optimised": _png(gray, optimize=True), "rgb-text": _png(rgb, pnginfo=_text("Comment", "x")),
         "gray-dpi": _png(gray, dpi=(300, 300)),
         "rgba": _png(rgb.convert("RGBA")), "la": _png(gray.convert("LA")), "palette": _png(rgb.convert("P")),
         "gray-trns": _png(gray, transparency=0), "gray16": _png(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)),
         "one-bit": _png(gray.convert("1")),
         "exif-rotated": _png(rgb, exif=_exif(6)),
         "xmp-rotated": _png(rgb, pnginfo=_text("XML:com.adobe.xmp", '<x tiff:Orientation="6"/>')),
         "raw-profile-exif": _png(rgb, pnginfo=_text("Raw profile type exif", _raw_profile(_exif(6)))),
         "raw-profile-exif-z": _png(rgb, pnginfo=_text("Raw profile type exif", _raw_profile(_exif(8)), zip=True))}
    chunks = _chunks(v["gray"])
    (ihdr_kind, ihdr), rest = chunks[0], chunks[1:]
    idat = b"".join(body for kind, body in rest if kind == b"IDAT")
    halves = [(b"IDAT", idat[:len(idat) // 2]), (b"IDAT", idat[len(idat) // 2:])]
    v["idat-in-two"] = _assemble([chunks[0], *halves, (b"IEND", b"")])
    v["idat-split-by-text"] = _assemble([chunks[0], halves[0], (b"tEXt", b"a\0b"), halves[1], (b"IEND", b"")])
    v["interlace-flag"] = _assemble([(ihdr_kind, ihdr[:12] + b"\x01"), *rest])
    v["bad-ihdr-crc"] = v["gray"][:29] + b"\0\0\0\0" + v["gray"][33:]
    v["truncated-idat"] = _assemble([chunks[0], (b"IDAT", idat[:len(idat) // 2]), (b"IEND", b"")])
    v["corrupt-idat"] = _assemble([chunks[0], (b"IDAT", idat[:4] + bytes(len(idat) - 4)), (b"IEND", b"")])
    v["no-iend"] = v["gray"][:-12]
    v["cut-short"] = v["gray"][:len(v["gray"]) // 2]
    v["unknown-critical-chunk"] = _assemble([chunks[0], (b"ZZZZ", b"?"), *rest])
    v["private-chunk"] = _assemble([chunks[0], (b"prVt", b"anything"), *rest])
    v["chunk-name-not-letters"] = _assemble([chunks[0], (b"pr1t", b"x"), *rest])
    v["ihdr-short"] = _assemble([(ihdr_kind, ihdr[:12]), *rest])
    # Chunks Pillow reads before the image data: valid ones, then each one malformed.
    for kind, good in ((b"gAMA", (45455).to_bytes(4, "big")), (b"cHRM", bytes(range(32))),
                       (b"sRGB", b"\0"), (b"pHYs", (2835).to_bytes(4, "big") * 2 + b"\1")):
        name = kind.decode()
        v[name] = _assemble([chunks[0], (kind, good), *rest])
        v[f"{name}-after-data"] = _assemble([chunks[0], *rest[:-1], (kind, good), rest[-1]])
        v[f"{name}-short"] = _assemble([chunks[0], (kind, good[:-1]), *rest])
        v[f"{name}-short-after-data"] = _assemble([chunks[0], *rest[:-1], (kind, good[:-1]), rest[-1]])
    import zlib
    v["ztxt-unknown-method"] = _assemble([chunks[0], (b"zTXt", b"Comment\0\1abc"), *rest])
    v["ztxt-too-large"] = _assemble([chunks[0], (b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * 2**21)), *rest])
    v["iccp-empty"] = _assemble([chunks[0], (b"iCCP", b""), *rest])
    v["text-exif-rotated"] = _assemble([_chunks(v["rgb"])[0], (b"tEXt", b"exif\0" + _exif(6).tobytes()),
                                        *_chunks(v["rgb"])[1:]])
    return v


def _text(key: str, value: str, zip: bool = False):  # noqa: A002 - Pillow's name
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    if key.startswith("XML"):
        info.add_itxt(key, value)
    else:
        info.add_text(key, value, zip=zip)
    return info


def _raw_profile(exif: Image.Exif) -> str:
    """EXIF as ImageMagick writes it into a PNG text chunk (Pillow reads it back)."""
    raw = exif.tobytes()
    return f"\nexif\n{len(raw):8d}\n{raw.hex()}\n"


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _outcome(data: bytes, spec: Preprocess) -> tuple:
    try:
        d = decode_image(data, spec)
    except DecodeError as err:
        return ("reject", err.reason)
    return ("ok", d.pixels.shape, d.pixels.tobytes(), d.width, d.height, d.mode, d.format)


FAST_PATH_TAKES = {"gray", "rgb", "gray-big", "gray-optimised", "gray-dpi", "idat-in-two", "private-chunk",
                   "gAMA", "cHRM", "sRGB", "pHYs", "gAMA-after-data", "cHRM-after-data", "sRGB-after-data",
                   "pHYs-after-data"}


@pytest.mark.parametrize("spec", [Preprocess(image_size=28, channels=1), Preprocess(image_size=28, channels=3),
                                  Preprocess(image_size=16, channels=1, resize="crop"),
                                  Preprocess(image_size=32, channels=3, resize="pad")],
                         ids=["gray28", "rgb28", "gray16-crop", "rgb32-pad"])
def test_plain_png_fast_path_gives_what_image_open_gives(spec, monkeypatch):
    from ae_core import decode
    files = {**_png_variants(), **{k: d for k, d in good_files(COIL, MNIST).items() if k.endswith(".png")},
             **{k: d for k, (d, _) in broken_files(COIL, MNIST).items()},
             "mnist": (MNIST / "00000.png").read_bytes(), "coil": (COIL / "obj5__10.png").read_bytes()}
    fast = {k: _outcome(d, spec) for k, d in files.items()}
    monkeypatch.setattr(decode, "_plain_png", lambda data, max_pixels: None)
    reference = {k: _outcome(d, spec) for k, d in files.items()}
    assert fast == reference
    monkeypatch.undo()
    taken = {k for k, d in files.items()
             if (png := decode._plain_png(d, 10**8)) is not None and decode._png_pixels(png) is not None}
    assert FAST_PATH_TAKES | {"mnist", "coil"} <= taken  # the fast path really runs on plain PNGs
    assert not taken & (set(_png_variants()) - FAST_PATH_TAKES)


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16"])
def test_a_transparent_colour_key_is_composited_on_white(mode):
    # a PNG's tRNS chunk names one colour as transparent, in gray, RGB and 16-bit gray images too
    arr = np.full((8, 8), 90, np.uint8)
    arr[:4] = 0  # the top half in the transparent colour
    if mode == "RGB":
        img, key = Image.fromarray(np.stack([arr] * 3, axis=-1)), (0, 0, 0)
    elif mode == "I;16":
        img, key = Image.fromarray(arr.astype(np.uint16) * 257), 0
    else:
        img, key = Image.fromarray(arr), 0
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=key)
    px = decode_image(buf.getvalue(), Preprocess(image_size=8, channels=1)).pixels[0]
    assert (px[:4] == 255).all() and (px[4:] == 90).all()


def test_crop_takes_the_centred_square_without_scaling_up_the_whole_image():
    band = np.zeros((90, 30), np.uint8)
    band[25:65] = 200  # bright around the centred 30x30 square (rows 30-59), dark above and below
    buf = io.BytesIO()
    Image.fromarray(band).save(buf, "PNG")
    px = decode_image(buf.getvalue(), Preprocess(image_size=16, channels=1, resize="crop")).pixels
    assert (px == 200).all()
    # a 2,000,000 x 1 strip of a few kB: scaled up whole to 16 rows first, it took ~0.5 GB
    code = ("import io,resource,numpy as np;from PIL import Image;from ae_core.decode import Preprocess,decode_image;"
            "b=io.BytesIO();Image.fromarray(np.tile(np.arange(256,dtype=np.uint8),(1,7813))).save(b,'PNG');"
            "before=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "decode_image(b.getvalue(),Preprocess(image_size=16,channels=1,resize='crop'));"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-before)")
    grew_kb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grew_kb < 100_000



@pytest.mark.parametrize("mode", ["F", "RGBA"])
def test_a_large_float_or_alpha_image_decodes_in_about_its_own_size(mode, tmp_path):
    # before: float64 copies and full-size compositing: a 10,000 x 10,000 float image took 2.9 GB
    # and an RGBA one 2 GB; these 6,000 x 6,000 (144 MB decoded) took 253-468 and 400-708 MB
    # (built here, not at collection: each is 144 MB while it lives)
    image = (Image.fromarray(np.tile(np.linspace(-5, 1000, 6000, dtype=np.float32), (6000, 1)), "F") if mode == "F"
             else Image.new("RGBA", (6000, 6000), (10, 20, 30, 128)))
    path = tmp_path / "large.tif"
    image.save(path, compression="tiff_adobe_deflate")
    del image
    code = ("import resource,sys;from ae_core.decode import Preprocess,decode_image;data=open(sys.argv[1],'rb').read();"
            "before=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "px=decode_image(data,Preprocess(image_size=28,channels=3)).pixels;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-before, int(px.mean()))")
    grew_kb, mean = map(int, subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                                            text=True, check=True).stdout.split())
    # the decoded image (144 MB; 146 MB measured), and for RGBA its premultiplied copy (286 MB)
    assert grew_kb < (220_000 if mode == "F" else 360_000), grew_kb
    # a ramp stretched to 0..255; (10, 20, 30) half over white (+-1: rounding of the reduced blocks)
    assert abs(mean - (127 if mode == "F" else 137)) <= 1, mean


def test_a_large_float_image_with_a_few_nan_pixels_is_not_darkened_by_the_early_reduce():
    # a NaN averaged into its block made the block NaN, so black: 57% of a 2400x2400 depth map
    ramp = np.tile(np.linspace(0, 10, 2400, dtype=np.float32), (2400, 1))
    ramp.ravel()[np.random.default_rng(0).choice(ramp.size, ramp.size // 100, replace=False)] = np.nan
    px = decode_image(_float_tiff(ramp), Preprocess(image_size=28, channels=1)).pixels
    assert px.max() > 240 and (px == 0).mean() < 0.1
