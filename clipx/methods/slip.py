"""SLIP (Mu et al., 2022): CLIP's loss plus SimCLR's NT-Xent on two augmented views of each image,
through the same image tower and a projection head of its own, weighted by ``loss.ssl_weight``.

Where clipx differs from the paper: the head reads the image tower's output (its embedding before
normalisation) rather than the trunk before the tower's projection, so it works the same for every
tower (open_clip ViTs, ModifiedResNets, locked towers); clipx's SimCLR does the same.
"""

from __future__ import annotations

import torch

from clipx.config import GATHER_MODES
from clipx.data.batch import IMAGE, VIEWS, ImageTextViewsBatch
from clipx.data.captions import caption_chooser
from clipx.data.tokenizer import Tokenizer
from clipx.errors import ClipxError
from clipx.losses import ClipLoss, NTXentLoss
from clipx.methods.image_text import ContrastiveObjective, ImageTextMethod, texts
from clipx.methods.views import ViewsMethod, captioned_image_and_views
from clipx.models import create_model
from clipx.precision import upcast
from clipx.ssl.batchnorm import split_batchnorm_
from clipx.ssl.encoder import projection_head


class SlipObjective(ContrastiveObjective):
    """CLIP on (image, caption) pairs + ``ssl_weight`` x NT-Xent on the image tower's views."""

    def __init__(self, model: torch.nn.Module, clip_loss: torch.nn.Module, ssl_loss: torch.nn.Module,
                 ssl_weight: float):
        super().__init__(model, clip_loss)
        self.ssl_loss, self.ssl_weight = ssl_loss, ssl_weight

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        first, second = batch[VIEWS][:2]
        *outputs, projections = self.model(batch[IMAGE], texts(batch), torch.cat([first, second]))
        projections = upcast(projections)  # (2B, P)
        return {**self.named(batch, *outputs), "view1": projections[: len(first)], "view2": projections[len(first):]}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        out = super().loss_from_features(features)
        clip = out["loss"]
        ssl = self.ssl_loss(features["view1"], features["view2"])
        out["metrics"].update(clip_loss=clip.detach(), ssl_loss=ssl.detach())
        return {**out, "loss": clip + self.ssl_weight * ssl}


class SLIP(ImageTextMethod):
    gather_modes = GATHER_MODES  # CLIP's and NT-Xent's negatives gathered alike
    hard_negatives = True
    evaluators = ("zero_shot", "retrieval", "knn", "linear_probe")
    decodes_on_device = False  # its SSL views are made from the decoded image in the loader
    replays_views = False  # nor are they replayed from reinforced shards
    # The head's BatchNorm: per device, or synchronised across GPUs, as for the image-only methods.
    check_processes = ViewsMethod.check_processes
    prepare = ViewsMethod.prepare

    def validate(self, config) -> None:
        if config.loss.ssl_weight < 0:
            raise ClipxError(f"loss.ssl_weight must be >= 0; got {config.loss.ssl_weight}")
        if config.ssl.views.count != 2:
            raise ClipxError(f"loss.name=slip trains on two views per image; got ssl.views.count={config.ssl.views.count}")

    def build_model(self, config) -> torch.nn.Module:
        head = projection_head(config.model.arch["embed_dim"], config.ssl.head_hidden, config.ssl.head_out)
        return split_batchnorm_(create_model(config.model, image_head=head), config.ssl.bn_splits)

    def train_transform(self, config):
        return captioned_image_and_views(config, super().train_transform(config))

    def collate(self, config):
        return ImageTextViewsBatch(Tokenizer(config.model, config.data.trim_padding), caption_chooser(config.data, config.eval))

    def objective(self, model, config):
        return SlipObjective(model, ClipLoss(config.loss.gather),
                             NTXentLoss(config.ssl.temperature, config.loss.gather), config.loss.ssl_weight)
