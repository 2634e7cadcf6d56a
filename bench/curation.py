"""Curation against planted noise: does score -> filter -> dedup find what was planted, and does a CLIP
trained on what it keeps beat one trained on everything, at equal steps?

    .venv/bin/python bench/curation.py [--steps 600] [--seeds 0 1] [--datasets digits photos]
    .venv/bin/python bench/curation.py --markdown runs/bench/curation.json

For each dataset (scikit-learn's digits, `clipx prep digits`; the photographs shipped with
scikit-image and scikit-learn, `clipx prep photos`), the clean training shards get planted noise
(bench/curation_noise.py): 40% of the captions swapped to an image of another class, and
near-duplicates (crops, re-encodes, brightness changes) of other samples making up 20% of the pool.
truth.json says which is which; nothing of it reaches the curation.

Before planting, a fifth of the clean training split is set aside (seeded) as the scorer's data:
DataComp scores its pool with a CLIP trained on other, cleaner data (OpenAI's), and this is that
setting in small. The pool is made from the other four fifths.

1. raw: the demo CLIP (configs/demo-digits.yaml) trained on the whole noisy pool, one run per seed.
2. scorer: the same CLIP trained on the clean fifth.
3. score the pool with it (--embeddings, --copy-descriptor as given: thumbnail by default); filter
   --threshold auto (Otsu's split of the scores); dedup (exact bytes, then SemDeDup at
   --dedup-threshold on the copy descriptors); apply: keep.parquet.
4. curated: the same CLIP, same steps and seeds, trained with data.keep.

Reported per dataset: swapped pairs removed and good pairs lost (good: neither swapped nor a planted
duplicate), planted duplicates removed (per group of a source and its copies, all but one is the
goal: removed members, at most size - 1 per group, over the sum of size - 1) and false dedup
removals (dedup's removals outside every group, over the samples outside the groups that dedup
saw), and zero-shot top-1 on the clean held-out split, raw and curated, each seed and the mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, run_or_render  # noqa: E402

DEMO = REPO / "configs" / "demo-digits.yaml"
SWEEP = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995)
TEMPLATES = {"digits": "digits", "photos": "photos"}


def prepare(dataset: str, work: Path, seed: int) -> tuple[Path, Path]:
    """(the noisy pool's folder, the clean held-out split's folder), written once."""
    from bench.curation_noise import plant_noise

    clean = work / dataset / "clean"
    if not (clean / "train").is_dir():
        if dataset == "digits":
            from data_prep import prep_digits

            prep_digits(clean, image_size=32, shard_size=256, workers=0)
        else:
            from data_prep.photos import prep_photos

            prep_photos(clean, image_size=32, workers=0)
    pool, scorer_data = work / dataset / "pool", work / dataset / "scorer-data"
    if not (pool / "truth.json").is_file():
        split_clean(clean / "train", work / dataset / "pool-clean", scorer_data, fraction=0.2, seed=seed)
        plant_noise(work / dataset / "pool-clean", pool, swap_fraction=0.4, duplicate_fraction=0.2, seed=seed)
    return pool, scorer_data, clean / "test"


def split_clean(train: Path, rest: Path, aside: Path, fraction: float, seed: int) -> None:
    """``fraction`` of ``train``'s samples (a seeded draw) into shards at ``aside``, the others at ``rest``."""
    import random

    from bench.curation_noise import read_samples
    from data_prep.writer import ShardWriter

    samples, shard_size = read_samples(train)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    cut = round(fraction * len(samples))
    for out, part in ((aside, sorted(order[:cut])), (rest, sorted(order[cut:]))):
        with ShardWriter(out, shard_size) as writer:
            for n in part:
                writer.add(f"{n:09d}", samples[n]["jpg"], samples[n]["txt"], samples[n]["meta"])


def train_clip(dataset: str, shards: Path, test: Path, out: Path, steps: int, seed: int, keep: Path | None) -> dict:
    from clipx.apps.run_hooks import run_hooks
    from clipx.config import load_config
    from clipx.train.loop import train

    overrides = [f"data.train={shards}", f"data.val={test}", f"train.output_dir={out}", f"train.steps={steps}",
                 f"train.seed={seed}", f"eval.every={steps}", f"train.checkpoint_every={steps}",
                 f"eval.templates={TEMPLATES[dataset]}", "train.plots=false", "train.precision=bf16"]
    if keep is not None:
        overrides.append(f"data.keep={keep}")
    summary = train(load_config(DEMO, overrides), hooks=run_hooks())
    return {"zero_shot_top1": summary["eval"]["zero_shot"]["top1"], "checkpoint": summary["checkpoint"],
            "train_seconds": summary.get("train_seconds")}


