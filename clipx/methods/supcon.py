"""Supervised contrastive learning (``loss.name: supcon``; Khosla et al. 2020): SimCLR's two views and
encoder, with every same-label view in the global batch as a positive (clipx.losses.SupConLoss).

Labels come from the shards as evaluation reads them (a ``.cls`` member or the ``eval.label_key``
field of the ``.json``), every class kept. A sample without a label is trained on, not skipped: its
label is -1 and its other view its only positive, as in SimCLR. A malformed label skips the sample
(counted as no_class_label).
"""

from __future__ import annotations

import torch

from clipx.config import GATHER_MODES
from clipx.data.batch import LABEL, LabelledViewsBatch
from clipx.data.labels import LabelReader
from clipx.losses.supcon import UNLABELLED, SupConLoss
from clipx.methods.objective import Objective
from clipx.methods.simclr import SimCLRObjective
from clipx.methods.views import ViewsMethod


class SupConObjective(SimCLRObjective):
    """SimCLR's two-view forward, plus each sample's label, into a SupConLoss."""

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        return {**super().features(batch), "label": batch[LABEL]}

    def loss_from_features(self, features: dict[str, torch.Tensor]) -> dict:
        labelled = (features["label"] != UNLABELLED).float().mean()
        return {"loss": self.loss(features["view1"], features["view2"], features["label"]),
                "metrics": {"labelled_fraction": labelled}}


class SupCon(ViewsMethod):
    gather_modes = GATHER_MODES

    def collate(self, config):
        return LabelledViewsBatch(LabelReader(config.eval.label_key, classes=None, unlabelled=UNLABELLED))

    def objective(self, model, config) -> Objective:
        return SupConObjective(model, SupConLoss(config.ssl.temperature, config.loss.gather))
