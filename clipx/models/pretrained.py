"""Initial weights from local disk (``model.pretrained``), in any of the formats clipx exports.

Sources, all read without pickle: a clipx run or checkpoint directory; an open_clip folder
(``open_clip_config.json`` + ``*.safetensors``); a Hugging Face ``CLIPModel`` folder (``config.json``
+ ``model.safetensors``); a ``.safetensors`` file in open_clip names (``CLIP`` or ``CustomTextCLIP``)
or clipx names. Everything is mapped to clipx's names (open_clip's CustomTextCLIP names).

``read_pretrained`` reads whole tensors (the eager build); ``pretrained_rows`` maps the same names to
``RowSource``s that read any rows of a tensor from the memory-mapped file without reading the rest, so
that a sharded model loads each rank's rows only (clipx/train/sharded_init.py). A CLIPModel's packed
q/k/v projection is three row ranges of three tensors, its transposed projections column ranges.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
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
    file, hf_config = _weights_file(path)
    state = load_file(str(file))
    return from_hf_clip(state, hf_config) if hf_config is not None else from_open_clip(state)


def _weights_file(path: str | Path) -> tuple[Path, dict | None]:
    """The safetensors file holding ``path``'s weights, and its config.json when it is a transformers
    CLIPModel folder (whose names differ), else None."""
    path = Path(path)
    if not path.exists():
        raise ClipxError(f"model.pretrained {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ClipxError(f"model.pretrained {path}: only .safetensors files are read (no pickle)")
        return path, None
    if (path / "open_clip_config.json").is_file():
        return _safetensors_in(path), None
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if config.get("model_type") == "clip":
        return _safetensors_in(path), config
    return as_checkpoint(path) / "model.safetensors", None


def from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP names -> clipx names (CustomTextCLIP and clipx names pass through)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "text.token_embedding.weight" in state or "token_embedding.weight" not in state:
        return state
    return {f"text.{k}" if k.startswith(_OPEN_CLIP_TEXT_PARTS) else k: v for k, v in state.items() if k != "attn_mask"}


# clipx name -> CLIPModel name, besides the blocks; the projections are stored transposed there.
_HF_NAMES = {
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
}
_HF_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text.text_projection": "text_projection.weight"}


def _hf_layout(config: dict) -> dict:
    """clipx name -> (CLIPModel names stacked along dim 0, stored transposed?) for a CLIPModel."""
    layout = {ours: ([theirs], False) for ours, theirs in _HF_NAMES.items()}
    layout.update({ours: ([theirs], True) for ours, theirs in _HF_TRANSPOSED.items()})
    for src, dst, tower in (("vision_model.encoder.layers", "visual.transformer.resblocks", "vision_config"),
                            ("text_model.encoder.layers", "text.transformer.resblocks", "text_config")):
        for i in range(config[tower]["num_hidden_layers"]):
            s, d = f"{src}.{i}", f"{dst}.{i}"
            for kind in ("weight", "bias"):
                layout[f"{d}.attn.in_proj_{kind}"] = ([f"{s}.self_attn.{p}_proj.{kind}" for p in "qkv"], False)
                layout.update({f"{d}.{ours}.{kind}": ([f"{s}.{theirs}.{kind}"], False)
                               for ours, theirs in BLOCK_RENAMES.items()})
    return layout


def _hf_missing(layout: dict, present) -> None:
    missing = next((k for names, _ in layout.values() for k in names if k not in present), None)
    if missing is not None:
        raise ClipxError(f"model.pretrained: the CLIPModel weights have no {missing}")


def from_hf_clip(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """transformers CLIPModel weights -> clipx names (the inverse of clipx.apps.export_hf)."""
    layout = _hf_layout(config)
    _hf_missing(layout, state)
    out = {ours: torch.cat([state[k] for k in names]) if len(names) > 1 else state[names[0]].T if transposed
           else state[names[0]] for ours, (names, transposed) in layout.items()}
    return {k: v.contiguous() for k, v in out.items()}


def _hf_rows(handle, config: dict) -> dict:
    """A CLIPModel file's tensors as clipx names' row sources (``from_hf_clip``'s mapping, read lazily)."""
    layout = _hf_layout(config)
    _hf_missing(layout, set(handle.keys()))
    return {ours: CatRows([RowSource(handle, k) for k in names]) if len(names) > 1
            else RowSource(handle, names[0], transposed) for ours, (names, transposed) in layout.items()}


class RowSource:
    """Rows [start, stop) of one stored tensor (``shape``), read from a memory-mapped safetensors file;
    ``transposed``: the stored tensor is the transpose, so rows are read as its columns."""

    def __init__(self, handle, key: str, transposed: bool = False):
        self.handle, self.key, self.transposed = handle, key, transposed
        stored = tuple(handle.get_slice(key).get_shape())
        self.shape = torch.Size(stored[::-1] if transposed else stored)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if not self.shape:
            return self.handle.get_tensor(self.key)
        part = self.handle.get_slice(self.key)
        return part[:, start:stop].T.contiguous() if self.transposed else part[start:stop]


class CatRows:
    """Several ``RowSource``s stacked along dim 0 (a CLIPModel's q, k and v as one packed projection)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = torch.Size((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        pieces, offset = [], 0
        for part in self.parts:
            low, high = max(start - offset, 0), min(stop - offset, part.shape[0])
            if low < high:
                pieces.append(part.rows(low, high))
            offset += part.shape[0]
        return torch.cat(pieces) if pieces else torch.empty((0, *self.shape[1:]))


def pretrained_rows(path: str | Path) -> dict:
    """``read_pretrained``'s names, each a ``RowSource`` (or ``CatRows``) reading rows on demand."""
    file, hf_config = _weights_file(path)
    handle = safe_open(str(file), "pt")
    if hf_config is not None:
        return _hf_rows(handle, hf_config)
    return from_open_clip({k: RowSource(handle, k) for k in handle.keys()})


def check_pretrained_fits(weights: dict, shapes: dict, path, text_tower: str) -> dict:
    """The entries of ``weights`` (tensors or row sources, anything with ``shape``) that a model whose
    CLIP part has ``shapes`` takes; one-line errors for adapters it has no place for, missing keys and
    shapes that differ (a 0-dim scalar fits a 1-element vector: sharding's shape of the scalars)."""
    if any(is_adapter_key(k) and k not in shapes for k in weights):
        raise ClipxError(f"model.pretrained {path} holds LoRA adapters this model has no place for; start from its "
                         "merged export (clipx export --format open_clip) or set model.lora_* as it was trained")
    expected = {k: v for k, v in shapes.items() if not is_adapter_key(k) or k in weights}
    if text_tower == "hf":
        expected = {k: v for k, v in expected.items() if not k.startswith("text.")}
        weights = {k: v for k, v in weights.items() if not k.startswith("text.")}
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(expected[k]) != tuple(weights[k].shape)
                   and not (tuple(expected[k]) == (1,) and tuple(weights[k].shape) == ()))
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else \
            f"{wrong[0]} is {tuple(weights[wrong[0]].shape)} there, {tuple(expected[wrong[0]])} here"
        raise ClipxError(f"model.pretrained {path} does not fit model.name's architecture ({detail}); point "
                         "model.name at the architecture it was trained with")
    return {k: weights[k] for k in expected}


def init_from_pretrained(model: torch.nn.Module, path: str | Path, text_tower: str) -> None:
    """Load ``path``'s weights into ``model`` (its CLIP part, ``clip_state_dict``). With a transformers
    text tower (whose weights come from model.hf_text_path), only the image tower, the logit scale and
    bias are taken from ``path``. LoRA adapters are taken from ``path`` if it has them (a clipx LoRA
    run), else they stay as built (zero: the pretrained function)."""
    # A CLIP's weights: what a method adds to the towers (SLIP's view head, a classifier's head) starts
    # as the method builds it.
    shapes = {k: v.shape for k, v in model.clip_state_dict().items()}
    model.load_state_dict(check_pretrained_fits(read_pretrained(path), shapes, path, text_tower), strict=False)
