"""clipx's own RandomResizedCrop and ToNormalizedTensor against torchvision's, which they replace
in training for speed: the same distribution of crop boxes, the same tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from clipx.data.transforms import RandomResizedCrop, ToNormalizedTensor

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_normalised_tensor_equals_torchvision_to_tensor_then_normalize():
    image = _image(40, 24)
    expected = T.Normalize(MEAN, STD)(T.ToTensor()(image))
    actual = ToNormalizedTensor(MEAN, STD)(image)
    assert actual.shape == expected.shape == (3, 24, 40) and actual.dtype == torch.float32
    assert torch.allclose(actual, expected, atol=1e-6)


@pytest.mark.parametrize("size,scale", [((64, 64), (0.9, 1.0)), ((80, 48), (0.08, 1.0)), ((48, 200), (0.3, 1.0))])
def test_crop_boxes_follow_torchvision_s_distribution(size, scale):
    """Area fraction and aspect ratio of 4,000 boxes: in range, and their means within a few
    hundredths of torchvision's own get_params on the same image."""
    width, height = size
    ours = RandomResizedCrop(32, scale=scale)
    torch.manual_seed(0)
    boxes = [ours.box(width, height) for _ in range(4000)]
    theirs = [T.RandomResizedCrop.get_params(_image(width, height), list(scale), [3 / 4, 4 / 3]) for _ in range(4000)]

    def stats(whs):
        areas = np.array([w * h / (width * height) for w, h in whs])
        ratios = np.array([math.log(w / h) for w, h in whs])
        return areas, ratios

    areas, ratios = stats([(right - left, bottom - top) for left, top, right, bottom in boxes])
    their_areas, their_ratios = stats([(w, h) for _, _, h, w in theirs])
    assert all(0 <= left < right <= width and 0 <= top < bottom <= height for left, top, right, bottom in boxes)
    assert areas.min() >= scale[0] * 0.9 and areas.max() <= 1.0
    assert abs(areas.mean() - their_areas.mean()) < 0.02
    assert abs(ratios.mean() - their_ratios.mean()) < 0.03 and abs(ratios.std() - their_ratios.std()) < 0.03


def test_a_crop_depends_only_on_the_generator_state():
    image = _image(64, 64)
    crop = RandomResizedCrop(32, scale=(0.3, 1.0))
    torch.manual_seed(7)
    first = np.array(crop(image))
    torch.manual_seed(7)
    assert np.array_equal(first, np.array(crop(image))) and first.shape == (32, 32, 3)


def test_the_views_blur_is_a_whole_gaussian_drawn_per_sample():
    from PIL import ImageFilter

    from clipx.ssl.views import RandomGaussianBlur

    image = _image(32, 32)
    assert RandomGaussianBlur(p=0.0)(image) is image
    torch.manual_seed(3)
    blurred = np.asarray(RandomGaussianBlur(p=1.0, sigma=(2.0, 2.0))(image), dtype=np.float32)
    expected = np.asarray(image.filter(ImageFilter.GaussianBlur(2.0)), dtype=np.float32)
    assert np.array_equal(blurred, expected)
    # A sigma of 2 px spreads a pixel well beyond a 3-tap kernel: noise is mostly smoothed away.
    assert blurred.std() < 0.5 * np.asarray(image, dtype=np.float32).std()
