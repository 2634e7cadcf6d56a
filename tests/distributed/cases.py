"""Cases run by torchrun in 2 processes (see launch.py); each rank saves its results for the test.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 cases.py CASE OUT_DIR [ARGS]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

GLOBAL_BATCH = 8


def tiny_problem(seed: int = 0, siglip: bool = False):
    """A seeded tiny DualEncoder (open_clip towers) and a global batch of random images and tokens."""
    model, _ = tiny_model_and_config(seed, siglip)
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    tokens = torch.randint(1, 400, (GLOBAL_BATCH, 16), generator=generator)
    return model, images, tokens


def tiny_model_and_config(seed: int = 0, siglip: bool = False):
    """The seeded tiny model (open_clip towers of TINY_ARCH, eval mode) with its config."""
    import dataclasses

    from clipx.config import load_config
    from clipx.models import create_model
    from tests.conftest import REPO, TINY_ARCH

    config = load_config(REPO / "configs" / "demo-digits.yaml", [])
    model_cfg = dataclasses.replace(config.model, arch=TINY_ARCH)
    if siglip:
        model_cfg = dataclasses.replace(model_cfg, init_temperature=0.1, init_logit_bias=-10.0)
    config = dataclasses.replace(config, model=model_cfg)
    torch.manual_seed(seed)
    return create_model(config.model).eval(), config


def loss_and_grads(model, loss_fn, images, tokens) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, backward; (loss, {parameter name: gradient}) with names as in the bare model."""
    model.zero_grad(set_to_none=True)
    image_features, text_features, scale, bias = model(images, tokens)
    loss = loss_fn(image_features, text_features, scale, *(() if bias is None else (bias,)))
    loss.backward()
    bare = getattr(model, "module", model)
    return loss.detach(), {n: p.grad.detach().clone() for n, p in bare.named_parameters() if p.grad is not None}


def case_clip_gather(out_dir: Path) -> dict:
    """ClipLoss in every gather mode on this rank's half of the global batch, through Accelerate's DDP."""
    from clipx.losses import ClipLoss
    from clipx.train.runtime import make_accelerator

    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    results = {}
    for gather in ("none", "global", "local"):
        model, images, tokens = tiny_problem()
        model = accelerator.prepare(model)
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        # chunk_size 3: the 8 gathered columns are streamed in 3 chunks (the last one partial)
        loss, grads = loss_and_grads(model, ClipLoss(gather=gather, chunk_size=3), images[rows], tokens[rows])
        results[gather] = {"loss": loss, "grads": grads}
    return results


def case_siglip(out_dir: Path) -> dict:
    """SigLipLoss on this rank's half of the batch, texts passed around the ring."""
    from clipx.losses import SigLipLoss
    from clipx.train.runtime import make_accelerator

    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    model, images, tokens = tiny_problem(siglip=True)
    model = accelerator.prepare(model)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    loss, grads = loss_and_grads(model, SigLipLoss(), images[rows], tokens[rows])
    return {"siglip": {"loss": loss, "grads": grads}}


def fake_kernel_timings(fastest: str) -> None:
    """Every attention call times 1 s under ``fastest`` and 2 s under the others (PyTorch's own
    pick, "default", times as flash), and no kernel cache answers instead of the measurement."""
    from clipx.models import attention

    os.environ["CLIPX_CACHE_DIR"] = "off"
    quick = {fastest, "default"} if fastest == "flash" else {fastest}
    attention.time_call = lambda call, kernel, backward, repeats=5: 1.0 if kernel in quick else 2.0


def case_evaluate(out_dir: Path, shards: str) -> dict:
    """Sharded zero-shot + retrieval evaluation of the seeded tiny model. The ranks' timings disagree
    (rank 0: math is fastest, rank 1: flash): every rank must use rank 0's kernels ("kernels")."""
    from clipx.data.tokenizer import Tokenizer
    from clipx.models.inference import InferenceEncoder
    from clipx.train.runtime import make_accelerator
    from eval.run import evaluate

    accelerator = make_accelerator()
    fake_kernel_timings("math" if accelerator.process_index == 0 else "flash")
    kernels, settle = [], InferenceEncoder.settle  # what each rank settled on, for the test
    InferenceEncoder.settle = lambda self, examples: kernels.append(settle(self, examples)) or kernels[-1]
    model, config = tiny_model_and_config()
    results = evaluate(model, Tokenizer(config.model), config.model, shards, accelerator.device, workers=1)
    return {"evaluation": results, "kernels": kernels}


