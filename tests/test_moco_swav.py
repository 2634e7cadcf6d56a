"""MoCo and SwAV: the queue against a hand simulation, momentum updates, Sinkhorn marginals, BatchNorm
splits and shuffles, multi-crop, and exact resume of the objective's state."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.methods import build_model, build_objective, method_of
from clipx.train.state_io import load_tree
from tests.conftest import REPO, tiny_overrides

MOCO = REPO / "configs" / "moco-digits.yaml"
SWAV = REPO / "configs" / "swav-digits.yaml"


def tiny_config(path, tiny_model_json, **overrides):
    values = {"model.name": tiny_model_json, "ssl.head_hidden": 16, "ssl.head_out": 4, "ssl.moco.predictor_hidden": 16,
              "ssl.swav.prototypes": 6, "ssl.bn_splits": 2, **overrides}
    return load_config(path, [f"{k}={v}" for k, v in values.items()])


def random_views(batch: int, count: int = 2, size: int = 32, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(batch, 3, size, size, generator=generator) for _ in range(count)]}


def test_moco_queue_and_pointer_match_a_hand_simulated_queue(tiny_model_json):
    config = tiny_config(MOCO, tiny_model_json, **{"ssl.moco.queue_size": 8, "train.batch_size": 4})
    objective = build_objective(build_model(config), config)
    rows = [row.clone() for row in objective.queue.features]  # the simulation: a list and a pointer
    pointer = 0
    for step in range(1, 6):
        features = objective.features(random_views(4, seed=step))
        objective.loss_from_features(features)
        for key in F.normalize(features["key"], dim=1):
            rows[pointer] = key
            pointer = (pointer + 1) % len(rows)
        objective.end_step(step, 5, accepted=True)
    assert objective.queue.pointer == pointer == 4
    assert torch.equal(objective.queue.features, torch.stack(rows))


def test_the_momentum_encoder_gets_no_gradient_and_follows_the_ema(tiny_model_json):
    config = tiny_config(MOCO, tiny_model_json, **{"ssl.moco.version": 3, "ssl.moco.momentum_cosine": False,
                                                   "ssl.moco.momentum": 0.9, "train.batch_size": 4})
    model = build_model(config)
    objective = build_objective(model, config)
    objective(random_views(4))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_encoder.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    with torch.no_grad():  # an optimizer step would move the online encoder away from its copy
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    objective.end_step(1, 10, accepted=True)
    for old, online, new in zip(before, model.encoder.parameters(), model.momentum_encoder.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)


def test_momentum_schedule_rises_from_its_base_to_one():
    from clipx.ssl.momentum import momentum_at

    assert momentum_at(0, 100, 0.99, cosine=True) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99, cosine=True) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99, cosine=True) == pytest.approx(1.0)
    assert momentum_at(50, 100, 0.99, cosine=False) == 0.99


@pytest.mark.parametrize("version", [2, 3])
def test_moco_resume_restores_weights_and_queue_exactly(version, tmp_path, digits_dir, tiny_model_json):
    """Stop after step 2 of 4 and resume: weights, momentum encoder and queue equal the unbroken run."""
    from clipx.train.loop import train

    extra = {"train.steps": 4, "train.checkpoint_every": 2, "data.val": "null", "ssl.moco.version": version,
             "ssl.moco.queue_size": 128}
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(load_config(MOCO, tiny_overrides(digits_dir, tiny_model_json, full, **extra)))
    shutil.copytree(full / "checkpoints" / "step-000000002", resumed / "checkpoints" / "step-000000002")
    train(load_config(MOCO, tiny_overrides(digits_dir, tiny_model_json, resumed, **extra)), resume="latest")
    step4 = "checkpoints/step-000000004"
    expected, actual = load_file(full / step4 / "model.safetensors"), load_file(resumed / step4 / "model.safetensors")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    queue, resumed_queue = (load_tree(run / step4 / "rank0")["objective"] for run in (full, resumed))
    assert queue.keys() == resumed_queue.keys() and all(torch.equal(queue[k], resumed_queue[k]) for k in queue)
    if version == 2:
        assert int(queue["moco_queue.pointer"]) == 0 and int(queue["moco_queue.filled"]) == 128
    else:
        assert queue == {}  # MoCo v3 keeps no queue


def test_moco_queue_must_hold_whole_global_batches(tiny_model_json, monkeypatch):
    with pytest.raises(ClipxError, match="multiple of the global batch, hence of .* = 64"):  # before launch
        method_of(tiny_config(MOCO, tiny_model_json, **{"ssl.moco.queue_size": 96, "train.batch_size": 64}))
    from clipx import dist

    # 2 processes x 64 = 128: 192 passes the per-process rule but not the global one.
    config = tiny_config(MOCO, tiny_model_json, **{"ssl.moco.queue_size": 192, "train.batch_size": 64})
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(ClipxError, match="multiple of the global batch 128"):
        build_objective(build_model(config), config)


@pytest.mark.parametrize("override, message", [
    ({"loss.name": "ntxent", "ssl.batchnorm": "shuffle"}, "ssl.batchnorm=shuffle is not available for loss.name=ntxent"),
    ({"loss.name": "ntxent", "ssl.batchnorm": "local", "ssl.views.small_crops": 2}, "used by loss.name=swav only"),
    ({"ssl.moco.version": 2, "ssl.moco.queue_size": 0}, "needs ssl.moco.queue_size"),
    ({"ssl.views.small_crop_scale": "[0.5, 0.1]"}, "ssl.views.small_crop_scale"),
    ({"ssl.moco.version": 4}, "ssl.moco.version must be one of"),
])
def test_inconsistent_ssl_settings_are_refused_before_training(override, message):
    """By the config check, or by the method's (clipx.methods.method_of, which runs before launch)."""
    with pytest.raises(ClipxError, match=message):
        method_of(load_config(MOCO, [f"{k}={v}" for k, v in override.items()]))


