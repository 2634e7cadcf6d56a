"""What the curation stages cost on a pool of embeddings: seconds and peak memory per stage.

    .venv/bin/python bench/curation_scale.py [--samples 200000] [--dim 512]
    .venv/bin/python bench/curation_scale.py --markdown runs/bench/curation_scale.json

The stages after `clipx curate score` run in one process on the pool's embeddings (scoring is the
scorer's forward pass, measured with the model elsewhere). Here the pool is synthetic: unit float16
image embeddings of --samples rows, a twentieth of them near-copies of others, captions naming one of
the 1,008 default concept entries each (skewed: a few entries take most), and an evaluation set of
--samples / 20 images. Each stage runs as `clipx curate` runs it (clusters: one per 1,000 samples for
SemDeDup, 100 for the image-based filter), timed once, on this machine's cores.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, run_or_render  # noqa: E402


def synthetic_pool(samples: int, dim: int, seed: int = 0):
    import numpy as np
    import torch

    from clipx.curation import default_entries

    generator = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(samples, dim, generator=generator), dim=1)
    chosen = torch.randperm(samples, generator=generator)[: samples // 10]
    sources, copies = chosen[: len(chosen) // 2], chosen[len(chosen) // 2: 2 * (len(chosen) // 2)]
    noise = 0.01 * torch.randn(len(copies), dim, generator=generator)
    images[copies] = torch.nn.functional.normalize(images[sources] + noise, dim=1)  # cosine about 0.97 to 1
    entries = default_entries()
    rng = np.random.default_rng(seed)
    picks = np.minimum(rng.zipf(1.3, samples) - 1, len(entries) - 1)
    captions = [f"a photo of a {entries[p]} on a table" for p in picks]
    scores = rng.normal(0.3, 0.05, samples).astype(np.float32)
    reference = images[torch.randperm(samples, generator=generator)[: samples // 20]]
    return images.half(), captions, scores, entries, reference.half()


def timed(label: str, results: dict, step):
    started = time.perf_counter()
    out = step()
    results[label] = {"seconds": round(time.perf_counter() - started, 2),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    return out


def measure(args) -> dict:
    import torch

    from clipx.curation import (
        balance,
        image_based_filter,
        keep_top_fraction,
        match_entries,
        near_duplicates_of,
        otsu_threshold,
        semantic_duplicates,
    )

    images, captions, scores, entries, reference = synthetic_pool(args.samples, args.dim)
    stages: dict = {}
    timed("filter: Otsu threshold + top 30%", stages, lambda: (otsu_threshold(scores), keep_top_fraction(scores, 0.3)))
    timed("filter: image-based (k-means, 100 clusters)", stages,
          lambda: image_based_filter(images, reference, 100, seed=0))
    keep, _ = timed(f"dedup: SemDeDup ({args.samples // 1000} clusters, 0.95)", stages,
                    lambda: semantic_duplicates(images, 0.95, max(1, args.samples // 1000), seed=0))
    matches = timed("balance: match captions to entries", stages, lambda: match_entries(captions, entries))
    timed("balance: cap at t = 1% of the pool", stages, lambda: balance(matches, len(entries), args.samples // 100, 0))
    timed(f"decontaminate against {len(reference)} images", stages,
          lambda: near_duplicates_of(images, reference, 0.95))
    return {"command": "bench/curation_scale.py " + " ".join(sys.argv[1:]), "samples": args.samples,
            "dim": args.dim, "threads": torch.get_num_threads(), "near_copies_removed": int((~keep).sum()),
            "stages": stages}


def markdown(results: dict) -> str:
    lines = [f"`{results['command']}`: {results['samples']:,} samples of {results['dim']} dimensions, "
             f"{results['threads']} threads; SemDeDup removed {results['near_copies_removed']:,} of the "
             f"{results['samples'] // 20:,} planted near-copies.", "",
             "| stage | seconds | peak RSS (MiB, process so far) |", "|---|---:|---:|"]
    lines += [f"| {name} | {row['seconds']:.1f} | {row['peak_rss_mib']:,} |" for name, row in results["stages"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    add_report_arguments(parser, "curation_scale")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
