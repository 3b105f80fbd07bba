"""Bytes in, an upright 8-bit RGB image out, or a typed error a user can act on.

Everything that enters the product as an image (an upload, an ingested file) goes through
`decode_image`. It takes bytes only: file names and declared content types are never trusted,
the format is sniffed from the data. Limits are checked in order of cost: encoded size, then
the pixel count read from the header (Pillow's `Image.open` is lazy), and only then are the
pixels decoded, so a decompression bomb is refused without allocating its pixels.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # 20 MiB encoded
DEFAULT_MAX_PIXELS = 40_000_000  # e.g. 8000 x 5000; decoded RGB = 120 MB

# Pillow format ids we accept, with the magic bytes that identify each. The magic bytes only
# tell a broken file of a known format (CorruptImage) from something else (UnsupportedFormat).
SUPPORTED_FORMATS: dict[str, tuple[bytes, ...]] = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "WEBP": (b"RIFF",),
    "BMP": (b"BM",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}
SUPPORTED_FORMATS_TEXT = "JPEG, PNG, WebP, BMP, GIF or TIFF"
WHITE = (255, 255, 255)
MAX_16BIT = 65535
MAX_8BIT = 255

# Errors Pillow raises while decoding a broken file (it has no single base class for them).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

# `warnings.catch_warnings` swaps the process-wide filter list; two threads interleaving it
# could leave our "error" filter installed. Header parsing is cheap, so it is serialised.
_open_lock = threading.Lock()


class ImageInputError(ValueError):
    """Base of every refusal; `code` is a stable machine-readable reason (the service maps the
    kind of refusal to its answer)."""

    code: str = "invalid_image"


class EmptyImage(ImageInputError):
    code = "empty_image"


class ImageTooLarge(ImageInputError):
    """The encoded bytes exceed the size limit."""

    code = "image_too_large"


class TooManyPixels(ImageInputError):
    """The header declares more pixels than allowed (a decompression bomb or a huge scan)."""

    code = "too_many_pixels"


class UnsupportedImageFormat(ImageInputError):
    """Not an image, or an image in a format or colour mode we do not decode."""

    code = "unsupported_image_format"


class CorruptImage(ImageInputError):
    """A file of a supported format that cannot be decoded (truncated, damaged)."""

    code = "corrupt_image"


# Set in a decoded image's `info` when it was decoded at reduced size: the full (width, height).
FULL_SIZE_KEY = "campsearch_full_size"


@dataclass(frozen=True)
class DecodedImage:
    """An upright 8-bit RGB image and the format its bytes were in ("JPEG", "PNG", ...)."""

    image: Image.Image
    format: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the photo in pixels, after EXIF orientation (the full size, also
        when `image` was decoded at reduced size)."""
        return full_size(self.image)


def full_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the photo an image was decoded from (see `decode_image`'s
    `reduce_to`), else its own size."""
    return tuple(image.info.get(FULL_SIZE_KEY, image.size))


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce_to: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode `data` into RGB, applying EXIF orientation; GIF and TIFF give their first frame.

    Transparent images are composited on white; greyscale, palette, CMYK and 16-bit images are
    converted to 8-bit RGB. Raises an `ImageInputError` subclass: EmptyImage, ImageTooLarge
    (more than `max_bytes`), TooManyPixels (width x height above `max_pixels`, checked before
    any pixel is decoded), UnsupportedImageFormat, CorruptImage.

    `reduce_to` (width, height): a JPEG at least twice as large on both sides is decoded at
    1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), never below that size on either side (an
    extractor's `decode_size`; square sizes are safe under any EXIF rotation). Other formats
    and smaller JPEGs decode at full size.
    """
    if not data:
        raise EmptyImage("the image is empty (0 bytes); send the file's contents")
    if len(data) > max_bytes:
        raise ImageTooLarge(
            f"the image is {len(data):,} bytes; the limit is {max_bytes:,} bytes. "
            "Send a smaller or more compressed file."
        )
    image = _open_lazily(data, max_pixels)
    _check_pixel_count(image.size, max_pixels)
    stored_size = image.size
    if reduce_to is not None and image.format == "JPEG":
        image.draft(image.mode, reduce_to)
    reduced_size = image.size
    try:
        image.seek(0)
        image.load()
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(image.size, max_pixels) from exc
    except _DECODE_ERRORS as exc:
        raise _corrupt(image.format, f"its pixels cannot be decoded: {exc}") from exc
    fmt = str(image.format)
    upright = _to_rgb(_apply_exif_orientation(image))
    if reduced_size != stored_size:
        turned = upright.size != reduced_size  # EXIF orientation swapped width and height
        upright.info[FULL_SIZE_KEY] = stored_size[::-1] if turned else stored_size
    return DecodedImage(image=upright, format=fmt)


