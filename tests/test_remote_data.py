"""Shards streamed from an S3-compatible store and an HTTP server on loopback, started here: training
on them gives the local run's weights bitwise; connection cuts, stalls, resets and 503s are retried
(every good sample arrives exactly once, a shard that stays down is counted, nothing hangs); the
local cache serves a second epoch from disk within its byte budget."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipx.config import DataConfig, load_config
from clipx.data.batch import ImageTextBatch
from clipx.data.cache import ShardCache
from clipx.data.eval_loader import build_eval_loader
from clipx.data.pipeline import POSITION_KEY
from clipx.data.remote import RemoteOptions
from clipx.data.skips import SkipCounter
from clipx.train.loop import train
from clipx.train.stream import TrainStream
from tests.conftest import DEMO, tiny_overrides
from tests.netservers import FaultProxy, RangeHTTPServer, apply_s3_env, s3_server, scheduled_faults, upload_folder

SHARDS = "shard-{000000..000005}.tar"


@pytest.fixture
def s3(monkeypatch, digits_dir):
    """A moto S3 server holding the digits shards under s3://digits/train/ (credentials in the env)."""
    apply_s3_env(monkeypatch)
    with s3_server() as endpoint:
        upload_folder(endpoint, "digits", digits_dir / "train", prefix="train")
        yield endpoint


def final_weights(run: Path) -> dict:
    return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))


def test_training_on_s3_and_http_shards_gives_the_local_weights_bitwise(s3, digits_dir, tiny_model_json, tmp_path):
    def run(name: str, **data) -> dict:
        overrides = tiny_overrides(digits_dir, tiny_model_json, tmp_path / name, **{
            "train.steps": 20, "train.batch_size": 32, "data.val": "null", "train.checkpoint_every": 20, **data})
        train(load_config(DEMO, overrides))
        return final_weights(tmp_path / name)

    local = run("local")
    with RangeHTTPServer(digits_dir / "train") as http:
        over_http = run("http", **{"data.train": f"{http.url}/{SHARDS}"})
    # The sample count comes from the bucket's sizes.json; the endpoint from the config.
    over_s3 = run("s3", **{"data.train": f"s3://digits/train/{SHARDS}", "data.endpoint_url": s3,
                           "data.io_block_bytes": 65536})
    for name, weights in (("http", over_http), ("s3", over_s3)):
        assert weights.keys() == local.keys()
        assert all(torch.equal(weights[k], local[k]) for k in local), f"{name} weights differ from local"


def faulty_plan(kinds_per_shard: dict[str, list]) -> dict:
    """Per shard file name, the fault (or None) of each successive GET of it."""
    return {f"shard-{i:06d}.tar": kinds for i, kinds in kinds_per_shard.items()}


@pytest.mark.parametrize("store", ["http", "s3"])
def test_network_faults_are_retried_and_every_good_sample_arrives_once(store, s3, digits_dir, monkeypatch):
    # Shards are ~330 KB, read in 64 KB blocks: each fault hits a shard's first, middle or last read.
    plan = faulty_plan({0: ["cut", None, None, "503"], 1: [None, "reset", None, None, "cut"],
                        2: ["503", "503", None, None, None, "stall"], 3: [None, None, "cut", "reset"],
                        4: ["stall", None, "503"], 5: ["503"] * 50})  # shard 5 stays down
    upstream = RangeHTTPServer(digits_dir / "train") if store == "http" else None
    with (upstream or _nothing()) as server, FaultProxy(server.url if server else s3, scheduled_faults(plan),
                                                         stall_seconds=20) as proxy:
        pattern = f"{proxy.url}/{SHARDS}" if store == "http" else f"s3://digits/train/{SHARDS}"
        # One reader, so that one pass is exactly the first batches (with two, the worker holding the
        # dead shard would start its next pass early); the training test above runs two workers.
        data = DataConfig(train=pattern, train_num_samples=1437, workers=0, shuffle_buffer=50, io_timeout=1.0,
                          io_retries=4, io_backoff=0.05, io_block_bytes=65536, max_skip_fraction=None,
                          endpoint_url=proxy.url if store == "s3" else None)
        started = time.monotonic()
        stream = TrainStream(data, lambda image: torch.zeros(1), 1, 0, ImageTextBatch(lambda texts: texts), 0, 1)
        keys, counts = first_pass(stream)
        elapsed = time.monotonic() - started
        gets = sum(n for (method, _), n in proxy.requests.items() if method == "GET")
        injected = sum(proxy.injected.values())
    dead = set(shard_keys(digits_dir / "train" / "shard-000005.tar"))
    good = sorted(set(all_keys(digits_dir)) - dead)
    assert sorted(keys) == good, "a good sample was lost or delivered twice"
    assert counts["unreadable_shard"] == 1 and counts["used"] == len(good)
    assert sum(counts.values()) - counts["used"] == 1  # nothing else was counted
    assert injected >= 0.2 * gets, (injected, gets)
    assert elapsed < 120, f"took {elapsed:.0f} s: something waited on a stalled connection too long"


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def first_pass(stream: TrainStream) -> tuple[list[str], dict]:
    """Keys of the first pass over all shards, and its skip counts (from the data position of its
    last batch: the stream runs on into the next pass, whose reads must not count)."""
    keys, counts = [], {}
    for batch in stream.loader:  # the epoch may also end exactly with the pass
        position = batch[POSITION_KEY]
        if position["pass_index"] > 0:
            break
        keys += batch["key"]
        counts = position["skips"]
    return keys, {name: counts.get(name, 0) for name in (*SkipCounter.REASONS, SkipCounter.USED)}


