"""The combination matrix: every objective flavour x accumulation x precision x tower x world size.

Objectives, their flavours (MoCo v2 and v3) and the gather modes each honours come from the
objective registry, so a method registered later joins the matrix without an edit here. The axes
that are not registries (accumulation, precision, towers) are listed below; each combination is
a list of config overrides for a seconds-long run on the digits shards.

Not every product is run: the full objective x accumulation x precision grid runs at world size 1
on the default tower; every tower runs with every objective it can serve; a cover of the grid
(every objective, accumulation mode and precision at least once, the MiniLM tower unlocked) runs at
world size 2, all inside one launch, where every flavour also runs sharded with FSDP. Every
combination measures its attention kernel (train.attention=auto), and every flavour also runs in
bf16 with the unfused kernel forced, on one and on two processes. One image-text and one image-only
flavour also run torch.compile'd in bf16, on one process and (image-text) on two. Recipes that are
options (RECIPES: patch dropout, several captions, hard negatives, EMA weights, layer-wise
learning-rate decay, distillation, LoRA, RandAugment, i-Mix, text pairs, JPEGs decoded on the device, a
curated keep-list, reinforced shards with a stored or an online teacher ensemble) run with every flavour they
apply to on one process and with an image-text, an image-only and a text-only flavour (each where it
applies) on two; EMA also runs sharded with those flavours on one and on two processes, and LoRA
sharded with the image-text one. Text-only methods (SimCSE) train the default tower's text
transformer and the MiniLM towers; image recipes do not apply to them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from clipx.methods import METHODS
from clipx.methods.image_text import ImageTextMethod

ACCUMULATION = {"k1": {"train.accum_steps": 1}, "features2": {"train.accum_steps": 2, "train.accum_mode": "features"},
                "naive2": {"train.accum_steps": 2, "train.accum_mode": "naive"}}
# fp16 runs on the CPU through clipx's CPU loss scaler (clipx.train.runtime.enable_cpu_fp16). Its
# first scale is low enough that 3 steps of a tiny model do not all overflow; the back-off from the
# default 65536 is tested on its own (tests/test_combination_fixes.py).
PRECISION = {"fp32": {"train.precision": "no"}, "bf16": {"train.precision": "bf16"},
             "fp16": {"train.precision": "fp16", "train.fp16_init_scale": 256.0}}

# How the model is spread over the ranks: DDP replicas, or FSDP2 shards.
SHARDING = {"ddp": {}, "fsdp": {"train.sharding": "fsdp"}}
# The attention kernel: train.attention=auto (every other combination) measures, and on these tiny
# shapes may keep PyTorch's fused kernel; "math" forces the unfused path that bf16 runs pick on
# the bench model, for every flavour in bf16 on one and on two processes.
ATTENTION = {"auto": {}, "math": {"train.attention": "math"}}
# torch.compile: runs are eager by default (train.compile=false); "compiled" (train.compile=true) runs one
# image-text and one image-only flavour in bf16 on one and on two processes.
COMPILE = {"eager": {}, "compiled": {"train.compile": True}}
# Training recipes that are options rather than objectives, each run with every flavour on one
# process and with an image-text and an image-only flavour on two. Patch dropout's unmasked tuning
# covers the last of the 3 steps, so the resume from step 2 crosses the switch.
# Several captions per sample: the digits' .txt sentence or their .json class name, drawn per sample.
# Hard negatives: the digits' .json "negative", the caption's template filled with another class.
# EMA weights: a decay low enough that 3 steps move the average visibly; they also run sharded
# (FSDP keeps each rank's shards of the average), on one and on two processes.
# Layer-wise learning-rate decay counts the blocks of an image-text model's towers.
# FLYP: CLIP's loss with the class prompts of each sample's label as its captions.
# Distillation from the online teacher that the digits fixture writes beside the shards (the
# embedded form gives the same losses: tests/test_distill.py).
# LoRA adapters on both towers of an image-text model, their base weights frozen: the runner checks
# that no frozen parameter changed.
# RandAugment on every method's training images; i-Mix's mixup (half the micro-batches) and cutmix
# on the methods with a mixed loss (METHODS' ``mixing``): their draws must replay and resume.
RECIPES = {"plain": {},
           "patch_dropout": {"model.patch_dropout": 0.5, "model.patch_dropout_unmasked_steps": 1},
           "multi_caption": {"data.caption_keys": {"txt": 0.5, "classname": 0.5}},
           "hard_negatives": {"data.hard_negative_key": "negative"},
           "ema": {"train.ema_decay": 0.9},
           "layer_decay": {"train.layer_decay": 0.75},
           "distill": {"distill.teacher": "{data_dir}/teacher", "distill.weight": 0.5},
           "flyp": {"data.caption_keys": {"class_prompt": 1}},
           "lora": {"model.lora_rank": 4},
           "randaugment": {"data.randaugment": "2,9"},
           "imix": {"ssl.mix": "mixup", "ssl.mix_prob": 0.5},
           "icutmix": {"ssl.mix": "cutmix"},
           "text_pairs": {"data.positive_key": "classname"},
           "device_decode": {"data.decode": "device"},
           "keep_list": {"data.keep": "{data_dir}/keep.parquet"},
           "reinforced": {"data.train": "{data_dir}/train-reinforced", "data.reinforced": True,
                          "distill.embedded": True, "distill.weight": 0.7, "distill.student_weight": 0.3,
                          "data.caption_keys": {"txt": 0.5, "classname": 0.5}},
           "reinforced_online": {"data.train": "{data_dir}/train-reinforced", "data.reinforced": True,
                                 "distill.teacher": "{data_dir}/teacher,{data_dir}/teacher2",
                                 "distill.ensemble": "logits"}}
# Recipes about an image and its caption: image-text only; about captions alone: text-only methods
# too. Recipes about the towers' blocks: models with a text tower. About images: not text-only ones.
IMAGE_TEXT_RECIPES = {"distill", "flyp"}
CAPTION_RECIPES = {"multi_caption"}
TEXT_TOWER_RECIPES = {"layer_decay", "lora"}
IMAGE_RECIPES = {"patch_dropout", "randaugment"}
MIX_RECIPES = {"imix", "icutmix"}
# Text pairs (SimCSE's supervised positives): the digits' .json class name as each caption's pair.
PAIR_RECIPES = {"text_pairs"}
# JPEGs decoded on the training device (METHODS' ``decodes_on_device``), here the CPU's decoder: the
# crop boxes drawn in the loader must replay and resume like the decoded ones.
DEVICE_DECODE_RECIPES = {"device_decode"}
# Reinforced shards (`clipx prep reinforce`: stored views, an ensemble of two teachers, the class name
# as a synthetic caption): their replayed views and the ensemble's stored embeddings (MobileCLIP's
# convex weights, real and synthetic captions mixed), or the ensemble run online on the replayed
# views; on the methods that train on one image per sample (METHODS' ``replays_views``).
REINFORCED_RECIPES = {"reinforced", "reinforced_online"}
# About which samples are read (a curated keep-list, `clipx curate apply`), not how a method uses
# them: one flavour of each kind (image-text, image-only, text-only) covers it.
DATA_RECIPES = {"keep_list"}

# A context of 32 tokens, twice the digits' longest caption: training batches are trimmed to 16
# (data.trim_padding), so every run also checks trimmed batches against resume and the gathers.
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}
# open_clip's ModifiedResNet (CLIP's RN50 design: BatchNorm, attention pooling), at 32 px.
TINY_RESNET = {**TINY_VIT, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16}}


@dataclass(frozen=True)
class Tower:
    """A tower choice: the architecture JSON to write, and the overrides that select it."""

    arch: dict
    overrides: dict = field(default_factory=dict)
    needs_minilm: bool = False
    image_text_only: bool = False  # locks and text towers exist only in image-text models
    views_only: bool = False  # torchvision ResNets are SSL encoders
    # fp16 convolutions have no fast CPU kernels: a ResNet-18 step takes minutes in the CPU fp16
    # stand-in. The loss-scaler path is the same for every tower, and runs with the others.
    cpu_fp16: bool = True
    locked_prefixes: tuple[str, ...] = ()  # state-dict prefixes that must stay bitwise unchanged
    text_only: bool = False  # also a text-only model's tower (its image side is no different from "vit")
    patch_tokens: bool = False  # an open_clip ViT and text transformer: serves the decoders' methods (CoCa, SigLIP 2)


TOWERS = {
    "vit": Tower(TINY_VIT, patch_tokens=True),
    "modified_resnet": Tower(TINY_RESNET),
    "torchvision_resnet18": Tower(TINY_VIT, {"ssl.encoder": "resnet18"}, views_only=True, cpu_fp16=False),
    "vit_locked": Tower(TINY_VIT, {"model.lock_image": True}, image_text_only=True, locked_prefixes=("visual.",),
                        patch_tokens=True),
    "modified_resnet_locked": Tower(TINY_RESNET, {"model.lock_image": True}, image_text_only=True,
                                    locked_prefixes=("visual.",)),
    "minilm_locked": Tower(TINY_VIT, {"model.text_tower": "hf", "model.lock_text": True}, needs_minilm=True,
                           image_text_only=True, locked_prefixes=("text.transformer.",), text_only=True),
    "minilm_partly_unlocked": Tower(TINY_VIT, {"model.text_tower": "hf", "model.lock_text": True,
                                               "model.lock_text_unlocked_layers": 1},
                                    needs_minilm=True, image_text_only=True,
                                    locked_prefixes=tuple(f"text.transformer.encoder.layer.{i}." for i in range(5))
                                    + ("text.transformer.embeddings.",), text_only=True),
    "minilm_unlocked": Tower(TINY_VIT, {"model.text_tower": "hf"}, needs_minilm=True, image_text_only=True,
                             text_only=True),
    # LiT with the packaged MiniLM as the trainable text tower: the flagship recipe of the DDP bug.
    "lit_minilm": Tower(TINY_VIT, {"model.text_tower": "hf", "model.lock_image": True}, needs_minilm=True,
                        image_text_only=True, locked_prefixes=("visual.",)),
}


@dataclass(frozen=True)
class Combination:
    name: str
    objective: str  # loss.name
    tower: str
    overrides: dict
    world_size: int = 1



def is_image_text(objective: str) -> bool:
    """Whether the method trains on image-caption pairs (which caption recipes apply to)."""
    return isinstance(METHODS.get(objective), ImageTextMethod)


def has_text_tower(objective: str) -> bool:
    """Whether the method's model has a text tower (which text towers and locks apply to): the
    image-text methods, and classification fine-tuning of a CLIP."""
    return METHODS.get(objective).has_text_tower


def flavours() -> list[tuple[str, str, dict]]:
    """(name, loss.name, overrides) for every registered objective flavour, e.g. ("moco-v3", "moco", {...})."""
    out = []
    for objective in METHODS.list():
        for variant, overrides in METHODS.get(objective).variants.items():
            out.append((f"{objective}-{variant}" if variant else objective, objective, dict(overrides)))
    return out


def _combination(flavour, tower: str, accumulation: str, precision: str, world_size: int = 1,
                 sharding: str = "ddp", attention: str = "auto", compile: str = "eager",
                 recipe: str = "plain") -> Combination:
    name, objective, overrides = flavour
    suffix = "".join(f"/{value}" for value, default in ((sharding, "ddp"), (attention, "auto"), (compile, "eager"),
                                                        (recipe, "plain")) if value != default)
    return Combination(f"{name}/{tower}/{accumulation}/{precision}/w{world_size}{suffix}", objective, tower,
                       {**overrides, **TOWERS[tower].overrides, **ACCUMULATION[accumulation], **PRECISION[precision],
                        **SHARDING[sharding], **ATTENTION[attention], **COMPILE[compile], **RECIPES[recipe]},
                       world_size)


def is_text_only(objective: str) -> bool:
    """Whether the method trains a text tower alone (SimCSE)."""
    return METHODS.get(objective).text_only


def kind(objective: str) -> str:
    """image_text (trains on captions), classifier (a CLIP with a head: a text tower, no captions),
    text_only (a text tower on captions) or image_only (self-supervised)."""
    if is_image_text(objective):
        return "image_text"
    if is_text_only(objective):
        return "text_only"
    return "classifier" if has_text_tower(objective) else "image_only"


def compiled_cover() -> list[tuple[str, str, dict]]:
    """The flavours the matrix also runs compiled (and runs the recipes with on two processes): the
    first image-text one, the first image-only one and the first text-only one."""
    kinds = [[f for f in flavours() if kind(f[1]) == wanted] for wanted in ("image_text", "image_only", "text_only")]
    return [found[0] for found in kinds if found]


def recipe_applies(recipe: str, objective: str) -> bool:
    """Whether a flavour of ``objective`` can train with ``recipe`` (the others refuse it)."""
    method = METHODS.get(objective)
    if recipe in DATA_RECIPES:
        return objective in {flavour[1] for flavour in compiled_cover()}
    if recipe == "hard_negatives":
        return method.hard_negatives
    if recipe in MIX_RECIPES:
        return method.mixing
    if recipe in REINFORCED_RECIPES:
        return method.replays_views
    if recipe in TEXT_TOWER_RECIPES:
        return has_text_tower(objective)
    if recipe in PAIR_RECIPES:
        return method.text_only
    if recipe in DEVICE_DECODE_RECIPES:
        return method.decodes_on_device and not method.text_only
    if recipe == "patch_dropout":
        return method.takes_patch_dropout and not method.text_only
    if recipe in IMAGE_RECIPES:
        return not method.text_only
    if recipe in CAPTION_RECIPES:
        return is_image_text(objective) or method.text_only
    return recipe not in IMAGE_TEXT_RECIPES or is_image_text(objective)


def _serves(tower: str, objective: str) -> bool:
    t, text_tower = TOWERS[tower], has_text_tower(objective)
    if METHODS.get(objective).needs_patch_tokens and not t.patch_tokens:
        return False
    if is_text_only(objective):
        return t.text_only
    return not (t.image_text_only and not text_tower) and not (t.views_only and text_tower)


def world_one() -> list[Combination]:
    """Every flavour x accumulation x precision on the ViT; every other tower with every flavour it serves;
    every flavour sharded with FSDP over a group of one."""
    grid = [_combination(f, "vit", a, p) for f, a, p in itertools.product(flavours(), ACCUMULATION, PRECISION)]
    precisions = itertools.cycle(PRECISION)  # towers rotate through the precisions
    towers = []
    for tower in TOWERS:
        for flavour in (f for f in flavours() if tower != "vit" and _serves(tower, f[1])):
            precision = next(precisions)
            if precision == "fp16" and not TOWERS[tower].cpu_fp16:
                precision = next(precisions)
            towers.append(_combination(flavour, tower, "k1", precision))
    sharded = [_combination(f, "vit", "k1", "fp32", sharding="fsdp") for f in flavours()]  # FSDP's group of one
    math = [_combination(f, "vit", "k1", "bf16", attention="math") for f in flavours()]
    compiled = [_combination(f, "vit", "k1", "bf16", compile="compiled") for f in compiled_cover()]
    precisions = itertools.cycle(PRECISION)
    recipes = [_combination(f, "vit", "k1", next(precisions), recipe=recipe)
               for recipe in RECIPES if recipe != "plain" for f in flavours() if recipe_applies(recipe, f[1])]
    recipes += [_combination(f, "vit", "k1", "fp32", sharding="fsdp", recipe="ema") for f in compiled_cover()]
    recipes += [_combination(compiled_cover()[0], "vit", "k1", "fp32", sharding="fsdp", recipe="lora")]
    return grid + towers + sharded + math + compiled + recipes


def world_two() -> list[Combination]:
    """Every flavour with each accumulation mode once and each precision once (a Latin square), plus
    the MiniLM towers on 2 processes; then every flavour sharded with FSDP (accumulation and precision
    rotating), and FSDP with a locked tower and with the transformers text tower."""
    out = []
    for index, flavour in enumerate(flavours()):
        for shift, accumulation in enumerate(ACCUMULATION):
            precision = list(PRECISION)[(index + shift) % len(PRECISION)]
            out.append(_combination(flavour, "vit", accumulation, precision, world_size=2,
                                    attention="math" if precision == "bf16" else "auto"))
    image_text = [f for f in flavours() if is_image_text(f[1])]
    out += [_combination(image_text[0], tower, "k1", "fp32", world_size=2)
            for tower in ("minilm_unlocked", "lit_minilm", "modified_resnet_locked")]
    out += [_combination(f, "torchvision_resnet18", "k1", "bf16", world_size=2)
            for f in flavours() if not _serves("vit_locked", f[1])][:1]
    accumulations, precisions = itertools.cycle(ACCUMULATION), itertools.cycle(PRECISION)
    out += [_combination(f, "vit", next(accumulations), next(precisions), world_size=2, sharding="fsdp")
            for f in flavours()]
    out += [_combination(image_text[0], tower, "k1", "fp32", world_size=2, sharding="fsdp")
            for tower in ("vit_locked", "minilm_partly_unlocked")]
    out += [_combination(f, "vit", "k1", "bf16", world_size=2, compile="compiled") for f in compiled_cover()[:1]]
    out += [_combination(f, "vit", "features2", "fp32", world_size=2, recipe=recipe)
            for recipe in RECIPES if recipe != "plain" for f in compiled_cover() if recipe_applies(recipe, f[1])]
    out += [_combination(f, "vit", "k1", "bf16", world_size=2, sharding="fsdp", recipe="ema") for f in compiled_cover()]
    out += [_combination(compiled_cover()[0], "vit", "k1", "bf16", world_size=2, sharding="fsdp", recipe="lora")]
    return out
