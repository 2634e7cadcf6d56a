"""ImageEncoder: a backbone (open_clip vision tower or torchvision ResNet) plus a projection head.

Evaluators (kNN, linear probe) use the backbone's features; the loss sees the head's projections.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from clipx.errors import ClipxError


def projection_head(in_dim: int, hidden: int, out: int) -> nn.Module:
    """SimCLR's MLP head: Linear -> BatchNorm -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


def torchvision_resnet(name: str, image_size: int) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet without its classifier; for small images (<= 64 px)
    the 7x7/2 stem and max-pool become a 3x3/1 convolution, as for CIFAR."""
    import torchvision

    if not hasattr(torchvision.models, name) or not name.startswith("resnet"):
        raise ClipxError(f"ssl.encoder {name!r} is not a torchvision ResNet (resnet18, resnet50, ...) or open_clip")
    net = getattr(torchvision.models, name)(weights=None)
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


class ImageEncoder(nn.Module):
    """backbone: images (B, 3, H, W) -> features (B, F); head: features -> projections (B, P)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, head_hidden: int, head_out: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = projection_head(feature_dim, head_hidden, head_out)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm backbone features (B, F), what evaluators compare."""
        return nn.functional.normalize(self.backbone(images), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P) projections (not normalised; the loss decides)."""
        return self.head(self.backbone(images))


def create_image_encoder(model_cfg, ssl_cfg) -> ImageEncoder:
    """The backbone named by ``ssl.encoder`` at the resolution of ``model.arch``, with the head of ``ssl``."""
    from clipx.models import image_size
    from clipx.models.towers import build_open_clip_vision

    if ssl_cfg.encoder == "open_clip":
        backbone, width = build_open_clip_vision(model_cfg.arch), model_cfg.arch["embed_dim"]
    else:
        backbone, width = torchvision_resnet(ssl_cfg.encoder, image_size(model_cfg))
    return ImageEncoder(backbone, width, ssl_cfg.head_hidden, ssl_cfg.head_out)
