"""Export a transformers text tower as a sentence-transformers folder (``clipx export --format
sentence-transformers``): what a SimCSE run (or a CLIP with model.text_tower=hf) trained, for tools
that embed sentences with mean pooling.

The folder is a plain transformers model (config.json, model.safetensors, the tokenizer's files) that
``AutoModel.from_pretrained`` loads, plus the modules sentence-transformers reads around it: pooling
over the attention mask (mean, or the first token, as model.hf_pooling), clipx's projection as a
Dense layer without bias or activation, and L2 normalisation. Pooling the transformer's hidden states
and projecting them reproduces clipx's embedding (tests/test_simcse.py checks it to 1e-5).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from clipx.errors import ClipxError

# sentence-transformers' module list: transformer, pooling, dense projection, normalisation.
MODULES = [("0", "", "Transformer"), ("1", "1_Pooling", "Pooling"), ("2", "2_Dense", "Dense"),
           ("3", "3_Normalize", "Normalize")]


def export_sentence_transformers(checkpoint: str | Path, out: str | Path, weights: str = "auto") -> Path:
    """Write ``checkpoint``'s transformers text tower (its ``weights``: auto, ema or raw) as the
    sentence-transformers folder ``out``; returns ``out``. Written beside ``out`` and renamed into
    place, so a failed export leaves no half-written folder."""
    from transformers import AutoTokenizer

    from clipx.api import load_model
    from clipx.models.towers import HFTextTower

    model, config = load_model(checkpoint, weights=weights)
    tower = getattr(model, "text", None)
    if not isinstance(tower, HFTextTower):
        raise ClipxError(f"{checkpoint} has no transformers text tower (model.text_tower=hf): a sentence-transformers "
                         "folder holds a transformers encoder; an open_clip text tower is read with clipx.load")
    if config.model.lora_rank:
        raise ClipxError("a LoRA run's text tower: export it with --format hf or open_clip (adapters merged)")
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tower.transformer.save_pretrained(staging, safe_serialization=True)
    AutoTokenizer.from_pretrained(config.model.hf_text_path, local_files_only=True).save_pretrained(staging)
    hidden, embed = tower.proj.in_features, tower.proj.out_features
    _write_json(staging / "modules.json", [{"idx": int(name), "name": name, "path": path,
                                            "type": f"sentence_transformers.models.{kind}"}
                                           for name, path, kind in MODULES])
    _write_json(staging / "sentence_bert_config.json", {"max_seq_length": config.model.hf_context_length,
                                                         "do_lower_case": False})
    _write_json(staging / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": tower.pooling == "cls",
        "pooling_mode_mean_tokens": tower.pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False})
    _write_json(staging / "2_Dense" / "config.json", {"in_features": hidden, "out_features": embed, "bias": False,
                                                      "activation_function": "torch.nn.modules.linear.Identity"})
    save_file({"linear.weight": tower.proj.weight.detach().contiguous()}, str(staging / "2_Dense" / "model.safetensors"))
    (staging / "3_Normalize").mkdir()
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
