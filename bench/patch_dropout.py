"""FLIP's patch dropout against none: training speed on the bench model, zero-shot on the digits.

    .venv/bin/python bench/patch_dropout.py [--rate 0.5] [--precision bf16] [--alternations 3]

Speed: clipx on `make bench`'s work (configs/bench-small.yaml, its shards, batch 128, 20 steps,
first 5 dropped), with and without `model.patch_dropout`, runs alternating, medians; both also with
token batches at full context (`data.trim_padding=false`), and compiled (`train.compile=true`; its
compilation falls in the dropped steps).
Learning: the digits demo's training (configs/demo-digits.yaml, 600 steps, the demo's precision
choice) without patch dropout, with it, and with it plus FLIP's unmasked tuning over the last 10%
of the steps; zero-shot top-1 on the held-out digits at equal steps, and each run's wall time.
Prints Markdown tables and writes runs/bench/patch_dropout/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.perf import MODEL, run_clipx, write_bench_shards  # noqa: E402


def speed(work: Path, rate: float, precision: str, alternations: int, batch: int = 128, steps: int = 20) -> dict:
    """Samples/s with and without patch dropout, as clipx runs (token batches trimmed to the captions'
    length), and both again with the batches at full context (data.trim_padding=false): how much of
    the step the text tower takes decides what dropping image tokens can buy."""
    shards = write_bench_shards(work, 64, batch * steps * 2)
    untrimmed, compiled = "data.trim_padding=false", "train.compile=true"
    variants = {"none": [], f"patch_dropout={rate}": [f"model.patch_dropout={rate}"],
                f"none, {untrimmed}": [untrimmed],
                f"patch_dropout={rate}, {untrimmed}": [f"model.patch_dropout={rate}", untrimmed],
                f"none, {compiled}": [compiled],
                f"patch_dropout={rate}, {compiled}": [f"model.patch_dropout={rate}", compiled]}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(alternations):
        for name in (list(variants) if index % 2 == 0 else list(variants)[::-1]):
            result = run_clipx(work / "runs" / f"speed-{len(rates[name])}-{name}", shards, MODEL, batch, steps,
                               workers=2, threads=2, precision=precision, overrides=variants[name])
            rates[name].append(result["samples_per_second"])
            print(f"  {name}: {result['samples_per_second']:.1f} samples/s", file=sys.stderr)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {"precision": precision, "runs": rates, "medians": medians,
            "ratio": medians[f"patch_dropout={rate}"] / medians["none"],
            "ratio_untrimmed": medians[f"patch_dropout={rate}, {untrimmed}"] / medians[f"none, {untrimmed}"],
            # Steady state after compilation (the first 5 steps, compilation among them, are dropped):
            # what train.compile=true runs.
            "ratio_compiled": medians[f"patch_dropout={rate}, {compiled}"] / medians[f"none, {compiled}"],
            "compute_only": compute_only(shards, rate, precision, batch)}


def compute_only(shards: Path, rate: float, precision: str, batch: int, alternations: int = 5) -> dict:
    """The same comparison without the loader: clipx's step (bench/profile_step.py) on random inputs,
    with clipx's token length for these shards and with the full context, the four models
    alternating; median ms per step."""
    from bench.perf import clipx_text_length
    from bench.profile_step import build_step

    length = clipx_text_length(shards, MODEL, batch)
    dropout = (f"model.patch_dropout={rate}",)
    variants = {"none": (length, ()), f"patch_dropout={rate}": (length, dropout),
                "none, full context": (None, ()), f"patch_dropout={rate}, full context": (None, dropout)}
    steps = {name: build_step(MODEL, batch, 2, precision, text_length=text_length, overrides=overrides)[0]
             for name, (text_length, overrides) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in [*steps.values()] * 2:  # warm-up
        step()
    for _ in range(alternations):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    ms = {name: statistics.median(values) * 1000 for name, values in times.items()}
    return {"text_length": length, "ms_per_step": ms, "ratio": ms["none"] / ms[f"patch_dropout={rate}"],
            "ratio_full_context": ms["none, full context"] / ms[f"patch_dropout={rate}, full context"],
            "trimming": ms["none, full context"] / ms["none"]}


def learning(work: Path, rate: float, steps: int = 600) -> dict:
    from clipx.apps.demo import run_demo

    tuning = steps // 10
    variants = {"none": [], f"patch_dropout={rate}": [f"model.patch_dropout={rate}"],
                f"patch_dropout={rate}, unmasked last {tuning} steps": [
                    f"model.patch_dropout={rate}", f"model.patch_dropout_unmasked_steps={tuning}"]}
    out = {}
    for index, (name, overrides) in enumerate(variants.items()):
        results = run_demo(work / f"digits-{index}", overrides=[f"train.steps={steps}", *overrides])
        out[name] = {"zero_shot_top1": results["zero_shot"]["top1"], "precision": results["precision"],
                     "train_seconds": results["train"]["train_seconds"],
                     "samples_per_second": results["train"]["samples_per_second"]}
        print(f"  {name}: zero-shot {out[name]['zero_shot_top1']:.3f}", file=sys.stderr)
    return {"steps": steps, "variants": out}


def markdown(results: dict) -> str:
    s = results["speed"]
    lines = [f"Bench model, batch 128, {s['precision']}, {len(next(iter(s['runs'].values())))} runs each, alternating:",
             "", "| patch dropout | samples/s (median) | runs |", "|---|---:|---|"]
    lines += [f"| {name} | {s['medians'][name]:.1f} | {', '.join(f'{r:.1f}' for r in runs)} |"
              for name, runs in s["runs"].items()]
    lines += ["", f"**Speed-up: {s['ratio']:.2f}x eager** ({s['ratio_untrimmed']:.2f}x with token batches at full "
              "context)" + (f"; **{s['ratio_compiled']:.2f}x compiled** (train.compile=true, steady state)"
                            if "ratio_compiled" in s else ""), ""]
    c = s["compute_only"]
    lines += [f"Compute only (no loader; random inputs; {c['text_length']} text tokens, or the full context), "
              "median ms per step: " + ", ".join(f"{name} {value:.0f}" for name, value in c["ms_per_step"].items()) +
              f"; **patch dropout speed-up {c['ratio']:.2f}x** ({c['ratio_full_context']:.2f}x at full context); "
              f"trimming the token batches alone: {c['trimming']:.2f}x", ""]
    d = results["learning"]
    lines += [f"Digits demo, {d['steps']} steps each:", "",
              "| variant | precision | zero-shot top-1 | train seconds | samples/s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {name} | {v['precision']} | {v['zero_shot_top1']:.3f} | {v['train_seconds']:.0f} | "
              f"{v['samples_per_second']:.0f} |" for name, v in d["variants"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "patch_dropout")
    parser.add_argument("--speed-only", action="store_true",
                        help="measure speed only; keep the learning results of the last run's results.json")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS.json", help="print saved results as tables")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    saved = args.work / "results.json"
    if args.speed_only and not saved.is_file():
        sys.exit(f"--speed-only keeps the learning results of an earlier run: {saved} is missing")
    results = {"command": "bench/patch_dropout.py", "rate": args.rate,
               "speed": speed(args.work, args.rate, args.precision, args.alternations),
               "learning": (json.loads(saved.read_text())["learning"] if args.speed_only
                            else learning(args.work, args.rate))}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
