"""clipx's BPE tokenizer gives open_clip's SimpleTokenizer ids exactly, and skips ftfy on plain text."""

from __future__ import annotations

import random

import ftfy
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from clipx.data.tokenizer import BpeTokenizer

# Characters each of the cleaning steps acts on: HTML entities, mojibake, curly quotes, ligatures,
# full-width forms, control characters and line breaks, beside plain ASCII.
PIECES = ["a", "photo", "of", "the", "digit", "7", " ", "  ", ".", ",", "'", '"', "-", "~", "%", "$",
          "&amp;", "&", "&lt;b&gt;", "&#39;", "Ã©", "café", "\u2019", "\u201cquoted\u201d", "\ufb01ne",
          "\uff21\uff22", "\t", "\n", "\r\n", "\x1b[1m", "\x00", "\u00a0", "Ünïcödé", "日本語", "🙂", "UPPER"]


def corpus(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12))) for _ in range(count)]
    texts += ["".join(rng.choice(PIECES[:16]) for _ in range(rng.randint(0, 12))) for _ in range(count)]  # plain
    texts += ["a very long caption " * 20, "", "   ", "&amp;" * 3]  # truncated, empty, blank, entities
    return texts


@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_equal_open_clips_tokenizer(context_length):
    texts = corpus(1500)
    expected = SimpleTokenizer(context_length=context_length)(texts)
    fast = BpeTokenizer(SimpleTokenizer(context_length=context_length))
    assert fast.fast
    assert torch.equal(fast(texts), expected)


def test_plain_text_skips_ftfy_and_other_text_does_not(monkeypatch):
    fast = BpeTokenizer(SimpleTokenizer(context_length=32))
    calls = []
    original = ftfy.fix_text
    monkeypatch.setattr(ftfy, "fix_text", lambda text, *a, **k: calls.append(text) or original(text, *a, **k))
    fast(["a photo of the digit 7.", "Two  spaces, UPPER case; 50% off!"])
    assert calls == []
    fast(["caf\u00e9", "fish &amp; chips", "line\nbreak"])
    assert calls == ["caf\u00e9", "fish &amp; chips", "line\nbreak"]
