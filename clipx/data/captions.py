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
field; where it holds several, one is drawn the same way, from a generator of its own. So is a text
pair's second text (``data.positive_key``: the .pos.txt member, "pos.txt", or a .json field), which
text-only training (SimCSE) takes as the caption's positive.

One more source, "class_prompt", is made rather than read: one of the task's prompt templates
(eval.templates) filled with the name of the sample's class (its label). Trained alone, it is FLYP's
contrastive fine-tuning (Goyal et al. 2023, "Finetune like you pretrain"): the class prompts are the
captions, so fine-tuning keeps the loss the model was pretrained with.
"""

from __future__ import annotations

import json
import random
from typing import Optional, Sequence

from clipx.data.labels import sample_label
from clipx.templates import chosen_classes, load_templates

TXT = "txt"  # the name, in data.caption_keys, of the .txt member
NEGATIVE_TXT = "neg.txt"  # the name, in data.hard_negative_key, of the .neg.txt member
POSITIVE_TXT = "pos.txt"  # the name, in data.positive_key, of the .pos.txt member
CLASS_PROMPT = "class_prompt"  # the name, in data.caption_keys, of the prompts made from the sample's label


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


def json_object(sample: dict) -> dict | None:
    """The sample's .json as a dict ({} without one), or None when it is not a JSON object."""
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _json_fields(sample: dict) -> dict:
    """The sample's .json as a dict; empty when it is missing or not a JSON object."""
    return json_object(sample) or {}


def _strings(value) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


class ClassPrompts:
    """sample -> every prompt template filled with the name of its class; [] when its label is
    missing, malformed or not one of ``classes``."""

    def __init__(self, classnames: Sequence[str], templates: Sequence[str], label_key: str, classes: Sequence[int]):
        self.classnames, self.templates, self.label_key = list(classnames), list(templates), label_key
        self.classes = frozenset(classes)

    def __call__(self, sample: dict) -> list[str]:
        try:
            label = sample_label(sample, self.label_key)
        except (ValueError, TypeError, UnicodeDecodeError):
            return []
        if label not in self.classes:
            return []
        return [template.format(self.classnames[label]) for template in self.templates]


def _second_text(sample: dict, key: Optional[str], member: str, stream: str, sample_seed: int) -> Optional[str]:
    """One text of ``key`` (the ``member`` file's lines, or a .json field) of ``sample``, or None; where
    it holds several, one drawn from a generator of the ``stream``'s own, seeded by the sample."""
    if key is None:
        return None
    options = _lines(sample.get(member)) if key == member else _strings(_json_fields(sample).get(key))
    if len(options) <= 1:
        return options[0] if options else None
    return options[random.Random(f"{stream}-{sample_seed}").randrange(len(options))]


class CaptionChooser:
    """``chooser(sample, sample_seed)`` -> the sample's caption this epoch, or None when it has none;
    ``chooser.negative(sample, sample_seed)`` -> its hard negative, or None;
    ``chooser.positive(sample, sample_seed)`` -> its paired text (``positive_key``), or None."""

    def __init__(self, caption_keys: Optional[dict] = None, negative_key: Optional[str] = None,
                 class_prompts: Optional[ClassPrompts] = None, positive_key: Optional[str] = None):
        self.weights = dict(caption_keys) if caption_keys else None
        self.negative_key, self.positive_key = negative_key, positive_key
        if self.weights and CLASS_PROMPT in self.weights and class_prompts is None:
            raise ValueError(f"caption source {CLASS_PROMPT!r} needs the task's class prompts")
        self.class_prompts = class_prompts

    def negative(self, sample: dict, sample_seed: int) -> Optional[str]:
        return _second_text(sample, self.negative_key, NEGATIVE_TXT, "negative", sample_seed)

    def positive(self, sample: dict, sample_seed: int) -> Optional[str]:
        return _second_text(sample, self.positive_key, POSITIVE_TXT, "positive", sample_seed)

    def __call__(self, sample: dict, sample_seed: int) -> Optional[str]:
        if self.weights is None:
            return first_caption(sample)
        meta = _json_fields(sample) if set(self.weights) - {TXT, CLASS_PROMPT} else {}  # parsed once per sample
        sources = {name: self._source(sample, name, meta) for name in self.weights}
        present = [(name, captions) for name, captions in sources.items() if captions]
        if not present:
            return None
        rng = random.Random(sample_seed)
        (_, captions), = rng.choices(present, weights=[self.weights[name] for name, _ in present])
        return captions[rng.randrange(len(captions))]

    def _source(self, sample: dict, name: str, meta: dict) -> list[str]:
        if name == TXT:
            return all_captions(sample)
        if name == CLASS_PROMPT:
            return self.class_prompts(sample) if self.class_prompts is not None else []
        return _strings(meta.get(name))


def caption_chooser(data_cfg, eval_cfg, pairs: bool = False) -> CaptionChooser:
    """The chooser a run's config describes: data.caption_keys and data.hard_negative_key, with the
    class prompts of eval.templates (and eval.classes, eval.label_key) when "class_prompt" is a source;
    with ``pairs`` (text-pair training), data.positive_key too."""
    keys, prompts = data_cfg.caption_keys, None
    if keys and CLASS_PROMPT in keys:
        classnames, templates = load_templates(eval_cfg.templates)
        prompts = ClassPrompts(classnames, templates, eval_cfg.label_key,
                               chosen_classes(eval_cfg.classes, len(classnames)))
    return CaptionChooser(keys, data_cfg.hard_negative_key, prompts, data_cfg.positive_key if pairs else None)