def case_timeout(out_dir: Path) -> dict:
    """Rank 1 never joins the all-reduce: rank 0 must fail within the timeout with a message naming it."""
    import time

    import torch.distributed as dist

    from clipx import dist as clipx_dist
    from clipx.errors import ClipxError
    from clipx.train.runtime import make_accelerator

    make_accelerator(collective_timeout_s=3)
    message = ""
    if dist.get_rank() == 0:
        started = time.monotonic()
        try:
            with clipx_dist.collective_timeout_guard(3):
                dist.all_reduce(torch.ones(1))
        except ClipxError as error:
            message = str(error)
        return {"message": message, "seconds": time.monotonic() - started}
    time.sleep(8)
    return {"message": message, "seconds": 0.0}


def case_accum_features(out_dir: Path) -> dict:
    """Feature caching on 2 ranks x 2 micro-batches of 2, through DDP (no_sync until the last replay)."""
    from clipx.losses import ClipLoss
    from clipx.methods.image_text import ContrastiveObjective
    from clipx.train.runtime import make_accelerator
    from clipx.train.step import micro_batch_gradients

    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    model, images, tokens = tiny_problem()
    model = accelerator.prepare(model)
    per_rank = GLOBAL_BATCH // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    images, tokens = images[mine], tokens[mine]
    micro = [{"image": images[i:i + 2], "text": tokens[i:i + 2]} for i in range(0, per_rank, 2)]
    out = micro_batch_gradients(accelerator, model, ContrastiveObjective(model, ClipLoss(gather="local")), micro,
                                "features")
    grads = {n: p.grad.detach().clone() for n, p in model.module.named_parameters() if p.grad is not None}
    return {"accum": {"loss": out["loss"], "grads": grads}}


def paired_halves() -> tuple[torch.Tensor, torch.Tensor, slice]:
    """Two (GLOBAL_BATCH, 6) tensors drawn from seed 0, and the rows that belong to this rank."""
    from clipx.train.runtime import make_accelerator

    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(GLOBAL_BATCH, 6, generator=generator)
    second = torch.randn(GLOBAL_BATCH, 6, generator=generator)
    return first, second, slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)


def case_ntxent(out_dir: Path) -> dict:
    """NT-Xent on this rank's half of a batch of view pairs, negatives gathered from both ranks."""
    from clipx.losses import NTXentLoss

    z1, z2, rows = paired_halves()
    mine1, mine2 = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
    loss = NTXentLoss(0.2)(mine1, mine2)
    loss.backward()
    return {"loss": loss.detach(), "grad_z1": mine1.grad, "grad_z2": mine2.grad}


SUPCON_LABELS = (0, 1, 0, -1, 1, 2, -1, 0)  # classes shared across the ranks' halves; -1: no label


def case_supcon(out_dir: Path) -> dict:
    """SupCon (float64) on this rank's half of a batch of labelled view pairs, in each gather mode."""
    from clipx.losses import SupConLoss

    z1, z2, rows = paired_halves()
    labels = torch.tensor(SUPCON_LABELS)[rows]
    out = {}
    for gather in ("none", "local", "global"):
        mine1, mine2 = z1[rows].double().requires_grad_(), z2[rows].double().requires_grad_()
        loss = SupConLoss(0.2, gather)(mine1, mine2, labels)
        loss.backward()
        out[gather] = {"loss": loss.detach(), "grad_z1": mine1.grad, "grad_z2": mine2.grad}
    return out


def case_sinkhorn(out_dir: Path) -> dict:
    """Sinkhorn–Knopp codes of this rank's half of a score matrix, marginals over both ranks."""
    from clipx.losses.swav import sinkhorn
    from clipx.train.runtime import make_accelerator

    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    scores = sinkhorn_scores()
    half = len(scores) // world
    return {"codes": sinkhorn(scores[rank * half:(rank + 1) * half], 0.05, 10)}


