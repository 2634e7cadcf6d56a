"""Decode one untrusted image and re-encode it as a size x size RGB JPEG."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from clipx.data.transforms import MAX_IMAGE_PIXELS

# Checked from the header before any pixel is decoded, so a hostile file cannot claim
# gigapixels and exhaust memory; the trainer's decoder uses the same cap.
MAX_PIXELS = MAX_IMAGE_PIXELS
JPEG_QUALITY = 95


def encode_image(source, size: int) -> bytes | None:
    """Return JPEG bytes of `source` as an exactly `size` x `size` RGB image, or None.

    `source` may be encoded bytes, a file path, a PIL image or a numpy array (H, W) or (H, W, C).
    The shorter side is resized to `size` (bicubic; small images are upscaled) and the centre
    cropped. None means the input could not be decoded: not an image, truncated, too many
    pixels, or an unsupported type. The caller counts it; it is never fatal.
    """
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    try:
        if isinstance(source, Image.Image):
            return _encode(source, size)
        if isinstance(source, np.ndarray):
            return _encode(Image.fromarray(source), size)
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(source)
        elif not isinstance(source, (str, os.PathLike)):
            return None
        return _decode_and_encode(source, size)
    # Untrusted bytes make PIL raise almost anything (OSError, SyntaxError, struct.error,
    # IndexError, DecompressionBombError...); each one just means "skip this sample".
    except Exception:  # noqa: BLE001
        return None


def _decode_and_encode(fp, size: int) -> bytes | None:
    """Open lazily, refuse oversized headers, then decode at reduced scale where possible."""
    with warnings.catch_warnings():
        # Our own MAX_PIXELS check replaces PIL's global bomb limit and its warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(fp) as image:
            if image.width * image.height > MAX_PIXELS or image.width < 1 or image.height < 1:
                return None
            # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft never goes below `size`.
            image.draft("RGB", (size, size))
            return _encode(image, size)


def _encode(image: Image.Image, size: int) -> bytes:
    image = ImageOps.exif_transpose(image)  # phones store rotation in EXIF, not in the pixels
    image = _to_rgb(image)
    # fit = crop the centred square, then resize it: the same pixels as resize-then-crop.
    image = ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white; a plain convert would expose arbitrary hidden colours."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
