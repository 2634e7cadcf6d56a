"""Exactness across processes: 2 ranks x B/2 give the loss and gradients of 1 rank x B (fp32, 1e-6)."""

import pytest
import torch

from clipx.losses import ClipLoss
from tests.distributed.cases import GLOBAL_BATCH, loss_and_grads, tiny_problem
from tests.distributed.launch import run_two_processes

# Tolerance 1e-6, relative to each tensor's scale: gradients of magnitude ~8 (token embeddings summed
# over the batch) differ by up to 2.6e-6 between 1 and 2 processes from fp32 summation order alone.
TOLERANCE = 1e-6


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """max |actual - expected| <= 1e-6 * max(1, max |expected|)."""
    error = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert error <= TOLERANCE * scale, f"{name}: max error {error:.3g} > {TOLERANCE} x {scale:.3g}"


@pytest.fixture(scope="module")
def clip_results(tmp_path_factory):
    return run_two_processes("clip_gather", tmp_path_factory.mktemp("clip_gather"))


def assert_grads_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], name)


@pytest.mark.parametrize("gather", ["global", "local"])
def test_gathered_loss_and_gradients_equal_one_process_with_the_whole_batch(clip_results, gather):
    model, images, tokens = tiny_problem()
    expected_loss, expected_grads = loss_and_grads(model, ClipLoss(gather=gather), images, tokens)
    ranks = [r[gather] for r in clip_results]
    # `global`: every rank computes the full loss; `local`: the mean over ranks is the full loss.
    mean_loss = sum(r["loss"] for r in ranks) / 2
    assert_close(mean_loss, expected_loss, "loss")
    for rank in ranks:  # DDP leaves the same averaged gradient on every rank
        assert_grads_equal(rank["grads"], expected_grads)


def test_gather_none_equals_the_mean_of_per_rank_losses(clip_results):
    """`none` sees only local negatives: equal to averaging two independent half-batch losses."""
    half = GLOBAL_BATCH // 2
    losses, grads = [], []
    for rows in (slice(0, half), slice(half, GLOBAL_BATCH)):
        model, images, tokens = tiny_problem()
        loss, g = loss_and_grads(model, ClipLoss(gather="none"), images[rows], tokens[rows])
        losses.append(loss)
        grads.append(g)
    expected_grads = {n: (grads[0][n] + grads[1][n]) / 2 for n in grads[0]}
    for r, rank in enumerate(clip_results):
        assert_close(rank["none"]["loss"], losses[r], "loss")
        assert_grads_equal(rank["none"]["grads"], expected_grads)
    # And it really differs from the full-batch loss: fewer negatives.
    model, images, tokens = tiny_problem()
    full, _ = loss_and_grads(model, ClipLoss(gather="local"), images, tokens)
    assert abs(float(sum(losses) / 2 - full)) > 1e-3


