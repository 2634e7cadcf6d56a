"""SimCLR: two augmented views of each image, pulled together by NT-Xent against all other views."""

from __future__ import annotations

import torch

from clipx.config import GATHER_MODES
from clipx.data.batch import VIEWS
from clipx.losses import NTXentLoss
from clipx.losses.mixed import mixed_ntxent
from clipx.methods.mixing import mix_features, mixer_of
from clipx.methods.objective import Objective
from clipx.methods.views import ViewsMethod
from clipx.precision import upcast
from clipx.ssl.mixing import Mixer


class SimCLRObjective(Objective):
    """An ImageEncoder (possibly Accelerate-wrapped) and an NTXentLoss."""

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module):
        self.model = model
        self.loss = loss

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        first, second = batch[VIEWS][:2]
        # One forward over both views, so BatchNorm in the head normalises them together.
        projections = upcast(self.model(torch.cat([first, second])))  # (2B, P)
        return {"view1": projections[: len(first)], "view2": projections[len(first):]}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        return {"loss": self.loss(features["view1"], features["view2"]), "metrics": {}}


class MixedSimCLRObjective(SimCLRObjective):
    """SimCLR with view 1 mixed (i-Mix, ssl.mix): ``mixed_ntxent`` (clipx/methods/mixing.py)."""

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, mixer: Mixer):
        super().__init__(model, loss)
        self.mixer = mixer

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        first, second = batch[VIEWS][:2]
        mix = self.mixer(first)
        return {**super().features({VIEWS: [mix.images, second]}), **mix_features(mix)}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        loss = mixed_ntxent(features["view1"], features["view2"], features["mix_lam"], features["mix_shift"],
                            self.loss.temperature, self.loss.gather)
        return {"loss": loss, "metrics": {}}


class SimCLR(ViewsMethod):
    gather_modes = GATHER_MODES
    mixing = True

    def objective(self, model, config):
        loss = NTXentLoss(config.ssl.temperature, config.loss.gather)
        if config.ssl.mix != "none":
            return MixedSimCLRObjective(model, loss, mixer_of(config.ssl))
        return SimCLRObjective(model, loss)
