"""Objectives (model + loss) selected by ``loss.name``."""

from __future__ import annotations

from clipx.losses import ClipLoss, SigLipLoss
from clipx.objectives.base import Objective
from clipx.objectives.clip import ContrastiveObjective
from clipx.registry import Registry

OBJECTIVES: Registry = Registry("loss")


@OBJECTIVES.register("clip")
def _clip(model, loss_cfg) -> Objective:
    return ContrastiveObjective(model, ClipLoss(gather=loss_cfg.gather))


@OBJECTIVES.register("siglip")
def _siglip(model, loss_cfg) -> Objective:
    return ContrastiveObjective(model, SigLipLoss(gather=loss_cfg.gather), uses_bias=True)


def build_objective(model, loss_cfg) -> Objective:
    """The objective for ``loss_cfg.name`` around an already built (and prepared) model."""
    return OBJECTIVES.get(loss_cfg.name)(model, loss_cfg)


__all__ = ["Objective", "ContrastiveObjective", "build_objective", "OBJECTIVES"]