def _open_lazily(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only; Pillow's own bomb warning/error becomes TooManyPixels."""
    try:
        with _open_lock, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=list(SUPPORTED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixels(
            f"the image declares too many pixels ({exc}); the limit is {max_pixels:,} pixels. "
            "Resize it before sending."
        ) from exc
    except UnidentifiedImageError as exc:
        detected = _sniff_format(data)
        if detected is not None:
            raise _corrupt(detected, "its header cannot be read") from exc
        raise UnsupportedImageFormat(
            f"the data is not an image in a supported format ({SUPPORTED_FORMATS_TEXT}). "
            "Convert it to JPEG or PNG."
        ) from exc
    except _DECODE_ERRORS as exc:
        raise _corrupt(_sniff_format(data), f"its header cannot be read: {exc}") from exc


def _corrupt(fmt: str | None, detail: str) -> CorruptImage:
    return CorruptImage(
        f"the {fmt or 'image'} file is truncated or damaged ({detail}). Re-export or re-upload it."
    )


def _sniff_format(data: bytes) -> str | None:
    for fmt, magics in SUPPORTED_FORMATS.items():
        if any(data.startswith(magic) for magic in magics):
            if fmt == "WEBP" and data[8:12] != b"WEBP":
                continue
            return fmt
    return None


def _too_many_pixels(size: tuple[int, int], max_pixels: int) -> TooManyPixels:
    width, height = size
    return TooManyPixels(
        f"the image is {width} x {height} = {width * height:,} pixels; the limit is "
        f"{max_pixels:,} pixels. Resize it before sending."
    )


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise _too_many_pixels(size, max_pixels)


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says. A damaged EXIF block does not make a
    readable image unusable: it is then left as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency composited on white; 16/32-bit integer and float greyscale
    scaled to 8 bits rather than clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        return Image.fromarray(_scale_integer_to_8bit(np.asarray(image)), mode="L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_scale_float_to_8bit(np.asarray(image)), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise UnsupportedImageFormat(
            f"images in colour mode {mode!r} are not supported; convert it to RGB first."
        ) from exc


def _scale_integer_to_8bit(pixels: np.ndarray) -> np.ndarray:
    """16-bit samples (0..65535) to 0..255. 32-bit integer images whose values all fit in
    8 bits are taken as 8-bit data; others as 16-bit (values clipped to 0..65535)."""
    values = pixels.astype(np.int64)
    if pixels.dtype.itemsize != 2 and values.size and values.max() <= MAX_8BIT:
        return np.clip(values, 0, MAX_8BIT).astype(np.uint8)
    return np.rint(np.clip(values, 0, MAX_16BIT) / (MAX_16BIT / MAX_8BIT)).astype(np.uint8)


def _scale_float_to_8bit(pixels: np.ndarray) -> np.ndarray:
    """Float samples: [0, 1] data is scaled by 255; anything else is taken as 0..255."""
    values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=MAX_8BIT, neginf=0.0)
    if values.size and values.max() <= 1.0:
        values = values * MAX_8BIT
    return np.rint(np.clip(values, 0, MAX_8BIT)).astype(np.uint8)
