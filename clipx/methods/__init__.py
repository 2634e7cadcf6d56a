"""Training methods, selected by ``loss.name``: one module each, one registry line each.

A method owns everything that differs between methods (clipx.methods.objective.Method): its model,
train-time transform, batch fields, model preparation, config checks, per-step state and which
evaluators apply. Adding one is a new module plus a line below (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from clipx.errors import ClipxError
from clipx.methods.classify import Classify
from clipx.methods.clip import CLIP
from clipx.methods.distill import Distilled
from clipx.methods.image_text import ImageTextMethod
from clipx.methods.moco import MoCo
from clipx.methods.objective import Method, Objective
from clipx.methods.siglip import SigLIP
from clipx.methods.simclr import SimCLR
from clipx.methods.simcse import SimCSE
from clipx.methods.slip import SLIP
from clipx.methods.supcon import SupCon
from clipx.methods.swav import SwAV
from clipx.registry import Registry

METHODS: Registry[Method] = Registry("loss")
METHODS.register("clip")(CLIP())
METHODS.register("siglip")(SigLIP())
METHODS.register("ntxent")(SimCLR())
METHODS.register("moco")(MoCo())
METHODS.register("swav")(SwAV())
METHODS.register("slip")(SLIP())
METHODS.register("classify")(Classify())
METHODS.register("supcon")(SupCon())
METHODS.register("simcse")(SimCSE())


def method_of(config) -> Method:
    """The method ``config`` names, after its checks: one line on stderr for anything it cannot train."""
    name = config.loss.name
    method = METHODS.get(name)
    if method.gather_modes and config.loss.gather not in method.gather_modes:
        raise ClipxError(f"loss.gather={config.loss.gather} is not available for loss.name={name}; "
                         f"use one of {', '.join(method.gather_modes)}")
    if config.ssl.batchnorm not in method.batchnorm_modes:
        raise ClipxError(f"ssl.batchnorm={config.ssl.batchnorm} is not available for loss.name={name}; "
                         f"use one of {', '.join(method.batchnorm_modes)}")
    if config.ssl.views.small_crops and not method.multi_crop:
        raise ClipxError(f"ssl.views.small_crops (multi-crop) is used by loss.name=swav only, not {name}")
    if config.data.hard_negative_key is not None and not method.hard_negatives:
        takers = ", ".join(m for m in METHODS.list() if METHODS.get(m).hard_negatives)
        raise ClipxError(f"data.hard_negative_key (hard-negative captions) is used by loss.name={takers}, not {name}")
    if config.model.lora_rank and not method.has_text_tower:
        raise ClipxError(f"model.lora_rank (LoRA adapters on both towers) applies to CLIP models (image-text "
                         f"methods and classify), not loss.name={name}")
    if config.model.text_dropout is not None and not method.text_only:
        raise ClipxError(f"model.text_dropout (dropout in an open_clip text tower) is used by text-only training "
                         f"(loss.name=simcse), not loss.name={name}")
    if config.ssl.mix != "none":
        _check_mixing(config, method)
    if config.distill.enabled:
        if not isinstance(method, ImageTextMethod):
            raise ClipxError(f"distill (a teacher CLIP's similarities as targets) applies to image-text methods, "
                             f"not loss.name={name}")
        method = Distilled(method)
    method.validate(config)
    return method


def _check_mixing(config, method: Method) -> None:
    name, takers = config.loss.name, ", ".join(m for m in METHODS.list() if METHODS.get(m).mixing)
    if not method.mixing:
        raise ClipxError(f"ssl.mix={config.ssl.mix} (i-Mix) has a mixed loss for loss.name={takers}, not {name}; "
                         "set ssl.mix=none")
    if config.data.hard_negative_key is not None or config.distill.enabled:
        raise ClipxError(f"ssl.mix={config.ssl.mix} does not combine with hard-negative captions or distill; "
                         "set ssl.mix=none or drop them")


def build_model(config):
    """The model ``config``'s method trains, with random weights (what checkpoints are loaded into)."""
    return method_of(config).build_model(config)


def build_objective(model, config) -> Objective:
    """The objective of ``config``'s method around an already built (and prepared) model."""
    return method_of(config).objective(model, config)


__all__ = ["METHODS", "Method", "Objective", "build_model", "build_objective", "method_of"]
