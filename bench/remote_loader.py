"""Training-loader throughput from a loopback S3 server and an HTTP server, against local disk.

    .venv/bin/python bench/remote_loader.py                    # writes runs/bench/remote_loader.json
    .venv/bin/python bench/remote_loader.py --markdown runs/bench/remote_loader.json

The same shards (synthetic 64 px JPEGs with captions, 1,000 per shard, bench/resume_time.py's
writer) read by the training stream (`clipx.train.stream.TrainStream`: read, shuffle, decode, the
CLIP training transform at 64 px, batches of 256) from local disk, from moto's S3 server and from a
range-capable HTTP server, both on 127.0.0.1 (tests/netservers.py), with 1 and 2 loader workers.
Sources alternate within each repetition (local, s3, http, then reversed), and each figure is the
median over repetitions of samples per second over the timed batches, after warm-up batches that
absorb worker start-up. Loopback has no network latency or bandwidth limit: this measures the
cost of clipx's remote reading path (fsspec clients, ranged reads, the extra copies), not a
bucket's speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, run_or_render  # noqa: E402
from bench.resume_time import write_shards  # noqa: E402

SOURCES = ("local", "s3", "http")


def samples_per_second(pattern: str, workers: int, args, endpoint: str | None) -> float:
    from clipx.config import DataConfig
    from clipx.data.batch import ImageTextBatch
    from clipx.data.crops import TrainImage
    from clipx.train.stream import TrainStream

    data = DataConfig(train=pattern, workers=workers, endpoint_url=endpoint)
    transform = TrainImage(args.image_size, data.crop_scale_min)  # the image-text methods' training crop
    stream = TrainStream(data, transform, args.batch, 0, ImageTextBatch(lambda texts: texts), 0, 1)
    batches = stream.batches()
    for _ in range(args.warmup):
        next(batches)
    started = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    return args.batches * args.batch / (time.perf_counter() - started)


def measure(args) -> dict:
    import os

    from tests.netservers import S3_TEST_ENV, RangeHTTPServer, s3_server, upload_folder

    pattern = write_shards(args.work / "remote-loader-shards", args.samples, 1000, args.image_size)
    folder = Path(pattern).parent
    names = pattern.rsplit("/", 1)[1]
    os.environ.update(S3_TEST_ENV)
    runs: dict[str, dict[int, list[float]]] = {s: {w: [] for w in args.workers} for s in SOURCES}
    with s3_server() as endpoint, RangeHTTPServer(folder) as http:
        upload_folder(endpoint, "bench", folder)
        patterns = {"local": (pattern, None), "s3": (f"s3://bench/{names}", endpoint),
                    "http": (f"{http.url}/{names}", None)}
        for repetition in range(args.repetitions):
            for workers in args.workers:
                order = SOURCES if repetition % 2 == 0 else tuple(reversed(SOURCES))
                for source in order:
                    rate = samples_per_second(*patterns[source][:1], workers, args, patterns[source][1])
                    runs[source][workers].append(rate)
                    print(f"{source} workers={workers}: {rate:.0f} samples/s", file=sys.stderr)
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "runs": {s: {str(w): r for w, r in by_workers.items()} for s, by_workers in runs.items()}}


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"Shards: {s['samples']:,} samples of {s['image_size']} px JPEG, 1,000 per shard; batch {s['batch']}, "
             f"{s['warmup']} warm-up and {s['batches']} timed batches per run; medians of {s['repetitions']} "
             "repetitions, sources alternating.", "",
             "| loader workers | source | samples/s | per worker | / local | runs |", "|---:|---|---:|---:|---:|---|"]
    for workers in map(str, s["workers"]):
        local = statistics.median(results["runs"]["local"][workers])
        for source in SOURCES:
            rates = results["runs"][source][workers]
            median = statistics.median(rates)
            lines.append(f"| {workers} | {source} | {median:.0f} | {median / int(workers):.0f} | "
                         f"{median / local:.2f} | {', '.join(f'{r:.0f}' for r in rates)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repetitions", type=int, default=3)
    add_report_arguments(parser, "remote_loader")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
