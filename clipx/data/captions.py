"""Which caption a sample contributes: the .txt member's lines, .json fields, and sampling among them.

Recaptioned data sets carry several captions per image (the original alt-text beside synthetic
captions from a captioning model), and retrieval-style sets several lines per .txt. With
``data.caption_keys`` unset a training sample's caption is the first line of its .txt (what clipx
always did). With it set, e.g. ``{txt: 0.5, recaption: 0.5}``, each sample draws, every epoch, one
of the named sources present in it with probability proportional to its weight ("txt" is the .txt
member, any other name a field of the .json, a string or a list of strings), then one caption of
that source uniformly. The draw uses its own generator seeded by the sample's place in the stream,
so a resumed run draws the same captions, and the image augmentations draw exactly as without it.

A sample's hard negative (``data.hard_negative_key``) is the .neg.txt member ("neg.txt") or a .json
field; where it holds several, one is drawn the same way, from a generator of its own.
"""

from __future__ import annotations

import json
import random
from typing import Optional

TXT = "txt"  # the name, in data.caption_keys, of the .txt member
NEGATIVE_TXT = "neg.txt"  # the name, in data.hard_negative_key, of the .neg.txt member


def all_captions(sample: dict) -> list[str]:
    """Every non-empty line of the .txt member (retrieval sets store several captions per image)."""
    return _lines(sample.get("txt"))


def first_caption(sample: dict) -> str | None:
    """The first non-empty line of the sample's .txt member, or None."""
    captions = all_captions(sample)
    return captions[0] if captions else None


def _lines(raw) -> list[str]:
    if raw is None:
        return []
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _json_fields(sample: dict) -> dict:
    """The sample's .json as a dict; empty when it is missing or not a JSON object."""
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _strings(value) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


class CaptionChooser:
    """``chooser(sample, sample_seed)`` -> the sample's caption this epoch, or None when it has none;
    ``chooser.negative(sample, sample_seed)`` -> its hard negative, or None."""

    def __init__(self, caption_keys: Optional[dict] = None, negative_key: Optional[str] = None):
        self.weights = dict(caption_keys) if caption_keys else None
        self.negative_key = negative_key

    def negative(self, sample: dict, sample_seed: int) -> Optional[str]:
        if self.negative_key is None:
            return None
        options = (_lines(sample.get(NEGATIVE_TXT)) if self.negative_key == NEGATIVE_TXT
                   else _strings(_json_fields(sample).get(self.negative_key)))
        if len(options) <= 1:
            return options[0] if options else None
        return options[random.Random(f"negative-{sample_seed}").randrange(len(options))]

    def __call__(self, sample: dict, sample_seed: int) -> Optional[str]:
        if self.weights is None:
            return first_caption(sample)
        meta = _json_fields(sample) if set(self.weights) - {TXT} else {}  # parsed once per sample
        sources = {name: all_captions(sample) if name == TXT else _strings(meta.get(name)) for name in self.weights}
        present = [(name, captions) for name, captions in sources.items() if captions]
        if not present:
            return None
        rng = random.Random(sample_seed)
        (_, captions), = rng.choices(present, weights=[self.weights[name] for name, _ in present])
        return captions[rng.randrange(len(captions))]
