"""Objectives (model + loss) selected by ``loss.name``, each with the model and inputs it needs.

The training loop reads a spec's fields (which model to build, which batch inputs to produce) and
never asks which method it is running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


ALL_GATHER_MODES = ("none", "global", "local")


@dataclass(frozen=True)
class ObjectiveSpec:
    inputs: str  # IMAGE_TEXT or VIEWS
    build_model: Callable[[object, object], torch.nn.Module]  # (model_cfg, ssl_cfg) -> model
    build: Callable[[torch.nn.Module, object], Objective]  # (prepared model, config) -> objective
    # The loss.gather modes the method honours; () for methods whose negatives are always global
    # (MoCo's keys, SwAV's Sinkhorn), for which loss.gather has no effect.
    gather_modes: tuple[str, ...] = ()
    # Named flavours of the method, each as the config overrides that select it (MoCo v2 and v3).
    # The combination matrix trains every flavour; "" is the method as configured by default.
    variants: dict[str, dict] = field(default_factory=lambda: {"": {}})


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
    IMAGE_TEXT, _dual_encoder, lambda model, config: ContrastiveObjective(model, ClipLoss(config.loss.gather)),
    gather_modes=ALL_GATHER_MODES))
OBJECTIVES.register("siglip")(ObjectiveSpec(
    IMAGE_TEXT, _dual_encoder,
    lambda model, config: ContrastiveObjective(model, SigLipLoss(config.loss.gather), uses_bias=True),
    # SigLIP passes texts around a ring of ranks (local); a dense all-gather of its (N, N) logits buys nothing.
    gather_modes=("none", "local"),
    variants={"": {"model.init_logit_bias": -10.0, "model.init_temperature": 0.1}}))
OBJECTIVES.register("ntxent")(ObjectiveSpec(
    VIEWS, _image_encoder,
    lambda model, config: SimCLRObjective(model, NTXentLoss(config.ssl.temperature, config.loss.gather)),
    gather_modes=ALL_GATHER_MODES))
OBJECTIVES.register("moco")(ObjectiveSpec(VIEWS, _moco_model, _moco,
                                          variants={"v2": {"ssl.moco_version": 2, "ssl.batchnorm": "shuffle"},
                                                    "v3": {"ssl.moco_version": 3}}))
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
