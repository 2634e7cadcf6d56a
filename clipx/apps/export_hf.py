"""Export a clipx CLIP checkpoint as a Hugging Face ``CLIPModel`` directory (config, safetensors,
tokenizer and image-processor files), loadable with ``CLIPModel.from_pretrained(DIR)``.

Only the architectures both libraries compute identically are exported: open_clip's plain ViT
(class-token pooling, pre-LayerNorm, no layer scale or attention pooler) and its causal text
transformer (pooling at the end-of-text token). Anything else is refused with the option named.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from clipx.errors import ClipxError
from clipx.models.lora import merged_state_dict
from clipx.models.pretrained import BLOCK_RENAMES

# Keys of open_clip's tower configs that CLIPModel can represent; any other key is refused.
VISION_KEYS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}
TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
BOS, EOS = 49406, 49407  # open_clip's <start_of_text> and <end_of_text> ids


def hf_config(arch: dict, init_logit_scale: float) -> dict:
    """The CLIPConfig dict for an open_clip architecture dict."""
    vision, text = arch["vision_cfg"], arch["text_cfg"]
    for name, cfg, allowed in (("vision_cfg", vision, VISION_KEYS), ("text_cfg", text, TEXT_KEYS)):
        extra = sorted(set(cfg) - allowed)
        if extra or not isinstance(cfg.get("layers", 12), int):
            raise ClipxError(f"model.arch {name} uses {extra or ['layers as a tuple']}, which CLIPModel has no "
                             "equivalent for; export with --format open_clip instead")
    act = "quick_gelu" if arch.get("quick_gelu") else "gelu"
    v_width, t_width = vision.get("width", 768), text.get("width", 512)
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": arch["embed_dim"],
        "logit_scale_init_value": init_logit_scale,
        "vision_config": {
            "hidden_size": v_width, "intermediate_size": int(v_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision.get("layers", 12), "num_attention_heads": v_width // vision.get("head_width", 64),
            "image_size": vision.get("image_size", 224), "patch_size": vision.get("patch_size", 16),
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": arch["embed_dim"],
        },
        "text_config": {
            "vocab_size": text.get("vocab_size", 49408), "hidden_size": t_width,
            "intermediate_size": int(t_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12), "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77), "hidden_act": act, "layer_norm_eps": 1e-5,
            "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": 0, "projection_dim": arch["embed_dim"],
        },
    }



def _blocks(state: dict, src: str, dst: str, layers: int) -> dict:
    """open_clip residual blocks (packed q/k/v) -> CLIPEncoderLayer weights."""
    out = {}
    for i in range(layers):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for kind in ("weight", "bias"):
            for part, tensor in zip("qkv", state[f"{s}.attn.in_proj_{kind}"].chunk(3)):
                out[f"{d}.self_attn.{part}_proj.{kind}"] = tensor
            out.update({f"{d}.{new}.{kind}": state[f"{s}.{old}.{kind}"] for old, new in BLOCK_RENAMES.items()})
    return out


def hf_state_dict(state: dict, config: dict) -> dict[str, torch.Tensor]:
    """clipx (open_clip CustomTextCLIP) weights -> CLIPModel weights."""
    v_layers, t_layers = config["vision_config"]["num_hidden_layers"], config["text_config"]["num_hidden_layers"]
    out = {
        "logit_scale": state["logit_scale"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,  # open_clip: x @ proj; HF: Linear (x @ W.T)
        "text_model.embeddings.token_embedding.weight": state["text.token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["text.positional_embedding"],
        "text_model.final_layer_norm.weight": state["text.ln_final.weight"],
        "text_model.final_layer_norm.bias": state["text.ln_final.bias"],
        "text_projection.weight": state["text.text_projection"].T,
    }
    out.update(_blocks(state, "visual.transformer.resblocks", "vision_model.encoder.layers", v_layers))
    out.update(_blocks(state, "text.transformer.resblocks", "text_model.encoder.layers", t_layers))
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def write_tokenizer(out: Path, context_length: int) -> None:
    """open_clip's BPE (the one CLIP ships) as CLIPTokenizer's vocab.json and merges.txt."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!", "do_lower_case": True}))


def write_image_processor(out: Path, size: int, mean, std) -> None:
    """Resize the shorter side (bicubic), centre-crop, normalise: clipx's evaluation transform."""
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
        "do_convert_rgb": True}))


def export_hf(checkpoint: str | Path, out: str | Path, weights: str = "auto") -> Path:
    """Write ``checkpoint`` (its ``weights``: auto, ema or raw) as a transformers CLIPModel folder ``out``."""
    from clipx.api import load_model
    from clipx.models import image_size

    model, config = load_model(checkpoint, weights=weights)
    if not hasattr(model, "visual") or not hasattr(model, "encode_text"):
        raise ClipxError(f"{checkpoint} is no CLIP model ({config.loss.name}): --format hf exports CLIP models")
    if config.model.text_tower != "open_clip" or model.logit_bias is not None:
        raise ClipxError("--format hf exports CLIP models with open_clip towers and no SigLIP bias (CLIPModel has "
                         "neither a transformers text tower slot nor a logit bias); use --format open_clip")
    cfg = hf_config(config.model.arch, float(model.logit_scale.detach()))
    weights = hf_state_dict(merged_state_dict(model, model.clip_state_dict()), cfg)  # LoRA adapters folded in
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(out, cfg["text_config"]["max_position_embeddings"])
    write_image_processor(out, image_size(config.model), config.model.image_mean, config.model.image_std)
    return out
