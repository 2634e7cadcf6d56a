"""Hostile and broken training data: every fault kind skipped and counted by reason, every good sample
read exactly once per pass, skip summaries per epoch in checkpoints, the skip-fraction stop, pipe: opt-in."""

import json
import shutil

import pytest
import torch

from bench.hostile_corpus import build_hostile_corpus, read_one_pass
from clipx.config import DataConfig
from clipx.data.batch import ImageTextBatch
from clipx.data.pipeline import SharedEpoch, build_train_loader
from clipx.data.shards import expand_shards
from clipx.data.skips import SkipCounter
from clipx.errors import ClipxError
from clipx.train.checkpoint import list_checkpoints
from clipx.train.metrics_log import read_sample_keys
from tests.conftest import run_training, tiny_overrides


@pytest.fixture(scope="module")
def corpus(digits_dir, tmp_path_factory):
    return build_hostile_corpus(digits_dir / "train", tmp_path_factory.mktemp("hostile"))


def test_every_fault_kind_is_skipped_and_counted_and_every_good_sample_read_once(corpus):
    keys, counter = read_one_pass(corpus, workers=0)
    assert len(keys) == len(set(keys)), "a good sample was delivered twice"
    assert sorted(keys) == sorted(corpus.good_keys)
    assert counter.snapshot() == {reason: corpus.expected_skips.get(reason, 0) for reason in SkipCounter.REASONS}
    assert counter.used() == len(corpus.good_keys)
    # Every kind is in the corpus but the labels of evaluation and the members a method asks for
    # (distill.embedded's teacher.npy: tests/test_distill.py).
    assert set(corpus.expected_skips) == set(SkipCounter.REASONS) - {"bad_label", "missing_member", "no_class_label"}


def test_worker_processes_count_into_the_same_tally(corpus):
    keys, counter = read_one_pass(corpus, workers=2)
    assert set(keys) <= set(corpus.good_keys)
    skips = counter.snapshot()
    # Each worker reads its own shards; one whose shards hold fewer good samples than its share of the
    # epoch starts its next pass and counts some faults twice, so the tally is at least the pass's.
    for reason, n in corpus.expected_skips.items():
        assert skips[reason] >= n, (reason, skips)


def train_overrides(digits_dir, tiny_model_json, out, corpus_folder, **extra):
    return tiny_overrides(digits_dir, tiny_model_json, out, **{
        "data.train": corpus_folder, "data.train_num_samples": 53, "data.val": "null", "train.batch_size": 8,
        "data.shuffle_buffer": 16, "train.steps": 20, "train.checkpoint_every": 5, "train.log_every": 5,
        "train.log_sample_keys": "true", **extra})


@pytest.fixture(scope="module")
def train_corpus(corpus, tmp_path_factory):
    """The corpus as a training folder, without the vanishing shard (a folder lists what is there)."""
    folder = tmp_path_factory.mktemp("train-corpus")
    for shard in corpus.folder.glob("*.tar"):
        if shard != corpus.vanishing_shard:
            shutil.copy(shard, folder / shard.name)
    return folder


def test_training_on_hostile_data_stores_skips_per_epoch_and_resumes_to_the_same_counts_and_keys(
        tmp_path, train_corpus, digits_dir, tiny_model_json):
    full = tmp_path / "full"
    overrides = train_overrides(digits_dir, tiny_model_json, full, train_corpus, **{"data.max_skip_fraction": 0.4})
    run_training(overrides, timeout=300)  # a timeout here is a hang
    summary = json.loads((full / "summary.json").read_text())
    by_epoch = summary["skipped_by_epoch"]
    assert sorted(by_epoch) == ["0", "1"]  # 20 steps of 8 batches per epoch: epochs 0 and 1 finished
    for counts in by_epoch.values():
        assert counts["corrupt_tar"] >= 4 and counts["undecodable_image"] >= 3 and counts["used"] >= 64
    assert summary["skipped"]["used"] > by_epoch["0"]["used"] + by_epoch["1"]["used"]  # epoch 2 in progress
    state = json.loads((list_checkpoints(full)[-1] / "trainer_state.json").read_text())
    assert state["skips_by_epoch"] == by_epoch

    # Resume from step 10 (mid epoch 1) in a copy of the run: the same per-epoch counts and sample keys.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for checkpoint in list_checkpoints(resumed):
        if int(checkpoint.name.split("-")[1]) > 10:
            shutil.rmtree(checkpoint)
    (resumed / "summary.json").unlink()
    run_training(train_overrides(digits_dir, tiny_model_json, resumed, train_corpus,
                                 **{"data.max_skip_fraction": 0.4}), "--resume", "latest", timeout=300)
    assert json.loads((resumed / "summary.json").read_text())["skipped_by_epoch"] == by_epoch
    full_keys, resumed_keys = read_sample_keys(full), read_sample_keys(resumed)
    assert [step for step, _ in full_keys[0]] == list(range(1, 21))
    assert resumed_keys == full_keys


def test_too_many_skips_stop_the_run_with_one_line(tmp_path, train_corpus, digits_dir, tiny_model_json):
    result = run_training(train_overrides(digits_dir, tiny_model_json, tmp_path / "run", train_corpus,
                                          **{"data.max_skip_fraction": 0.1}), check=False, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "epoch 0:" in last and "of training inputs were skipped" in last and "data.max_skip_fraction=0.1" in last
    assert "Traceback" not in result.stderr
    assert list_checkpoints(tmp_path / "run")  # what was saved before the stop is still there


def test_pipe_urls_are_refused_unless_the_config_opts_in(tmp_path, corpus, digits_dir, tiny_model_json):
    clean = corpus.folder / "shard-0-clean.tar"
    with pytest.raises(ClipxError, match="pipe: URLs, which run shell commands"):
        expand_shards(f"pipe:cat {clean}")
    data = DataConfig(train=f"pipe:cat {clean}", train_num_samples=20, workers=0, allow_pipe_urls=True)
    loader, _ = build_train_loader(data, 1, lambda image: torch.zeros(1), ImageTextBatch(lambda texts: texts), 0, 0, 1, SharedEpoch(),
                                   SkipCounter())
    assert sorted(key for batch in loader for key in batch["key"]) == [f"s0-{i:04d}" for i in range(20)]
    result = run_training(tiny_overrides(digits_dir, tiny_model_json, tmp_path / "run", **{
        "data.train": f"pipe:cat {clean}"}), check=False)
    assert result.returncode != 0 and "data.allow_pipe_urls=true" in result.stderr.strip().splitlines()[-1]
