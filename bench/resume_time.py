"""How long does a resumed run wait for its first batch, as a function of where in the epoch it stopped?

    .venv/bin/python bench/resume_time.py                      # writes runs/bench/resume_time.json
    .venv/bin/python bench/resume_time.py --markdown runs/bench/resume_time.json

An epoch of 200,000 synthetic samples (64 px JPEGs of noise with a caption, 100 shards of 2,000),
read by the training stream (`clipx.train.stream.TrainStream`) with 2 loader workers, batch 256,
the default 2,000-sample shuffle buffer and the CLIP training transform at 64 px. For stopping
points at 10%, 50% and 90% of the epoch it times, from building the stream to holding the first
batch after the stopping point:

- replay: the stream without saved positions, which reads, decodes and augments the epoch up to the
  stopping point and drops those batches (clipx before saved data positions; still the path for
  checkpoints written before them); the unbroken run that records the positions does the same
  work and counts as the first replay;
- skip: the stream given the workers' positions a checkpoint saves, which replays the shuffle
  buffer's draws on sample numbers, reads back only the buffered samples and seeks to the next
  unread one.

Both are timed alternately (skip, replay, skip, ...) and reported as medians; each resumed stream's
first batch is checked against the unbroken stream's batch at that point (keys and pixels).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, run_or_render  # noqa: E402


def write_shards(folder: Path, samples: int, per_shard: int, size: int) -> str:
    """``samples`` noise JPEGs with captions in shards of ``per_shard`` (written once), and sizes.json."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    shards = (samples + per_shard - 1) // per_shard
    pattern = str(folder / f"shard-{{000000..{shards - 1:06d}}}.tar")
    if (folder / "sizes.json").is_file():
        return pattern
    rng = np.random.default_rng(0)
    # A few hundred distinct images, reused: encoding 200,000 would take longer than the benchmark.
    images = []
    for _ in range(256):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, format="JPEG", quality=90)
        images.append(out.getvalue())
    sizes = {}
    for shard in range(shards):
        name = f"shard-{shard:06d}.tar"
        count = min(per_shard, samples - shard * per_shard)
        with tarfile.open(folder / name, "w") as tar:
            for i in range(count):
                key = f"{shard:06d}{i:05d}"
                for suffix, data in (("jpg", images[(shard * 7 + i) % len(images)]),
                                     ("txt", f"a photo of sample {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = count
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return pattern


def make_stream(pattern: str, args):
    from clipx.config import DataConfig
    from clipx.data.batch import ImageTextBatch
    from clipx.data.crops import TrainImage
    from clipx.train.stream import TrainStream

    data = DataConfig(train=pattern, workers=args.workers, shuffle_buffer=args.shuffle_buffer)
    transform = TrainImage(args.image_size, data.crop_scale_min)  # the image-text methods' training crop
    return TrainStream(data, transform, args.batch, 0, ImageTextBatch(lambda texts: texts), 0, 1)


def first_batch_after(pattern: str, args, consumed: int, positions: dict | None) -> tuple[float, dict]:
    """Seconds from building the stream to the first batch after ``consumed`` batches, and that batch."""
    started = time.perf_counter()
    stream = make_stream(pattern, args)
    if positions is not None:
        stream.load_state_dict(positions)
    _, batch = next(stream.batches(consumed))
    return time.perf_counter() - started, batch


def measure(args) -> dict:
    import torch

    pattern = write_shards(args.work / "resume-shards", args.samples, args.per_shard, args.image_size)
    per_epoch = make_stream(pattern, args).batches_per_epoch
    results: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "batches_per_epoch": per_epoch, "points": []}
    for fraction in args.fractions:
        consumed = round(per_epoch * fraction)
        # The unbroken stream up to the point: its positions (what a checkpoint holds) and next batch.
        # It reads and decodes all the batches before the point, as a replay does: its time to the
        # next batch is the first replay figure.
        started = time.perf_counter()
        stream = make_stream(pattern, args)
        batches = stream.batches()
        for _ in range(consumed):
            next(batches)
        positions = json.loads(json.dumps(stream.state_dict()))
        _, expected = next(batches)
        unbroken = time.perf_counter() - started
        del batches, stream
        times: dict[str, list[float]] = {"skip": [], "replay": [unbroken]}
        order = ["skip", "replay"]
        for index in range(max(args.replays, args.skips)):
            for name in order if index % 2 == 0 else reversed(order):
                if len(times[name]) >= (args.skips if name == "skip" else args.replays):
                    continue
                seconds, batch = first_batch_after(pattern, args, consumed, positions if name == "skip" else None)
                assert batch["key"] == expected["key"] and torch.equal(batch["image"], expected["image"]), name
                times[name].append(seconds)
                print(f"{fraction:.0%} {name}: {seconds:.2f} s", file=sys.stderr)
        results["points"].append({"fraction": fraction, "consumed_batches": consumed,
                                  **{f"{n}_seconds": statistics.median(t) for n, t in times.items()},
                                  **{f"{n}_runs": [round(x, 3) for x in t] for n, t in times.items()}})
    return results


def markdown(results: dict) -> str:
    s, points = results["settings"], results["points"]
    lines = [f"Epoch: {s['samples']:,} samples ({s['image_size']} px JPEG, {s['per_shard']:,} per shard), "
             f"batch {s['batch']}, {s['workers']} loader workers, shuffle buffer {s['shuffle_buffer']:,}, "
             f"{results['batches_per_epoch']} batches per epoch; medians of {s['skips']} skip and "
             f"{s['replays']} replay runs, alternating.", "",
             "| stopped at | batches consumed | replay, s | skip, s | replay / skip | runs (skip; replay) |",
             "|---:|---:|---:|---:|---:|---|"]
    for p in points:
        lines.append(f"| {p['fraction']:.0%} | {p['consumed_batches']:,} | {p['replay_seconds']:.2f} | "
                     f"{p['skip_seconds']:.2f} | {p['replay_seconds'] / p['skip_seconds']:.1f}x | "
                     f"{', '.join(f'{x:.2f}' for x in p['skip_runs'])}; "
                     f"{', '.join(f'{x:.2f}' for x in p['replay_runs'])} |")
    first, last = points[0], points[-1]
    lines += ["", f"Skip at {last['fraction']:.0%} / skip at {first['fraction']:.0%}: "
              f"{last['skip_seconds'] / first['skip_seconds']:.2f} (bar: at most 1.5). Replay / skip at "
              f"{last['fraction']:.0%}: {last['replay_seconds'] / last['skip_seconds']:.1f}x (bar: at least 20x)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=2000)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--skips", type=int, default=3)
    parser.add_argument("--replays", type=int, default=2)
    add_report_arguments(parser, "resume_time")
    args = parser.parse_args()
    random.seed(0)
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
