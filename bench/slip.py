"""SLIP against CLIP on the digits: zero-shot, kNN and linear probe at equal steps and at equal time.

    .venv/bin/python bench/slip.py [--steps 600] [--seeds 0 1 2] [--no-equal-time]

For each of --seeds, two runs of the digits demo in the precision the demo picks: CLIP
(configs/demo-digits.yaml) and SLIP (configs/slip-digits.yaml: the same model, data, batch and
schedule, plus NT-Xent on two views per image through the image tower) for --steps steps each;
then, for the first seed, CLIP again for as many steps as fit in SLIP's training time. Each final checkpoint is scored by zero-shot top-1 on the held-out
digits and by kNN and linear-probe top-1 of its image embeddings (training digits as the labelled
set). Prints a Markdown table and writes runs/bench/slip/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def scored_run(work: Path, config: Path, steps: int, seed: int = 0) -> dict:
    """One demo run of ``config`` for ``steps`` steps: its zero-shot result, probes and training time."""
    from clipx.api import load_model
    from clipx.apps.demo import run_demo
    from clipx.apps.demo_ssl import probe
    from eval.run import default_device

    out = run_demo(work, config, overrides=[f"train.steps={steps}", f"train.checkpoint_every={steps}",
                                            f"train.seed={seed}"])
    device = default_device()
    model, model_config = load_model(out["checkpoint"], device)
    probes = probe(model, model_config.model, work / "data", device)
    return {"steps": steps, "seed": seed, "precision": out["precision"],
            "train_seconds": out["train"]["train_seconds"], "zero_shot_top1": out["zero_shot"]["top1"],
            "knn_top1": probes["knn"]["top1"], "linear_probe_top1": probes["linear_probe"]["top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--equal-time", action=argparse.BooleanOptionalAction, default=True,
                        help="also CLIP for SLIP's training time (first seed only)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "slip")
    args = parser.parse_args()

    configs = REPO / "configs"
    runs = []
    for seed in args.seeds:
        suffix = "" if seed == 0 else f"-seed{seed}"
        runs.append({"run": "CLIP", **scored_run(args.work / f"clip{suffix}", configs / "demo-digits.yaml",
                                                 args.steps, seed)})
        runs.append({"run": "SLIP", **scored_run(args.work / f"slip{suffix}", configs / "slip-digits.yaml",
                                                 args.steps, seed)})
        if args.equal_time and seed == args.seeds[0]:
            equal_time = round(args.steps * runs[-1]["train_seconds"] / runs[-2]["train_seconds"])
            runs.append({"run": "CLIP, SLIP's time", **scored_run(args.work / f"clip-equal-time{suffix}",
                                                                 configs / "demo-digits.yaml", equal_time, seed)})
    results = {"command": "bench/slip.py", "runs": runs}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print("| run | seed | steps | precision | train seconds | zero-shot top-1 | kNN top-1 | linear probe top-1 |\n"
          "|---|---:|---:|---|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['run']} | {r['seed']} | {r['steps']} | {r['precision']} | {r['train_seconds']:.0f} | "
              f"{r['zero_shot_top1']:.3f} | {r['knn_top1']:.3f} | {r['linear_probe_top1']:.3f} |")


if __name__ == "__main__":
    main()
