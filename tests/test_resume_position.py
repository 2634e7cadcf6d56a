"""Resuming the data stream from saved worker positions: the same batches as an unbroken run, bitwise,
at any point of an epoch (shuffle buffer mid-fill, mid-drain, across shard and pass boundaries),
with the epoch's skip counts exact, and nothing before the resume point decoded again."""

import json

import pytest
import torch

from bench.hostile_corpus import build_hostile_corpus
from clipx.config import DataConfig
from clipx.data.batch import ImageTextBatch
from clipx.data.position import Position, ShuffleBuffer, replay_shuffle
from clipx.train.stream import TrainStream


class CountingTransform:
    """A transform that records how often it ran (decoding and augmenting happen once per call) and
    draws from torch's RNG, so a sample's output depends on its augmentation seed."""

    def __init__(self):
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        return torch.tensor(image.getpixel((3, 5)), dtype=torch.float32).flatten()[:1] + torch.rand(1)


def make_stream(data: DataConfig, transform=None) -> TrainStream:
    return TrainStream(data, transform or CountingTransform(), 8, 3, ImageTextBatch(lambda texts: texts), 0, 1)


def take(stream: TrainStream, batches, n: int) -> list[tuple[int, list, torch.Tensor]]:
    return [(epoch, batch["key"], batch["image"]) for epoch, batch in (next(batches) for _ in range(n))]


def same(a, b) -> bool:
    return len(a) == len(b) and all(ea == eb and ka == kb and torch.equal(ia, ib)
                                    for (ea, ka, ia), (eb, kb, ib) in zip(a, b))


@pytest.fixture(scope="module")
def corpus(digits_dir, tmp_path_factory):
    return build_hostile_corpus(digits_dir / "train", tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_anywhere_gives_the_unbroken_batches_and_counts(digits_dir, workers):
    """Digits, 6 shards of <= 256: a 100-sample buffer fills, crosses shards and drains at each pass end."""
    data = DataConfig(train=str(digits_dir / "train"), workers=workers, shuffle_buffer=100)
    unbroken = make_stream(data)
    per_epoch = unbroken.batches_per_epoch
    batches = unbroken.batches()
    reference, counts = take(unbroken, batches, 2 * per_epoch + 3), unbroken.take_finished()
    for cut in (1, per_epoch // 2 + 1, per_epoch + 7, 2 * per_epoch - 2):
        first = make_stream(data)
        first_batches = first.batches()
        assert same(take(first, first_batches, cut), reference[:cut])
        saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = make_stream(data)
        resumed.load_state_dict(saved)
        rest = take(resumed, resumed.batches(cut), len(reference) - cut)
        assert same(rest, reference[cut:]), f"resumed after {cut} batches"
        # The finished epochs' skip counts (epoch, counts) match the unbroken run's, "used" included.
        finished_before = [c for c in counts if c[0] < cut // per_epoch]
        assert finished_before + resumed.take_finished() == counts


def test_a_resume_decodes_nothing_before_its_position(digits_dir):
    data = DataConfig(train=str(digits_dir / "train"), workers=0, shuffle_buffer=100)
    first = make_stream(data)
    per_epoch = first.batches_per_epoch
    take(first, first.batches(), per_epoch - 2)
    transform = CountingTransform()
    resumed = make_stream(data, transform)
    resumed.load_state_dict(first.state_dict())
    take(resumed, resumed.batches(per_epoch - 2), 2)
    assert transform.calls == 2 * 8  # digits hold no bad samples: one decode per sample trained on


def test_resume_in_hostile_data_keeps_the_epoch_counts_exact(corpus):
    """Damaged shards, duplicate keys, undecodable images: a resume at every batch of the epoch
    gives the same keys and the same per-epoch skip counts as the unbroken pass."""
    data = DataConfig(train=str(corpus.folder), train_num_samples=len(corpus.good_keys), workers=0,
                      shuffle_buffer=16)
    unbroken = make_stream(data, lambda image: torch.zeros(1))
    per_epoch = unbroken.batches_per_epoch
    reference = take(unbroken, unbroken.batches(), per_epoch + 1)
    counts = unbroken.take_finished()
    assert counts[0][1]["corrupt_tar"] == corpus.expected_skips["corrupt_tar"]
    for cut in range(1, per_epoch):
        first = make_stream(data, lambda image: torch.zeros(1))
        take(first, first.batches(), cut)
        resumed = make_stream(data, lambda image: torch.zeros(1))
        resumed.load_state_dict(first.state_dict())
        assert same(take(resumed, resumed.batches(cut), per_epoch + 1 - cut), reference[cut:])
        assert resumed.take_finished() == counts, f"cut {cut}"


@pytest.mark.parametrize("read,size", [(0, 5), (3, 5), (4, 5), (40, 5), (17, 1)])
def test_replaying_the_shuffle_buffer_on_numbers_gives_its_state(read, size):
    import random

    real = ShuffleBuffer(size, random.Random("s"))
    emitted = sum(real.push(n) is not None for n in range(read))
    position = Position(epoch=0, worker=0, pass_index=0, read=read, emitted=emitted)
    replayed = replay_shuffle(position, ShuffleBuffer(size, random.Random("s")))
    assert replayed.held() == real.held()
    assert [replayed.push(n) for n in range(read, read + 9)] == [real.push(n) for n in range(read, read + 9)]
    # The pass ended after ``read`` samples and two of the drained ones were handed on.
    real = ShuffleBuffer(size, random.Random("s"))
    emitted = sum(real.push(n) is not None for n in range(read))
    real.drain()
    drained = [real.next_drained() for _ in range(min(2, len(real.drained)))]
    position.draining, position.emitted = True, emitted + len(drained)
    assert replay_shuffle(position, ShuffleBuffer(size, random.Random("s"))).held() == real.held()