def test_sinkhorn_codes_have_uniform_marginals():
    """Rows sum to 1 and every prototype gets N/K of the batch. SwAV's 3 iterations only approach
    that (31% imbalance on these random scores, a few per cent on trained ones); at 50 the
    marginals hold to 1e-3."""
    from clipx.losses.swav import sinkhorn
    from tests.distributed.cases import sinkhorn_scores

    scores = sinkhorn_scores()  # (64, 12)
    errors = []
    for iterations in (3, 50):
        codes = sinkhorn(scores, 0.05, iterations)
        assert (codes >= 0).all()
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(64), atol=1e-3, rtol=0)
        errors.append((codes.sum(dim=0) * 12 / 64 - 1).abs().max().item())
    assert errors[1] < 1e-3 and errors[1] < errors[0]


def test_split_batchnorm_normalises_each_group_on_its_own():
    from clipx.ssl.batchnorm import split_batchnorm_

    plain = torch.nn.BatchNorm1d(3)
    split = split_batchnorm_(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), 2)[0]
    x = torch.randn(8, 3) * 4 + 1
    out = split(x)
    for group in (slice(0, None, 2), slice(1, None, 2)):  # rows i, i + 2, ... form a group
        torch.testing.assert_close(out[group], plain(x[group]))
    assert set(split.state_dict()) == set(plain.state_dict())  # checkpoints stay interchangeable
    torch.testing.assert_close(split.running_mean, 0.1 * x.mean(0), rtol=1e-5, atol=1e-6)


def test_shuffled_key_forward_returns_keys_in_input_order():
    from clipx.ssl.batchnorm import shuffled_forward, split_batchnorm_

    torch.manual_seed(0)
    x = torch.randn(8, 5)
    per_sample = torch.nn.Linear(5, 4)
    torch.testing.assert_close(shuffled_forward(per_sample, x), per_sample(x))  # same rows, same order
    # With BatchNorm in 2 groups, a shuffled pass normalises each key among other samples.
    encoder = split_batchnorm_(torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)), 2)
    assert not torch.allclose(shuffled_forward(encoder, x), encoder(x))


def test_vit_small_crops_use_the_resampled_positional_embedding(tiny_model_json):
    from clipx.ssl.encoder import vit_forward_resampled

    config = tiny_config(SWAV, tiny_model_json)
    backbone = build_model(config).encoder.backbone.eval()
    images = torch.randn(2, 3, 32, 32)
    # At the native size the re-implemented forward is open_clip's own, exactly.
    assert torch.equal(vit_forward_resampled(backbone, images), backbone(images))
    assert vit_forward_resampled(backbone, torch.randn(2, 3, 16, 16)).shape == (2, 32)


def test_swav_multicrop_loss_freezes_then_trains_the_prototypes(tiny_model_json):
    config = tiny_config(SWAV, tiny_model_json, **{"ssl.swav.freeze_prototypes_steps": 1, "ssl.swav.queue_size": 8,
                                                   "ssl.views.small_crops": 2, "train.batch_size": 4})
    model = build_model(config)
    objective = build_objective(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = random_views(4, 2, 32)
    batch["views"] += random_views(4, 2, 16, seed=1)["views"]
    for step in (1, 2):
        before = model.prototypes.weight.detach().clone()
        loss = objective(batch)["loss"]
        if step == 1:  # against SwAV's swapped prediction written out: every view predicts each global view's code
            from clipx.losses.swav import sinkhorn

            with torch.no_grad():
                scores = objective.features(batch)["scores"]  # (B, V, K); the queues are still empty
                log_p = F.log_softmax(scores / config.ssl.temperature, dim=-1)
                terms = [-(sinkhorn(scores[:, g], config.ssl.swav.sinkhorn_epsilon, config.ssl.swav.sinkhorn_iters)
                           * log_p[:, v]).sum(-1).mean() for g in (0, 1) for v in range(4) if v != g]
            torch.testing.assert_close(loss.detach(), torch.stack(terms).mean())
        loss.backward()
        frozen = step == 1
        assert (torch.count_nonzero(model.prototypes.weight.grad).item() == 0) == frozen
        optimizer.step()
        optimizer.zero_grad()
        objective.end_step(step, 2, accepted=True)
        moved = (model.prototypes.weight - before).abs().max().item()
        assert moved < 1e-6 if frozen else moved > 1e-3
        torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(6))
    # Two steps of 4 projections per global view filled the queues of 8.
    assert all(queue.full and queue.pointer == 0 for queue in objective.queues)
    assert int(objective.state_dict()["steps_done"]) == 2


def test_swav_batches_hold_two_global_views_and_the_small_crops(digits_dir, tiny_model_json):
    from clipx.data.pipeline import SharedEpoch, build_train_loader
    from clipx.data.skips import SkipCounter
    from clipx.methods import method_of

    config = tiny_config(SWAV, tiny_model_json, **{"data.train": digits_dir / "train", "data.workers": 0})
    method = method_of(config)
    loader, _ = build_train_loader(config.data, 8, method.train_transform(config), method.collate(config), 0, 0,
                                   1, SharedEpoch(), SkipCounter())
    views = next(iter(loader))["views"]
    assert [tuple(v.shape[-2:]) for v in views] == [(32, 32)] * 2 + [(16, 16)] * 2
