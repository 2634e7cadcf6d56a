"""Fine-tuning without forgetting, measured on the digits: fine-tune a CLIP on the digits 0-4 as a
classification task and score both that task and zero-shot classification of the held-out 5-9.

    .venv/bin/python bench/finetune.py [--pretrain-steps 120] [--steps 150] [--seeds 0]

1. Pretrain: the digits demo's CLIP (configs/demo-digits.yaml) for --pretrain-steps steps on all ten
   digits: short, so the 0-4 task leaves fine-tuning some headroom.
2. Fine-tune on the 0-4 training digits (configs/finetune-digits.yaml, loss.name: classify): fully;
   with LoRA adapters (model.lora_rank=4, adapters and head only); with layer-wise LR decay 0.75;
   and FLYP (CLIP's loss with the class prompts as captions, both towers).
3. WiSE-FT (`clipx wise-ft --alphas 0:1:0.1`) between the pretrained and the fully fine-tuned model.

Every model is scored on the 0-4 test digits (the head's top-1; zero-shot top-1 for the pretrained
model, whose head that is at step 0, and for FLYP) and by zero-shot top-1 among the classes 5-9 on the 5-9 test
digits. Prints a Markdown table, writes runs/bench/finetune/results.json and the WiSE-FT curve
bench/plots/finetune_wise_ft.png. `--markdown runs/bench/finetune/results.json` prints the tables again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOW, HIGH = "0-4", "5-9"


def clipx(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "clipx.cli", *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"clipx {' '.join(args[:2])} failed: {result.stderr[-2000:]}")
    return result.stdout


def zero_shot(checkpoint: Path, data: Path, classes: str, out: Path) -> dict:
    clipx("eval", "zero-shot", "--checkpoint", str(checkpoint), "--data", str(data), "--classes", classes,
          "--out", str(out))
    return json.loads(out.read_text())


def trainable_share(checkpoint: Path) -> float:
    """The share of the model's parameters that its run trained (requires_grad after preparation)."""
    from clipx.config import load_config
    from clipx.methods import method_of
    from clipx.models.lock import lock_towers

    config = load_config(Path(checkpoint) / "config.yaml", ["model.pretrained=null"])
    method = method_of(config)
    model = method.build_model(config)
    lock_towers(model, config.model)
    model = method.prepare(model, None, config)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)


def score(name: str, checkpoint: Path, data: Path, work: Path, has_head: bool) -> dict:
    low = zero_shot(checkpoint, data / "test", LOW, work / f"{name}-low.json")
    high = zero_shot(checkpoint, data / "test", HIGH, work / f"{name}-high.json")
    return {"model": name, "task_0_4": (low["classifier"] if has_head else low["zero_shot"])["top1"],
            "zero_shot_0_4": low["zero_shot"]["top1"], "held_out_5_9": high["zero_shot"]["top1"]}


def main() -> None:
    from clipx.apps.demo import run_demo
    from data_prep import prep_digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=120)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16"])
    parser.add_argument("--lr", type=float, default=3e-4, help="full and layer-decay fine-tuning's rate (LoRA: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of the pretraining and every fine-tuning")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "finetune")
    parser.add_argument("--plot", type=Path, default=REPO / "bench" / "plots" / "finetune_wise_ft.png")
    parser.add_argument("--markdown", type=Path, default=None, help="only print the tables of a results.json")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)

    common = [f"train.precision={args.precision}", f"train.seed={args.seed}"]
    pretrained = run_demo(args.work / "pretrain", REPO / "configs" / "demo-digits.yaml",
                          overrides=[*common, f"train.steps={args.pretrain_steps}",
                                     f"train.checkpoint_every={args.pretrain_steps}", "eval.every=0"])
    data, clip = args.work / "pretrain" / "data", Path(pretrained["checkpoint"])
    prep_digits(args.work / "low", image_size=32, shard_size=256, workers=0, classes=range(5))
    rows = [{**score("pretrained (zero-shot)", clip, data, args.work, False), "trained_share": 0.0}]
    variants = {"full fine-tuning": [f"train.lr={args.lr}"],
                "LoRA rank 4": ["model.lora_rank=4", "train.lr=1e-3", "train.weight_decay=0"],
                "layer decay 0.75": [f"train.lr={args.lr}", "train.layer_decay=0.75"],
                # FLYP: CLIP's own loss, the class prompts as the captions; its task score is zero-shot's.
                "FLYP": [f"train.lr={args.lr}", "loss.name=clip", "data.caption_keys={class_prompt: 1}"]}
    runs = {}
    for name, extra in variants.items():
        out = args.work / name.replace(" ", "-")
        clipx("train", "--config", str(REPO / "configs" / "finetune-digits.yaml"), *common, f"model.pretrained={clip}",
              f"data.train={args.work / 'low' / 'train'}", f"train.steps={args.steps}",
              f"train.checkpoint_every={args.steps}", f"train.output_dir={out}", *extra)
        runs[name] = out
        rows.append({**score(name, out, data, args.work, name != "FLYP"), "trained_share": trainable_share(
            sorted((out / "checkpoints").iterdir())[-1])})
    curve_dir = args.work / "wise-ft"
    clipx("wise-ft", "--zero-shot", str(clip), "--fine-tuned", str(runs["full fine-tuning"]), "--alphas", "0:1:0.1",
          "--task-data", str(data / "test"), "--held-out", str(data / "test"), "--held-out-classes", HIGH,
          "--out", str(curve_dir))
    curve = json.loads((curve_dir / "wise_ft.json").read_text())
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(curve_dir / "wise_ft.png", args.plot)
    results = {"pretrain_steps": args.pretrain_steps, "steps": args.steps, "lr": args.lr, "seed": args.seed,
               "precision": args.precision,
               "rows": rows, "wise_ft": curve}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    """The models' table, the WiSE-FT curve's table, and the issue's bar: an alpha that keeps the
    held-out zero-shot within 3 points of the pretrained model and >= 80% of full fine-tuning's gain."""
    lines = [f"Pretrained {results['pretrain_steps']} steps, fine-tuned {results['steps']} steps at lr "
             f"{results.get('lr', 3e-4):g} (LoRA 1e-3), {results['precision']}, seed {results.get('seed', 0)}.", "",
             "| model | 0-4 task top-1 | 5-9 zero-shot top-1 (held out) | share of the CLIP's parameters trained |",
             "|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['task_0_4']:.3f} | {r['held_out_5_9']:.3f} | {r['trained_share']:.2%} |")
    rows = sorted(results["wise_ft"]["rows"], key=lambda r: r["alpha"])
    start, end = rows[0], rows[-1]
    held = lambda r: next(iter(r["held_out_top1"].values()))  # noqa: E731  (one held-out set)
    gain = end["task_top1"] - start["task_top1"]
    lines += ["", "| WiSE-FT alpha | 0-4 task top-1 | share of full fine-tuning's gain | 5-9 zero-shot top-1 | "
              "change from pretrained |", "|---|---|---|---|---|"]
    passing = []
    for r in rows:
        kept = (r["task_top1"] - start["task_top1"]) / gain if gain > 0 else float("nan")
        drop = held(r) - held(start)
        if kept >= 0.8 and drop >= -0.03:
            passing.append(r["alpha"])
        lines.append(f"| {r['alpha']:.1f} | {r['task_top1']:.3f} | {kept:.0%} | {held(r):.3f} | {drop:+.3f} |")
    lines += ["", f"Alphas keeping >= 80% of the gain with the held-out zero-shot at most 3 points below the "
                  f"pretrained model's: {', '.join(f'{a:.1f}' for a in passing) or 'none'}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
