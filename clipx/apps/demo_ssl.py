"""Self-supervised digits demos: train an image encoder without captions, then kNN and linear probes
against the same encoder at random initialisation."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from clipx.apps.demo import REPO_CONFIGS, precision_overrides, print_rows, run_record
from clipx.errors import ClipxError

MODE_CONFIGS = {"simclr": "simclr-digits.yaml", "moco": "moco-digits.yaml", "swav": "swav-digits.yaml"}


def probe(model, model_cfg, data: Path, device) -> dict:
    """kNN and linear-probe top-1 on the held-out digits, with the training digits as the labelled set."""
    from eval.image_probes import knn_eval, labelled_features, linear_probe_eval

    train = labelled_features(model, model_cfg, str(data / "train"), device)
    test = labelled_features(model, model_cfg, str(data / "test"), device)
    return {"knn": knn_eval(train, test), "linear_probe": linear_probe_eval(train, test)}


def method_name(config) -> str:
    """The method a config trains, as the tables show it: simclr, moco v2, moco v3, swav."""
    if config.loss.name == "moco":
        return f"moco v{config.ssl.moco.version}"
    return {"ntxent": "simclr"}.get(config.loss.name, config.loss.name)


def run_ssl_demo(mode: str, out: Path, config_path: str | Path | None = None, overrides=()) -> dict:
    """Prep -> self-supervised training -> probes of the trained and the random-init encoder."""
    import torch

    from clipx.api import load_model
    from clipx.apps.run_hooks import run_hooks
    from clipx.config import load_config
    from clipx.methods import build_model
    from clipx.train.loop import train
    from data_prep import prep_digits
    from eval.run import default_device

    if config_path is None and mode not in MODE_CONFIGS:
        raise ClipxError(f"demo mode {mode!r} has no config yet; known: clip, {', '.join(MODE_CONFIGS)}")
    config_path = config_path or REPO_CONFIGS / MODE_CONFIGS[mode]
    started = time.perf_counter()
    data = out / "data"
    prep_digits(data, image_size=32, workers=min(2, os.cpu_count() or 1))
    config = load_config(config_path, [f"data.train={data / 'train'}", "data.val=null",
                                       f"train.output_dir={out / 'run'}", *precision_overrides(), *overrides])
    summary = train(config, hooks=run_hooks())  # the run's plots (data.val is null: probed below)
    device = default_device()
    trained, _ = load_model(summary["checkpoint"], device)
    torch.manual_seed(config.train.seed)  # the baseline is the same architecture, freshly initialised
    baseline = build_model(config).to(device).eval()
    results = {
        **probe(trained, config.model, data, device),
        "baseline": probe(baseline, config.model, data, device),
        "mode": mode,
        "method": method_name(config),
        **run_record(summary, config, started),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def print_ssl_table(results: dict) -> None:
    rows = [("kNN top-1", results["knn"]["top1"]), ("linear probe top-1", results["linear_probe"]["top1"]),
            ("random-init kNN top-1", results["baseline"]["knn"]["top1"]),
            ("random-init linear probe top-1", results["baseline"]["linear_probe"]["top1"]),
            ("train samples/s", results["train"]["samples_per_second"]),
            ("demo total seconds", results["total_seconds"])]
    print_rows(rows)


def ssl_markdown_table(paths: list[str | Path]) -> str:
    """A Markdown table with one row per self-supervised demo results.json."""
    lines = ["| method | kNN top-1 | linear probe top-1 | random-init kNN top-1 | random-init linear probe top-1 "
             "| train steps | train samples/s | demo total s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        r = json.loads(Path(path).read_text())
        lines.append(f"| {r.get('method', r['mode'])} | {r['knn']['top1']:.3f} | {r['linear_probe']['top1']:.3f} | "
                     f"{r['baseline']['knn']['top1']:.3f} | {r['baseline']['linear_probe']['top1']:.3f} | "
                     f"{r['train']['steps']} | {r['train']['samples_per_second']:.0f} | {r['total_seconds']:.0f} |")
    return "\n".join(lines)
