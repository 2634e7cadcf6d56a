"""SupCon against SimCLR on the digits: kNN and linear-probe top-1 at equal steps.

    .venv/bin/python bench/supcon.py [--steps 600] [--seeds 0 1]

Prepares the digits shards once (32 px), then for each of --seeds trains SimCLR
(configs/simclr-digits.yaml) and SupCon (configs/supcon-digits.yaml: the same encoder, head, views,
batch, temperature and schedule; every same-label view in the global batch is a positive) for
--steps steps each, in the precision the demos pick. Each final checkpoint's encoder is scored by
kNN and linear-probe top-1 on the held-out digits, with the training digits as the labelled set
(clipx.apps.demo_ssl.probe). Prints a Markdown table and writes runs/bench/supcon/results.json.
A run folder that already holds a finished run of --steps steps (its summary.json) is probed again,
not retrained (the table's "trained" column says which), so an interrupted bench continues.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = {"SimCLR": "simclr-digits.yaml", "SupCon": "supcon-digits.yaml"}


def scored_run(work: Path, data: Path, config: Path, steps: int, seed: int) -> dict:
    """One training run of ``config`` for ``steps`` steps (or the finished one in ``work``), then its
    probes and training time."""
    from clipx.api import load_model
    from clipx.apps.demo import precision_overrides
    from clipx.apps.demo_ssl import probe
    from clipx.config import load_config
    from clipx.train.loop import train
    from eval.run import default_device

    config = load_config(config, [f"data.train={data / 'train'}", "data.val=null", f"train.output_dir={work}",
                                  *precision_overrides(), f"train.steps={steps}", f"train.checkpoint_every={steps}",
                                  f"train.seed={seed}"])
    finished = work / "summary.json"
    reused = finished.is_file() and json.loads(finished.read_text())["steps"] == steps
    summary = json.loads(finished.read_text()) if reused else train(config)
    device = default_device()
    model, model_config = load_model(summary["checkpoint"], device)
    probes = probe(model, model_config.model, data, device)
    return {"steps": steps, "seed": seed, "precision": "fp32" if config.train.precision == "no"
            else config.train.precision, "train_seconds": summary["train_seconds"],
            "final_loss": summary["final_loss"], "knn_top1": probes["knn"]["top1"],
            "linear_probe_top1": probes["linear_probe"]["top1"], "trained": "earlier" if reused else "now"}


def main() -> None:
    from data_prep import prep_digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "supcon")
    args = parser.parse_args()

    data = args.work / "data"
    if not (data / "test").is_dir():
        prep_digits(data, image_size=32, workers=min(2, os.cpu_count() or 1))
    runs = []
    for seed in args.seeds:
        for name, config in RUNS.items():
            run = scored_run(args.work / f"{name.lower()}-seed{seed}", data, REPO / "configs" / config, args.steps, seed)
            runs.append({"run": name, **run})
    means = {name: {key: statistics.mean(r[key] for r in runs if r["run"] == name)
                    for key in ("knn_top1", "linear_probe_top1")} for name in RUNS}
    results = {"command": "bench/supcon.py " + " ".join(sys.argv[1:]), "runs": runs, "mean_over_seeds": means}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print("| run | seed | steps | precision | trained | train seconds | final loss | kNN top-1 | linear probe top-1 |\n"
          "|---|---:|---:|---|---|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['run']} | {r['seed']} | {r['steps']} | {r['precision']} | {r['trained']} | {r['train_seconds']:.0f} | "
              f"{r['final_loss']:.3f} | {r['knn_top1']:.3f} | {r['linear_probe_top1']:.3f} |")
    seeds = f"{len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''}"
    for name, mean in means.items():
        print(f"| {name}, mean of {seeds} | | {args.steps} | | | | | {mean['knn_top1']:.3f} | "
              f"{mean['linear_probe_top1']:.3f} |")


if __name__ == "__main__":
    main()
