"""Resuming an epoch on a different number of processes (clipx.train.elastic): the samples the old
ranks consumed plus those the new ranks read to finish the epoch are the epoch's samples, each
exactly once; every new rank makes the same number of batches; the next epoch deals whole shards.

The ranks here are TrainStreams built with their rank and world size in one process: the data
stream needs no process group (the model and optimizer state reshard as a resume at the same
world size loads them: DDP's is whole, FSDP's is joined and resplit by clipx.train.sharding)."""

from collections import Counter

import pytest
import torch

from bench.resume_time import write_shards
from clipx.config import DataConfig
from clipx.data.batch import ImageTextBatch
from clipx.errors import ClipxError
from clipx.train.stream import TrainStream

BATCH = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 shards of 96 samples: 768, which both world sizes divide into whole batches."""
    return write_shards(tmp_path_factory.mktemp("elastic"), 768, 96, 16)


def stream(pattern: str, rank: int, world: int) -> TrainStream:
    data = DataConfig(train=pattern, workers=2, shuffle_buffer=40)
    return TrainStream(data, lambda image: torch.zeros(1), BATCH, 5, ImageTextBatch(lambda texts: texts), rank, world)


def all_keys(pattern: str) -> Counter:
    import tarfile

    import braceexpand

    keys: Counter = Counter()
    for path in braceexpand.braceexpand(pattern):
        with tarfile.open(path) as tar:
            keys.update({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


def saved_by(shards: str, world: int, consumed: int, keys: Counter | None = None) -> list[dict]:
    """The stream states of ``world`` ranks that each consumed ``consumed`` batches of epoch 0 (their
    keys added to ``keys``)."""
    states = []
    for rank in range(world):
        old = stream(shards, rank, world)
        batches = old.batches()
        for _ in range(consumed):
            epoch, batch = next(batches)
            assert epoch == 0
            if keys is not None:
                keys.update(batch["key"])
        states.append(old.state_dict())
    return states


@pytest.mark.parametrize("old_world,new_world,consumed", [(2, 4, 20), (4, 2, 10), (2, 1, 7)])
def test_the_epoch_finishes_on_another_world_size_with_every_sample_once(shards, old_world, new_world, consumed):
    keys: Counter = Counter()
    old_states = saved_by(shards, old_world, consumed, keys)
    lengths, next_epoch_keys = [], Counter()
    for rank in range(new_world):
        new = stream(shards, rank, new_world)
        new.load_elastic(old_states)
        batches, taken = new.batches(), 0
        for epoch, batch in batches:
            if epoch == 1:  # the next epoch: whole shards dealt to the new ranks
                next_epoch_keys.update(batch["key"])
                break
            keys.update(batch["key"])
            taken += 1
        lengths.append(taken)
    assert keys == all_keys(shards), "the epoch lost or repeated samples across the change of world size"
    assert len(set(lengths)) == 1 and lengths[0] > 0  # every new rank the same number of batches
    assert sum(next_epoch_keys.values()) == new_world * BATCH


def test_elastic_resume_of_a_finished_epoch_starts_the_next(shards):
    old = stream(shards, 0, 2)
    batches = old.batches()
    for _ in range(old.batches_per_epoch):
        next(batches)
    new = stream(shards, 0, 1)
    new.load_elastic([old.state_dict(), old.state_dict()])
    assert next(new.batches())[0] == 1


def test_a_second_change_waits_for_the_split_epoch_to_end(shards):
    old_states = saved_by(shards, 2, 3)
    middle = stream(shards, 0, 1)
    middle.load_elastic(old_states)
    batches = middle.batches()
    next(batches)
    with pytest.raises(ClipxError, match="already split"):
        stream(shards, 0, 4).load_elastic([middle.state_dict()])
    while next(batches)[0] == 0:  # finish the split epoch, one batch into the next
        pass
    assert middle.state_dict()["remainder"] is None
    after = stream(shards, 0, 4)
    after.load_elastic([middle.state_dict()])  # a new epoch: split again
    assert after.remainder is not None and after.remainder["epoch"] == 1


def test_other_loader_workers_or_batch_size_take_the_same_path(shards):
    """Positions belong to a worker layout: a resume with 1 worker instead of 2, or another batch
    size, redistributes what the epoch left, exactly once."""
    from clipx.config import DataConfig

    old = stream(shards, 0, 1)
    keys: Counter = Counter()
    batches = old.batches()
    for _ in range(10):  # 688 samples left: 43 whole batches of 16
        keys.update(next(batches)[1]["key"])
    saved = old.state_dict()
    data = DataConfig(train=shards, workers=1, shuffle_buffer=40)
    new = TrainStream(data, lambda image: torch.zeros(1), 16, 5, ImageTextBatch(lambda texts: texts), 0, 1)
    assert new.needs_elastic(saved) and not old.needs_elastic(saved)
    new.load_elastic([saved])
    for epoch, batch in new.batches():
        if epoch == 1:
            break
        keys.update(batch["key"])
    assert keys == all_keys(shards)


def test_an_epoch_counted_run_is_retimed_to_its_epochs_after_a_split(shards):
    """train.epochs, not train.steps: after a resume on 4 processes instead of 2, the total steps are
    the micro-batches done plus the rest of the epoch and the remaining epochs at the new size."""
    from types import SimpleNamespace

    from clipx.train.build import retime_epoch_run

    old_states = saved_by(shards, 2, 20)
    new = stream(shards, 0, 4)
    new.load_elastic(old_states)
    scheduler = SimpleNamespace(lr_lambdas=[None])
    trainer = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(steps=None, epochs=3, accum_steps=1,
                                                                           warmup_steps=0)),
                              stream=new, scheduler=scheduler, total_steps=3 * 48)
    retime_epoch_run(trainer, batches_done=20)
    # 768 samples: 48 batches per rank per epoch at 2 x 8, 24 at 4 x 8; the split epoch's rest is 448
    # samples over 4 ranks x 2 workers: 7 batches per worker, 14 per rank.
    assert trainer.total_steps == 20 + 14 + 2 * 24
    assert scheduler.lr_lambdas[0](trainer.total_steps) == pytest.approx(0.0)


def test_a_sharded_run_saved_by_two_processes_resumes_on_one_and_finishes_the_epoch(tmp_path, tiny_model_json):
    """`clipx train` under torchrun with FSDP on 8 shards of 64: 6 steps (16 per epoch at 2 x 16), then
    `--resume latest` in one process: the model and optimizer reshard, and epoch 0's keys over
    both runs are the shards' keys exactly once."""
    import json

    from clipx.train.metrics_log import read_sample_keys
    from tests.conftest import REPO, run_training, tiny_overrides
    from tests.distributed.launch import torchrun

    data = tmp_path / "data"
    shards = write_shards(data / "train", 512, 64, 16)
    run = tmp_path / "run"

    def overrides(steps: int) -> list[str]:
        return tiny_overrides(data, tiny_model_json, run, **{
            "data.train": str(data / "train"), "data.val": "null", "train.batch_size": 16, "train.steps": steps,
            "train.checkpoint_every": 6, "train.sharding": "fsdp", "train.log_sample_keys": "true",
            "data.shuffle_buffer": 40})

    first = torchrun(["-m", "clipx.train", "--config", str(REPO / "configs" / "demo-digits.yaml"), *overrides(6)],
                     tmp_path, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    # 320 samples left: one process with 2 workers makes 10 batches each, 20 steps; 2 more start epoch 1.
    run_training(overrides(28), "--resume", "latest")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 28
    epochs = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            epochs[record["step"]] = record["epoch"]
    keys: Counter = Counter()
    for rank_keys in read_sample_keys(run).values():
        for step, batch_keys in rank_keys:
            if step <= 6 or epochs[step] == 0:
                keys.update(batch_keys)
    assert keys == all_keys(shards)
    assert [epochs[s] for s in (26, 27, 28)] == [0, 1, 1]
