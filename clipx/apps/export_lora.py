"""Export a LoRA run's adapters alone, in PEFT's file layout (``clipx export --format lora``).

The folder holds ``adapter_config.json`` (PEFT's LoraConfig: r, lora_alpha, lora_dropout,
target_modules) and ``adapter_model.safetensors`` with PEFT's saved names,
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``. Module paths are clipx's,
which for open_clip towers are open_clip's own (CustomTextCLIP: ``visual.transformer.resblocks.N``,
``text.transformer.resblocks.N``), so ``peft.PeftModel.from_pretrained(open_clip_model, DIR)`` puts
the adapters on an open_clip model of the base weights; a transformers text tower's paths are its
transformers model's under ``text.transformer.``. The run's trainable weights outside the adapters
(the logit scale, a transformers tower's projection, heads) go into the same file under
``base_model.model.<name>``, which PEFT's loader sets as it finds them: the folder plus the base
weights is the trained model.

Why PEFT's layout without depending on peft: peft adapts a model by wrapping its layers, which moves
every adapted base weight to ``<layer>.base_layer.weight``; clipx's checkpoints, pretrained loading,
open_clip / transformers key layouts, FSDP's per-block units and the lock / layer-decay group
patterns all key on the plain names, and peft's ``nn.MultiheadAttention`` adapter merges and
unmerges the whole weight around every call instead of adding a low-rank term to the fused
projection. Adapters are two small matrices per layer (clipx/models/lora.py), not worth a runtime
dependency; the file layout is what other tools read, so clipx writes that, and its tests check that
peft (a dev-only dependency) loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from clipx.errors import ClipxError
from clipx.models.lock import lock_towers
from clipx.models.lora import is_adapter_key, peft_state

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_lora(checkpoint: str | Path, out: str | Path, weights: str = "auto") -> Path:
    """Write the LoRA adapters of ``checkpoint`` (its ``weights``: auto, ema or raw) and its other
    trainable weights as a PEFT adapter folder ``out``; returns ``out``."""
    from clipx.api import load_model

    model, config = load_model(checkpoint, weights=weights)
    m = config.model
    if not m.lora_rank:
        raise ClipxError(f"{checkpoint} has no LoRA adapters (its model.lora_rank is 0); export it with "
                         "--format open_clip or hf")
    lock_towers(model, m)  # what the run trained: adapters, and what stays trainable besides them
    state = model.state_dict()
    tensors, targets = peft_state(model, state)
    tensors.update({f"base_model.model.{name}": state[name] for name, param in model.named_parameters()
                    if param.requires_grad and not is_adapter_key(name)})
    adapter_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": m.pretrained, "revision": None,
        "r": m.lora_rank, "lora_alpha": m.lora_alpha, "lora_dropout": m.lora_dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "inference_mode": True,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    return out
