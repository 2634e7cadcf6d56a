"""Image transforms for training and evaluation, and safe image decoding."""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision import transforms as T

# Decoding a crafted header can allocate gigabytes; refuse anything larger than this before decoding.
# 8192 x 8192 is far above any training resolution.
MAX_IMAGE_PIXELS = 8192 * 8192


class ImageTooLarge(ValueError):
    """The image header declares more pixels than MAX_IMAGE_PIXELS (a decompression bomb, or just huge)."""


def decode_image(data: bytes) -> Image.Image:
    """JPEG/PNG/... bytes -> RGB PIL image. Raises ImageTooLarge for an oversized header (read before
    any pixel is decoded) and other exceptions for undecodable input."""
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as error:  # PIL's own, higher cap, checked inside open()
        raise ImageTooLarge(str(error)) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"image of {width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS} pixel cap")
    return image.convert("RGB")


def image_transform(size: int, mean, std, train: bool, crop_scale_min: float = 1.0):
    """PIL image -> normalised float tensor (3, size, size).

    Training uses a mild RandomResizedCrop (open_clip's default scale is (0.9, 1.0)); evaluation
    resizes the shorter side and centre-crops.
    """
    if train and crop_scale_min < 1.0:
        geometry = [T.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    else:
        geometry = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """list of (3, H, W) -> (B, 3, H, W)."""
    return torch.stack(images, dim=0)