def removal_rates(cur: Path, truth: dict) -> dict:
    """What the stages removed, against the planted truth (see the module's docstring)."""
    import pyarrow.parquet as pq

    def removed(stage: str) -> set[str]:
        return set(pq.read_table(cur / "stages" / f"{stage}.parquet").column("key").to_pylist())

    by_filter, by_dedup = removed("filter"), removed("dedup")
    gone = by_filter | by_dedup
    swapped = {k for k, t in truth.items() if t["swapped"]}
    groups: dict[str, set[str]] = {}
    for key, t in truth.items():
        if t["duplicate_of"] is not None:
            groups.setdefault(t["duplicate_of"], {t["duplicate_of"]}).add(key)
    in_groups = set().union(*groups.values()) if groups else set()
    good = {k for k in truth if k not in swapped and k not in in_groups}
    extra = sum(len(g) - 1 for g in groups.values())
    dedup_saw = set(truth) - by_filter
    return {"swapped": len(swapped), "swapped_removed": len(swapped & gone) / max(len(swapped), 1),
            "good": len(good), "good_lost": len(good & gone) / max(len(good), 1),
            "duplicates": extra,
            "duplicates_removed": sum(min(len(g & gone), len(g) - 1) for g in groups.values()) / max(extra, 1),
            "false_dedup_removals": len((by_dedup - in_groups)) / max(len(dedup_saw - in_groups), 1),
            "kept": len(truth) - len(gone), "pool": len(truth)}


def measure_dataset(dataset: str, args) -> dict:
    from clipx.apps.curate import score_shards
    from clipx.apps.curate_stages import apply, run_dedup, run_filter

    work = args.work / "curation"
    pool, scorer_data, test = prepare(dataset, work, seed=0)
    truth = json.loads((pool / "truth.json").read_text())
    runs = work / dataset / "runs"
    raw = {seed: train_clip(dataset, pool, test, runs / f"raw-{seed}", args.steps, seed, None) for seed in args.seeds}
    scorer = train_clip(dataset, scorer_data, test, runs / "scorer", args.steps, 0, None)
    cur = work / dataset / "cur"
    score_shards(str(pool), scorer["checkpoint"], cur, embeddings=True, copy_descriptor=args.copy_descriptor)
    filtered = run_filter(cur, threshold="auto")
    sweep = {}
    for threshold in SWEEP:  # the trade-off at other thresholds; the run below uses --dedup-threshold
        run_dedup(cur, exact=True, threshold=threshold, seed=0)
        rates = removal_rates(cur, truth)
        sweep[str(threshold)] = {k: rates[k] for k in ("duplicates_removed", "false_dedup_removals")}
    deduped = run_dedup(cur, exact=True, threshold=args.dedup_threshold, seed=0)
    kept = apply(cur)
    curated = {seed: train_clip(dataset, pool, test, runs / f"curated-{seed}", args.steps, seed, cur / "keep.parquet")
               for seed in args.seeds}
    return {"removal": removal_rates(cur, truth), "threshold": filtered["threshold"], "dedup_sweep": sweep,
            "dedup_removed": deduped["removed"], "kept": kept["kept"], "scorer_zero_shot_top1": scorer["zero_shot_top1"],
            "raw": {str(s): r["zero_shot_top1"] for s, r in raw.items()},
            "curated": {str(s): r["zero_shot_top1"] for s, r in curated.items()}}


def measure(args) -> dict:
    return {"command": "bench/curation.py " + " ".join(sys.argv[1:]), "steps": args.steps, "seeds": args.seeds,
            "copy_descriptor": args.copy_descriptor,
            "dedup_threshold": args.dedup_threshold,
            "datasets": {dataset: measure_dataset(dataset, args) for dataset in args.datasets}}


def markdown(results: dict) -> str:
    lines = [f"`{results['command']}`: {results['steps']} steps, seeds {results['seeds']}, dedup threshold "
             f"{results['dedup_threshold']} on the {results['copy_descriptor']} descriptor.", "",
             "| dataset | pool | kept | swapped removed (>= 0.90) | good lost (<= 0.10) | duplicates removed (>= 0.95) "
             "| false dedup removals (<= 0.02) | zero-shot raw | zero-shot curated |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in results["datasets"].items():
        r = row["removal"]
        raw, cur = list(row["raw"].values()), list(row["curated"].values())
        lines.append(f"| {name} | {r['pool']} | {r['kept']} | {r['swapped_removed']:.3f} | {r['good_lost']:.3f} "
                     f"| {r['duplicates_removed']:.3f} | {r['false_dedup_removals']:.3f} "
                     f"| {sum(raw) / len(raw):.3f} ({', '.join(f'{v:.3f}' for v in raw)}) "
                     f"| {sum(cur) / len(cur):.3f} ({', '.join(f'{v:.3f}' for v in cur)}) |")
    lines += ["", "Deduplication's trade-off (after the filter, exact pass included) at other thresholds:", "",
              "| dataset | " + " | ".join(results["datasets"][next(iter(results["datasets"]))]["dedup_sweep"]) + " |",
              "|---|" + "---:|" * len(SWEEP)]
    for name, row in results["datasets"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v['duplicates_removed']:.3f} removed, {v['false_dedup_removals']:.3f} "
                                                 "false" for v in row["dedup_sweep"].values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--copy-descriptor", default="thumbnail", help="curate score --copy-descriptor")
    parser.add_argument("--datasets", nargs="+", default=["digits", "photos"])
    parser.add_argument("--dedup-threshold", type=float, default=0.98)
    add_report_arguments(parser, "curation")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
