"""One tokenizer interface over open_clip's BPE tokenizer and Hugging Face tokenizers."""

from __future__ import annotations

import functools
import re

import torch

from clipx.config import ModelConfig

# A trimmed batch's length is a multiple of this: few distinct shapes, so torch.compile builds few
# graphs and kernels tuned per shape stay few; at most 15 padding tokens per text are kept.
TRIM_MULTIPLE = 16


class Tokenizer:
    """Callable: list of N captions -> (N, L) int64 token ids, padded and truncated; L is the context length.

    ``trim_padding`` (data.trim_padding, for training batches): where the text tower cannot see
    trailing padding (``padding_is_inert``), the batch ends after its longest text, rounded up to a
    multiple of TRIM_MULTIPLE, instead of at the context length. Captions are often far shorter than
    the context (the benchmark model's digit captions fit 16 of its 32), and the tower's cost grows
    with L. The tower's features and gradients are those of the untrimmed batch up to rounding.
    """

    def __init__(self, cfg: ModelConfig, trim_padding: bool = False):
        if cfg.text_tower == "hf":
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(cfg.hf_text_path, local_files_only=True)
            self.context_length = cfg.hf_context_length
            self.pad_id = self._hf.pad_token_id if self._hf.pad_token_id is not None else 0
        else:
            self._hf = None
            self.context_length = cfg.arch["text_cfg"].get("context_length", 77)
            self._bpe = _bpe_tokenizer(self.context_length)
            self.pad_id = 0  # open_clip's SimpleTokenizer pads with zeros
        self.trim_padding = trim_padding and padding_is_inert(cfg)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self._hf is None:
            tokens = self._bpe(texts)
        else:
            tokens = self._hf(texts, padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")["input_ids"]
        return self.trim(tokens) if self.trim_padding else tokens

    def trim(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) -> (N, L'): the columns up to the last one any text uses, rounded up to TRIM_MULTIPLE.
        A pad id inside a text (open_clip's id 0 is a byte of its vocabulary) is kept: only trailing
        columns go."""
        used = (tokens != self.pad_id).any(0).nonzero()
        length = int(used.max()) + 1 if len(used) else 1
        length = min(-(-length // TRIM_MULTIPLE) * TRIM_MULTIPLE, tokens.shape[1])
        return tokens[:, :length]


def padding_is_inert(cfg: ModelConfig) -> bool:
    """Whether ``cfg``'s text tower gives the same features (and gradients) whatever trailing padding
    follows a text: a transformers tower masks pad tokens out of attention and pooling
    (models/towers.py:HFTextTower); an open_clip text transformer does when its attention is causal
    (no token sees a later one) and it pools the end-of-text token (``argmax``), with no class token
    appended after the padding. A non-causal open_clip tower attends to its padding, and ``last``
    pooling reads it: those keep the full context."""
    if cfg.text_tower == "hf":
        return True
    text_cfg = cfg.arch["text_cfg"]
    return (not text_cfg.get("no_causal_mask", False) and text_cfg.get("pool_type", "argmax") == "argmax"
            and not text_cfg.get("embed_cls", False))


@functools.lru_cache(maxsize=4)
def _bpe_tokenizer(context_length: int) -> "BpeTokenizer":
    """open_clip's BPE tokenizer, built once per process and context length: reading its merges takes a
    third of a second, and a run builds a tokenizer for training and again for each evaluation. The
    vocabulary ships inside the open_clip package: nothing is downloaded."""
    from open_clip.tokenizer import SimpleTokenizer

    return BpeTokenizer(SimpleTokenizer(context_length=context_length))


# Printable ASCII without "&": text that ftfy.fix_text and html.unescape return unchanged (ftfy's
# fixes act on non-ASCII characters, control characters and HTML entities, none of which can occur).
_PLAIN = re.compile(r"[ -%'-~]*")


class BpeTokenizer:
    """open_clip's SimpleTokenizer, giving the same ids (tests/test_tokenizer.py checks), with two of its
    costs taken out of the loader's per-sample work:

    - its text cleaning runs ftfy.fix_text and html.unescape twice on every caption, about half of
      a caption's tokenizing time; on plain text (``_PLAIN``) both are the identity, so the cleaning
      reduces to what follows them: whitespace folding and lower-casing;
    - it fills its output one row at a time from a new tensor per caption; here the padded rows are
      built as lists and become one tensor.

    Anything other than the default cleaning ("lower") or truncation goes to SimpleTokenizer itself.
    """

    def __init__(self, bpe):
        self.bpe = bpe
        self.context_length = bpe.context_length
        original = bpe.clean_fn
        self.fast = getattr(original, "__name__", "") == "_clean_lower" and bpe.reduction_fn is None
        if self.fast:
            bpe.clean_fn = lambda text: " ".join(text.split()).lower() if _PLAIN.fullmatch(text) else original(text)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if not self.fast:
            return self.bpe(texts)
        length, sot, eot = self.context_length, self.bpe.sot_token_id, self.bpe.eot_token_id
        rows = []
        for text in texts:
            tokens = [sot, *self.bpe.encode(text), eot]
            if len(tokens) > length:  # truncated, still ending with end-of-text (SimpleTokenizer's rule)
                tokens = tokens[:length - 1] + [eot]
            rows.append(tokens + [0] * (length - len(tokens)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)
