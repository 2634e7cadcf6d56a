"""SimCLR on the digits: plain vs RandAugment vs i-Mix (mixup), at equal steps.

    .venv/bin/python bench/mixing.py [--steps 600] [--randaugment 2,9] [--alpha 1.0]
                                     [--variants plain,randaugment,imix]

Each variant is the SimCLR digits demo (configs/simclr-digits.yaml, `clipx demo --mode simclr`) with
its overrides, the same seed, steps and batch; the trained encoder is scored by the demo's kNN and
linear probes on the 360 held-out digits. Prints a Markdown table and writes
runs/bench/mixing/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def variants(randaugment: str, alpha: float) -> dict[str, list[str]]:
    return {"plain": [], "randaugment": [f"data.randaugment={randaugment}"],
            "imix": ["ssl.mix=mixup", f"ssl.mix_alpha={alpha}"],
            "icutmix": ["ssl.mix=cutmix", f"ssl.mix_alpha={alpha}"],
            "randaugment+imix": [f"data.randaugment={randaugment}", "ssl.mix=mixup", f"ssl.mix_alpha={alpha}"]}


def markdown(results: dict) -> str:
    lines = [f"SimCLR on the digits, {results['steps']} steps each, {results['precision']}:", "",
             "| variant | overrides | kNN top-1 | linear probe top-1 | train samples/s | demo total s |",
             "|---|---|---:|---:|---:|---:|"]
    for row in results["rows"]:
        lines.append(f"| {row['variant']} | {' '.join(row['overrides']) or '-'} | {row['knn_top1']:.3f} | "
                     f"{row['linear_probe_top1']:.3f} | {row['samples_per_second']:.0f} | {row['total_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--randaugment", default="2,9")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--variants", default="plain,randaugment,imix")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "mixing")
    args = parser.parse_args()

    from clipx.apps.demo_ssl import run_ssl_demo

    table = variants(args.randaugment, args.alpha)
    rows, precision = [], None
    for name in args.variants.split(","):
        overrides = table[name]
        demo = run_ssl_demo("simclr", args.work / name, overrides=[f"train.steps={args.steps}",
                                                                   f"train.checkpoint_every={args.steps}", *overrides])
        precision = demo["precision"]
        rows.append({"variant": name, "overrides": overrides, "knn_top1": demo["knn"]["top1"],
                     "linear_probe_top1": demo["linear_probe"]["top1"],
                     "samples_per_second": demo["train"]["samples_per_second"], "total_seconds": demo["total_seconds"]})
        print(f"{name}: kNN top-1 {rows[-1]['knn_top1']:.3f}", flush=True)
    results = {"command": "bench/mixing.py " + " ".join(sys.argv[1:]), "steps": args.steps, "precision": precision,
               "rows": rows}
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
