"""clipx's training loader against open_clip_train's, per core, at 224 px on photo shards.

    .venv/bin/python bench/loader_peer.py                  # writes runs/bench/loader_peer.json
    .venv/bin/python bench/loader_peer.py --markdown runs/bench/loader_peer.json

Both loaders read the same shards (bench/photo_shards.py: JPEG photographs of 256 to 640 px on
their short side, as img2dataset writes them) with one loader worker each, so the rate is what one
core gives: open_clip_train's ``get_wds_dataset`` with ``open_clip.image_transform(224,
is_train=True)`` (RandomResizedCrop at scale 0.9 to 1, bicubic, then ToTensor and Normalize) and
ViT-B/32's tokenizer; clipx's ``build_train_loader`` with the CLIP method's transform and collation
for ViT-B/32 (the same crop distribution, a JPEG decoded at the scale its crop needs, uint8 batches
normalised later on the device), with data.decode=loader and, for the loader's share of the work,
data.decode=device (the loader then only reads headers and draws boxes; the decode is the GPU's).
Each measurement is a fresh process timing batches of 128 after 3 warm-up batches; the loaders
alternate and the table gives medians. open_clip_train needs webdataset < 1.0: bench/openclip_env.sh
installs it into runs/bench/openclip-site (`make peers`), first on PYTHONPATH for its runs only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, run_or_render  # noqa: E402
from bench.photo_shards import shard_pattern, write_photo_shards  # noqa: E402

BATCH, WARMUP = 128, 3
OPENCLIP_SITE = REPO / "runs" / "bench" / "openclip-site"

# Each probe builds ``loader`` and ends with TIMED: warm-up batches, then the timed ones.
TIMED = """
iterator = iter(loader)
for _ in range(WARMUP):
    next(iterator)
started = time.perf_counter()
for _ in range(batches):
    next(iterator)
print(json.dumps({"samples_per_second": batches * batch / (time.perf_counter() - started)}))
"""

CLIPX_PROBE = """
import json, sys, time
from clipx.config import load_config
from clipx.data.pipeline import SharedEpoch, build_train_loader
from clipx.data.skips import SkipCounter
from clipx.methods import method_of
pattern, batch, batches, decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = load_config(None, ["model.name=ViT-B-32", f"data.train={pattern}", "data.workers=1", f"data.decode={decode}",
                            f"data.train_num_samples={batch * (batches + 4)}", "data.shuffle_buffer=1000"])
method = method_of(config)
loader, _ = build_train_loader(config.data, batch, method.train_transform(config), method.collate(config),
                               0, 0, 1, SharedEpoch(), SkipCounter())
"""

OPENCLIP_PROBE = """
import argparse, json, sys, time
import open_clip
from open_clip_train.data import get_wds_dataset
pattern, batch, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
args = argparse.Namespace(train_data=pattern, train_num_samples=batch * (batches + 4), train_data_upsampling_factors=None,
                          dataset_resampled=False, batch_size=batch, workers=1, world_size=1, seed=0, distributed=False,
                          val_data=None, val_num_samples=None)
preprocess = open_clip.image_transform(224, is_train=True)
data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
data.set_epoch(0)
loader = data.dataloader
"""

LOADERS = {
    "open_clip_train": (OPENCLIP_PROBE, ()),
    "clipx": (CLIPX_PROBE, ("loader",)),
    "clipx, data.decode=device (loader's share)": (CLIPX_PROBE, ("device",)),
}


def rate(name: str, pattern: str, batches: int) -> float:
    probe, extra = LOADERS[name]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if name == "open_clip_train":
        env["PYTHONPATH"] = f"{OPENCLIP_SITE}{os.pathsep}{REPO}"
    out = subprocess.run([sys.executable, "-c", (probe + TIMED).replace("WARMUP", str(WARMUP)), pattern, str(BATCH), str(batches), *extra],
                         cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["samples_per_second"]


def measure(args) -> dict:
    if not (OPENCLIP_SITE / "webdataset").is_dir():
        raise SystemExit("open_clip_train needs webdataset < 1.0: run `make peers` (bench/openclip_env.sh) first")
    shards = write_photo_shards(args.work / "photos", BATCH * (args.batches + 4 + WARMUP))
    pattern = shard_pattern(shards)
    runs: dict[str, list[float]] = {name: [] for name in LOADERS}
    for index in range(args.alternations):
        for name in (list(LOADERS) if index % 2 == 0 else list(LOADERS)[::-1]):
            runs[name].append(rate(name, pattern, args.batches))
            print(f"  {name}: {runs[name][-1]:.0f} samples/s", file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {"head": commit.strip(), "cpu": platform.processor() or platform.machine(), "batch": BATCH,
            "batches": args.batches, "shards": str(shards.relative_to(REPO)) if shards.is_relative_to(REPO) else str(shards),
            "runs": runs}


def markdown(results: dict) -> str:
    base = statistics.median(results["runs"]["open_clip_train"])
    lines = [f"One loader worker each (one core), batches of {results['batch']} at 224 px, {results['batches']} batches "
             f"timed per run after {WARMUP} warm-up ones; medians of alternating runs; commit {results['head']}.", "",
             "| loader | samples/s per core (median) | against open_clip_train | runs |", "|---|---:|---:|---|"]
    for name, values in results["runs"].items():
        median = statistics.median(values)
        # The device-decoding row leaves the decode to the device: not the same work, no ratio.
        ratio = "(not the same work)" if "device" in name else f"{median / base:.2f}x"
        lines.append(f"| {name} | {median:.0f} | {ratio} | {', '.join(f'{v:.0f}' for v in values)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--alternations", type=int, default=5)
    add_report_arguments(parser, "loader_peer")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
