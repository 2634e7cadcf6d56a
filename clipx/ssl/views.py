"""Two (or more) augmented views per image: the SimCLR and MoCo v2 recipes, scaled to any image size."""

from __future__ import annotations

from torchvision import transforms as T


def view_augmentation(ssl_cfg, size: int, mean, std, crop_scale_min: float):
    """PIL image -> normalised (3, size, size) tensor, one random view.

    simclr: colour jitter (0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, grayscale p=0.2, blur; mocov2: jitter
    (0.4, 0.4, 0.4, 0.1). The blur kernel is ~10% of the image side (odd), as in SimCLR, so the
    recipe means the same on 32 px digits as on 224 px photos.
    """
    s = ssl_cfg.jitter_strength
    jitter = (T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s) if ssl_cfg.recipe == "simclr"
              else T.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s))
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=ssl_cfg.flip_prob),
        T.RandomApply([jitter], p=ssl_cfg.jitter_prob),
        T.RandomGrayscale(p=ssl_cfg.grayscale_prob),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=ssl_cfg.blur_prob),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class MultiView:
    """Callable: PIL image -> list of ``count`` independently augmented views."""

    def __init__(self, augmentation, count: int = 2):
        self.augmentation, self.count = augmentation, count

    def __call__(self, image):
        return [self.augmentation(image) for _ in range(self.count)]
