"""Training crops at a GPU's pace: decode only what the crop needs, resize with a batch-friendly
kernel, and leave the float conversion to the device.

The loader path (``TrainImage``): the crop box is drawn from the image's header before any pixel is
decoded (the same draws, from the same per-sample generator, as ``RandomResizedCrop``); a JPEG is
then decoded at the smallest DCT scale (1/2, 1/4 or 1/8, Pillow's draft mode) that still leaves the
crop a little larger than the target on both sides (``DRAFT_MARGIN``); the crop is resized by
torch's antialiased bicubic on uint8 pixels (several times faster than Pillow's filter on one
core), and the sample stays uint8 (3, S, S): a quarter of the bytes between worker and trainer,
and no per-sample float arithmetic. ``DeviceImages`` normalises the whole batch on the device in
one op.

The device path (data.decode: device): the loader draws the box and keeps the JPEG encoded
(``EncodedImage``); ``DeviceImages`` decodes the batch's JPEGs in one ``torchvision.io.decode_jpeg``
call on the training device (nvJPEG on a GPU, libjpeg-turbo on a CPU, which is how the tests run it)
and crops and resizes each there, in float. Images that are not JPEG, or truncated ones, are
decoded in the loader as on the loader path.

Both paths keep the distribution of crop boxes exactly (the boxes are drawn in source pixels,
before any scaling). What changes is the resampling of pixels inside the box: a DCT-scaled decode
and a shorter resize instead of a full decode and a longer one, or another decoder and a float
resize; tests/test_crops.py bounds the differences (pixel statistics, sharpness, grey levels).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipx.data.batch import ENCODED, IMAGE, EncodedImage
from clipx.data.transforms import ImageTooLarge, RandomResizedCrop, open_image

# A reduced JPEG decode (libjpeg's scaled IDCT) is a little softer than a full decode resized by the
# antialiased bicubic: at a crop just above the target size, 2.5% less mean neighbour contrast on
# bench/photo_shards.py's photographs. The decoder is asked for a reduction only while the reduced
# crop keeps this margin over the target, which keeps the difference under 1% and most of the saving
# (tests/test_crops.py).
DRAFT_MARGIN = 1.25
JPEG_FORMATS = ("JPEG", "MPO")  # Pillow opens a JPEG with a multi-picture segment (phones write them) as MPO


class TrainImage:
    """Encoded image bytes (or an already decoded PIL image) -> uint8 (3, size, size): a random
    resized crop (area fraction in [scale_min, 1], aspect ratio in [3/4, 4/3]), or with
    ``scale_min`` 1 the centre square, then ``augment`` (RandAugment's transforms, on the uint8
    tensor). With ``defer`` a JPEG is not decoded: it comes back as an ``EncodedImage`` (its bytes
    and box) for ``DeviceImages`` to decode on the training device."""

    takes_bytes = True  # clipx.data.pipeline hands it the sample's bytes, not a decoded image

    def __init__(self, size: int, scale_min: float = 1.0, augment: list | None = None, draft: bool = True,
                 defer: bool = False):
        self.size, self.augment, self.draft, self.defer = size, augment or [], draft, defer
        self.crop = RandomResizedCrop(size, scale=(scale_min, 1.0)) if scale_min < 1.0 else None

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in source pixels."""
        if self.crop is not None:
            return self.crop.box(width, height)
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, source) -> torch.Tensor | EncodedImage:
        encoded = isinstance(source, (bytes, bytearray))  # else a decoded image, handed on by a wrapper
        image = open_image(source) if encoded else source
        box = self.box(*image.size)
        if encoded and image.format in JPEG_FORMATS:
            if self.defer and not self.augment and is_complete_jpeg(source):
                return EncodedImage(bytes(source), box)
            if self.draft:
                box = draft_for_box(image, box, self.size)
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
        left, top, right, bottom = box
        out = resize_crop(pixels.permute(2, 0, 1)[None, :, top:bottom, left:right], self.size)[0]
        for op in self.augment:
            out = op(out)
        return out


def draft_for_box(image: Image.Image, box: tuple[int, int, int, int], size: int) -> tuple[int, int, int, int]:
    """Ask the JPEG decoder of a not yet loaded ``image`` for the largest reduction (1/2, 1/4, 1/8)
    that keeps the crop ``box`` at least ``DRAFT_MARGIN * size`` px on both sides; returns the box
    in the reduced image's pixels (its edges rounded to them)."""
    width, height = image.size
    left, top, right, bottom = box
    least = DRAFT_MARGIN * size
    wanted = (math.ceil(width * least / (right - left)), math.ceil(height * least / (bottom - top)))
    if width < 2 * wanted[0] or height < 2 * wanted[1]:
        return box  # no reduction possible: decode at full size
    image.draft("RGB", wanted)
    sx, sy = image.size[0] / width, image.size[1] / height
    new = (round(left * sx), round(top * sy), round(right * sx), round(bottom * sy))
    return new[0], new[1], max(new[2], new[0] + 1), max(new[3], new[1] + 1)


