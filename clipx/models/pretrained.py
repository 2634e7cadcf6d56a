"""Initial weights from local disk (``model.pretrained``), in any of the formats clipx exports.

Sources, all read without pickle: a clipx run or checkpoint directory; an open_clip folder
(``open_clip_config.json`` + ``*.safetensors``); a Hugging Face ``CLIPModel`` folder (``config.json``
+ ``model.safetensors``); a ``.safetensors`` file in open_clip names (``CLIP`` or ``CustomTextCLIP``)
or clipx names. Everything is mapped to clipx's names (open_clip's CustomTextCLIP names).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from clipx.errors import ClipxError
from clipx.models.lora import is_adapter_key
from clipx.run_layout import as_checkpoint

# open_clip residual-block module -> CLIPEncoderLayer module, besides the packed q/k/v projection:
# read one way when initialising from a CLIPModel, the other way by clipx.apps.export_hf.
BLOCK_RENAMES = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}

# open_clip's plain CLIP keeps the text tower's parts at the top level; CustomTextCLIP (and clipx)
# keep them under "text.".
_OPEN_CLIP_TEXT_PARTS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def _safetensors_in(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ClipxError(f"model.pretrained {folder} holds no .safetensors weights (pickled .bin/.pt files are "
                         "not read: convert them to safetensors)")
    return next((f for f in files if f.name == "open_clip_model.safetensors"), files[0])


def read_pretrained(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights at ``path`` in clipx names."""
    path = Path(path)
    if not path.exists():
        raise ClipxError(f"model.pretrained {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ClipxError(f"model.pretrained {path}: only .safetensors files are read (no pickle)")
        return from_open_clip(load_file(str(path)))
    if (path / "open_clip_config.json").is_file():
        return from_open_clip(load_file(str(_safetensors_in(path))))
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()).get("model_type") == "clip":
        return from_hf_clip(load_file(str(_safetensors_in(path))), json.loads((path / "config.json").read_text()))
    return load_file(str(as_checkpoint(path) / "model.safetensors"))


def from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP names -> clipx names (CustomTextCLIP and clipx names pass through)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "text.token_embedding.weight" in state or "token_embedding.weight" not in state:
        return state
    return {f"text.{k}" if k.startswith(_OPEN_CLIP_TEXT_PARTS) else k: v for k, v in state.items() if k != "attn_mask"}


def _blocks_from_hf(state: dict, src: str, dst: str, layers: int) -> dict:
    """CLIPEncoderLayer weights -> open_clip residual blocks (q/k/v packed again)."""
    out = {}
    for i in range(layers):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for kind in ("weight", "bias"):
            out[f"{d}.attn.in_proj_{kind}"] = torch.cat([state[f"{s}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out.update({f"{d}.{ours}.{kind}": state[f"{s}.{theirs}.{kind}"] for ours, theirs in BLOCK_RENAMES.items()})
    return out


def from_hf_clip(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """transformers CLIPModel weights -> clipx names (the inverse of clipx.apps.export_hf)."""
    try:
        out = {
            "logit_scale": state["logit_scale"],
            "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
            "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
            "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
            "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
            "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
            "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
            "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
            "visual.proj": state["visual_projection.weight"].T,
            "text.token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
            "text.positional_embedding": state["text_model.embeddings.position_embedding.weight"],
            "text.ln_final.weight": state["text_model.final_layer_norm.weight"],
            "text.ln_final.bias": state["text_model.final_layer_norm.bias"],
            "text.text_projection": state["text_projection.weight"].T,
        }
        out.update(_blocks_from_hf(state, "vision_model.encoder.layers", "visual.transformer.resblocks",
                                   config["vision_config"]["num_hidden_layers"]))
        out.update(_blocks_from_hf(state, "text_model.encoder.layers", "text.transformer.resblocks",
                                   config["text_config"]["num_hidden_layers"]))
    except KeyError as error:
        raise ClipxError(f"model.pretrained: the CLIPModel weights have no {error.args[0]}") from None
    return {k: v.contiguous() for k, v in out.items()}


def init_from_pretrained(model: torch.nn.Module, path: str | Path, text_tower: str) -> None:
    """Load ``path``'s weights into ``model`` (its CLIP part, ``clip_state_dict``). With a transformers
    text tower (whose weights come from model.hf_text_path), only the image tower, the logit scale and
    bias are taken from ``path``. LoRA adapters are taken from ``path`` if it has them (a clipx LoRA
    run), else they stay as built (zero: the pretrained function)."""
    weights = read_pretrained(path)
    # A CLIP's weights: what a method adds to the towers (SLIP's view head, a classifier's head) starts
    # as the method builds it.
    state = model.clip_state_dict()
    if any(is_adapter_key(k) and k not in state for k in weights):
        raise ClipxError(f"model.pretrained {path} holds LoRA adapters this model has no place for; start from its "
                         "merged export (clipx export --format open_clip) or set model.lora_* as it was trained")
    expected = {k: v for k, v in state.items() if not is_adapter_key(k) or k in weights}
    if text_tower == "hf":
        expected = {k: v for k, v in expected.items() if not k.startswith("text.")}
        weights = {k: v for k, v in weights.items() if not k.startswith("text.")}
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else \
            f"{wrong[0]} is {tuple(weights[wrong[0]].shape)} there, {tuple(expected[wrong[0]].shape)} here"
        raise ClipxError(f"model.pretrained {path} does not fit model.name's architecture ({detail}); point "
                         "model.name at the architecture it was trained with")
    model.load_state_dict({k: weights[k] for k in expected}, strict=False)
