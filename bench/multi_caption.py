"""Several captions per sample against one: the digits demo with data.caption_keys, zero-shot at equal steps.

    .venv/bin/python bench/multi_caption.py [--steps 600]

The digits' shards carry two captions per image: the .txt sentence (one of the prompt templates,
"a photo of the number three.") and the .json's bare class name ("three"), standing in for the
alt-text and a second caption of a recaptioned set. The demo trains once on the .txt alone and
once drawing between the two per sample and epoch (data.caption_keys={txt: 0.5, classname: 0.5}),
in the precision the demo picks, and is scored by zero-shot top-1 on the held-out digits with the
demo's templates. Prints a Markdown table and writes runs/bench/multi_caption/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {".txt only (data.caption_keys unset)": [],
            "txt or classname, 50/50 (data.caption_keys={txt: 0.5, classname: 0.5})": [
                "data.caption_keys={txt: 0.5, classname: 0.5}"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "multi_caption")
    args = parser.parse_args()

    from clipx.apps.demo import run_demo

    results = {"command": "bench/multi_caption.py", "steps": args.steps, "variants": {}}
    for index, (name, overrides) in enumerate(VARIANTS.items()):
        out = run_demo(args.work / f"digits-{index}", overrides=[f"train.steps={args.steps}", *overrides])
        results["variants"][name] = {"zero_shot_top1": out["zero_shot"]["top1"], "precision": out["precision"],
                                     "train_seconds": out["train"]["train_seconds"]}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"Digits demo, {args.steps} steps each:\n\n| captions | precision | zero-shot top-1 | train seconds |\n"
          "|---|---|---:|---:|")
    for name, row in results["variants"].items():
        print(f"| {name} | {row['precision']} | {row['zero_shot_top1']:.3f} | {row['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
