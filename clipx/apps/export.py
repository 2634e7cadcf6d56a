"""Export a clipx checkpoint to other tools' formats.

open_clip: a directory with ``open_clip_config.json`` and ``open_clip_model.safetensors`` that
``open_clip.create_model_and_transforms("local-dir:DIR")`` and ``open_clip.get_tokenizer("local-dir:DIR")``
load. A DualEncoder with open_clip towers keeps open_clip's CustomTextCLIP attribute names
(``visual``, ``text``, ``logit_scale``, ``logit_bias``), so the weights are written as they are and
the config only needs ``custom_text: true``. A LoRA model (model.lora_rank) is written with its
adapters merged into the weights they adapt.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from clipx.errors import ClipxError
from clipx.models.lora import merged_state_dict

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def export_open_clip(checkpoint: str | Path, out: str | Path, weights: str = "auto") -> Path:
    """Write ``checkpoint`` (its ``weights``: auto, ema or raw, as clipx.api.load_model) as an open_clip
    local directory ``out``; returns ``out``."""
    from clipx.api import load_model
    from clipx.models import image_size

    model, config = load_model(checkpoint, weights=weights)
    if not hasattr(model, "encode_text"):
        raise ClipxError(f"{checkpoint} is an image-only ({config.loss.name}) model: export covers CLIP models")
    if not hasattr(model, "visual"):
        raise ClipxError(f"{checkpoint} is a text-only ({config.loss.name}) model: export covers CLIP models; a "
                         "transformers text tower exports with --format sentence-transformers")
    if config.model.text_tower != "open_clip":
        raise ClipxError("a model with a transformers text tower (model.text_tower=hf) has no open_clip or CLIPModel "
                         "layout to export to; load it with clipx.load")
    # A CoCa's dict has its decoder (multimodal_cfg) and towers that hand out tokens: open_clip then
    # builds its CoCa class, whose state dict clipx's CoCa model has.
    model_cfg = {**getattr(model, "open_clip_arch", config.model.arch), "custom_text": True}
    if config.model.init_logit_bias is not None:  # SigLIP: open_clip then builds the logit_bias parameter
        model_cfg["init_logit_bias"] = config.model.init_logit_bias
    preprocess_cfg = {"size": image_size(config.model), "mode": "RGB", "mean": list(config.model.image_mean),
                      "std": list(config.model.image_std), "interpolation": "bicubic", "resize_mode": "shortest"}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = merged_state_dict(model, model.clip_state_dict())  # LoRA adapters folded in: plain open_clip weights
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / OPEN_CLIP_WEIGHTS))
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                                   indent=2))
    return out
