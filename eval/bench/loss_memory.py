"""Peak memory of the CLIP loss forward + backward per rank, for gather `global` vs `local`.

Run on 2 CPU processes (what BENCHMARKS.md reports):
    python -m torch.distributed.run --standalone --nproc_per_node 2 eval/bench/loss_memory.py --out FILE.json
Each rank holds B = global / 2 random unit features of width D; the figure is the rise of the
process's peak resident memory (VmHWM) during one forward + backward of ClipLoss, beside the
`clipx plan` estimate of the logit matrices plus gathered features and their gradients.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipx.losses import ClipLoss
from clipx.plan import feature_bytes, logit_bytes
from clipx.train.loop import make_accelerator
from eval.bench.memory import peak_bytes_during


def measure(gather: str, global_batch: int, dim: int) -> int:
    world = dist.get_world_size()
    torch.manual_seed(dist.get_rank())
    images = F.normalize(torch.randn(global_batch // world, dim), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(global_batch // world, dim), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    loss_fn = ClipLoss(gather=gather)

    def step():
        loss_fn(images, texts, scale).backward()

    step()  # warm-up: first-call allocations are not part of the steady state
    dist.barrier()
    return peak_bytes_during(step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", default="512,1024,2048,4096")
    args = parser.parse_args()
    torch.set_num_threads(1)
    accelerator = make_accelerator()
    world = accelerator.num_processes
    rows = []
    for gather in ("global", "local"):
        for global_batch in map(int, args.batches.split(",")):
            peak = measure(gather, global_batch, args.dim)
            peaks = [None] * world
            dist.all_gather_object(peaks, peak)
            rows.append({"gather": gather, "global_batch": global_batch, "world_size": world,
                         "peak_mib_per_rank": max(peaks) / 2**20,
                         "plan_mib": (logit_bytes(gather, global_batch // world, world)
                                      + feature_bytes(gather, global_batch // world, world, args.dim)) / 2**20})
    if accelerator.is_main_process:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
        print("| gather | global batch | ranks | measured peak MiB/rank | `clipx plan` logits + features MiB |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['gather']} | {r['global_batch']} | {r['world_size']} | {r['peak_mib_per_rank']:.1f} | "
                  f"{r['plan_mib']:.1f} |")


if __name__ == "__main__":
    main()
