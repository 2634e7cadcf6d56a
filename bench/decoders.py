"""CoCa on the digits, and recaptioning with it: do its captions name the digit, does its
contrastive half keep up with CLIP, and can a CLIP learn from its captions alone?

    .venv/bin/python bench/decoders.py [--steps 600] [--seeds 0 1]
    .venv/bin/python bench/decoders.py --markdown runs/bench/decoders.json

1. clip: the demo CLIP (configs/demo-digits.yaml, in bf16) on the digits' training shards.
2. coca: the same config with loss.name=coca (open_clip's CoCa layout: the decoder as wide and deep
   as the text tower, contrastive weight 1, captioning weight 2), same steps, seed and batch.
3. `clipx caption --method greedy` of the held-out shards with the CoCa: the share of held-out
   images whose caption names their digit (the class name as a word, and no other class's).
4. `clipx caption` of the training shards with the CoCa; recaptioned: the CLIP of 1 trained on those
   shards with data.caption_keys={synthetic_caption: 1}, the generated captions alone.

Reported: zero-shot top-1 on the held-out split of clip, coca and recaptioned (each seed and the
mean), the caption accuracy, and the time per training step of clip and coca (each run's median).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, finished, run_or_render  # noqa: E402

DEMO = REPO / "configs" / "demo-digits.yaml"
KEY = "synthetic_caption"


def digits(work: Path) -> Path:
    folder = work / "digits"
    if not (folder / "train").is_dir():
        from data_prep import prep_digits

        prep_digits(folder, image_size=32, shard_size=256, workers=0)
    return folder


def train_run(data: Path, out: Path, steps: int, seed: int, *overrides: str) -> dict:
    """One run of the demo config (bf16, evaluated at its end): zero-shot top-1, checkpoint, step time."""
    from clipx.apps.run_hooks import run_hooks
    from clipx.config import load_config
    from clipx.train.loop import train

    values = [f"data.train={data / 'train'}", f"data.val={data / 'test'}", f"train.output_dir={out}",
              f"train.steps={steps}", f"train.seed={seed}", f"eval.every={steps}", f"train.checkpoint_every={steps}",
              "train.plots=false", "train.precision=bf16", *overrides]
    summary = finished(out, steps) or train(load_config(DEMO, values), hooks=run_hooks())
    return {"zero_shot_top1": summary["eval"]["zero_shot"]["top1"], "checkpoint": str(summary["checkpoint"]),
            "step_seconds": median_step_seconds(out)}


def median_step_seconds(run: Path) -> float:
    """The median time per step over the run's logged training rows (samples per second, batch size)."""
    from clipx.config import load_config

    batch = load_config(run / "config.yaml", []).train.batch_size
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [row["samples_per_second"] for row in rows if row.get("kind") == "train" and row.get("samples_per_second")]
    return batch / statistics.median(rates)


def caption(checkpoint: str, shards: Path, out: Path) -> Path:
    from clipx.apps.caption import caption_shards

    if not (out / "caption.json").is_file():
        caption_shards(checkpoint, str(shards), out, key=KEY, method="greedy", max_tokens=14, batch_size=128)
    return out


def caption_accuracy(captioned: Path) -> dict:
    """The share of samples whose generated caption names their class, and three examples."""
    from clipx.templates import load_templates

    names, _ = load_templates("digits")
    right, total, examples = 0, 0, []
    for shard in sorted(captioned.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    fields = json.loads(tar.extractfile(member).read())
                    words = set(re.findall(r"[a-z]+", fields.get(KEY, "").lower()))
                    named = [name for name in names if name in words]
                    right += named == [names[fields["label"]]]
                    total += 1
                    if len(examples) < 3:
                        examples.append(f"{names[fields['label']]}: {fields.get(KEY, '')!r}")
    return {"right": right / total, "samples": total, "examples": examples}


def measure(args) -> dict:
    work = Path(args.work) / "decoders"
    data = digits(work)
    runs: dict = {"clip": {}, "coca": {}, "recaptioned": {}}
    accuracy = {}
    for seed in args.seeds:
        runs["clip"][seed] = train_run(data, work / f"clip-{seed}", args.steps, seed)
        runs["coca"][seed] = train_run(data, work / f"coca-{seed}", args.steps, seed, "loss.name=coca")
        coca = runs["coca"][seed]["checkpoint"]
        accuracy[seed] = caption_accuracy(caption(coca, data / "test", work / f"captioned-test-{seed}"))
        recaptioned = work / f"recaptioned-{seed}"
        caption(coca, data / "train", recaptioned / "train")
        if not (recaptioned / "test").exists():
            (recaptioned / "test").symlink_to(data / "test")
        runs["recaptioned"][seed] = train_run(recaptioned, work / f"clip-recaptioned-{seed}", args.steps, seed,
                                              f"data.caption_keys={{{KEY}: 1}}")
    return {"command": "bench/decoders.py " + " ".join(sys.argv[1:]), "steps": args.steps, "seeds": args.seeds,
            "runs": runs, "caption_accuracy": accuracy}


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def markdown(results: dict) -> str:
    runs = results["runs"]
    top1 = {name: [r["zero_shot_top1"] for r in runs[name].values()] for name in runs}
    step = {name: statistics.median(r["step_seconds"] for r in runs[name].values()) for name in ("clip", "coca")}
    right = [a["right"] for a in results["caption_accuracy"].values()]
    ratio = (sum(top1["recaptioned"]) / len(top1["recaptioned"])) / (sum(top1["clip"]) / len(top1["clip"]))
    lines = [f"`{results['command']}`: {results['steps']} steps of 128 pairs in bf16, seeds {results['seeds']}; "
             "zero-shot top-1 on the 360 held-out digits (mean, then each seed).", "",
             "| run | zero-shot top-1 | s per step (median of the run's logged rates) |", "|---|---:|---:|",
             f"| CLIP | {_mean(top1['clip'])} | {step['clip']:.3f} |",
             f"| CoCa (contrastive half) | {_mean(top1['coca'])} | {step['coca']:.3f} |",
             f"| CLIP on CoCa's captions alone (recaptioned) | {_mean(top1['recaptioned'])} | |", "",
             f"- CoCa's greedy captions name the held-out image's digit (bar >= 0.90): {_mean(right)}.",
             f"- CoCa's zero-shot minus CLIP's (bar: within 0.01): "
             f"{(sum(top1['coca']) - sum(top1['clip'])) / len(top1['clip']):+.3f}.",
             f"- Recaptioned over real captions (bar >= 0.9): {ratio:.3f}.",
             "- Examples (class: caption): " + "; ".join(next(iter(results["caption_accuracy"].values()))["examples"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    add_report_arguments(parser, "decoders")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
