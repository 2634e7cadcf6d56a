"""Peak memory of one optimizer step's gradients: one batch of K x B vs K micro-batches of B.

    python bench/accum_memory.py --config configs/demo-digits.yaml --batch 512 --accum 8
Prints a Markdown table: with feature caching the peak follows the micro-batch, not K x B.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from clipx.config import load_config
from clipx.data.tokenizer import Tokenizer
from clipx.methods import build_objective
from clipx.models import create_model, image_size
from clipx.train.runtime import make_accelerator
from clipx.train.step import micro_batch_gradients

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.memory import peak_bytes_during  # noqa: E402


def measure(config, batch: int, accum: int, mode: str) -> float:
    torch.manual_seed(0)
    model = create_model(config.model)
    objective = build_objective(model, config)
    size = image_size(config.model)
    tokens = Tokenizer(config.model)(["a handwritten seven."] * batch)
    images = torch.randn(batch, 3, size, size)
    micro = batch // accum
    micro_batches = [{"image": images[i:i + micro], "text": tokens[i:i + micro]} for i in range(0, batch, micro)]
    accelerator = make_accelerator()

    def step():
        model.zero_grad(set_to_none=False)
        micro_batch_gradients(accelerator, model, objective, micro_batches, mode)

    step()  # allocate gradients once, outside the measurement
    return peak_bytes_during(step) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo-digits.yaml")
    parser.add_argument("--batch", type=int, default=512, help="samples per optimizer step (K x B)")
    parser.add_argument("--accum", type=int, default=8, help="K")
    args = parser.parse_args()
    config = load_config(args.config)
    micro = args.batch // args.accum
    rows = [(f"one batch of {args.batch}", measure(config, args.batch, 1, "naive")),
            (f"features: {args.accum} x {micro} (same gradient)", measure(config, args.batch, args.accum, "features")),
            (f"naive: {args.accum} x {micro} (fewer negatives)", measure(config, args.batch, args.accum, "naive"))]
    print("| step | peak MiB above resident |")
    print("|---|---:|")
    for name, mib in rows:
        print(f"| {name} | {mib:.0f} |")


if __name__ == "__main__":
    main()
