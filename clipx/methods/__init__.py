"""Training methods, selected by ``loss.name``: one module each, one registry line each.

A method owns everything that differs between methods (clipx.methods.objective.Method): its model,
train-time transform, batch fields, model preparation, config checks, per-step state and which
evaluators apply. Adding one is a new module plus a line below (docs/ARCHITECTURE.md).

Loading a checkpoint builds its model by the method its config names, so it lives here, beside the
registry: ``load_model`` and ``load`` (which clipx.api hands consumers), and ``load_teacher``
(distillation's teacher, which ``method_of`` hands the ``Distilled`` wrapper, so that no method
module reaches back up to the registry).
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipx.config import load_config
from clipx.data.tokenizer import Tokenizer
from clipx.data.transforms import eval_transform
from clipx.errors import ClipxError
from clipx.methods.classify import Classify
from clipx.methods.clip import CLIP
from clipx.methods.coca import CoCa
from clipx.methods.distill import Distilled
from clipx.methods.image_text import ImageTextMethod
from clipx.methods.moco import MoCo
from clipx.methods.objective import Method, Objective
from clipx.methods.siglip import SigLIP
from clipx.methods.siglip2 import SigLIP2
from clipx.methods.simclr import SimCLR
from clipx.methods.simcse import SimCSE
from clipx.methods.slip import SLIP
from clipx.methods.supcon import SupCon
from clipx.methods.swav import SwAV
from clipx.models import image_size
from clipx.models.teacher import Teacher, library_teacher, teacher_of
from clipx.registry import Registry
from clipx.run_layout import as_checkpoint
from clipx.weights import choose_weights, read_weights

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
METHODS.register("coca")(CoCa())
METHODS.register("siglip2")(SigLIP2())


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
    if config.data.decode == "device":
        _check_device_decoding(config, method)
    if config.data.reinforced:
        _check_reinforced(config, method)
    if config.distill.enabled:
        if not isinstance(method, ImageTextMethod):
            raise ClipxError(f"distill (a teacher CLIP's similarities as targets) applies to image-text methods, "
                             f"not loss.name={name}")
        method = Distilled(method, load_teacher)
    method.validate(config)
    return method


def _check_device_decoding(config, method: Method) -> None:
    name, takers = config.loss.name, ", ".join(m for m in METHODS.list() if METHODS.get(m).decodes_on_device)
    if not method.decodes_on_device:
        raise ClipxError(f"data.decode=device decodes one crop per image on the device, for loss.name={takers}, "
                         f"not {name}; set data.decode=loader")
    if config.data.randaugment is not None:
        raise ClipxError("data.randaugment runs on decoded images in the loader; with data.decode=device drop it "
                         "or set data.decode=loader")
    if config.distill.enabled and not config.distill.embedded:
        raise ClipxError("distill with an online teacher decodes each image for the teacher in the loader; use "
                         "data.decode=loader, or embed the teacher first (clipx prep embed-teacher, distill.embedded)")


def _check_reinforced(config, method: Method) -> None:
    name, takers = config.loss.name, ", ".join(m for m in METHODS.list() if METHODS.get(m).replays_views)
    if not method.replays_views:
        raise ClipxError(f"data.reinforced replays one stored view per sample, for loss.name={takers}, not {name}; "
                         "train it on the shards' images (data.reinforced=false)")
    if config.data.decode == "device" or config.data.randaugment is not None:
        raise ClipxError("data.reinforced replays the views the shards store: data.decode=device and "
                         "data.randaugment do not apply; set data.decode=loader and data.randaugment=null")


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


def load_model(path: str | Path, device: str | torch.device = "cpu", weights: str = "auto"):
    """(model in eval mode, config) from a checkpoint directory, built from its own config.yaml alone.

    ``weights``: ``raw`` (the trained weights), ``ema`` (their moving average, train.ema_decay) or
    ``auto`` (ema when the checkpoint has it). A sharded (FSDP) checkpoint is consolidated on the fly
    from its ranks' model shards."""
    path = as_checkpoint(path)
    chosen = choose_weights(path, weights)
    config = load_config(path / "config.yaml")
    model = build_model(config)
    state = read_weights(path, model.state_dict(), chosen)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ClipxError(f"{path} weights do not match its config.yaml: {detail}") from None
    return model.to(device).eval(), config


def load(path: str | Path, device: str | torch.device = "cpu", weights: str = "auto"):
    """(model in eval mode, preprocess: PIL image -> (3, H, W) tensor, tokenizer: list[str] -> (N, L) ids).

    ``path`` is a checkpoint directory or a run directory (its newest checkpoint). The model is
    built from the checkpoint's own config.yaml; ``model.encode_image`` and ``model.encode_text``
    return unit-norm embeddings. Image-only (self-supervised) checkpoints have no text tower (the
    tokenizer is None), text-only (SimCSE) ones no image tower (no ``encode_image``).
    ``weights``: ``auto`` (the EMA weights when the run kept them, train.ema_decay), ``ema`` or ``raw``.
    """
    model, config = load_model(path, device, weights)
    m = config.model
    preprocess = eval_transform(image_size(m), m.image_mean, m.image_std)
    return model, preprocess, Tokenizer(m) if hasattr(model, "encode_text") else None


def load_teacher(path: str | Path, what: str = "distill.teacher") -> Teacher:
    """The teacher CLIP in folder ``path``, on the CPU: a clipx run or checkpoint (built by its method,
    its EMA weights when it kept them, as ``load``), an open_clip folder or a transformers CLIPModel folder.
    ``what``: the setting or option that named it, for errors."""
    path = Path(path)
    if not path.is_dir():
        raise ClipxError(f"{what} {path} is not a directory (a clipx run or checkpoint, an open_clip "
                         "folder or a transformers CLIPModel folder)")
    teacher = library_teacher(path)
    if teacher is not None:
        return teacher
    model, preprocess, tokenizer = load(path)
    if tokenizer is None or not hasattr(model, "encode_image"):
        raise ClipxError(f"{what} {path} is an {'image' if tokenizer is None else 'text'}-only model; "
                         "a teacher needs both towers")
    return teacher_of(model, preprocess, tokenizer, f"clipx:{path}")


__all__ = ["METHODS", "Method", "Objective", "build_model", "build_objective", "load", "load_model", "load_teacher",
           "method_of"]