def test_siglip_ring_equals_one_process_with_the_whole_batch(tmp_path):
    from clipx.losses import SigLipLoss

    ranks = [r["siglip"] for r in run_two_processes("siglip", tmp_path)]
    model, images, tokens = tiny_problem(siglip=True)
    expected_loss, expected_grads = loss_and_grads(model, SigLipLoss(), images, tokens)
    assert "logit_bias" in expected_grads
    assert_close(sum(r["loss"] for r in ranks) / 2, expected_loss, "loss")
    for rank in ranks:
        assert_grads_equal(rank["grads"], expected_grads)


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory, digits_dir):
    """101 of the held-out digits (an odd count) in 3 shards of uneven size."""
    import tarfile

    from data_prep import ShardWriter

    out = tmp_path_factory.mktemp("odd")
    samples = []
    for shard in sorted((digits_dir / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {}
            for info in tar:
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
            samples += sorted(members.items())
    with ShardWriter(out, shard_size=40) as writer:
        for key, parts in samples[:101]:
            writer.add(key, parts["jpg"], parts["txt"].decode(), __import__("json").loads(parts["json"]))
    return out


def test_sharded_evaluation_equals_single_process(odd_shards, tmp_path, monkeypatch):
    from clipx.data.tokenizer import Tokenizer
    from clipx.models import attention
    from eval.run import evaluate
    from tests.distributed.cases import fake_kernel_timings, tiny_model_and_config

    ranks = run_two_processes("evaluate", tmp_path, str(odd_shards))
    # Each rank's own timings chose differently (case_evaluate): all must use rank 0's kernels.
    assert [rank["kernels"] for rank in ranks] == [[{"image": "math", "text": "math"}]] * 2
    # The single process measures as rank 0 did (not left to this process's own timings, which
    # could choose another kernel and so other features).
    monkeypatch.setenv("CLIPX_CACHE_DIR", "off")
    monkeypatch.setattr(attention, "time_call", attention.time_call)  # put back after the fake below
    fake_kernel_timings("math")
    model, config = tiny_model_and_config()
    expected = evaluate(model, Tokenizer(config.model), config.model, str(odd_shards), torch.device("cpu"), workers=1)
    assert expected["num_images"] == 101
    for rank in ranks:
        assert rank["evaluation"]["num_images"] == 101  # none dropped, none counted twice
        assert rank["evaluation"]["zero_shot"] == expected["zero_shot"]
        assert rank["evaluation"]["retrieval"] == expected["retrieval"]


def test_a_collective_that_waits_too_long_fails_naming_the_rank(tmp_path):
    rank0 = run_two_processes("timeout", tmp_path, timeout=120)[0]
    assert rank0["message"].startswith("rank 0 of 2: a collective operation waited longer than 3 s")
    assert rank0["seconds"] < 30


def test_uneven_shards_train_the_same_steps_on_both_ranks_without_hanging(tmp_path, digits_dir, tiny_model_json):
    """4 shards of 300, 20, 256 and 5 samples: both ranks run every step, then checkpoint and evaluate."""
    import shutil

    from tests.conftest import REPO, tiny_overrides
    from tests.distributed.launch import torchrun

    uneven = tmp_path / "uneven" / "train"
    uneven.mkdir(parents=True)
    sizes = {}
    for index, (source, keep) in enumerate([("shard-000000.tar", 300), ("shard-000001.tar", 20),
                                            ("shard-000002.tar", 256), ("shard-000003.tar", 5)]):
        sizes[f"shard-{index:06d}.tar"] = _copy_first(digits_dir / "train" / source, uneven / f"shard-{index:06d}.tar",
                                                       keep)
    (uneven / "sizes.json").write_text(__import__("json").dumps(sizes))
    shutil.copytree(digits_dir / "test", tmp_path / "uneven" / "test")
    run = tmp_path / "run"
    overrides = tiny_overrides(tmp_path / "uneven", tiny_model_json, run, **{
        "train.steps": 12, "data.workers": 1, "train.batch_size": 16, "train.checkpoint_every": 6,
        "eval.every": 6, "train.collective_timeout_s": 120})
    result = torchrun(["-m", "clipx.train", "--config", str(REPO / "configs" / "demo-digits.yaml"), *overrides],
                      tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert (run / "checkpoints" / "step-000000012" / "model.safetensors").is_file()


def _copy_first(source, target, keep: int) -> int:
    """Copy the first ``keep`` samples of a shard; returns how many were written."""
    import tarfile

    with tarfile.open(source) as tar_in, tarfile.open(target, "w") as tar_out:
        keys = []
        for info in tar_in:
            key = info.name.partition(".")[0]
            if key not in keys:
                if len(keys) == keep:
                    break
                keys.append(key)
            tar_out.addfile(info, tar_in.extractfile(info))
    return len(keys)


def test_two_nodes_on_loopback_train_and_checkpoint(tmp_path, digits_dir, tiny_model_json):
    """Two launcher invocations with --nnodes 2 (one process each), rendezvous on 127.0.0.1."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO, tiny_overrides

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = tmp_path / "run"
    overrides = tiny_overrides(digits_dir, tiny_model_json, run, **{
        "train.steps": 4, "data.workers": 1, "train.batch_size": 16, "train.checkpoint_every": 2,
        "data.val": "null", "train.collective_timeout_s": 120})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "clipx.train", "--config", str(REPO / "configs" / "demo-digits.yaml"), *overrides],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=400) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert (run / "checkpoints" / "step-000000004" / "model.safetensors").is_file()


def test_resampled_mode_trains_on_fewer_shards_than_ranks(tmp_path, digits_dir, tiny_model_json):
    """One shard for 2 ranks: refused without resampling (no rank may starve), fine with it."""
    import json
    import shutil

    from tests.conftest import REPO, tiny_overrides
    from tests.distributed.launch import torchrun

    single = tmp_path / "single" / "train"
    single.mkdir(parents=True)
    shutil.copy(digits_dir / "train" / "shard-000000.tar", single)
    (single / "sizes.json").write_text(json.dumps({"shard-000000.tar": 256}))
    base = ["-m", "clipx.train", "--config", str(REPO / "configs" / "demo-digits.yaml")]
    overrides = tiny_overrides(tmp_path / "single", tiny_model_json, tmp_path / "run", **{
        "train.steps": 3, "data.workers": 1, "train.batch_size": 16, "data.val": "null",
        "train.collective_timeout_s": 120})
    refused = torchrun([*base, *overrides], tmp_path, timeout=300)
    assert refused.returncode != 0 and "need at least 2" in refused.stderr
    result = torchrun([*base, *overrides, "data.resampled=true"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3


def test_feature_caching_across_ranks_equals_one_process_with_the_whole_batch(tmp_path):
    """2 ranks x 2 micro-batches x 2 samples, replayed under DDP: the gradient of one batch of 8."""
    ranks = [r["accum"] for r in run_two_processes("accum_features", tmp_path)]
    model, images, tokens = tiny_problem()
    expected_loss, expected_grads = loss_and_grads(model, ClipLoss(gather="local"), images, tokens)
    assert_close(sum(r["loss"] for r in ranks) / 2, expected_loss, "loss")
    for rank in ranks:
        assert_grads_equal(rank["grads"], expected_grads)


def test_ntxent_across_ranks_equals_one_process_on_the_union_batch(tmp_path):
    from clipx.losses import NTXentLoss

    ranks = run_two_processes("ntxent", tmp_path)
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(GLOBAL_BATCH, 6, generator=generator, requires_grad=True)
    z2 = torch.randn(GLOBAL_BATCH, 6, generator=generator, requires_grad=True)
    expected = NTXentLoss(0.2)(z1, z2)
    expected.backward()
    assert_close(sum(r["loss"] for r in ranks) / 2, expected.detach(), "loss")
    half = GLOBAL_BATCH // 2
    for rank, r in enumerate(ranks):
        rows = slice(rank * half, (rank + 1) * half)
        # Each rank's inputs receive the gradient of the *sum* of both ranks' losses: /2 is DDP's average.
        assert_close(r["grad_z1"] / 2, z1.grad[rows], "z1")
        assert_close(r["grad_z2"] / 2, z2.grad[rows], "z2")


def test_sinkhorn_across_ranks_equals_one_process_on_the_union_batch(tmp_path):
    from clipx.losses.swav import sinkhorn
    from tests.distributed.cases import sinkhorn_scores

    ranks = run_two_processes("sinkhorn", tmp_path)
    expected = sinkhorn(sinkhorn_scores(), 0.05, 10)
    assert_close(torch.cat([r["codes"] for r in ranks]), expected, "codes")


def test_moco_keys_are_gathered_for_the_loss_and_the_queue(tmp_path):
    from clipx.losses.moco import batch_infonce

    ranks = run_two_processes("moco", tmp_path)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(GLOBAL_BATCH, 6, generator=generator, requires_grad=True)
    keys = torch.randn(GLOBAL_BATCH, 6, generator=generator)
    expected = batch_infonce(queries, keys, 0.2)
    expected.backward()
    assert_close(sum(r["loss"] for r in ranks) / 2, expected.detach(), "loss")
    half = GLOBAL_BATCH // 2
    for rank, r in enumerate(ranks):
        # Keys carry no gradient, so each rank's queries get exactly their own loss's gradient.
        assert_close(r["grad"] / 2, queries.grad[half * rank:half * (rank + 1)], "queries")
        assert_close(r["shuffled"], r["unshuffled"], "shuffled key encoder output, back in input order")
    # Both ranks hold the same queue: the global batch twice into 12 rows, wrapped at the end.
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"]) and ranks[0]["pointer"] == ranks[1]["pointer"] == 4
    assert torch.equal(ranks[0]["queue"], torch.cat([keys[4:8], keys[4:8], keys[:4]]))


def test_the_guards_decide_alike_on_every_rank_one_step_late_without_waiting(tmp_path):
    """A stop signal on rank 1 alone is agreed by both ranks at the next call; a NaN loss on rank 1
    alone refuses the step on both; two refusals in a row stop both ranks at the same step, naming
    the step the limit was reached at (counters are read a step late, so no step waits on them)."""
    ranks = run_two_processes("guards", tmp_path)
    for rank in ranks:
        assert rank["agreed"] == [False, False, True, True]
        assert rank["verdicts"] == [True, False, True, False, False, False]
        step, message = rank["stopped_at"]
        assert step == 6 and message.startswith("step 5: the loss or gradient norm was not finite on some rank; "
                                                "2 consecutive steps applied no update")
        assert rank["state"]["nonfinite"] == 4 and rank["state"]["accepted"] == 2
