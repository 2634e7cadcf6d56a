"""EMA weights against the raw ones: the digits demo with train.ema_decay, both sets of one run scored.

    .venv/bin/python bench/ema.py [--steps 600] [--decay 0.99]

Trains the digits demo once with configs/ema-digits.yaml (EMA decay 0.99, checkpoints every 200
steps) in the precision the demo picks. The EMA never feeds back into training, so the run's raw
weights are those of the same run without EMA; each checkpoint is then scored twice on the 360
held-out digits, with its raw weights and with its EMA weights (`--weights raw|ema` of the
evaluators, fp32): zero-shot top-1 with the demo's templates, and retrieval R@1 both ways.
Prints a Markdown table and writes runs/bench/ema/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def score(checkpoint: Path, weights: str, shards: Path) -> dict:
    """Zero-shot top-1 and retrieval R@1 of ``checkpoint``'s ``weights`` on ``shards``, in fp32."""
    from clipx.api import load_model
    from clipx.data.tokenizer import Tokenizer
    from eval.run import default_device, evaluate

    device = default_device()
    model, config = load_model(checkpoint, device, weights)
    results = evaluate(model, Tokenizer(config.model), config.model, str(shards), device,
                       templates=config.eval.templates, label_key=config.eval.label_key)
    return {"zero_shot_top1": results["zero_shot"]["top1"],
            "image_to_text_r1": results["retrieval"]["image_to_text"]["R@1"],
            "text_to_image_r1": results["retrieval"]["text_to_image"]["R@1"]}


def markdown(results: dict) -> str:
    lines = [f"Digits demo with train.ema_decay={results['decay']}, {results['steps']} steps, "
             f"{results['precision']}; each checkpoint scored in fp32 with both sets of weights:", "",
             "| step | weights | zero-shot top-1 | image->text R@1 | text->image R@1 |", "|---:|---|---:|---:|---:|"]
    for row in results["rows"]:
        lines.append(f"| {row['step']} | {row['weights']} | {row['zero_shot_top1']:.3f} | "
                     f"{row['image_to_text_r1']:.3f} | {row['text_to_image_r1']:.3f} |")
    lines += ["", f"Training: {results['train_seconds']:.0f} s, {results['samples_per_second']:.0f} samples/s "
              "(EMA update included)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "ema")
    args = parser.parse_args()

    from clipx.apps.demo import run_demo
    from clipx.run_layout import list_checkpoints

    demo = run_demo(args.work / "digits", config_path=REPO / "configs" / "ema-digits.yaml",
                    overrides=[f"train.steps={args.steps}", f"train.ema_decay={args.decay}"])
    rows = []
    for checkpoint in list_checkpoints(args.work / "digits" / "run"):
        step = int(checkpoint.name.removeprefix("step-"))
        for weights in ("raw", "ema"):
            rows.append({"step": step, "weights": weights,
                         **score(checkpoint, weights, args.work / "digits" / "data" / "test")})
    results = {"command": "bench/ema.py", "steps": args.steps, "decay": args.decay, "precision": demo["precision"],
               "train_seconds": demo["train"]["train_seconds"],
               "samples_per_second": demo["train"]["samples_per_second"], "rows": rows}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