def shard_keys(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})


def all_keys(digits_dir: Path) -> list[str]:
    return sorted(k for p in sorted((digits_dir / "train").glob("*.tar")) for k in shard_keys(p))


def test_a_second_epoch_reads_the_cache_not_the_server(digits_dir, tmp_path):
    plan = faulty_plan({1: ["cut"]})
    with RangeHTTPServer(digits_dir / "train") as server, FaultProxy(server.url, scheduled_faults(plan)) as proxy:
        data = DataConfig(train=f"{proxy.url}/{SHARDS}", train_num_samples=1437, workers=2, shuffle_buffer=50,
                          io_backoff=0.05, cache_dir=str(tmp_path / "cache"))
        stream = TrainStream(data, lambda image: torch.zeros(1), 64, 0, ImageTextBatch(lambda texts: texts), 0, 1)
        batches = stream.batches()
        epoch_keys: dict[int, list] = {}
        requests_after_first_epoch = None
        for epoch, batch in batches:
            if epoch == 2:
                break
            if epoch == 1 and requests_after_first_epoch is None:
                requests_after_first_epoch = sum(n for (m, _), n in proxy.requests.items() if m == "GET")
            epoch_keys.setdefault(epoch, []).extend(batch["key"])
        requests_at_end = sum(n for (m, _), n in proxy.requests.items() if m == "GET")
    assert requests_after_first_epoch is not None and requests_at_end == requests_after_first_epoch
    assert len(list((tmp_path / "cache").glob("*.tar"))) == 6
    assert set(epoch_keys[0]) <= set(all_keys(digits_dir)) and len(epoch_keys[1]) == len(epoch_keys[0])


def test_the_cache_keeps_its_byte_budget_evicting_the_least_recently_used(digits_dir, tmp_path):
    shards = sorted((digits_dir / "train").glob("*.tar"))
    size = max(p.stat().st_size for p in shards)
    with RangeHTTPServer(digits_dir / "train") as server:
        cache = ShardCache(tmp_path / "cache", 3 * size, RemoteOptions())
        urls = [f"{server.url}/{p.name}" for p in shards]
        def use(url: str) -> bytes:
            with cache.open(url) as stream:
                return stream.read()

        for url in urls[:3]:
            use(url)
            time.sleep(0.01)  # distinct modification times
        use(urls[0])  # used again: now the most recent
        time.sleep(0.01)
        use(urls[3])  # evicts the least recently used, urls[1]
        cached = {p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir()}
        assert cached == {shards[0].name, shards[2].name, shards[3].name}
        assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir()) <= 3 * size
        assert use(urls[2]) == shards[2].read_bytes()


def test_evaluation_reads_remote_shards_with_the_endpoint_from_the_environment(s3, digits_dir, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # botocore's standard variable: no clipx setting needed
    loader = build_eval_loader(f"s3://digits/train/{SHARDS}", lambda image: torch.zeros(1), "label", 100, workers=2)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == all_keys(digits_dir)


def test_an_unreachable_bucket_is_a_one_line_error(s3):
    from clipx.data.shards import expand_shards
    from clipx.errors import ClipxError

    options = RemoteOptions(endpoint_url=s3, retries=1)
    with pytest.raises(ClipxError, match="cannot read its first shard.*endpoint"):
        expand_shards(f"s3://no-such-bucket/{SHARDS}", "data.train", options=options)


def test_a_server_without_range_support_is_read_whole(digits_dir):
    """The standard library's HTTP server ignores Range headers and sends whole files: shards larger
    than one ranged read still arrive whole, once each."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(digits_dir / "train")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        data = DataConfig(train=f"http://127.0.0.1:{server.server_address[1]}/{SHARDS}", train_num_samples=1437,
                          workers=0, shuffle_buffer=50, io_block_bytes=65536, io_retries=1)
        stream = TrainStream(data, lambda image: torch.zeros(1), 1, 0, ImageTextBatch(lambda texts: texts), 0, 1)
        keys, counts = first_pass(stream)
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(keys) == all_keys(digits_dir) and counts["unreadable_shard"] == 0
