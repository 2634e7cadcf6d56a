"""Objectives (model + loss) selected by ``loss.name``, each with the model and inputs it needs.

The training loop reads a spec's fields (which model to build, which batch inputs to produce) and
never asks which method it is running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from clipx.losses import ClipLoss, NTXentLoss, SigLipLoss
from clipx.objectives.base import Objective
from clipx.objectives.clip import ContrastiveObjective
from clipx.objectives.simclr import SimCLRObjective
from clipx.registry import Registry

IMAGE_TEXT = "image_text"  # batches of images and tokenized captions
VIEWS = "views"  # batches of augmented views, captions unused


@dataclass(frozen=True)
class ObjectiveSpec:
    inputs: str  # IMAGE_TEXT or VIEWS
    build_model: Callable[[object, object], torch.nn.Module]  # (model_cfg, ssl_cfg) -> model
    build: Callable[[torch.nn.Module, object, object], Objective]  # (prepared model, loss_cfg, ssl_cfg)


def _dual_encoder(model_cfg, ssl_cfg):
    from clipx.models import create_model

    return create_model(model_cfg)


def _image_encoder(model_cfg, ssl_cfg):
    from clipx.ssl.encoder import create_image_encoder

    return create_image_encoder(model_cfg, ssl_cfg)


OBJECTIVES: Registry = Registry("loss")
OBJECTIVES.register("clip")(ObjectiveSpec(
    IMAGE_TEXT, _dual_encoder, lambda model, loss_cfg, ssl_cfg: ContrastiveObjective(model, ClipLoss(loss_cfg.gather))))
OBJECTIVES.register("siglip")(ObjectiveSpec(
    IMAGE_TEXT, _dual_encoder,
    lambda model, loss_cfg, ssl_cfg: ContrastiveObjective(model, SigLipLoss(loss_cfg.gather), uses_bias=True)))
OBJECTIVES.register("ntxent")(ObjectiveSpec(
    VIEWS, _image_encoder,
    lambda model, loss_cfg, ssl_cfg: SimCLRObjective(model, NTXentLoss(ssl_cfg.temperature, loss_cfg.gather))))


def objective_spec(loss_name: str) -> ObjectiveSpec:
    return OBJECTIVES.get(loss_name)


def build_model(config) -> torch.nn.Module:
    """The model the configured objective trains (random weights)."""
    return objective_spec(config.loss.name).build_model(config.model, config.ssl)


def build_objective(model, config) -> Objective:
    """The objective for ``config.loss.name`` around an already built (and prepared) model."""
    return objective_spec(config.loss.name).build(model, config.loss, config.ssl)


__all__ = ["Objective", "ObjectiveSpec", "IMAGE_TEXT", "VIEWS", "build_model", "build_objective",
           "objective_spec", "OBJECTIVES"]
