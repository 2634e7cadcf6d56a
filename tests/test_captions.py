"""Several captions per sample: data.caption_keys, drawn per sample per epoch, reproducibly."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from clipx.config import load_config
from clipx.data.captions import CaptionChooser
from clipx.errors import ClipxError
from tests.conftest import REPO

SAMPLE = {"__key__": "k", "txt": b"alt text one\n\n alt text two \n",
          "json": json.dumps({"recaption": "a synthetic caption", "more": ["x", "y", " "], "label": 3}).encode()}


def test_without_caption_keys_the_first_line_is_the_caption():
    assert CaptionChooser()(SAMPLE, 123) == "alt text one"


def test_sources_are_drawn_by_weight_and_captions_uniformly_within_one():
    choose = CaptionChooser({"txt": 1.0, "recaption": 3.0})
    counts = collections.Counter(choose(SAMPLE, seed) for seed in range(8000))
    assert set(counts) == {"alt text one", "alt text two", "a synthetic caption"}
    for caption, share in (("alt text one", 1 / 8), ("alt text two", 1 / 8), ("a synthetic caption", 3 / 4)):
        assert counts[caption] / 8000 == pytest.approx(share, abs=0.02), counts


def test_absent_sources_drop_out_and_lists_count_their_non_empty_strings():
    choose = CaptionChooser({"missing": 100.0, "more": 1.0, "label": 1.0})  # label: not a string
    assert {choose(SAMPLE, seed) for seed in range(200)} == {"x", "y"}
    assert CaptionChooser({"missing": 1.0})(SAMPLE, 0) is None
    assert CaptionChooser({"recaption": 1.0})({"__key__": "k", "json": b"not json"}, 0) is None


def test_the_draw_is_a_function_of_the_seed_alone():
    choose = CaptionChooser({"txt": 1.0, "recaption": 1.0})
    assert [choose(SAMPLE, seed) for seed in range(50)] == [choose(SAMPLE, seed) for seed in range(50)]
    assert len({choose(SAMPLE, seed) for seed in range(50)}) == 3


@pytest.mark.parametrize("value", ["{}", "{txt: 0}", "{txt: -1}", "{txt: true}", "{txt: .nan}"])
def test_bad_caption_keys_give_one_line_errors(value):
    with pytest.raises(ClipxError, match="data.caption_keys must map"):
        load_config(REPO / "configs" / "demo-digits.yaml", [f"data.caption_keys={value}"])


class Captions:
    """A collate that keeps the captions as strings."""

    needs_caption = True

    def __call__(self, samples: list[dict]) -> dict:
        return {"image": torch.stack([s["image"] for s in samples]), "text": [s["text"] for s in samples]}


def _two_epochs(digits_dir, **data) -> list[dict]:
    from clipx.data.captions import caption_chooser
    from clipx.data.crops import TrainImage
    from clipx.data.pipeline import SharedEpoch, build_train_loader
    from clipx.data.skips import SkipCounter

    config = load_config(REPO / "configs" / "demo-digits.yaml", [
        f"data.train={digits_dir / 'train'}", "data.workers=0", *(f"data.{k}={v}" for k, v in data.items())])
    transform = TrainImage(32, 0.8)  # what the image-text methods train with
    epoch = SharedEpoch()
    collate = Captions()
    collate.choose_caption = caption_chooser(config.data, config.eval)
    loader, _ = build_train_loader(config.data, 64, transform, collate, 0, 0, 1, epoch, SkipCounter())
    batches = []
    for number in range(2):
        epoch.set(number)
        batches.append(next(iter(loader)))
    return batches


def test_the_loader_draws_captions_per_epoch_and_leaves_image_augmentation_as_it_was(digits_dir):
    plain = _two_epochs(digits_dir)
    mixed = _two_epochs(digits_dir, caption_keys="{txt: 1, classname: 1}")
    again = _two_epochs(digits_dir, caption_keys="{txt: 1, classname: 1}")
    for a, b, c in zip(plain, mixed, again):
        assert torch.equal(a["image"], b["image"])  # the image's random draws are untouched
        assert b["text"] == c["text"]  # reproducible
    # Same samples in the same order (the images are equal): where the caption differs from the
    # .txt's, it is the .json's classname, a bare class name ("three"). Equal weights: about half.
    drawn = [(p, m) for a, b in zip(plain, mixed) for p, m in zip(a["text"], b["text"])]
    from_json = [m for p, m in drawn if m != p]
    assert all(" " not in m for m in from_json), from_json
    assert 0.3 < len(from_json) / len(drawn) < 0.7, drawn
