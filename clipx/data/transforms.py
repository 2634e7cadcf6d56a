"""Image transforms for training and evaluation, and safe image decoding."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

# Decoding a crafted header can allocate gigabytes; refuse anything larger than this before decoding.
# 8192 x 8192 is far above any training resolution.
MAX_IMAGE_PIXELS = 8192 * 8192


class ImageTooLarge(ValueError):
    """The image header declares more pixels than MAX_IMAGE_PIXELS (a decompression bomb, or just huge)."""


def open_image(data: bytes) -> Image.Image:
    """JPEG/PNG/... bytes -> a PIL image whose header is read and whose pixels are not decoded yet
    (so a JPEG can still be asked for a reduced decode, ``Image.draft``). Raises ImageTooLarge for
    an oversized header and other exceptions for input that is no image."""
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as error:  # PIL's own, higher cap, checked inside open()
        raise ImageTooLarge(str(error)) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"image of {width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS} pixel cap")
    return image


def decode_image(data: bytes) -> Image.Image:
    """JPEG/PNG/... bytes -> RGB PIL image. Raises ImageTooLarge for an oversized header (read before
    any pixel is decoded) and other exceptions for undecodable input."""
    return open_image(data).convert("RGB")


class RandomResizedCrop:
    """torchvision's RandomResizedCrop (same distribution of boxes, bicubic by default) at a fraction
    of its cost: the randomness in one draw from torch's generator instead of up to 60 small tensor
    ops, and the crop and resize in one PIL call that reads only the box. PIL image -> PIL image."""

    ATTEMPTS = 10

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 resample=Image.Resampling.BICUBIC):
        self.size, self.scale, self.resample = size, scale, resample
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = ratio

    def box(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom): a random area fraction in ``scale`` and aspect ratio in
        ``ratio``; the centre crop at the nearest allowed ratio if 10 draws do not fit. The draws
        come from ``generator``, else from torch's global one."""
        area = width * height
        for u_area, u_ratio, u_top, u_left in torch.rand(self.ATTEMPTS, 4, generator=generator).tolist():
            target = area * (self.scale[0] + u_area * (self.scale[1] - self.scale[0]))
            aspect = math.exp(self.log_ratio[0] + u_ratio * (self.log_ratio[1] - self.log_ratio[0]))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
                return left, top, left + w, top + h
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.resize((self.size, self.size), self.resample, box=self.box(*image.size))


class ToNormalizedTensor:
    """PIL RGB image -> (3, H, W) float tensor, (pixel / 255 - mean) / std per channel, in one
    arithmetic pass (torchvision's ToTensor then Normalize makes two float copies)."""

    def __init__(self, mean, std):
        std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W) uint8, writable
        return torch.addcmul(self.shift, pixels, self.scale)


def rand_augment(ops_magnitude: tuple[int, int] | None) -> list:
    """data.randaugment's (N, M) as a list of transforms: [torchvision's RandAugment] or [].

    torchvision's RandAugment draws its ops and signs with ``torch.randint`` from the global
    generator, which the pipeline seeds per sample (``sample_rng``): the same image gets the same ops
    in a resumed run, with or without loader workers. PIL -> PIL, or uint8 (3, H, W) -> uint8
    (clipx.data.crops.TrainImage applies it to its crop)."""
    if ops_magnitude is None:
        return []
    return [T.RandAugment(num_ops=ops_magnitude[0], magnitude=ops_magnitude[1])]


def eval_transform(size: int, mean, std):
    """PIL image -> normalised float tensor (3, size, size): the shorter side resized, then the centre
    crop, with torchvision's own transforms (the same images as open_clip's and CLIP_benchmark's
    preprocessing). Training crops are clipx.data.crops.TrainImage."""
    geometry = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """list of (3, H, W) -> (B, 3, H, W)."""
    return torch.stack(images, dim=0)
