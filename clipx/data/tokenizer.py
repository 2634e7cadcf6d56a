"""One tokenizer interface over open_clip's BPE tokenizer and Hugging Face tokenizers."""

from __future__ import annotations

import functools

import torch

from clipx.config import ModelConfig


class Tokenizer:
    """Callable: list of N captions -> (N, context_length) int64 token ids, padded and truncated."""

    def __init__(self, cfg: ModelConfig):
        if cfg.text_tower == "hf":
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(cfg.hf_text_path, local_files_only=True)
            self.context_length = cfg.hf_context_length
        else:
            self._hf = None
            self.context_length = cfg.arch["text_cfg"].get("context_length", 77)
            self._bpe = _bpe_tokenizer(self.context_length)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self._hf is None:
            return self._bpe(texts)
        encoded = self._hf(texts, padding="max_length", truncation=True, max_length=self.context_length,
                           return_tensors="pt")
        return encoded["input_ids"]


@functools.lru_cache(maxsize=4)
def _bpe_tokenizer(context_length: int):
    """open_clip's BPE tokenizer, built once per process and context length: reading its merges takes a
    third of a second, and a run builds a tokenizer for training and again for each evaluation. The
    vocabulary ships inside the open_clip package: nothing is downloaded."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)
