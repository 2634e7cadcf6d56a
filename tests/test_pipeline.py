"""The shard reader: round trip from `clipx prep` shards, epochs, determinism, corrupt data, errors."""

import shutil

import pytest
import torch

from clipx.config import load_config
from clipx.data.batch import ImageTextBatch
from clipx.data.eval_loader import build_eval_loader
from clipx.data.pipeline import POSITION_KEY, SharedEpoch, build_train_loader, steps_per_epoch
from clipx.data.shards import count_samples, expand_shards
from clipx.data.skips import SkipCounter
from clipx.data.tokenizer import Tokenizer
from clipx.data.transforms import eval_transform
from clipx.errors import ClipxError
from tests.conftest import REPO


@pytest.fixture()
def config(tiny_model_json, digits_dir):
    return load_config(REPO / "configs" / "demo-digits.yaml", [
        f"model.name={tiny_model_json}", f"data.train={digits_dir / 'train'}", "data.shuffle_buffer=100"])


def make_loader(config, pattern=None, workers=0, batch=64, seed=0, counter=None, epoch=None):
    data = config.data.__class__(**{**config.data.__dict__, "workers": workers,
                                    **({"train": pattern} if pattern else {})})
    transform = eval_transform(32, config.model.image_mean, config.model.image_std)
    return build_train_loader(data, batch, transform, ImageTextBatch(Tokenizer(config.model)), seed, 0, 1,
                              epoch or SharedEpoch(), counter or SkipCounter())


def keys_of(loader, limit=None):
    keys = []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        keys.append(batch["key"])
    return keys


def test_sizes_json_counts_and_brace_expansion(digits_dir):
    urls = expand_shards(str(digits_dir / "train" / "shard-{000000..000005}.tar"))
    assert len(urls) == 6 and count_samples(urls) == 1437
    assert expand_shards(str(digits_dir / "train")) == urls


def test_batches_have_fixed_keys_and_shapes(config):
    loader, batches = make_loader(config)
    assert batches == steps_per_epoch(1437, 64, 1)[0] == 23
    batch = next(iter(loader))
    # The worker's data position rides along; the training stream takes it off (clipx.train.stream).
    assert set(batch) == {"image", "text", "key", POSITION_KEY}
    assert batch[POSITION_KEY]["batches"] == 1 and batch[POSITION_KEY]["skips"]["used"] == 64
    assert batch["image"].shape == (64, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (64, 16) and batch["text"].dtype == torch.long


def test_one_epoch_reads_every_sample_before_repeating_any(config):
    loader, batches = make_loader(config)
    keys = [k for batch in keys_of(loader) for k in batch]
    assert len(keys) == batches * 64
    first_pass = keys[:1408]  # 22 full batches < 1437 samples in the epoch
    assert len(set(first_pass)) == len(first_pass)


def test_every_worker_yields_the_same_count_and_the_order_is_seeded(config):
    loader_a, batches = make_loader(config, workers=2)
    loader_b, _ = make_loader(config, workers=2)
    keys_a, keys_b = keys_of(loader_a), keys_of(loader_b)
    assert len(keys_a) == batches == 24  # 12 per worker
    assert keys_a == keys_b
    loader_c, _ = make_loader(config, workers=2, seed=1)
    assert keys_of(loader_c) != keys_a


def test_epochs_reshuffle_shards(config):
    epoch = SharedEpoch(0)
    loader, _ = make_loader(config, epoch=epoch)
    first = keys_of(loader, 3)
    epoch.set(1)
    assert keys_of(loader, 3) != first


def test_corrupt_and_garbage_shards_are_skipped_and_counted(config, digits_dir, tmp_path):
    shutil.copytree(digits_dir / "train", tmp_path / "train")
    shard = tmp_path / "train" / "shard-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    (tmp_path / "train" / "shard-000001.tar").write_bytes(b"<html>not a tar</html>" * 10)
    counter = SkipCounter()
    loader, _ = make_loader(config, pattern=str(tmp_path / "train"), counter=counter)
    keys = keys_of(loader, 10)
    assert len(keys) == 10
    assert counter.snapshot()["corrupt_tar"] >= 2


def test_pattern_matching_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(ClipxError, match="matched no files"):
        expand_shards(str(tmp_path / "shard-{000..003}.tar"))
    with pytest.raises(ClipxError, match="is empty"):
        expand_shards("")


def test_fewer_shards_than_workers_is_refused_unless_resampled(config, digits_dir):
    one = str(digits_dir / "train" / "shard-000000.tar")
    with pytest.raises(ClipxError, match="need at least 2"):
        make_loader(config, pattern=one, workers=2)
    data = config.data.__class__(**{**config.data.__dict__, "train": one, "workers": 2, "resampled": True,
                                    "train_num_samples": 256})
    transform = eval_transform(32, config.model.image_mean, config.model.image_std)
    loader, _ = build_train_loader(data, 32, transform, ImageTextBatch(Tokenizer(config.model)), 0, 0, 1, SharedEpoch(),
                                   SkipCounter())
    assert len(keys_of(loader, 4)) == 4


def test_eval_loader_reads_every_sample_once_with_labels_and_captions(config, digits_dir):
    transform = eval_transform(32, config.model.image_mean, config.model.image_std)
    loader = build_eval_loader(str(digits_dir / "test"), transform, "label", 100, workers=2)
    keys, labels, captions = [], [], []
    for batch in loader:
        keys += batch["key"]
        labels += batch["label"].tolist()
        captions += batch["captions"]
    assert len(keys) == len(set(keys)) == 360
    assert sorted(set(labels)) == list(range(10))
    assert all(len(c) == 1 and c[0] for c in captions)
