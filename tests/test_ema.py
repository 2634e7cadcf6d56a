"""EMA weights (train.ema_decay): the average's formula, refused steps, evaluation during training,
checkpoints and bitwise resume (also sharded), and the consumers' choice of weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.train.ema import ModelEma
from tests.conftest import DEMO, tiny_overrides

DECAY = 0.9


# ---------------------------------------------------------------------------------------------- EMA


def test_update_is_the_moving_average_formula_on_small_tensors():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    model[1].bias.requires_grad_(False)  # frozen: not averaged, read from the model
    ema = ModelEma(model, 0.75)
    assert ema.names == ["0.weight", "0.bias", "1.weight"]
    expected = {name: model.state_dict()[name].double() for name in ema.names}
    for _ in range(3):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        model(torch.randn(4, 3))  # moves the BatchNorm statistics
        ema.update()
        for name in ema.names:
            expected[name] = 0.75 * expected[name] + 0.25 * model.state_dict()[name].double()
    for name, average in ema.state_dict().items():
        assert average.dtype == torch.float32
        torch.testing.assert_close(average.double(), expected[name], rtol=0, atol=1e-6)
        assert not torch.allclose(average, model.state_dict()[name])
    whole = ema.model_state(model.state_dict())
    assert whole.keys() == model.state_dict().keys()
    for name in ("1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(whole[name], model.state_dict()[name])


def test_ema_decay_outside_zero_to_one_is_refused_with_one_line():
    for value in ("0", "1", "1.5", "-0.1", "nan"):
        with pytest.raises(ClipxError, match=r"train.ema_decay must be in \(0, 1\)") as caught:
            load_config(DEMO, [f"train.ema_decay={value}"])
        assert "\n" not in str(caught.value)


def test_the_memory_plan_counts_the_average_of_every_trainable_parameter():
    """4 fp32 bytes a trainable parameter: whole with DDP, about half of it per rank sharded over 2."""
    from clipx.apps.plan import plan_memory
    from clipx.methods import build_model

    parameters = sum(p.numel() for p in build_model(load_config(DEMO)).parameters())
    plain, averaged = (plan_memory(load_config(DEMO, extra), 2) for extra in ([], ["train.ema_decay=0.99"]))
    assert averaged.model_state - plain.model_state == 4 * parameters
    assert 2 * parameters <= averaged.model_state_fsdp - plain.model_state_fsdp <= 2.01 * parameters


@pytest.fixture()
def ema_trainer(digits_dir, tiny_model_json, tmp_path):
    from clipx.train.build import build_trainer

    config = load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "run", **{
        "train.ema_decay": DECAY, "data.workers": 0, "train.batch_size": 32}))
    trainer = build_trainer(config)
    yield trainer
    trainer.log.close()


def test_refused_steps_leave_the_average_alone_and_applied_steps_fold_the_weights_in(ema_trainer):
    from clipx.train.loop import fetch, train_step

    trainer = ema_trainer
    batches = trainer.stream.batches(0)
    _, good = fetch(trainer, batches, 1)
    bad = [{**good[0], "image": good[0]["image"].clone()}]
    bad[0]["image"][0] = float("nan")
    before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    train_step(trainer, bad, 1)
    assert trainer.guard.nonfinite == 1
    assert all(torch.equal(v, before[k]) for k, v in trainer.ema.state_dict().items())
    train_step(trainer, good, 2)
    weights = dict(trainer.model.named_parameters())
    for name, average in trainer.ema.state_dict().items():
        expected = DECAY * before[name].double() + (1 - DECAY) * weights[name].detach().double()
        torch.testing.assert_close(average.double(), expected, rtol=0, atol=1e-6)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.ema.state_dict().items())


def test_evaluation_during_training_scores_the_average_and_puts_the_trained_weights_back(ema_trainer, monkeypatch):
    import eval.run
    from clipx.apps.run_hooks import evaluate_during_training
    from clipx.train.loop import evaluate_now, fetch, train_step

    trainer, real_evaluate, seen = ema_trainer, eval.run.evaluate, {}

    def evaluate(model, *args, **kwargs):  # what the evaluators are given
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(eval.run, "evaluate", evaluate)
    batches = trainer.stream.batches(0)
    for step in (1, 2):
        train_step(trainer, fetch(trainer, batches, step)[1], step)
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    results = evaluate_now(trainer, 2, evaluate_during_training)
    assert results["weights"] == "ema" and "top1" in results["zero_shot"]
    averaged = trainer.ema.model_state(trained)
    assert seen.keys() == averaged.keys() and all(torch.equal(v, averaged[k]) for k, v in seen.items())
    assert any(not torch.equal(v, trained[k]) for k, v in seen.items())
    assert all(torch.equal(v, trained[k]) for k, v in trainer.model.state_dict().items())
    records = [json.loads(line) for line in trainer.log.path.read_text().splitlines()]
    assert records[-1]["kind"] == "eval" and records[-1]["weights"] == "ema"


def test_evaluating_the_average_of_a_sharded_model_leaves_its_training_unchanged(digits_dir, tiny_model_json, tmp_path):
    """FSDP over a group of one: a run that evaluates its EMA weights mid-run (swapped into the shards,
    then swapped back) trains on exactly as its twin that does not. Blocks stay gathered after a
    forward pass here (fsdp_reshard_after_forward=false), so a gathered copy of the averages would
    outlive the evaluation unless the swap frees it."""
    from clipx.apps.run_hooks import evaluate_during_training
    from clipx.dist import full_tensor
    from clipx.train.build import build_trainer
    from clipx.train.loop import evaluate_now, fetch, train_step

    twins = []
    for name in ("evaluated", "twin"):
        config = load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path / name, **{
            "train.ema_decay": DECAY, "data.workers": 0, "train.batch_size": 32, "train.sharding": "fsdp",
            "train.fsdp_reshard_after_forward": False}))
        trainer = build_trainer(config)
        batches = trainer.stream.batches(0)
        for step in (1, 2, 3):
            train_step(trainer, fetch(trainer, batches, step)[1], step)
            if step == 2 and name == "evaluated":
                assert evaluate_now(trainer, step, evaluate_during_training)["weights"] == "ema"
        twins.append({k: full_tensor(v).clone() for k, v in trainer.model.state_dict().items()})
        trainer.log.close()
    assert all(torch.equal(v, twins[1][k]) for k, v in twins[0].items())


def _train(digits_dir, tiny_model_json, run, resume=None, **extra):
    from clipx.train.loop import train

    overrides = {"train.steps": 3, "train.checkpoint_every": 2, "data.val": "null", "data.workers": 0,
                 "train.batch_size": 32, **extra}
    return train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, run, **overrides)), resume=resume)


def _resumed(digits_dir, tiny_model_json, unbroken, run, **extra):
    """The run ``unbroken`` again from its step-2 checkpoint, in ``run``."""
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(unbroken / "checkpoints" / "step-000000002", run / "checkpoints" / "step-000000002")
    _train(digits_dir, tiny_model_json, run, resume="latest", **extra)
    return run


@pytest.fixture(scope="module")
def runs(digits_dir, tiny_model_json, tmp_path_factory) -> dict:
    """Three steps with EMA, sharded over a group of one and not, each also resumed from step 2; and
    one run without EMA."""
    out = tmp_path_factory.mktemp("ema-runs")
    made = {}
    for sharding in ("fsdp", "ddp"):
        extra = {"train.ema_decay": DECAY, "train.sharding": sharding}
        made[sharding] = out / sharding
        _train(digits_dir, tiny_model_json, made[sharding], **extra)
        made[f"{sharding}-resumed"] = _resumed(digits_dir, tiny_model_json, made[sharding], out / f"{sharding}-r", **extra)
    made["plain"] = out / "plain"
    _train(digits_dir, tiny_model_json, made["plain"], **{"train.steps": 1})
    return made


def _final(run):
    from clipx.run_layout import list_checkpoints

    return list_checkpoints(run)[-1]


def test_checkpoints_carry_the_ema_model_and_a_resume_continues_it_bitwise(runs):
    from clipx.api import read_weights

    raw = load_file(str(_final(runs["ddp"]) / "model.safetensors"))
    for sharding in ("ddp", "fsdp"):
        unbroken, resumed = (read_weights(_final(runs[name]), raw, "ema") for name in (sharding, f"{sharding}-resumed"))
        assert unbroken.keys() == raw.keys()
        assert all(torch.equal(v, resumed[k]) for k, v in unbroken.items()), sharding
        assert [k for k, v in unbroken.items() if not torch.equal(v, raw[k])], "the average equals the weights"
    assert (_final(runs["ddp"]) / "model_ema.safetensors").is_file()
    shard = _final(runs["fsdp"])
    assert (shard / "model_ema-shard0.safetensors").is_file() and not (shard / "model_ema.safetensors").exists()
    # One process, fp32: sharding changes no number, so the sharded average equals the unsharded one.
    sharded = read_weights(shard, raw, "ema")
    assert all(torch.equal(v, sharded[k]) for k, v in read_weights(_final(runs["ddp"]), raw, "ema").items())


def test_consumers_choose_raw_or_ema_weights(runs, tmp_path):
    from clipx.api import choose_weights, consolidate, load_model

    checkpoint = _final(runs["ddp"])
    files = {kind: load_file(str(checkpoint / name)) for kind, name in (("raw", "model.safetensors"),
                                                                         ("ema", "model_ema.safetensors"))}
    for choice, kind in (("auto", "ema"), ("ema", "ema"), ("raw", "raw")):
        assert choose_weights(checkpoint, choice) == kind
        model, _ = load_model(checkpoint, weights=choice)
        assert all(torch.equal(v, files[kind][k]) for k, v in model.state_dict().items()), choice
    plain = _final(runs["plain"])
    assert choose_weights(plain, "auto") == "raw"
    with pytest.raises(ClipxError, match="holds no EMA weights") as caught:
        load_model(plain, weights="ema")
    assert "\n" not in str(caught.value)
    with pytest.raises(ClipxError, match="weights must be one of auto, ema, raw"):
        load_model(plain, weights="average")
    target = consolidate(_final(runs["fsdp"]), tmp_path / "ema.safetensors", weights="ema")
    assert all(torch.equal(v, files["ema"][k]) for k, v in load_file(str(target)).items())


def test_the_command_line_takes_a_weights_choice(runs, tmp_path, capsys):
    from clipx.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("a photo of the number three.\n")
    features = {}
    for choice in ("raw", "ema"):
        out = tmp_path / f"{choice}.npy"
        assert main(["encode", "--checkpoint", str(runs["ddp"]), "--texts", str(texts), "--out", str(out),
                     "--weights", choice]) == 0
        assert json.loads(capsys.readouterr().out)["weights"] == choice
        features[choice] = out.read_bytes()
    assert features["raw"] != features["ema"]
    assert main(["export", "--checkpoint", str(runs["plain"]), "--format", "open_clip", "--out",
                 str(tmp_path / "export"), "--weights", "ema"]) == 2
    assert "holds no EMA weights" in capsys.readouterr().err
