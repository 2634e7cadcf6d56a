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


def backbone_any_size(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``backbone(images)``, also for an open_clip ViT given images smaller than its native size
    (multi-crop's small crops): its positional embedding is then resampled to the smaller grid."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer) or images.shape[-1] == backbone.image_size[-1]:
        return backbone(images)
    return vit_forward_resampled(backbone, images)


def vit_forward_resampled(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """open_clip's ViT forward with the positional embedding resampled to the images' patch grid.

    At the native size it equals ``backbone(images)`` (a test holds it to that, so a change in
    open_clip's forward shows up there rather than as silently different small-crop features).
    """
    x = backbone.conv1(images).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
    position = backbone.positional_embedding  # (1 + native_grid^2, width)
    native, grid = backbone.grid_size[0], images.shape[-1] // backbone.patch_size[0]
    patches = position[1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
    patches = nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    position = torch.cat([position[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])
    cls = backbone.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = backbone.ln_pre(backbone.patch_dropout(torch.cat([cls, x], dim=1) + position.to(x.dtype)))
    pooled, _ = backbone._pool(backbone.transformer(x))  # open_clip's own pooling and final norm
    return pooled @ backbone.proj if backbone.proj is not None else pooled


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

    def backbone_features(self, views: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """(B, 3, H, W), or a list of views whose sizes may differ (multi-crop) -> (sum of B, F).

        Consecutive views of one size go through the backbone together, as in SwAV.
        """
        if torch.is_tensor(views):
            return self.backbone(views)
        features, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features.append(backbone_any_size(self.backbone, torch.cat(views[start:end])))
            start = end
        return torch.cat(features)

    def forward(self, views: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """(B, 3, H, W) or a list of views -> (sum of B, P) projections (not normalised; the loss decides)."""
        return self.head(self.backbone_features(views))


def create_image_encoder(model_cfg, ssl_cfg) -> ImageEncoder:
    """The backbone named by ``ssl.encoder`` at the resolution of ``model.arch``, with the head of ``ssl``."""
    from clipx.models import image_size
    from clipx.models.towers import build_open_clip_vision

    if ssl_cfg.encoder == "open_clip":
        backbone, width = build_open_clip_vision(model_cfg.arch, model_cfg.patch_dropout), model_cfg.arch["embed_dim"]
    else:
        if model_cfg.patch_dropout:
            raise ClipxError(f"model.patch_dropout drops ViT patches; ssl.encoder {ssl_cfg.encoder} is a ResNet")
        backbone, width = torchvision_resnet(ssl_cfg.encoder, image_size(model_cfg))
    return ImageEncoder(backbone, width, ssl_cfg.head_hidden, ssl_cfg.head_out)
