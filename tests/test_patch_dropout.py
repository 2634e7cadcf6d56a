"""FLIP's patch dropout: fewer image tokens in training, all of them at evaluation, the unmasked tuning phase."""

from __future__ import annotations

import copy

import pytest
import torch

from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.models.patch_dropout import PatchDropoutSchedule
from clipx.models.towers import build_open_clip_vision
from tests.conftest import REPO

ARCH = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}


def tokens_seen(tower, images) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the patch dropout received, what the transformer received) in one forward pass."""
    seen = {}
    hooks = [tower.patch_dropout.register_forward_hook(lambda m, args, out: seen.update(before=args[0], after=out)),
             tower.transformer.register_forward_pre_hook(lambda m, args: seen.update(blocks=args[0]))]
    tower(images)
    for hook in hooks:
        hook.remove()
    assert seen["blocks"].shape == seen["after"].shape
    return seen["before"], seen["after"]


def test_training_keeps_the_class_token_and_a_random_half_of_the_patches():
    torch.manual_seed(0)
    tower = build_open_clip_vision(ARCH, patch_dropout=0.5).train()
    before, after = tokens_seen(tower, torch.randn(3, 3, 32, 32))
    assert before.shape[1] == 1 + 16 and after.shape[1] == 1 + 8
    assert torch.equal(after[:, 0], before[:, 0])  # the class token, first
    for sample in range(3):  # every kept token is one of the sample's own patches, none twice
        kept = [next(i for i in range(1, 17) if torch.equal(row, before[sample, i])) for row in after[sample, 1:]]
        assert len(set(kept)) == 8
    again, _ = tokens_seen(tower, torch.randn(3, 3, 32, 32))
    assert again.shape[1] == 17


def test_evaluation_sees_every_patch_and_equals_the_undropped_tower():
    torch.manual_seed(0)
    dropped = build_open_clip_vision(ARCH, patch_dropout=0.5)
    plain = build_open_clip_vision(ARCH)
    assert list(dropped.state_dict()) == list(plain.state_dict())  # no weights of its own: checkpoints unchanged
    plain.load_state_dict(dropped.state_dict())
    images = torch.randn(2, 3, 32, 32)
    dropped.eval(), plain.eval()
    torch.testing.assert_close(dropped(images), plain(images), rtol=0, atol=0)


def test_the_schedule_switches_to_every_patch_for_the_last_steps():
    torch.manual_seed(0)
    tower = build_open_clip_vision(ARCH, patch_dropout=0.5).train()
    schedule = PatchDropoutSchedule(tower, 0.5, unmasked_steps=2)
    rates = []
    for step in range(1, 6):
        schedule.before_step(step, total_steps=5)
        rates.append(tower.patch_dropout.prob)
        _, after = tokens_seen(tower, torch.randn(2, 3, 32, 32))
        assert after.shape[1] == (17 if rates[-1] == 0 else 9)
    assert rates == [0.5, 0.5, 0.5, 0.0, 0.0]


def test_a_copy_keeps_its_rate_apart():
    tower = build_open_clip_vision(ARCH, patch_dropout=0.25)
    twin = copy.deepcopy(tower)
    PatchDropoutSchedule(tower, 0.25, unmasked_steps=1).before_step(1, total_steps=1)
    assert tower.patch_dropout.prob == 0.0 and twin.patch_dropout.prob == 0.25


@pytest.mark.parametrize("override, message", [
    ("model.patch_dropout=1.0", r"must be in \[0, 1\)"),
    ("model.patch_dropout=-0.1", r"must be in \[0, 1\)"),
    ("model.patch_dropout_unmasked_steps=-1", "must not be negative"),
])
def test_bad_settings_give_one_line_errors(override, message):
    with pytest.raises(ClipxError, match=message):
        load_config(REPO / "configs" / "demo-digits.yaml", [override])


def test_towers_without_patches_refuse_it():
    resnet = {**ARCH, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16}}
    with pytest.raises(ClipxError, match="drops ViT patches"):
        build_open_clip_vision(resnet, patch_dropout=0.5)
    from clipx.ssl.encoder import create_image_encoder

    config = load_config(REPO / "configs" / "simclr-digits.yaml", ["model.patch_dropout=0.5", "ssl.encoder=resnet18"])
    with pytest.raises(ClipxError, match="is a ResNet"):
        create_image_encoder(config.model, config.ssl)


def test_masked_applies_the_configured_rate_in_the_unmasked_phase_and_restores_it():
    """What the attention kernel is chosen under: the masked phase's lengths, whichever step a run starts at."""
    tower = build_open_clip_vision(ARCH, patch_dropout=0.5).train()
    schedule = PatchDropoutSchedule(tower, 0.5, unmasked_steps=1)
    schedule.before_step(5, total_steps=5)
    with schedule.masked():
        assert tower.patch_dropout.prob == 0.5
        assert tokens_seen(tower, torch.randn(2, 3, 32, 32))[1].shape[1] == 9
    assert tower.patch_dropout.prob == 0.0