def resize_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, h, w) uint8 or float -> (N, 3, size, size) of the same dtype: antialiased bicubic
    (Pillow's filter), rounded and clamped for uint8 by torch's own uint8 kernel."""
    if pixels.shape[-2:] == (size, size):
        return pixels.clone()
    return F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def is_complete_jpeg(data) -> bool:
    """Whether JPEG bytes end with the end-of-image marker: a truncated download does not, and the
    device decoder fails a whole batch on one bad image, so such a file is decoded in the loader
    (which skips it, if it cannot)."""
    return bytes(data[-2:]) == b"\xff\xd9" or bytes(data).rstrip(b"\0")[-2:] == b"\xff\xd9"


class DeviceImages:
    """Finishes a training batch on the device: the JPEGs the loader left encoded are decoded and
    cropped there, and uint8 images become normalised float, (pixel / 255 - mean) / std, in one op
    for the batch (the same arithmetic as ``ToNormalizedTensor``). Batches whose images are float
    already (the self-supervised views, hand-made batches) pass as they are."""

    def __init__(self, mean, std, size: int):
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.constants = {"cpu": (-torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t,
                                  1.0 / (255.0 * std_t))}  # device type -> (shift, scale)
        self.size = size
        self.failed = 0  # encoded images the device decoder could not read (given zeros)

    def __call__(self, batch: dict, device) -> dict:
        """``batch`` with its images on ``device``, normalised; other keys as they were."""
        encoded = batch.pop(ENCODED, None)
        if encoded is not None:
            pixels = self.assemble(batch[IMAGE], encoded, device)
        elif batch.get(IMAGE) is not None and batch[IMAGE].dtype == torch.uint8:
            pixels = batch[IMAGE].to(device, non_blocking=True)
        else:
            return batch
        shift, scale = self.on(torch.device(device))
        batch[IMAGE] = torch.addcmul(shift, pixels, scale)  # (B, 3, S, S) float32
        return batch

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalisation's (shift, scale), copied to ``device`` once."""
        if str(device) not in self.constants:
            self.constants[str(device)] = tuple(t.to(device) for t in self.constants["cpu"])
        return self.constants[str(device)]

    def assemble(self, loader_rows: torch.Tensor, encoded: dict, device) -> torch.Tensor:
        """(B, 3, S, S) float pixels in [0, 255], in batch order: the rows the loader decoded
        (``loader_rows``, uint8) and those decoded here."""
        crops = iter(self.decode(encoded["data"], encoded["boxes"], device))
        decoded = iter(loader_rows.to(device, non_blocking=True).float())
        here = set(encoded["rows"])
        total = len(here) + len(loader_rows)
        return torch.stack([next(crops) if row in here else next(decoded) for row in range(total)])

    def decode(self, data: list[bytes], boxes: list[tuple[int, int, int, int]], device) -> torch.Tensor:
        """(n, 3, S, S) float: each JPEG decoded on ``device``, its box cut out and resized."""
        images = decode_jpegs(data, device)
        crops: list[torch.Tensor] = []
        for pixels, (left, top, right, bottom) in zip(images, boxes):
            if pixels is None:  # undecodable on the device: a zero image, counted (summary.json) and warned of
                if not self.failed:
                    warnings.warn("data.decode=device: a JPEG that neither the device's decoder nor Pillow can read "
                                  "is trained on as a zero image (summary.json counts them); data.decode=loader "
                                  "skips such files instead", stacklevel=2)
                self.failed += 1
                crops.append(torch.zeros(1, 3, self.size, self.size, device=device))
                continue
            crop = pixels[None, :, top:bottom, left:right].float()
            crops.append(resize_crop(crop, self.size).clamp_(0, 255))
        return torch.cat(crops) if crops else torch.empty(0, 3, self.size, self.size, device=device)  # (n, 3, S, S)


def decode_jpegs(data: list[bytes], device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 per JPEG, decoded together on ``device``; when the batch call fails, one by
    one, with None for an image that neither the device decoder nor Pillow can read."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    if not tensors:
        return []
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=torch.device(device)))
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for tensor, raw in zip(tensors, data):
        try:
            out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=torch.device(device)))
        except RuntimeError:
            out.append(_pillow_decode(raw, device))
    return out


def _pillow_decode(data: bytes, device) -> torch.Tensor | None:
    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except (OSError, ImageTooLarge, ValueError):
        return None
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).to(device)
