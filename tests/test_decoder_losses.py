"""The loss terms of CoCa and the SigLIP 2 recipe against hand-written references on small tensors,
and the SigLIP 2 teacher's schedule (copied at the switch, averaged after applied late steps only)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clipx.config import load_config
from clipx.losses.caption import caption_loss
from clipx.losses.self_distillation import masked_patch_distillation, next_centre, teacher_targets, view_distillation
from tests.matrix.combos import TINY_VIT

TOLERANCE = 1e-6


def _softmax(values: list[float]) -> list[float]:
    peak = max(values)
    exps = [math.exp(v - peak) for v in values]
    return [e / sum(exps) for e in exps]


def _cross_entropy(target: list[float], logits: list[float]) -> float:
    """H(target, softmax(logits)), by hand."""
    probs = _softmax(logits)
    return -sum(t * math.log(p) for t, p in zip(target, probs))


def test_caption_loss_is_the_mean_cross_entropy_of_the_non_pad_tokens():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[3, 1, 6, 0, 0], [2, 2, 0, 0, 0], [5, 4, 3, 2, 1]])
    terms = [-math.log(_softmax(logits[b, t].tolist())[labels[b, t]]) for b in range(3) for t in range(5)
             if labels[b, t] != 0]
    assert caption_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), abs=TOLERANCE)


def test_view_distillation_is_dino_cross_entropy_averaged_over_views_and_samples():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)  # (V, B, K)
    teacher = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    centre = torch.randn(6, generator=generator, dtype=torch.float64)
    t_s, t_t = 0.1, 0.04
    targets = [_softmax([(teacher[b, k] - centre[k]).item() / t_t for k in range(6)]) for b in range(4)]
    expected = sum(_cross_entropy(targets[b], [x / t_s for x in student[v, b].tolist()])
                   for v in range(3) for b in range(4)) / 12
    actual = view_distillation(student, teacher_targets(teacher, centre, t_t), t_s)
    assert actual.item() == pytest.approx(expected, abs=TOLERANCE)


def test_masked_patch_distillation_averages_masked_patches_per_image_then_images():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
    centre = torch.randn(5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    t_s, t_t = 0.1, 0.04
    per_image = []
    for b in range(2):
        masked = [n for n in range(4) if mask[b, n]]
        per_image.append(sum(_cross_entropy(_softmax([(teacher[b, n, k] - centre[k]).item() / t_t for k in range(5)]),
                                            [x / t_s for x in student[b, n].tolist()]) for n in masked) / len(masked))
    actual = masked_patch_distillation(student, teacher_targets(teacher, centre, t_t), mask, t_s)
    assert actual.item() == pytest.approx(sum(per_image) / 2, abs=TOLERANCE)


def test_the_centre_moves_towards_the_mean_of_every_row():
    teacher = torch.arange(24, dtype=torch.float64).view(2, 3, 4)
    centre = torch.ones(4, dtype=torch.float64)
    means = [sum(teacher.view(-1, 4)[r, k].item() for r in range(6)) / 6 for k in range(4)]
    expected = [0.9 * 1 + 0.1 * m for m in means]
    assert next_centre(centre, teacher, 0.9).tolist() == pytest.approx(expected, abs=TOLERANCE)


def _siglip2(tmp_path, *overrides: str):
    from clipx.methods import build_model, method_of

    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(TINY_VIT))
    config = load_config(None, [f"model.name={arch}", "loss.name=siglip2", "model.init_logit_bias=-10",
                                "loss.siglip2.prototypes=16", "loss.siglip2.head_hidden=32",
                                "loss.siglip2.head_bottleneck=8", "train.steps=10", *overrides])
    torch.manual_seed(0)
    model = build_model(config)
    return model, method_of(config).objective(model, config)


def _batch(generator_seed: int = 3) -> dict:
    generator = torch.Generator().manual_seed(generator_seed)
    return {"image": torch.randn(4, 3, 32, 32, generator=generator),
            "text": torch.randint(1, 400, (4, 12), generator=generator),
            "views": [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]}


def test_siglip2_adds_each_weighted_term_to_the_sigmoid_loss(tmp_path):
    model, objective = _siglip2(tmp_path, "loss.siglip2.late_fraction=1.0", "loss.siglip2.decoder_weight=0.5",
                                "loss.siglip2.silc_weight=2.0", "loss.siglip2.tips_weight=0.25")
    out = objective(_batch())
    metrics = out["metrics"]
    parts = [metrics[f"{name}_loss"] for name in ("sigmoid", "caption", "silc", "tips")]
    assert out["loss"].item() == pytest.approx(sum(p.item() for p in parts), abs=TOLERANCE)
    torch.manual_seed(0)  # the same masks again, for the unweighted terms by hand
    features = objective.features(_batch())
    caption = caption_loss(features["caption_logits"], features["caption_labels"])
    assert metrics["caption_loss"].item() == pytest.approx(0.5 * caption.item(), rel=1e-5)


@pytest.mark.parametrize("off", ["decoder", "silc", "tips"])
def test_each_siglip2_term_turns_off_alone_and_takes_its_part_of_the_model_with_it(tmp_path, off):
    model, objective = _siglip2(tmp_path, "loss.siglip2.late_fraction=1.0", f"loss.siglip2.{off}_weight=0")
    metrics = objective(_batch())["metrics"]
    name = {"decoder": "caption"}.get(off, off)
    assert f"{name}_loss" not in metrics
    assert {"sigmoid", "caption", "silc", "tips"} - {name} <= {k[: -len("_loss")] for k in metrics if k.endswith("_loss")}
    part = {"decoder": "decoder.", "silc": "silc_head.", "tips": "tips_head."}[off]
    assert not any(key.startswith(part) for key in model.state_dict())


def _teacher_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.teacher.parameters()])


def _student_parameters(model) -> list[torch.Tensor]:
    student, _ = model.student_and_teacher()
    return [p for module in student for p in module.parameters()]


def _student_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in _student_parameters(model)])


def test_the_teacher_starts_as_the_student_at_the_switch_and_then_follows_it_by_ema(tmp_path):
    model, objective = _siglip2(tmp_path, "loss.siglip2.late_fraction=0.5", "loss.siglip2.teacher_momentum=0.9")
    with torch.no_grad():
        for p in _student_parameters(model):
            p.add_(0.01)  # the student moves away from the teacher it was built with
    for step in range(1, 5):
        objective.end_step(step, 10, True)
        assert not objective.late() and not torch.equal(_teacher_vector(model), _student_vector(model))
    objective(_batch())  # an early step: no self-distillation, nothing staged for the teacher
    objective.end_step(5, 10, True)
    assert objective.late() and torch.equal(_teacher_vector(model), _student_vector(model))
    before = _teacher_vector(model)
    with torch.no_grad():
        for p in _student_parameters(model):
            p.add_(0.1)
    objective(_batch())
    objective.end_step(6, 10, False)  # refused: the teacher and the centres stay
    assert torch.equal(_teacher_vector(model), before)
    objective(_batch())
    staged_centre = objective.staged("silc_centre")[-1].clone()
    objective.end_step(6, 10, True)
    torch.testing.assert_close(_teacher_vector(model), 0.9 * before + 0.1 * _student_vector(model), rtol=0, atol=1e-6)
    assert torch.equal(objective.centres["silc"], staged_centre)


def test_masked_patches_become_the_mask_token_before_the_transformer(tmp_path):
    from clipx.models.siglip2 import masked_patches

    model, _ = _siglip2(tmp_path)
    seen: list[torch.Tensor] = []
    images, mask = torch.randn(2, 3, 32, 32), torch.tensor([[True, False] * 8, [False, True] * 8])
    token = torch.arange(model.visual.conv1.out_channels, dtype=torch.float32)
    with masked_patches(model.visual, mask, token):
        # Hooks run in the order they were added: this one sees what the transformer will see.
        handle = model.visual.conv1.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
        model.visual.conv1(images)
    handle.remove()
    plain = model.visual.conv1(images).flatten(2).transpose(1, 2)  # (B, N, W)
    hooked = seen[0].flatten(2).transpose(1, 2)
    assert torch.equal(hooked[mask], token.expand(int(mask.sum()), -1))
    assert torch.equal(hooked[~mask], plain[~mask])
