"""Distillation on the digits: a micro CLIP student with and without a teacher, at equal steps.

    .venv/bin/python bench/distill.py [--steps 300] [--seeds 0 1 2] [--weights 1.0 2.33]

The teacher is the digits demo (configs/demo-digits.yaml, 600 steps, models/tiny-digits.json); its
embeddings of the training digits go into the shards once (`clipx prep embed-teacher`). The student
(configs/distill-digits.yaml, models/micro-digits.json: one block per tower, 32 wide) then trains
for --steps steps per seed: alone (the same config with distillation off) and with distill.embedded
at each of --weights: 1.0 (open_clip's sum of the two losses) and 2.33 (MobileCLIP's 0.7 / 0.3 mix of
distillation and contrastive loss, up to a constant factor that AdamW's updates do not see). Every model is scored by zero-shot top-1 on the 360 held-out digits. Prints a
Markdown table and writes runs/bench/distill/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parameters(checkpoint: str) -> str:
    """All parameters, and those outside the token-embedding table (49,408 rows on both models)."""
    from clipx.api import load_model

    named = dict(load_model(checkpoint)[0].named_parameters())
    total = sum(p.numel() for p in named.values())
    outside = sum(p.numel() for n, p in named.items() if "token_embedding" not in n)
    return f"{total:,} ({outside:,} outside the token embeddings)"


def main() -> None:
    from clipx.apps.demo import run_demo
    from data_prep.embed_teacher import embed_teacher

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.33])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "distill")
    args = parser.parse_args()

    configs = REPO / "configs"
    teacher = run_demo(args.work / "teacher", configs / "demo-digits.yaml")
    data = args.work / "teacher" / "data"
    embedded = data / "train-teacher"
    embed_teacher(teacher["checkpoint"], str(data / "train"), embedded)
    runs = []
    for seed in args.seeds:
        forms = [("alone", ["distill.embedded=false", f"data.train={data / 'train'}"])]
        forms += [(f"distilled, weight {w:g}", [f"data.train={embedded}", f"distill.weight={w}"]) for w in args.weights]
        for index, (form, overrides) in enumerate(forms):
            out = run_demo(args.work / f"student-{index}-seed{seed}", configs / "distill-digits.yaml",
                           overrides=[*overrides, f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}",
                                      f"train.seed={seed}"])
            runs.append({"student": form, "seed": seed, "steps": args.steps, "precision": out["precision"],
                         "train_seconds": out["train"]["train_seconds"], "zero_shot_top1": out["zero_shot"]["top1"],
                         "parameters": parameters(out["checkpoint"])})
    results = {"command": "bench/distill.py", "teacher": {
        "zero_shot_top1": teacher["zero_shot"]["top1"], "steps": teacher["train"]["steps"],
        "parameters": parameters(teacher["checkpoint"])}, "runs": runs}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    t = results["teacher"]
    print(f"Teacher: the digits demo, {t['parameters']} parameters, {t['steps']} steps, "
          f"zero-shot top-1 {t['zero_shot_top1']:.3f}.\n")
    print("| student | seed | parameters | steps | precision | train seconds | zero-shot top-1 |\n"
          "|---|---:|---:|---:|---|---:|---:|")
    for r in runs:
        print(f"| {r['student']} | {r['seed']} | {r['parameters']} | {r['steps']} | {r['precision']} | "
              f"{r['train_seconds']:.0f} | {r['zero_shot_top1']:.3f} |")
    for form in dict.fromkeys(r["student"] for r in runs):
        scores = [r["zero_shot_top1"] for r in runs if r["student"] == form]
        print(f"\nmean zero-shot top-1, {form}: {statistics.mean(scores):.3f} over {len(scores)} seed(s)", end="")
    print()


if __name__ == "__main__":
    main()
