"""SLIP against CLIP on the digits: zero-shot, kNN and linear probe at equal steps and at equal time.

    .venv/bin/python bench/slip.py [--steps 600]

Three runs of the digits demo, in the precision the demo picks: CLIP (configs/demo-digits.yaml)
and SLIP (configs/slip-digits.yaml: the same model, data, batch and schedule, plus NT-Xent on two
views per image through the image tower) for --steps steps each, then CLIP again for as many steps
as fit in SLIP's training time. Each final checkpoint is scored by zero-shot top-1 on the held-out
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


def scored_run(work: Path, config: Path, steps: int) -> dict:
    """One demo run of ``config`` for ``steps`` steps: its zero-shot result, probes and training time."""
    from clipx.api import load_model
    from clipx.apps.demo import run_demo
    from clipx.apps.demo_ssl import probe
    from eval.run import default_device

    out = run_demo(work, config, overrides=[f"train.steps={steps}", f"train.checkpoint_every={steps}"])
    device = default_device()
    model, model_config = load_model(out["checkpoint"], device)
    probes = probe(model, model_config.model, work / "data", device)
    return {"steps": steps, "precision": out["precision"], "train_seconds": out["train"]["train_seconds"],
            "zero_shot_top1": out["zero_shot"]["top1"], "knn_top1": probes["knn"]["top1"],
            "linear_probe_top1": probes["linear_probe"]["top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "slip")
    args = parser.parse_args()

    configs = REPO / "configs"
    runs = {"CLIP": scored_run(args.work / "clip", configs / "demo-digits.yaml", args.steps),
            "SLIP": scored_run(args.work / "slip", configs / "slip-digits.yaml", args.steps)}
    equal_time = round(args.steps * runs["SLIP"]["train_seconds"] / runs["CLIP"]["train_seconds"])
    runs["CLIP, SLIP's time"] = scored_run(args.work / "clip-equal-time", configs / "demo-digits.yaml", equal_time)
    results = {"command": "bench/slip.py", "runs": runs}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print("| run | steps | precision | train seconds | zero-shot top-1 | kNN top-1 | linear probe top-1 |\n"
          "|---|---:|---|---:|---:|---:|---:|")
    for name, r in runs.items():
        print(f"| {name} | {r['steps']} | {r['precision']} | {r['train_seconds']:.0f} | {r['zero_shot_top1']:.3f} | "
              f"{r['knn_top1']:.3f} | {r['linear_probe_top1']:.3f} |")


if __name__ == "__main__":
    main()
