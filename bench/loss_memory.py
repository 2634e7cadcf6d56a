"""Peak memory of a contrastive loss forward + backward per rank.

Global batch grows at a fixed 2 ranks (what BENCHMARKS.md reports for `global` vs `local`):
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/loss_memory.py
Ranks grow at a fixed per-rank batch (run once per rank count):
    python -m torch.distributed.run --standalone --nproc_per_node 4 bench/loss_memory.py \\
        --per-rank 1024 --losses clip-global,clip-local,siglip
Each rank holds random unit features of width D; the figure is the rise of the process's peak
resident memory (VmHWM) during one forward + backward, beside `clipx plan`'s estimate for CLIP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipx.apps.plan import feature_bytes, logit_bytes, siglip_bytes
from clipx.losses import ClipLoss, SigLipLoss
from clipx.train.runtime import make_accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.memory import peak_bytes_during  # noqa: E402

LOSSES = {
    "clip-global": lambda: (ClipLoss(gather="global"), False),
    "clip-local": lambda: (ClipLoss(gather="local"), False),
    "siglip": lambda: (SigLipLoss(), True),
}


def measure(loss_name: str, local_batch: int, dim: int) -> int:
    torch.manual_seed(dist.get_rank())
    images = F.normalize(torch.randn(local_batch, dim), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(local_batch, dim), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss_fn, uses_bias = LOSSES[loss_name]()

    def step():
        loss_fn(images, texts, scale, *((bias,) if uses_bias else ())).backward()

    step()  # warm-up: first-call allocations are not part of the steady state
    dist.barrier()
    return peak_bytes_during(step)


def plan_mib(loss_name: str, local_batch: int, world: int, dim: int) -> str:
    if loss_name == "siglip":
        return f"{sum(siglip_bytes(local_batch, dim)) / 2**20:.1f}"
    gather = loss_name.split("-")[1]
    return f"{(logit_bytes(gather, local_batch, world) + feature_bytes(gather, local_batch, world, dim)) / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", default="512,1024,2048,4096", help="global batches (fixed ranks)")
    parser.add_argument("--per-rank", type=int, default=None, help="fixed per-rank batch instead of --batches")
    parser.add_argument("--losses", default="clip-global,clip-local")
    args = parser.parse_args()
    torch.set_num_threads(1)
    accelerator = make_accelerator()
    world = accelerator.num_processes
    local_batches = [args.per_rank] if args.per_rank else [int(b) // world for b in args.batches.split(",")]
    rows = []
    for loss_name in args.losses.split(","):
        for local_batch in local_batches:
            peaks = [None] * world
            dist.all_gather_object(peaks, measure(loss_name, local_batch, args.dim))
            rows.append((loss_name, local_batch * world, world, max(peaks) / 2**20,
                         plan_mib(loss_name, local_batch, world, args.dim)))
    if accelerator.is_main_process:
        print("| loss | global batch | ranks | measured peak MiB/rank | `clipx plan` logits + features MiB |")
        print("|---|---:|---:|---:|---:|")
        for name, global_batch, ranks, peak, plan in rows:
            print(f"| {name} | {global_batch} | {ranks} | {peak:.1f} | {plan} |")


if __name__ == "__main__":
    main()
