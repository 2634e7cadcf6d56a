"""A frozen teacher CLIP, with its own image transform and tokenizer.

``teacher_of`` wraps an image-text model that is already loaded. ``library_teacher`` reads the two
layouts other libraries write, each with that library: an open_clip folder (``open_clip_config.json``
+ weights, through open_clip's ``local-dir:`` loader) and a transformers ``CLIPModel`` folder
(``config.json`` of model_type clip, with its tokenizer and image-processor files). A clipx run or
checkpoint needs the method registry to be built, which sits above the models:
``clipx.methods.load_teacher`` reads all three. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


class Teacher:
    """``embed(images, tokens)`` -> L2-normalised (image, text) embeddings, fp32, without gradients.

    ``transform``: PIL image -> the teacher's (3, H, W) input (its evaluation transform: the
    teacher sees the stored image, not the student's augmented crop, so online and embedded
    teachers agree); ``tokenize``: list[str] -> (N, L) ids; ``logit_scale``: its exp()'d scale.
    """

    def __init__(self, encode_image: Callable, encode_text: Callable, transform: Callable, tokenize: Callable,
                 logit_scale: float, module: torch.nn.Module, source: str):
        self._encode_image, self._encode_text = encode_image, encode_text
        self.transform, self.tokenize, self.logit_scale = transform, tokenize, logit_scale
        self.module, self.source = module, source
        module.eval().requires_grad_(False)

    def to(self, device) -> "Teacher":
        self.module.to(device)
        return self

    @torch.no_grad()
    def embed(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_images(images), self.embed_texts(tokens)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) unit rows, fp32."""
        return F.normalize(self._encode_image(images).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, D) unit rows, fp32."""
        return F.normalize(self._encode_text(tokens).float(), dim=-1)


def teacher_of(model: torch.nn.Module, transform: Callable, tokenize: Callable, source: str) -> Teacher:
    """A Teacher around an already loaded image-text model (``encode_image``, ``encode_text``,
    ``logit_scale`` as a log), with its evaluation transform and tokenizer."""
    return Teacher(model.encode_image, model.encode_text, transform, tokenize,
                   float(model.logit_scale.detach().exp()), model, source)


def library_teacher(path: str | Path) -> Teacher | None:
    """The teacher in folder ``path`` when another library wrote it (open_clip, transformers), on the
    CPU; None for anything else (a clipx run or checkpoint: ``clipx.methods.load_teacher`` reads it)."""
    path = Path(path)
    if (path / "open_clip_config.json").is_file():
        return _open_clip_teacher(path)
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "clip":
        return _hf_teacher(path)
    return None


def _open_clip_teacher(path: Path) -> Teacher:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    return teacher_of(model, preprocess, open_clip.get_tokenizer(f"local-dir:{path}"), f"open_clip:{path}")


def _hf_teacher(path: Path) -> Teacher:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(path, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    length = model.config.text_config.max_position_embeddings

    def tokenize(texts: list[str]) -> torch.Tensor:
        # Padded to the full context: CLIP's causal text tower pools at the end-of-text token,
        # which never attends to the padding after it.
        return tokenizer(texts, padding="max_length", truncation=True, max_length=length,
                         return_tensors="pt")["input_ids"]

    def transform(image) -> torch.Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    def features(output) -> torch.Tensor:  # transformers 5 returns a model output, 4 a tensor
        return output if torch.is_tensor(output) else output.pooler_output

    return Teacher(lambda images: features(model.get_image_features(pixel_values=images)),
                   lambda tokens: features(model.get_text_features(input_ids=tokens)),
                   transform, tokenize, float(model.logit_scale.detach().exp()), model, f"transformers:{path}")
