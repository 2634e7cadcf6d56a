"""Augmented views per image: the SimCLR and MoCo v2 recipes, scaled to any image size, and
SwAV's multi-crop (global views plus low-resolution small crops)."""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from clipx.data.transforms import RandomResizedCrop, ToNormalizedTensor, rand_augment


class RandomGaussianBlur:
    """With probability ``p``, a Gaussian blur of standard deviation drawn from ``sigma`` (pixels),
    by PIL's filter: the whole Gaussian, where a fixed small kernel (torchvision's, sized 10% of a
    32 px image: 3 taps) truncates a sigma of 2 to little more than a 3-pixel box. PIL -> PIL."""

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        apply, where = torch.rand(2).tolist()
        if apply >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(self.sigma[0] + where * (self.sigma[1] - self.sigma[0])))


def view_augmentation(views_cfg, size: int, mean, std, scale: tuple[float, float],
                      randaugment: tuple[int, int] | None = None):
    """PIL image -> normalised (3, size, size) tensor, one random view of ``scale`` of its area.

    RandAugment's (N, M) ops, if given, follow the crop and flip (as in timm's and torchvision's
    recipes), before the colour jitter.

    simclr: colour jitter (0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, grayscale p=0.2, blur; mocov2: jitter
    (0.4, 0.4, 0.4, 0.1). The blur's sigma is drawn from [0.1, 2.0] pixels, as in SimCLR and MoCo v2.
    """
    s = views_cfg.jitter_strength
    jitter = (T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s) if views_cfg.recipe == "simclr"
              else T.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s))
    return T.Compose([
        RandomResizedCrop(size, scale=scale),
        T.RandomHorizontalFlip(p=views_cfg.flip_prob),
        *rand_augment(randaugment),
        T.RandomApply([jitter], p=views_cfg.jitter_prob),
        T.RandomGrayscale(p=views_cfg.grayscale_prob),
        RandomGaussianBlur(views_cfg.blur_prob),
        ToNormalizedTensor(mean, std),
    ])


class MultiView:
    """Callable: PIL image -> ``count`` global views, then ``small_count`` small crops (multi-crop)."""

    def __init__(self, augmentation, count: int = 2, small_augmentation=None, small_count: int = 0):
        self.augmentation, self.count = augmentation, count
        self.small_augmentation, self.small_count = small_augmentation, small_count

    def __call__(self, image):
        views = [self.augmentation(image) for _ in range(self.count)]
        return views + [self.small_augmentation(image) for _ in range(self.small_count)]


def ssl_views(views_cfg, size: int, mean, std, crop_scale_min: float,
              randaugment: tuple[int, int] | None = None) -> MultiView:
    """The configured views (``ssl.views``): ``count`` global crops of ``size`` px covering at least
    ``views_cfg.crop_scale_min`` of the image (``crop_scale_min``, data's, when that is None), and
    ``small_crops`` crops of ``small_crop_size`` px; every view with RandAugment's (N, M) if given."""
    if views_cfg.crop_scale_min is not None:
        crop_scale_min = views_cfg.crop_scale_min
    small = (view_augmentation(views_cfg, views_cfg.small_crop_size, mean, std, tuple(views_cfg.small_crop_scale),
                               randaugment) if views_cfg.small_crops else None)
    return MultiView(view_augmentation(views_cfg, size, mean, std, (crop_scale_min, 1.0), randaugment), views_cfg.count,
                     small, views_cfg.small_crops)
