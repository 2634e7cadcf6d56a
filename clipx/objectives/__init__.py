"""Objectives (model + loss) selected by ``loss.name``, each with the model and inputs it needs.

The training loop reads a spec's fields (which model to build, which batch inputs to produce) and
never asks which method it is running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from clipx import dist
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
    build: Callable[[torch.nn.Module, object], Objective]  # (prepared model, config) -> objective


def _dual_encoder(model_cfg, ssl_cfg):
    from clipx.models import create_model

    return create_model(model_cfg)


def _image_encoder(model_cfg, ssl_cfg):
    from clipx.ssl.encoder import create_image_encoder

    return create_image_encoder(model_cfg, ssl_cfg)


def _moco_model(model_cfg, ssl_cfg):
    from clipx.ssl.moco import MoCoModel

    predictor = ssl_cfg.predictor_hidden if ssl_cfg.moco_version == 3 else None
    return MoCoModel(_image_encoder(model_cfg, ssl_cfg), predictor)


def _swav_model(model_cfg, ssl_cfg):
    from clipx.ssl.swav import SwAVModel

    return SwAVModel(_image_encoder(model_cfg, ssl_cfg), ssl_cfg.prototypes)


def _moco(model, config):
    from clipx.objectives.moco import MoCoObjective

    t = config.train
    return MoCoObjective(model, config.ssl, t.batch_size * t.accum_steps * dist.world_size())


def _swav(model, config):
    from clipx.objectives.swav import SwAVObjective

    return SwAVObjective(model, config.ssl)


OBJECTIVES: Registry = Registry("loss")
OBJECTIVES.register("clip")(ObjectiveSpec(
    IMAGE_TEXT, _dual_encoder, lambda model, config: ContrastiveObjective(model, ClipLoss(config.loss.gather))))
OBJECTIVES.register("siglip")(ObjectiveSpec(
    IMAGE_TEXT, _dual_encoder,
    lambda model, config: ContrastiveObjective(model, SigLipLoss(config.loss.gather), uses_bias=True)))
OBJECTIVES.register("ntxent")(ObjectiveSpec(
    VIEWS, _image_encoder,
    lambda model, config: SimCLRObjective(model, NTXentLoss(config.ssl.temperature, config.loss.gather))))
OBJECTIVES.register("moco")(ObjectiveSpec(VIEWS, _moco_model, _moco))
OBJECTIVES.register("swav")(ObjectiveSpec(VIEWS, _swav_model, _swav))


def objective_spec(loss_name: str) -> ObjectiveSpec:
    return OBJECTIVES.get(loss_name)


def build_model(config) -> torch.nn.Module:
    """The model the configured objective trains (random weights)."""
    spec = objective_spec(config.loss.name)
    model = spec.build_model(config.model, config.ssl)
    if spec.inputs == VIEWS:
        from clipx.ssl.batchnorm import split_batchnorm_

        split_batchnorm_(model, config.ssl.bn_splits)
    return model


def build_objective(model, config) -> Objective:
    """The objective for ``config.loss.name`` around an already built (and prepared) model."""
    return objective_spec(config.loss.name).build(model, config)


__all__ = ["Objective", "ObjectiveSpec", "IMAGE_TEXT", "VIEWS", "build_model", "build_objective",
           "objective_spec", "OBJECTIVES"]
