"""decode_image: every supported format and colour mode, EXIF orientation, and every refusal."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.vision.images import (
    CorruptImage,
    EmptyImage,
    ImageInputError,
    ImageTooLarge,
    TooManyPixels,
    UnsupportedImageFormat,
    decode_image,
)
from service.api.errors import image_refusal_status

REPO_ROOT = Path(__file__).resolve().parents[1]
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # EXIF: the stored image must be rotated 90 degrees clockwise to display


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def pixel(data: bytes, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    decoded = decode_image(data)
    assert decoded.image.mode == "RGB"
    return decoded.image.getpixel(xy)


def close(actual, expected, tol: int = 6) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(actual, expected, strict=True))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB, with a tiny IDAT: a few hundred bytes
    that would decode to width*height*3 bytes of pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


# --- formats -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("JPEG", {"quality": 95}),
        ("PNG", {}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
    ],
)
def test_each_supported_format_decodes_to_rgb(fmt: str, params: dict) -> None:
    image = Image.new("RGB", (40, 30), RED)
    decoded = decode_image(encode(image, fmt, **params))
    assert decoded.format == fmt
    assert decoded.size == (40, 30)
    assert decoded.image.mode == "RGB"
    assert close(decoded.image.getpixel((20, 15)), RED)


def test_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    decoded = decode_image(data)
    assert decoded.format == "GIF"
    assert close(decoded.image.getpixel((8, 8)), RED)


def test_multipage_tiff_gives_its_first_page() -> None:
    pages = [Image.new("RGB", (16, 16), BLUE), Image.new("RGB", (16, 16), RED)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert close(pixel(data, (8, 8)), BLUE)


# --- colour modes --------------------------------------------------------------------------


def test_greyscale_and_bilevel() -> None:
    assert pixel(encode(Image.new("L", (8, 8), 200), "PNG")) == (200, 200, 200)
    assert pixel(encode(Image.new("1", (8, 8), 1), "PNG")) == WHITE


def test_palette_with_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    data = encode(image, "PNG", transparency=0)  # index 0 (black) is transparent
    assert pixel(data, (0, 0)) == WHITE
    assert pixel(data, (1, 1)) == RED


def test_rgba_and_la_are_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black over white -> mid grey
    data = encode(rgba, "PNG")
    assert pixel(data, (0, 0)) == WHITE
    assert pixel(data, (1, 1)) == BLUE
    assert close(pixel(data, (2, 2)), (127, 127, 127), tol=2)
    assert pixel(encode(Image.new("LA", (8, 8), (0, 0)), "PNG")) == WHITE
    assert close(pixel(encode(rgba, "WEBP", lossless=True), (1, 1)), BLUE)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_is_converted(fmt: str) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    assert Image.open(io.BytesIO(encode(cmyk, fmt))).mode == "CMYK"
    assert close(pixel(encode(cmyk, fmt)), RED, tol=10)


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    row = [pixel(data, (x, 0))[0] for x in range(4)]
    assert row == [0, 128, 255, 4]  # clipping would give [0, 255, 255, 255]


def test_32_bit_integer_and_float_tiff() -> None:
    ints = np.array([[0, 65535]], dtype=np.int32)
    assert [pixel(encode(Image.fromarray(ints), "TIFF"), (x, 0))[0] for x in (0, 1)] == [0, 255]
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    data = encode(Image.fromarray(floats), "TIFF")
    assert [pixel(data, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    decoded = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (20, 40)  # rotated to portrait
    assert close(decoded.image.getpixel((10, 5)), RED, tol=12)  # left half moved to the top
    assert close(decoded.image.getpixel((10, 35)), BLUE, tol=12)


def test_real_photos_decode_at_their_manifest_size(shared_dir: Path) -> None:
    manifest = shared_dir / "data" / "coco-mini" / "manifest.jsonl"
    entries = [json.loads(line) for line in manifest.read_text().splitlines()[:5]]
    for entry in entries:
        decoded = decode_image((manifest.parent / entry["image"]).read_bytes())
        assert decoded.format == "JPEG"
        assert decoded.size == (entry["width"], entry["height"])
        assert decoded.image.mode == "RGB"


# --- refusals ------------------------------------------------------------------------------


def refusal(data: bytes, **limits) -> ImageInputError:
    with pytest.raises(ImageInputError) as info:
        decode_image(data, **limits)
    return info.value


def test_empty_body() -> None:
    error = refusal(b"")
    assert isinstance(error, EmptyImage)
    assert image_refusal_status(error) == 400
    assert "empty (0 bytes)" in str(error)


def test_encoded_size_limit() -> None:
    data = encode(Image.new("RGB", (64, 64), RED), "PNG")
    error = refusal(data, max_bytes=len(data) - 1)
    assert isinstance(error, ImageTooLarge)
    assert image_refusal_status(error) == 413
    assert f"{len(data):,} bytes; the limit is {len(data) - 1:,}" in str(error)
    assert decode_image(data, max_bytes=len(data)).size == (64, 64)


def test_bomb_beyond_pillows_own_limit_becomes_our_error() -> None:
    filters_before = list(warnings.filters)
    limit_before = Image.MAX_IMAGE_PIXELS
    data = png_header_only(50_000, 50_000)
    assert len(data) < 500
    error = refusal(data)
    assert isinstance(error, TooManyPixels)
    assert image_refusal_status(error) == 413
    assert "too many pixels" in str(error) and "Resize it" in str(error)
    assert warnings.filters == filters_before  # no filter leaks out of the call
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_pixel_limit_below_pillows_is_checked_from_the_header() -> None:
    error = refusal(png_header_only(5000, 4000), max_pixels=10_000_000)
    assert isinstance(error, TooManyPixels)
    assert "5000 x 4000 = 20,000,000 pixels; the limit is 10,000,000" in str(error)
    # Pillow's warning zone (89M-179M pixels) is refused as ours, not as a printed warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(refusal(png_header_only(10_000, 10_000)), TooManyPixels)


def png_zero_bomb(side: int) -> bytes:
    """A complete, valid black PNG of side x side RGB: ~1000:1 compressed (8000^2 -> ~190 KB
    that decode to 192 MB). Built row by row so building it allocates little."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def test_bombs_are_refused_without_allocating_their_pixels() -> None:
    """In a fresh process whose address space is capped at 64 MiB above what it already maps,
    refusing a header-only 50000^2 image and a complete 8000^2 zero-bomb (over the default
    40M-pixel limit, under Pillow's own) succeeds; the control decodes the same bomb with a
    raised limit and runs out of memory, which shows the cap would catch a decoder that
    allocated first and checked later."""
    script = f"""
import resource, sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from tests.test_images import png_header_only, png_zero_bomb
from model.vision.images import decode_image, TooManyPixels
bombs = [png_header_only(50_000, 50_000), png_zero_bomb(8_000)]
with open("/proc/self/statm") as statm:
    mapped = int(statm.read().split()[0]) * resource.getpagesize()
cap = mapped + 64 * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
for data in bombs:
    try:
        decode_image(data)
    except TooManyPixels:
        pass
    else:
        raise SystemExit("not refused")
try:
    decode_image(bombs[1], max_pixels=100_000_000)
except MemoryError:
    print("control ran out of memory")
else:
    print("control decoded within the cap")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "control ran out of memory"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_file(fmt: str) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = encode(noise, fmt)
    error = refusal(data[: len(data) // 2])
    assert isinstance(error, CorruptImage), error
    assert image_refusal_status(error) == 400
    assert "truncated or damaged" in str(error)


def test_damaged_header_of_a_known_format() -> None:
    error = refusal(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    assert isinstance(error, CorruptImage)
    assert "the PNG file is truncated or damaged" in str(error)


def test_damaged_png_data_fails_its_checksum() -> None:
    data = bytearray(encode(Image.new("RGB", (32, 32), RED), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF  # flip a byte of compressed data: CRC no longer matches
    assert isinstance(refusal(bytes(data)), CorruptImage)


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is plain text\n",
        b"<!DOCTYPE html><html><body><img src=x></body></html>",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    ],
    ids=["text", "html", "svg", "pdf"],
)
def test_non_images(data: bytes) -> None:
    error = refusal(data)
    assert isinstance(error, UnsupportedImageFormat)
    assert image_refusal_status(error) == 415
    assert "not an image in a supported format" in str(error)


def test_zip_even_when_it_contains_an_image() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photo.png", encode(Image.new("RGB", (8, 8)), "PNG"))
    assert isinstance(refusal(buffer.getvalue()), UnsupportedImageFormat)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "PCX", "TGA"])
def test_image_formats_we_do_not_accept(fmt: str) -> None:
    """Pillow reads these, but they are not on the list: the decoder surface stays small."""
    assert isinstance(refusal(encode(Image.new("RGB", (16, 16), RED), fmt)), UnsupportedImageFormat)
