"""The SigLIP 2 recipe against SigLIP at equal steps, each extra term removed in turn, on two datasets.

    .venv/bin/python bench/siglip2_ablation.py [--steps 600] [--seeds 0 1] [--datasets digits photos]
    .venv/bin/python bench/siglip2_ablation.py --markdown runs/bench/siglip2_ablation.json

Every run is configs/siglip-digits.yaml (the demo's tiny ViT; batch 128, or --batch-size) in bf16, on scikit-learn's
digits (`clipx prep digits`) or the photographs shipped with scikit-image and scikit-learn
(`clipx prep photos`), evaluated zero-shot on the held-out split at its last step:

- siglip: the sigmoid loss alone;
- siglip2: loss.name=siglip2 with its defaults: the LocCa decoder (weight 1) from the first step,
  SILC (1) and TIPS (0.25) for the last 20% of the steps, against an EMA teacher (0.996);
- siglip2 without X: the same with X's weight at 0.

The student's local views are ssl.views: 2 crops of at least 0.2 of the image, no flips (a mirrored
digit is another sign), SimCLR's colour jitter and blur. Reported: zero-shot top-1 (mean of the
seeds, then each) and the median time per step of each run (its training rows' samples per second).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, finished, run_or_render  # noqa: E402

CONFIG = REPO / "configs" / "siglip-digits.yaml"
SIGLIP2 = ["loss.name=siglip2", "ssl.views.crop_scale_min=0.2", "ssl.views.flip_prob=0"]
VARIANTS = {"siglip": [], "siglip2": SIGLIP2,
            "siglip2 without the decoder": [*SIGLIP2, "loss.siglip2.decoder_weight=0"],
            "siglip2 without SILC": [*SIGLIP2, "loss.siglip2.silc_weight=0"],
            "siglip2 without TIPS": [*SIGLIP2, "loss.siglip2.tips_weight=0"]}


def dataset(name: str, work: Path) -> Path:
    folder = work / name
    if not (folder / "train").is_dir():
        if name == "digits":
            from data_prep import prep_digits

            prep_digits(folder, image_size=32, shard_size=256, workers=0)
        else:
            from data_prep.photos import prep_photos

            prep_photos(folder, image_size=32, workers=0)
    return folder


def train_run(name: str, data: Path, out: Path, steps: int, seed: int, overrides: list[str], batch: int) -> dict:
    from clipx.apps.run_hooks import run_hooks
    from clipx.config import load_config
    from clipx.methods.siglip2 import late_start
    from clipx.train.loop import train

    values = [f"data.train={data / 'train'}", f"data.val={data / 'test'}", f"train.output_dir={out}",
              f"train.steps={steps}", f"train.seed={seed}", f"eval.every={steps}", f"train.checkpoint_every={steps}",
              f"eval.templates={name}", "train.plots=false", "train.precision=bf16", f"train.batch_size={batch}",
              *overrides]
    config = load_config(CONFIG, values)
    summary = finished(out, steps) or train(config, hooks=run_hooks())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row.get("kind") == "train" and row.get("samples_per_second")]
    start = late_start(steps, config.loss.siglip2.late_fraction)

    def seconds(part: list[dict]) -> float:
        return config.train.batch_size / statistics.median(row["samples_per_second"] for row in part)

    # Logged rates cover the steps since the last row: a row past the switch by a whole interval is late.
    late = [row for row in rows if row["step"] - config.train.log_every >= start]
    return {"zero_shot_top1": summary["eval"]["zero_shot"]["top1"],
            "step_seconds": seconds([row for row in rows if row["step"] <= start]), "late_step_seconds": seconds(late)}


def measure(args) -> dict:
    work = Path(args.work) / "siglip2"
    results: dict = {}
    for name in args.datasets:
        data = dataset(name, work)
        results[name] = {variant: {seed: train_run(name, data, work / name / f"{variant.replace(' ', '-')}-{seed}",
                                                   args.steps, seed, overrides, args.batch_size)
                                   for seed in args.seeds}
                         for variant, overrides in VARIANTS.items()}
    return {"command": "bench/siglip2_ablation.py " + " ".join(sys.argv[1:]), "steps": args.steps,
            "batch_size": args.batch_size, "seeds": args.seeds, "datasets": results}


def markdown(results: dict) -> str:
    names = list(results["datasets"])
    lines = [f"`{results['command']}`: {results['steps']} steps of {results['batch_size']} pairs in bf16, seeds "
             f"{results['seeds']}; "
             "zero-shot top-1 on the held-out split (mean, then each seed), and seconds per step (median over "
             "the runs' logged rates) before the switch and in the last 20% of the steps, where SILC and TIPS "
             "run.", "",
             "| variant | " + " | ".join(f"{n} top-1 | {n} s/step | {n} s/step, last 20%" for n in names) + " |",
             "|---|" + "---:|---:|---:|" * len(names)]
    for variant in VARIANTS:
        cells = []
        for name in names:
            runs = list(results["datasets"][name][variant].values())
            top1 = [r["zero_shot_top1"] for r in runs]
            cells += [f"{sum(top1) / len(top1):.3f} ({', '.join(f'{v:.3f}' for v in top1)})",
                      f"{statistics.median(r['step_seconds'] for r in runs):.3f}",
                      f"{statistics.median(r['late_step_seconds'] for r in runs):.3f}"]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--datasets", nargs="+", default=["digits", "photos"])
    parser.add_argument("--batch-size", type=int, default=128)
    add_report_arguments(parser, "siglip2_ablation")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
