"""Training crops decoded as far as the crop needs (clipx/data/crops.py): the same crop boxes as
before, images that differ only by resampling, the device path through the CPU decoder, and the
normalisation moved to the device."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from bench.photo_shards import photo_jpeg, source_photos
from clipx.data.batch import ENCODED, IMAGE, EncodedImage, collate_images
from clipx.data.crops import DRAFT_MARGIN, DeviceImages, TrainImage, draft_for_box
from clipx.data.transforms import RandomResizedCrop, ToNormalizedTensor, decode_image, open_image

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """40 photographs of 256 to 640 px on their short side, as img2dataset leaves them."""
    rng, sources = random.Random(0), source_photos()
    return [photo_jpeg(sources[i % 2], rng) for i in range(40)]


def crops(transform: TrainImage, images: list[bytes], seed: int = 0) -> list[torch.Tensor]:
    out = []
    for index, data in enumerate(images):
        torch.manual_seed(seed + index)  # the pipeline seeds each sample's draws by its place
        out.append(transform(data))
    return out


def test_the_same_draws_and_places_as_the_pillow_crop_before_it(photos):
    """TrainImage draws what the Pillow pipeline it replaced drew (RandomResizedCrop on the decoded
    image), no more and no less, and crops the same place: only the resampler differs."""
    old = RandomResizedCrop(224, scale=(0.08, 1.0))
    differences = []
    for index, data in enumerate(photos):
        torch.manual_seed(index)
        before = torch.from_numpy(np.array(old(decode_image(data)))).permute(2, 0, 1).float()
        after_old = torch.get_rng_state()
        torch.manual_seed(index)
        now = TrainImage(224, 0.08, draft=False)(data).float()
        assert torch.equal(torch.get_rng_state(), after_old)  # reading the header draws nothing
        differences.append((now - before).abs().mean().item())
    # Pillow's bicubic against torch's on the same box: rounding, about a grey level. A box drawn
    # or placed differently would differ by tens of levels on these photographs.
    assert np.mean(differences) < 1.5 and max(differences) < 3, differences


def test_draft_decoding_keeps_the_crop_statistics_and_reduces_large_images(photos):
    drafted = crops(TrainImage(224, 0.9), photos)
    full = crops(TrainImage(224, 0.9, draft=False), photos)
    # The same boxes, so the same places: per image the crops differ only by resampling.
    differences = [(a.float() - b.float()).abs().mean().item() for a, b in zip(drafted, full)]
    assert np.mean(differences) < 0.5, differences  # grey levels, on average over the images
    a, b = torch.stack(drafted).float(), torch.stack(full).float()
    for dims in ((0, 2, 3), (0, 1, 2, 3)):  # per channel, and overall
        assert torch.allclose(a.mean(dims), b.mean(dims), rtol=0.005)
        assert torch.allclose(a.std(dims), b.std(dims), rtol=0.005)
    # Sharpness: the mean absolute difference of neighbouring pixels, that of the full decode to 1%.
    def sharpness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean().item()
    assert sharpness(a) == pytest.approx(sharpness(b), rel=0.01)
    reduced = 0
    for data in photos:  # the draft engages whenever the crop is at least twice the target
        image = open_image(data)
        width = image.size[0]
        draft_for_box(image, (0, 0, *image.size), 224)
        if image.size[0] < width:
            reduced += 1
            assert min(image.size) >= DRAFT_MARGIN * 224
    assert reduced >= len(photos) // 4


def test_centre_square_without_random_crop():
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    image.paste((255, 255, 255), (50, 0, 250, 200))  # the centre square, white
    data = io.BytesIO()
    image.save(data, "PNG")
    out = TrainImage(32)(data.getvalue())
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert out.float().mean() > 250


def test_device_normalisation_equals_the_per_sample_normalisation(photos):
    pixels = torch.stack(crops(TrainImage(224, 0.9), photos[:4]))
    batch = DeviceImages(MEAN, STD, 224)({IMAGE: pixels, "key": ["a"]}, "cpu")
    per_sample = ToNormalizedTensor(MEAN, STD)
    expected = torch.stack([per_sample(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels])
    assert batch[IMAGE].dtype == torch.float32 and torch.equal(batch[IMAGE], expected)
    float_batch = {IMAGE: expected.clone()}  # hand-made and self-supervised batches pass as they are
    assert torch.equal(DeviceImages(MEAN, STD, 224)(float_batch, "cpu")[IMAGE], expected)


def png(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, "PNG")
    return out.getvalue()


def test_device_decoding_matches_the_loader_path_row_for_row(photos):
    samples = [photos[0], png(photos[1]), photos[2], png(photos[3]), photos[4]]
    with pytest.raises(OSError):  # a truncated JPEG is decoded in the loader, which skips it
        TrainImage(224, 0.9, defer=True)(photos[3][:-100])
    deferred = crops(TrainImage(224, 0.9, defer=True), samples)
    assert [isinstance(s, EncodedImage) for s in deferred] == [True, False, True, False, True]
    # The loader path without draft crops the same boxes from the full decode.
    loader = crops(TrainImage(224, 0.9, draft=False), samples)
    batch = collate_images(deferred)
    assert batch[ENCODED]["rows"] == [0, 2, 4] and batch[IMAGE].shape == (2, 3, 224, 224)
    images = DeviceImages(MEAN, STD, 224)
    on_device = images(batch, "cpu")[IMAGE]
    expected = images({IMAGE: torch.stack(loader)}, "cpu")[IMAGE]
    # In grey levels: torchvision's JPEG decoder and the float resize differ from Pillow's decoder and
    # the uint8 resize by rounding (about 0.16 levels on average here, at most a few).
    difference = (on_device - expected).abs() * (255 * torch.tensor(STD).view(1, 3, 1, 1))
    assert difference.mean() < 0.5 and difference.amax() < 8
    assert torch.equal(on_device[[1, 3]], expected[[1, 3]])  # the loader's own rows, untouched
    assert images.failed == 0


def test_an_image_the_device_cannot_decode_becomes_zeros_and_is_counted(photos):
    garbage = photos[0][:600] + bytes(range(256)) * 20 + b"\xff\xd9"  # a JPEG header, then noise
    batch = collate_images([EncodedImage(photos[1], (0, 0, 100, 100)), EncodedImage(garbage, (0, 0, 50, 50))])
    images = DeviceImages(MEAN, STD, 32)
    out = images(batch, "cpu")[IMAGE]
    assert images.failed == 1 and out.shape == (2, 3, 32, 32)
    zero = images({IMAGE: torch.zeros(1, 3, 32, 32, dtype=torch.uint8)}, "cpu")[IMAGE]
    assert torch.equal(out[1:], zero) and not torch.equal(out[:1], zero)
