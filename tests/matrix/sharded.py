"""FSDP against DDP against one process: 5 optimizer steps of the real training step, and sharded state
that reshards between process counts.

Each case builds a trainer with ``build_trainer`` (so sharding, the optimizer, the loss scaler and the
update guard are the ones a run gets) and feeds ``train_step`` the same synthetic global batch per
step, split over the ranks: GLOBAL samples, in one micro-batch or in 2 with feature caching.
AdamW runs with eps 1e-3 instead of 1e-6: with the default, a weight whose gradient is about 1e-6 or
smaller (token embeddings of rare tokens) moves by ~lr whatever that gradient's rounding, so fp32
summation order alone (1 rank against 2 or 4, sharded or not) parts the weights by 2e-6 after 5
steps. The larger eps keeps the comparison about sharding, not about Adam's conditioning.
At step 3 one case's batch holds a NaN image, so that every rank must refuse that step (the guard
reads the global gradient norm, which under FSDP spans every rank's shards). Models run in eval mode
(no layer couples the samples of a batch, see tests/matrix/exactness.py).

torchrun entry: ``python -m torch.distributed.run --nproc_per_node W -m tests.matrix.sharded OUT DATA
[LOAD_FROM [reload-only]]``: runs every case with DDP and with FSDP and writes ``OUT/results-w{W}.pt``
(rank 0), and saves the FSDP clip case's model and optimizer state as shards in ``OUT/state-w{W}``.
Given ``LOAD_FROM`` (shards written by another process count), it loads them into a fresh sharded
model and optimizer and saves them again as ``OUT/reloaded-w{W}``; ``reload-only`` skips the cases.
The one-process reference is ``run_case`` at world size 1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.matrix.combos import TINY_VIT

GLOBAL = 16  # divisible by 1, 2 and 4 ranks, and by 2 micro-batches of each
STEPS = 5
NAN_STEP = 3


@dataclass(frozen=True)
class Case:
    name: str
    overrides: dict
    micro_batches: int = 1
    nan_at_step: int | None = None
    image_text: bool = True
    extra: dict = field(default_factory=dict)


CASES = (
    # Feature caching over 2 micro-batches, and clipping at a norm the steps exceed (the global
    # norm across shards decides the factor).
    Case("clip", {"loss.name": "clip", "train.grad_clip_norm": 0.5}, micro_batches=2),
    Case("siglip", {"loss.name": "siglip", "model.init_logit_bias": -10.0, "model.init_temperature": 0.1}),
    Case("ntxent", {"loss.name": "ntxent", "ssl.head_hidden": 32, "ssl.head_out": 16}, image_text=False),
    Case("clip-nan-step", {"loss.name": "clip"}, nan_at_step=NAN_STEP),
)


def build(case: Case, world: int, data_dir: Path, out: Path, sharding: str):
    from clipx.config import load_config
    from clipx.train.build import build_trainer

    arch = out / "arch.json"
    values = {"model.name": str(arch), "data.train": str(data_dir / "train"), "data.val": "null",
              "data.workers": 0, "train.batch_size": GLOBAL // world // case.micro_batches,
              "train.accum_steps": case.micro_batches, "train.steps": STEPS, "train.warmup_steps": 0,
              "train.lr": 1e-3, "train.eps": 1e-3, "train.threads": 1, "train.sharding": sharding,
              "train.output_dir": str(out / f"run-{case.name}-{sharding}-w{world}"), **case.overrides}
    torch.manual_seed(0)
    trainer = build_trainer(load_config(None, [f"{k}={v}" for k, v in values.items()]))
    trainer.model.eval()
    return trainer


def batch(case: Case, step: int) -> dict:
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randn(GLOBAL, 3, 32, 32, generator=generator)
    if case.nan_at_step == step:
        images[0] = float("nan")
    if case.image_text:
        return {"image": images, "text": torch.randint(1, 400, (GLOBAL, 16), generator=generator)}
    return {"views": [images, torch.randn(GLOBAL, 3, 32, 32, generator=generator)]}


def rows(sample: dict, selection: slice) -> dict:
    return {k: [v[selection] for v in value] if isinstance(value, list) else value[selection]
            for k, value in sample.items()}


def run_case(case: Case, world: int, rank: int, data_dir: Path, out: Path, sharding: str) -> dict:
    """Losses (averaged over ranks), refusals, and the whole final weights of 5 steps."""
    from clipx import dist
    from clipx.dist import unwrap
    from clipx.train.loop import train_step

    trainer = build(case, world, data_dir, out, sharding)
    per_rank, losses = GLOBAL // world, []
    for step in range(1, STEPS + 1):
        mine = rows(batch(case, step), slice(rank * per_rank, (rank + 1) * per_rank))
        size = per_rank // case.micro_batches
        micro = [rows(mine, slice(i * size, (i + 1) * size)) for i in range(case.micro_batches)]
        result = train_step(trainer, micro, step)
        losses.append(float(dist.all_reduce_sum_(result["loss"].detach().clone()) / world))
    state = unwrap(trainer.model).state_dict()
    weights = {k: dist.full_tensor(v.detach()).reshape(-1).clone() for k, v in state.items()}
    return {"losses": losses, "refused": trainer.guard.refused, "weights": weights, "trainer": trainer}


def main() -> None:
    import json

    import torch.distributed as torch_dist

    from clipx.dist import unwrap
    from clipx.train.runtime import make_accelerator
    from clipx.train.sharding import load_shards, save_shards

    out, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    load_from = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    if rank == 0:
        (out / "arch.json").write_text(json.dumps(TINY_VIT))
    torch_dist.barrier()
    results = {}
    for case in CASES if "reload-only" not in sys.argv[4:] else ():
        for sharding in ("ddp", "fsdp"):
            found = run_case(case, world, rank, data_dir, out, sharding)
            trainer = found.pop("trainer")
            results[f"{case.name}/{sharding}"] = found
            if case.name == "clip" and sharding == "fsdp":
                model = unwrap(trainer.model)
                save_shards(ensure(out / f"state-w{world}", rank), rank, model.state_dict(), model, trainer.optimizer)
            torch_dist.barrier()
    if load_from is not None:  # the clip case, freshly built, takes the state another process count wrote
        fresh = build(CASES[0], world, data_dir, out, "fsdp")
        model = unwrap(fresh.model)
        load_shards(load_from, count_shards(load_from), model, fresh.optimizer)
        save_shards(ensure(out / f"reloaded-w{world}", rank), rank, model.state_dict(), model, fresh.optimizer)
    results["scaler"] = overflow_on_one_rank(rank)
    if rank == 0:
        torch.save({"cases": results, "world_size": world}, out / f"results-w{world}.pt")
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    from tests.distributed.cases import leave_without_destructors

    leave_without_destructors()  # a CI run saw a rank abort at exit after results-w4.pt was written


def overflow_on_one_rank(rank: int) -> dict:
    """fp16's loss scaler with sharded gradients: only rank 0's gradient shard overflows. Every rank
    must skip the step and halve the scale (clipx.train.sharding.SyncedGradScaler). Returns each
    rank's scale after the update and whether its parameter moved, gathered."""
    from clipx.dist import gather_no_grad
    from clipx.train.sharding import SyncedGradScaler

    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scaler = SyncedGradScaler("cpu", init_scale=1024.0)
    scaler.scale(parameter.sum()).backward()  # any scaled backward, as training makes
    parameter.grad.fill_(float("inf") if rank == 0 else 1.0)
    scaler.step(optimizer)  # unscales first, with the overflow flag taken over all ranks
    scaler.update()
    return {"scales": gather_no_grad(torch.tensor([scaler.get_scale()])),
            "moved": gather_no_grad(torch.tensor([float(not torch.equal(parameter.detach(), torch.ones(3)))]))}


def ensure(folder: Path, rank: int) -> Path:
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    import torch.distributed as torch_dist

    torch_dist.barrier()
    return folder


def count_shards(folder: Path) -> int:
    return sum(1 for _ in folder.glob("model-shard*.safetensors"))


if __name__ == "__main__":
    main()
