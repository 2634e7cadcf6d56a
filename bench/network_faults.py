"""Network faults while streaming shards: every good sample exactly once per pass, nothing hangs.

    .venv/bin/python bench/network_faults.py                   # writes runs/bench/network_faults.json
    .venv/bin/python bench/network_faults.py --markdown runs/bench/network_faults.json

24 shards of 500 synthetic 64 px JPEGs (bench/resume_time.py's writer) served from loopback by an
HTTP server with range support and by moto's S3 server, each behind tests/netservers.py's fault
proxy. The proxy faults a seeded random 30% of shard reads (GET requests): it cuts the connection
halfway through the body, stalls it (longer than `data.io_timeout`), resets it, or answers 503;
no read fails more than 3 times in a row, so with `data.io_retries: 5` every shard can be read.
The training loader (2 workers, 256 KiB ranged reads, a 2 s timeout) reads 2 epochs; the keys of
each epoch's own pass must be the shards' keys exactly once, with no sample counted as skipped.
The same run without faults gives the time the faults cost.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, run_or_render  # noqa: E402
from bench.resume_time import write_shards  # noqa: E402

KINDS = ("cut", "503", "reset", "stall")


def random_faults(fraction: float, seed: int, max_in_a_row: int = 3):
    """A fault plan for tests/netservers.FaultProxy: each GET faulted with probability ``fraction``
    (kind drawn at random, stalls rarer), never more than ``max_in_a_row`` times in a row per object."""
    in_a_row: dict[str, int] = collections.defaultdict(int)
    lock = threading.Lock()

    def faults(method: str, path: str, attempt: int) -> str | None:
        if method != "GET" or not path.endswith(".tar"):
            return None
        rng = random.Random(f"{seed}-{path}-{attempt}")
        with lock:
            if in_a_row[path] < max_in_a_row and rng.random() < fraction:
                in_a_row[path] += 1
                return rng.choices(KINDS, weights=(4, 4, 4, 1))[0]
            in_a_row[path] = 0
            return None

    return faults


def read_epochs(pattern: str, endpoint: str | None, args) -> dict:
    """Read ``args.epochs`` epochs; per epoch, the keys of its own pass (workers that finish early
    start the next pass inside the epoch: those keys belong to the next pass, not this one)."""
    import torch

    from clipx.config import DataConfig
    from clipx.data.batch import ImageTextBatch
    from clipx.data.pipeline import POSITION_KEY
    from clipx.train.stream import TrainStream

    data = DataConfig(train=pattern, workers=2, shuffle_buffer=200, io_timeout=2.0, io_retries=5, io_backoff=0.1,
                      io_block_bytes=256 << 10, endpoint_url=endpoint, max_skip_fraction=None)
    stream = TrainStream(data, lambda image: torch.zeros(1), 1, 0, ImageTextBatch(lambda texts: texts), 0, 1)
    started = time.perf_counter()
    epochs, skipped = [], collections.Counter()
    for epoch in range(args.epochs):
        stream.epoch.set(epoch)
        keys: collections.Counter = collections.Counter()
        last: dict[int, dict] = {}
        for batch in stream.loader:
            position = batch[POSITION_KEY]
            if position["pass_index"] == epoch:
                keys.update(batch["key"])
                last[position["worker"]] = position["skips"]
        epochs.append(keys)
        for counts in last.values():
            skipped.update({k: v for k, v in counts.items() if k != "used"})
    return {"seconds": time.perf_counter() - started, "epochs": epochs, "skipped": dict(skipped)}


def measure(args) -> dict:
    import tarfile

    from tests.netservers import S3_TEST_ENV, FaultProxy, RangeHTTPServer, s3_server, upload_folder

    pattern = write_shards(args.work / "network-fault-shards", 24 * 500, 500, 64)
    folder = Path(pattern).parent
    names = pattern.rsplit("/", 1)[1]
    expected: collections.Counter = collections.Counter()
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            expected.update({m.name.split(".")[0] for m in tar.getmembers()})
    os.environ.update(S3_TEST_ENV)
    results: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "samples": sum(expected.values()), "rows": []}
    with s3_server() as s3, RangeHTTPServer(folder) as http:
        upload_folder(s3, "faults", folder)
        for store, upstream in (("http", http.url), ("s3", s3)):
            for faulty in (False, True):
                plan = random_faults(args.fraction, args.seed) if faulty else None
                with FaultProxy(upstream, plan, stall_seconds=30) as proxy:
                    url = f"{proxy.url}/{names}" if store == "http" else f"s3://faults/{names}"
                    run = read_epochs(url, proxy.url if store == "s3" else None, args)
                    gets = sum(n for (method, _), n in proxy.requests.items() if method == "GET")
                    row = {"store": store, "faults": faulty, "seconds": run["seconds"], "gets": gets,
                           "injected": dict(proxy.injected), "skipped": run["skipped"],
                           "exact": all(keys == expected for keys in run["epochs"]),
                           "delivered": [sum(keys.values()) for keys in run["epochs"]]}
                results["rows"].append(row)
                print(row, file=sys.stderr)
    return results


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"{results['samples']:,} samples in 24 shards, {s['epochs']} epochs, faults on a seeded "
             f"{s['fraction']:.0%} of reads (seed {s['seed']}), at most 3 in a row per shard.", "",
             "| store | faults | GET requests | faults injected (cut / 503 / reset / stall) | share of reads | "
             "samples per epoch | every sample exactly once | skipped | seconds |",
             "|---|---|---:|---|---:|---|---|---|---:|"]
    for row in results["rows"]:
        injected = row["injected"]
        total = sum(injected.values())
        lines.append(f"| {row['store']} | {'yes' if row['faults'] else 'no'} | {row['gets']} | "
                     f"{total} ({' / '.join(str(injected.get(k, 0)) for k in KINDS)}) | "
                     f"{total / max(row['gets'], 1):.0%} | {', '.join(f'{d:,}' for d in row['delivered'])} | "
                     f"{'yes' if row['exact'] else 'NO'} | {sum(row['skipped'].values())} | {row['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    add_report_arguments(parser, "network_faults")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
