"""What the image-only methods (SimCLR, MoCo, SwAV) share: augmented views as inputs, an image
encoder with a projection head, BatchNorm splits or SyncBatchNorm, and evaluation by probes."""

from __future__ import annotations

import torch

from clipx.config_rules import parse_randaugment
from clipx.data.batch import ViewsBatch
from clipx.methods.objective import Method
from clipx.models import image_size
from clipx.ssl.batchnorm import check_sync_batchnorm, split_batchnorm_, sync_batchnorm
from clipx.ssl.encoder import ImageEncoder, create_image_encoder
from clipx.ssl.views import ssl_views


class ViewsMethod(Method):
    """Trains an image encoder on views of the same image; captions in the shards are ignored."""

    evaluators = ("knn", "linear_probe")

    def build_model(self, config) -> torch.nn.Module:
        return split_batchnorm_(self.build_network(config, create_image_encoder(config.model, config.ssl)),
                                config.ssl.bn_splits)

    def build_network(self, config, encoder: ImageEncoder) -> torch.nn.Module:
        """The method's model around the shared encoder (the encoder itself by default)."""
        return encoder

    def check_processes(self, config, processes: int, device_type: str) -> None:
        if config.ssl.batchnorm == "sync":
            check_sync_batchnorm(processes, device_type)

    def prepare(self, model, accelerator, config):
        return sync_batchnorm(model, accelerator) if config.ssl.batchnorm == "sync" else model

    def train_transform(self, config):
        m = config.model
        return ssl_views(config.ssl.views, image_size(m), m.image_mean, m.image_std, config.data.crop_scale_min,
                         parse_randaugment(config.data.randaugment))

    def collate(self, config):
        return ViewsBatch()


class ImageAndViews:
    """PIL image -> [the captioned image's transform of it, then the SSL views of it]."""

    def __init__(self, image_transform, views):
        self.image_transform, self.views = image_transform, views

    def __call__(self, image) -> list[torch.Tensor]:
        return [self.image_transform(image), *self.views(image)]


def captioned_image_and_views(config, image_transform) -> ImageAndViews:
    """The transform of the image-text methods that also train on SSL views of the image (SLIP's
    NT-Xent, SigLIP 2's local views): ``image_transform`` (the captioned image's), then ssl.views."""
    m = config.model
    views = ssl_views(config.ssl.views, image_size(m), m.image_mean, m.image_std, config.data.crop_scale_min,
                      parse_randaugment(config.data.randaugment))
    return ImageAndViews(image_transform, views)
