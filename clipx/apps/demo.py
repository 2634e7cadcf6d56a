"""The digits demo: prep shards, train a tiny CLIP on the CPU, evaluate it, write results.json."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from clipx.errors import ClipxError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # clipx/apps/demo.py -> the checkout


def default_config_path() -> Path:
    path = REPO_CONFIGS / "demo-digits.yaml"
    if not path.is_file():
        raise ClipxError(f"{path} not found; run the demo from a clipx checkout or pass --config")
    return path


def precision_overrides() -> list[str]:
    """The demos train in bf16 where the hardware runs it fast (AMX or AVX512-BF16 on a CPU, bf16
    on a GPU) and in fp32 elsewhere; the caller's own overrides come after and win. Says which."""
    import torch

    from clipx.precision import fastest_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = fastest_precision(device)
    print(f"demo: training in {'bf16' if precision == 'bf16' else 'fp32'} "
          f"({'fast bf16 found' if precision == 'bf16' else 'no fast bf16'} on the {device}; "
          "override with train.precision=...)")
    return [f"train.precision={precision}"]


def run_demo(out: Path, config_path: str | Path | None = None, overrides=(), shuffle_captions: bool = False) -> dict:
    """Prep -> train -> zero-shot + retrieval on the held-out digits; returns and writes results.json."""
    from clipx.api import load_model
    from clipx.apps.run_hooks import run_hooks
    from clipx.config import load_config
    from clipx.data.tokenizer import Tokenizer
    from clipx.train.loop import train
    from data_prep import prep_digits
    from eval.run import default_device, evaluate

    started = time.perf_counter()
    data = out / "data"
    prep_digits(data, image_size=32, workers=min(2, os.cpu_count() or 1))
    train_dir = data / "train"
    if shuffle_captions:
        from data_prep.control import shuffle_captions as write_shuffled

        train_dir = data / "train-shuffled-captions"
        write_shuffled(data / "train", train_dir, seed=0)
    config = load_config(config_path or default_config_path(), [
        f"data.train={train_dir}", f"data.val={data / 'test'}", f"train.output_dir={out / 'run'}",
        *precision_overrides(), *overrides,
    ])
    summary = train(config, hooks=run_hooks())
    final = summary["eval"]  # training evaluates the final step on data.val, the held-out digits
    if final is None or "zero_shot" not in final or "retrieval" not in final:
        device = default_device()
        model, config = load_model(summary["checkpoint"], device)
        final = evaluate(model, Tokenizer(config.model), config.model, str(data / "test"), device,
                         templates=config.eval.templates, label_key=config.eval.label_key)
    results = {
        "zero_shot": final["zero_shot"],
        "retrieval": final["retrieval"],
        "eval": {"num_images": final["num_images"], "num_captions": final["num_captions"]},
        "control": {"shuffled_captions": shuffle_captions},
        **run_record(summary, config, started),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from clipx.apps.report.html import write_report

    write_report(out / "run", out / "report.html")  # after results.json: the timings above exclude it
    return results


def run_record(summary: dict, config, started: float) -> dict:
    """The training part of a demo's results.json: throughput, wall time, loss, checkpoint."""
    return {
        "train": {k: summary[k] for k in ("samples_per_second", "wall_seconds", "train_seconds", "steps",
                                          "final_loss")},
        "loss": config.loss.name,
        "precision": "fp32" if config.train.precision == "no" else config.train.precision,
        "attention_kernel": summary.get("attention_kernel"),
        "checkpoint": summary["checkpoint"],
        "total_seconds": time.perf_counter() - started,
    }


def print_table(results: dict) -> None:
    rows = [
        ("zero-shot top-1", results["zero_shot"]["top1"]),
        ("zero-shot top-5", results["zero_shot"]["top5"]),
        ("image->text R@1", results["retrieval"]["image_to_text"]["R@1"]),
        ("text->image R@1", results["retrieval"]["text_to_image"]["R@1"]),
        ("train samples/s", results["train"]["samples_per_second"]),
        ("train wall seconds", results["train"]["wall_seconds"]),
    ]
    if results["control"]["shuffled_captions"]:
        print("CONTROL RUN: captions shuffled across images (expect chance-level zero-shot, about 0.10)")
    print_rows(rows)


def print_rows(rows: list[tuple[str, float]]) -> None:
    """A two-column table of named numbers on stdout."""
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:10.3f}" if value < 100 else f"{name:<{width}}  {value:10.1f}")


TABLE_COLUMNS = (
    ("zero-shot top-1", ("zero_shot", "top1")),
    ("zero-shot top-5", ("zero_shot", "top5")),
    ("mean per-class recall", ("zero_shot", "mean_per_class_recall")),
    ("image->text R@1", ("retrieval", "image_to_text", "R@1")),
    ("text->image R@1", ("retrieval", "text_to_image", "R@1")),
    ("text->image R@10", ("retrieval", "text_to_image", "R@10")),
    ("train samples/s", ("train", "samples_per_second")),
    ("train wall s", ("train", "wall_seconds")),
    ("demo total s", ("total_seconds",)),
)


def markdown_table(paths: list[str | Path]) -> str:
    """A Markdown table with one row per demo results.json, for README and BENCHMARKS."""
    lines = ["| run | " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |",
             "|---|" + "---:|" * len(TABLE_COLUMNS)]
    for path in paths:
        results = json.loads(Path(path).read_text())
        cells = []
        for _, keys in TABLE_COLUMNS:
            value = results
            for key in keys:
                value = value[key]
            cells.append(f"{value:.3f}" if value < 10 else f"{value:.0f}")
        name = "captions shuffled (control)" if results["control"]["shuffled_captions"] else "digits demo"
        if results.get("loss", "clip") != "clip":
            name += f" ({results['loss']})"
        if "precision" in results:
            name += f", {results['precision']}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