def sinkhorn_scores() -> torch.Tensor:
    """(64, 12) cosine scores of random unit vectors against 12 random unit prototypes."""
    generator = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(64, 16, generator=generator), dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(12, 16, generator=generator), dim=1)
    return z @ prototypes.T


def case_moco(out_dir: Path) -> dict:
    """MoCo across ranks: v3's in-batch InfoNCE with gathered keys, the v2 queue fed with gathered
    keys, and the key encoder's BatchNorm shuffle, each on this rank's half of a global batch."""
    from clipx import dist as clipx_dist
    from clipx.losses.moco import batch_infonce
    from clipx.ssl.batchnorm import shuffled_forward
    from clipx.ssl.queue import FeatureQueue

    queries, keys, rows = paired_halves()
    rank = clipx_dist.rank()
    mine = queries[rows].clone().requires_grad_()
    loss = batch_infonce(mine, keys[rows], 0.2)
    loss.backward()
    queue = FeatureQueue(12, 6)
    for _ in range(2):  # 16 rows into 12: wraps around
        queue.enqueue(clipx_dist.gather_no_grad(keys[rows]))
    torch.manual_seed(rank)  # different on each rank: the permutation must still be rank 0's
    per_sample = torch.nn.Linear(6, 3)
    torch.nn.init.constant_(per_sample.weight, 0.5)  # the same encoder on both ranks, as under DDP
    torch.nn.init.constant_(per_sample.bias, 0.1)
    shuffled = shuffled_forward(per_sample, keys[rows])
    return {"loss": loss.detach(), "grad": mine.grad, "queue": queue.features, "pointer": queue.pointer,
            "shuffled": shuffled, "unshuffled": per_sample(keys[rows]).detach()}


def case_guards(out_dir: Path) -> dict:
    """The guards' decisions across ranks: a stop signal that only rank 1 received at its second
    call, and a loss that is NaN on rank 1 only at step 2 (and NaN everywhere from step 4 on)."""
    from clipx.train.guards import StopRequest, UpdateGuard
    from clipx.train.runtime import make_accelerator

    accelerator = make_accelerator()
    rank = accelerator.process_index
    stop = StopRequest(grace_s=60.0)
    stop.close()  # the flag is set by hand below, not by a signal
    agreed = []
    for call in range(1, 5):
        if rank == 1 and call == 2:
            stop.received = "SIGTERM"
        agreed.append(stop.agreed("cpu"))
    guard = UpdateGuard(limit=2)
    verdicts, stopped_at = [], None
    for step in range(1, 7):
        nan = (step == 2 and rank == 1) or step >= 4
        loss = torch.tensor(float("nan") if nan else 1.0 + rank)
        verdicts.append(bool(guard.judge(loss, torch.tensor(1.0), step)))
        guard.post()
        try:
            guard.check()  # the previous step's counters, as the loop reads them
        except Exception as error:  # ClipxError: what every rank must raise at the same step
            stopped_at = (step, str(error))
            break
    return {"agreed": agreed, "verdicts": verdicts, "stopped_at": stopped_at, "state": guard.state_dict()}


CASES = {"guards": case_guards, "clip_gather": case_clip_gather, "ntxent": case_ntxent, "supcon": case_supcon, "sinkhorn": case_sinkhorn, "moco": case_moco, "accum_features": case_accum_features, "siglip": case_siglip, "evaluate": case_evaluate,
         "timeout": case_timeout}


def main() -> None:
    import torch.distributed as dist

    case, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    results = CASES[case](out_dir, *sys.argv[3:])
    results.update(rank=dist.get_rank(), world_size=dist.get_world_size())
    torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
    if case != "timeout":  # the group is broken on purpose there: no barrier can pass
        dist.barrier()
    leave_without_destructors()


def leave_without_destructors() -> None:
    """Exit 0 once every rank's results are saved, without C++ destructors: at interpreter exit,
    gloo's threads can abort a rank ("terminate called without an active exception", seen in a CI
    run after every result was written), and a broken group's destructor does for certain."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
