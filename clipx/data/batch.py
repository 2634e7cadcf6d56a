"""The keys of a training batch, defined once, and the ways samples become a batch.

Every pipeline and objective uses these names. A method picks its collation (image + tokenized
caption, augmented views, labelled images or views, text pairs); the streaming pipeline only calls
what it is given.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from clipx.data.captions import CaptionChooser

IMAGE = "image"  # (B, 3, H, W): float, normalised; uint8 from the loader until clipx.data.crops.DeviceImages
TEXT = "text"  # (B, L) int64 token ids
VIEWS = "views"  # list of (B, 3, H, W) augmented views of the same images (self-supervised modes)
KEY = "key"  # list of B sample keys, for de-duplication and debugging
LABEL = "label"  # (B,) int64: each sample's row of a classifier, or its class (-1: none) (clipx.data.labels)
NEGATIVE_TEXT = "negative_text"  # (B, L) token ids of each sample's hard-negative caption ("" where it has none)
NEGATIVE_MASK = "negative_mask"  # (B,) bool: whether the sample has a hard negative
POSITIVE_TEXT = "positive_text"  # (B, L) token ids of each sample's paired text, or of its caption again (SimCSE)
# Distillation (clipx/methods/distill.py): the teacher's own inputs, or its stored embeddings.
TEACHER_IMAGE = "teacher_image"  # [(B, 3, H', W')]: the image through each teacher's transform
TEACHER_TEXT = "teacher_text"  # [(B, L')]: the caption through each teacher's tokenizer
# (n,) int64: the flat indices into text[:, 1:] of the tokens a text decoder predicts (padding left
# out), made on the host with the batch, so that picking them on the device waits for nothing.
CAPTION_POSITIONS = "caption_positions"
PAD = 0  # the token id of padding (open_clip's tokenizer): no caption token
# Distillation's lists hold one entry per teacher (an ensemble; one teacher is a list of one).
TEACHER_EMBEDDING = "teacher_embedding"  # [(B, 2, Dt) float]: each teacher's image and text embeddings
# data.decode: device: the batch's JPEGs still encoded, {"data": [n bytes], "boxes": [n crop boxes
# (left, top, right, bottom)], "rows": [n batch rows]}; IMAGE then holds the other B - n rows, and
# clipx.data.crops.DeviceImages decodes these on the training device.
ENCODED = "encoded_images"


class EncodedImage(NamedTuple):
    """A training image left for the device to decode: its JPEG bytes and crop box in source pixels."""

    data: bytes
    box: tuple[int, int, int, int]


class ReplayedView(NamedTuple):
    """A stored view of a reinforced sample (clipx/data/reinforce.py), replayed by the loader: its
    uint8 (3, S, S) pixels, which of the sample's views it is, and each online teacher's input."""

    pixels: torch.Tensor
    index: int
    teacher_inputs: tuple = ()


def collate_images(images: list) -> dict:
    """Samples' images -> {"image": (B, 3, H, W)}, or, when some are ``EncodedImage``,
    {"image": the other rows stacked, "encoded_images": those, with their rows}."""
    images = [image.pixels if isinstance(image, ReplayedView) else image for image in images]
    encoded = [(row, image) for row, image in enumerate(images) if isinstance(image, EncodedImage)]
    if not encoded:
        return {IMAGE: torch.stack(images)}
    decoded = [image for image in images if not isinstance(image, EncodedImage)]
    pixels = torch.stack(decoded) if decoded else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return {IMAGE: pixels, ENCODED: {"data": [e.data for _, e in encoded], "boxes": [e.box for _, e in encoded],
                                     "rows": [row for row, _ in encoded]}}


class ImageTextBatch:
    """Samples {"image": (3, H, W), "text": str, "key"} -> {"image": (B, 3, H, W), "text": (B, L), "key"}.

    ``choose_caption`` (clipx.data.captions) is how the pipeline picks each sample's caption. When it
    picks hard negatives too, the batch also has each sample's "negative" caption, tokenized, and
    which samples have one: every batch then carries both, so the ranks gather tensors of one shape.
    """

    needs_caption = True

    def __init__(self, tokenizer, choose_caption: CaptionChooser = CaptionChooser()):
        self.tokenizer, self.choose_caption = tokenizer, choose_caption
        self.hard_negatives = choose_caption.negative_key is not None

    def __call__(self, samples: list[dict]) -> dict:
        return {KEY: [s["key"] for s in samples], **collate_images([s["image"] for s in samples]),
                **self.captions(samples)}

    def captions(self, samples: list[dict], **more_texts: list[str]) -> dict:
        """{"text": (B, L)} and, when hard negatives are on, {"negative_text": (B, L), "negative_mask": (B,)};
        ``more_texts``: further {key: B texts} tokenized with them (all of one length L)."""
        texts = {TEXT: [s["text"] for s in samples], **more_texts}
        if self.hard_negatives:
            negatives = [s.get("negative") for s in samples]
            texts[NEGATIVE_TEXT] = [n or "" for n in negatives]
        batch = tokenize_together(self.tokenizer, texts)
        if self.hard_negatives:
            batch[NEGATIVE_MASK] = torch.tensor([n is not None for n in negatives])
        return batch


def tokenize_together(tokenizer, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """{key: texts} -> {key: (len(texts), L) token ids}, in one tokenizer call: a tokenizer that trims
    padding (data.trim_padding) then gives every text tensor of a batch the same length, which
    objectives that encode them together (hard negatives, SimCSE's pairs) rely on. The tokenizer's
    output is sliced by rows, so any batch-first result works (tests pass texts through as they are)."""
    tokens = tokenizer([text for group in texts.values() for text in group])
    batch, start = {}, 0
    for key, group in texts.items():
        batch[key] = tokens[start:start + len(group)]
        start += len(group)
    return batch


class TextPairBatch(ImageTextBatch):
    """Samples {"text": str, "positive": str or None, "key"} (no image) -> {"text": (B, L),
    "positive_text": (B, L), "key"}, plus hard negatives as ImageTextBatch has them: text-only
    contrastive training (SimCSE). A sample's positive is its paired text where it has one, else its
    own caption again, which then differs from the anchor only by the encoder's dropout."""

    def __call__(self, samples: list[dict]) -> dict:
        return {KEY: [s["key"] for s in samples],
                **self.captions(samples, **{POSITIVE_TEXT: [s["positive"] or s["text"] for s in samples]})}


class ViewsBatch:
    """Samples whose "image" is a list of V views -> {"views": V tensors (B, 3, H, W), "key"}.
    Captions are not needed: image-only methods train on images without one."""

    needs_caption = False

    def __call__(self, samples: list[dict]) -> dict:
        views = len(samples[0]["image"])
        return {KEY: [s["key"] for s in samples],
                VIEWS: [torch.stack([s["image"][v] for s in samples]) for v in range(views)]}


class LabelledViewsBatch(ViewsBatch):
    """Samples of views and a "label" -> a views batch plus {"label": (B,) int64}. ``labels``
    (clipx.data.labels.LabelReader) is how the pipeline reads each sample's label; -1 marks a sample
    without one (SupCon, clipx/methods/supcon.py)."""

    def __init__(self, labels):
        self.labels = labels

    def __call__(self, samples: list[dict]) -> dict:
        return {**super().__call__(samples), LABEL: torch.tensor([s["label"] for s in samples], dtype=torch.long)}


class ImageTextViewsBatch(ImageTextBatch):
    """Samples whose "image" is [image, view 1, ..., view V] (SLIP) -> an image-text batch plus
    {"views": V tensors (B, 3, H, W)}."""

    def __call__(self, samples: list[dict]) -> dict:
        batch = super().__call__([{**s, "image": s["image"][0]} for s in samples])
        views = len(samples[0]["image"]) - 1
        return {**batch, VIEWS: [torch.stack([s["image"][1 + v] for s in samples]) for v in range(views)]}


def caption_positions(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> the flat indices into tokens[:, 1:] of those that are not padding: the
    positions whose next token a decoder predicts (CAPTION_POSITIONS)."""
    return (tokens[:, 1:] != PAD).flatten().nonzero().squeeze(1)


def caption_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the batch's CAPTION_POSITIONS, the token at each): what a decoder predicts. A batch made
    without them (by hand, in tests) has them computed here, which on a GPU waits for the device."""
    positions = batch.get(CAPTION_POSITIONS)
    if positions is None:
        positions = caption_positions(batch[TEXT])
    return positions, batch[TEXT][:, 1:].flatten()[positions]


class ImageCaptionBatch(ImageTextBatch):
    """An image-text batch plus CAPTION_POSITIONS, for methods with a text decoder (CoCa)."""

    def __call__(self, samples: list[dict]) -> dict:
        batch = super().__call__(samples)
        return {**batch, CAPTION_POSITIONS: caption_positions(batch[TEXT])}


class ImageCaptionViewsBatch(ImageTextViewsBatch):
    """An image-text batch with views plus CAPTION_POSITIONS (SigLIP 2: local views and a decoder)."""

    def __call__(self, samples: list[dict]) -> dict:
        batch = super().__call__(samples)
        return {**batch, CAPTION_POSITIONS: caption_positions(batch[TEXT])}


class LabelledImageBatch:
    """Samples {"image": (3, H, W), "label": int, "key"} -> {"image": (B, 3, H, W), "label": (B,), "key"}.
    ``labels`` (clipx.data.labels.LabelReader) is how the pipeline reads each sample's label;
    captions are not needed."""

    needs_caption = False

    def __init__(self, labels):
        self.labels = labels

    def __call__(self, samples: list[dict]) -> dict:
        return {KEY: [s["key"] for s in samples], IMAGE: torch.stack([s["image"] for s in samples]),
                LABEL: torch.tensor([s["label"] for s in samples], dtype=torch.long)}
