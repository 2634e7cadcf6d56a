"""Exactness across processes, for every registered objective flavour and gather mode it honours.

Each case builds the seeded tiny model of the matrix and its objective, splits one global batch of
GLOBAL samples over the ranks, and computes one step's gradients through ``micro_batch_gradients``
under DDP: in one micro-batch, or in 2 with feature caching (GradCache). The test compares them with
one process on the union batch: the loss averaged over ranks and DDP's averaged gradients must
equal the single-process loss and gradients (for ``gather: none``, the mean of per-rank problems).

Everything runs in float64 (the default dtype while a case runs): the comparison then sees errors
of the distribution itself, not fp32's summation order, which differs with the rank count and
reaches ~1e-6 of the gradients' scale on the larger objectives.

Models run in eval mode: BatchNorm then normalises with running statistics, so no layer couples
the samples of a batch. In train mode the SSL heads' BatchNorm makes a "union batch" undefined for
both multi-process and micro-batched runs (each normalises its own rows), as docs/scaling-out.md says.

torchrun entry: ``python -m torch.distributed.run --nproc_per_node W -m tests.matrix.exactness OUT``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from clipx.methods import METHODS
from tests.matrix.combos import TINY_VIT, flavours, has_text_tower, is_image_text

# The decoders' methods (CoCa, SigLIP 2) run on the matrix's tiny ViT with a vocabulary of 512 tokens
# (the cases' random ids are below 400): their decoder projections and embedding tables of 49,408
# tokens would hold gigabytes of float64 gradients over the cases on every rank. (Classifiers keep
# the whole vocabulary: their zero-shot head is built from tokenized prompts.)
SMALL_VOCABULARY = {**TINY_VIT, "text_cfg": {**TINY_VIT["text_cfg"], "vocab_size": 512}}


def small_vocabulary(arch_path: Path) -> Path:
    return arch_path.with_name("arch-512-tokens.json")
GLOBAL = 12  # samples in the union batch: divisible by 1, 2, 3 and 4 ranks, and by 2 micro-batches of each


@dataclass(frozen=True)
class Case:
    name: str
    objective: str
    gather: str
    micro_batches: int  # 1, or 2 with feature caching
    overrides: dict
    hard_negatives: bool = False  # the batch carries hard-negative captions, some samples without one
    distill: bool = False  # the batch carries a teacher's embeddings (distill.embedded)
    # ssl.mix with FixedMix's mixes; mix_blocks: the blocks of each micro-batch that mix among themselves
    mix: bool = False
    mix_blocks: int = 1


def cases() -> list[Case]:
    out = []
    for name, objective, overrides in flavours():
        spec = METHODS.get(objective)
        for gather in spec.gather_modes or ("local",):  # methods without gather modes always gather
            for micro_batches in (1, 2):
                base = {**overrides, "loss.gather": gather}
                prefix = f"{name}/gather-{gather}/micro{micro_batches}"
                out.append(Case(prefix, objective, gather, micro_batches, base))
                if spec.hard_negatives:
                    out.append(Case(prefix + "/hard-negatives", objective, gather, micro_batches, base, True))
                if spec.mixing:  # i-Mix's virtual labels: partners on their own rank, targets gathered
                    out.append(Case(prefix + "/imix", objective, gather, micro_batches, {**base, "ssl.mix": "mixup"},
                                    mix=True))
                if is_image_text(objective):  # the teachers' logits gathered like the student's
                    ensemble = "probabilities" if micro_batches == 1 else "logits"
                    distill = {**DISTILL, "distill.ensemble": ensemble} if spec.replays_views else ONE_TEACHER
                    out.append(Case(prefix + "/distill", objective, gather, micro_batches, {**base, **distill},
                                    distill=True))
    return out


# SigLIP 2's self-distillation terms from the first step (the cases run no step before), with small heads.
SIGLIP2_LATE = {"loss.siglip2.late_fraction": 1.0, "loss.siglip2.prototypes": 16, "loss.siglip2.head_hidden": 32,
                "loss.siglip2.head_bottleneck": 8}
# What a step stages for after_step that every rank must compute alike, as one process on the union
# batch would: the teacher's centres, means over every rank's outputs.
GLOBAL_STAGED = ("silc_centre", "tips_centre")

# An ensemble of two teachers, embedded: their embeddings come with the batch, their widths (unlike
# the students' 32 and each other's: the loss must not need them alike) and logit scales (each its own
# temperature) from the reinforce.json that ``ensemble_shards`` writes. One micro-batch averages the
# teachers' probabilities, two their logits.
DISTILL = {"distill.embedded": True, "data.reinforced": True, "distill.weight": 0.5}
TEACHERS = ({"source": "a", "logit_scale": 7.0, "dim": 24}, {"source": "b", "logit_scale": 11.0, "dim": 16})
# Methods whose image comes with views (SLIP, SigLIP 2) read no reinforced shards: one embedded
# teacher (embed-teacher's form), its scale given as teacher.json would give it.
ONE_TEACHER = {"distill.embedded": True, "distill.teacher_logit_scale": 7.0, "distill.weight": 0.5}


def ensemble_shards(folder: Path) -> Path:
    """An (empty) shard with a reinforce.json beside it naming ``TEACHERS``: all the objective reads.
    Rank 0 writes it before the cases run."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reinforce.json").write_text(json.dumps({
        "teachers": TEACHERS, "augmentations": 1, "image_size": 32, "caption_key": "synthetic", "captions": 0,
        "recipe": {}}))
    (folder / "shard-000000.tar").touch()
    return folder / "shard-000000.tar"


def build(case: Case, world: int, arch_path: Path):
    """(config, seeded model in eval mode) for ``case`` at ``world`` ranks."""
    from clipx.config import load_config
    from clipx.methods import build_model, method_of

    per_micro = GLOBAL // world // case.micro_batches
    if METHODS.get(case.objective).needs_patch_tokens:
        arch_path = small_vocabulary(arch_path)
    values = {"model.name": str(arch_path), "loss.name": case.objective, "train.batch_size": per_micro,
              "train.accum_steps": case.micro_batches, "ssl.head_hidden": 32, "ssl.head_out": 16,
              "ssl.moco.predictor_hidden": 32, "ssl.moco.queue_size": 2 * GLOBAL, "ssl.swav.queue_size": 2 * GLOBAL,
              "ssl.swav.prototypes": 16, **SIGLIP2_LATE, **case.overrides}
    if case.overrides.get("data.reinforced"):
        values["data.train"] = str(arch_path.parent / "ensemble" / "shard-000000.tar")
    config = load_config(None, [f"{k}={v}" for k, v in values.items()])
    torch.manual_seed(0)
    # As a run prepares it (a classifier's zero-shot head and frozen text tower: DDP must not wait for
    # the gradients of parameters no loss reaches).
    return config, method_of(config).prepare(build_model(config), None, config).eval()


def global_batch(case: Case) -> dict:
    generator = torch.Generator().manual_seed(1)
    if METHODS.get(case.objective).text_only:  # captions and their positives, no image
        batch = {"text": torch.randint(1, 400, (GLOBAL, 16), generator=generator),
                 "positive_text": torch.randint(1, 400, (GLOBAL, 16), generator=generator)}
        if case.hard_negatives:
            batch.update(negative_text=torch.randint(1, 400, (GLOBAL, 16), generator=generator),
                         negative_mask=torch.arange(GLOBAL) % 3 != 1)
        return batch
    if has_text_tower(case.objective):  # views and labels too, for SLIP's image-only term and classifiers
        batch = {"image": torch.randn(GLOBAL, 3, 32, 32, generator=generator),
                 "text": torch.randint(1, 400, (GLOBAL, 16), generator=generator),
                 "views": [torch.randn(GLOBAL, 3, 32, 32, generator=generator) for _ in range(2)],
                 "label": torch.randint(0, 10, (GLOBAL,), generator=generator)}
        if case.hard_negatives:  # every third sample has none: masked out on whichever rank holds it
            batch.update(negative_text=torch.randint(1, 400, (GLOBAL, 16), generator=generator),
                         negative_mask=torch.arange(GLOBAL) % 3 != 1)
        if case.distill:
            teachers = [torch.randn(GLOBAL, 2, t["dim"], generator=generator)
                        for t in (TEACHERS if case.overrides.get("data.reinforced") else TEACHERS[:1])]
            batch["teacher_embedding"] = [t / t.norm(dim=-1, keepdim=True) for t in teachers]
        return batch
    views = [torch.randn(GLOBAL, 3, 32, 32, generator=generator) for _ in range(2)]
    # Labels for the image-only methods that read them (SupCon; the others ignore them): 3 classes
    # spread over every rank's rows, and every fourth sample without a label (-1, instance positives).
    labels = torch.randint(0, 3, (GLOBAL,), generator=generator).masked_fill(torch.arange(GLOBAL) % 4 == 1, -1)
    return {"views": views, "label": labels}


class FixedMasker:
    """A patch masker whose masks are the same however the union batch is split: each image masks
    the half of its patches with the largest mean pixel value (a run draws them at random:
    clipx/methods/siglip2.py:PatchMasker)."""

    def __call__(self, images: torch.Tensor, patches: int) -> torch.Tensor:
        side = int(patches ** 0.5)
        means = torch.nn.functional.adaptive_avg_pool2d(images.mean(dim=1), side).flatten(1)
        return means.argsort(dim=1).argsort(dim=1) >= patches // 2


class FixedMix:
    """A mixer whose mixes are the same however the union batch is split: each sample's lam follows
    from its pixels, and its partner is the next sample of its block (a micro-batch's rows split
    into ``blocks`` equal blocks), so one process on the union batch, told the multi-process run's
    blocks, mixes exactly what the ranks' micro-batches mix. (A run draws its mixes per rank and
    micro-batch instead: clipx/ssl/mixing.py.)"""

    def __init__(self, blocks: int):
        self.blocks = blocks

    def __call__(self, images: torch.Tensor):
        from clipx.ssl.mixing import MixDraw

        b, size = len(images), len(images) // self.blocks
        lam = 0.5 + 0.25 * (1 + torch.tanh(images.flatten(1).mean(dim=1) * 10))
        local = torch.arange(b)
        partner = local - local % size + (local % size + 1) % size
        weight = lam.view(-1, 1, 1, 1)
        return MixDraw(weight * images + (1 - weight) * images[partner], lam, partner - local)


def rows(batch: dict, selection: slice) -> dict:
    return {k: [v[selection] for v in value] if isinstance(value, list) else value[selection]
            for k, value in batch.items()}


def step_gradients(case: Case, accelerator, world: int, rank: int, arch_path: Path) -> dict:
    """This rank's share of the global batch through one step, in float64: {"loss", "grads"}."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _step_gradients(case, accelerator, world, rank, arch_path)
    finally:
        torch.set_default_dtype(previous)


def _step_gradients(case: Case, accelerator, world: int, rank: int, arch_path: Path) -> dict:
    from clipx.methods import build_objective
    from clipx.train.step import micro_batch_gradients

    config, model = build(case, world, arch_path)
    if accelerator is not None:
        model = accelerator.prepare(model)
    objective = build_objective(model, config)
    if case.mix:
        objective.mixer = FixedMix(case.mix_blocks)
    inner = getattr(objective, "student", objective)  # the method's own objective inside distillation's
    if hasattr(inner, "masker"):
        inner.masker = FixedMasker()
    per_rank = GLOBAL // world
    mine = rows(global_batch(case), slice(rank * per_rank, (rank + 1) * per_rank))
    size = per_rank // case.micro_batches
    micro = [rows(mine, slice(i * size, (i + 1) * size)) for i in range(case.micro_batches)]
    out = micro_batch_gradients(accelerator or _NoAccelerator(), model, objective, micro, "features")
    bare = getattr(model, "module", model)
    return {"loss": out["loss"].detach(),
            "grads": {n: p.grad.detach().clone() for n, p in bare.named_parameters() if p.grad is not None},
            "staged": {name: objective.staged(name)[-1] for name in GLOBAL_STAGED if objective.staged(name)}}


class _NoAccelerator:
    """What micro_batch_gradients needs of an Accelerator, for the single-process reference."""

    scaler = None

    @staticmethod
    def backward(loss):
        loss.backward()

    @staticmethod
    def no_sync(model):
        import contextlib

        return contextlib.nullcontext()


def reference(case: Case, world: int, arch_path: Path) -> dict:
    """One process: the union batch in one micro-batch; for gather none, the mean of the ranks' problems."""
    import dataclasses

    if case.gather != "none":
        union = dataclasses.replace(case, micro_batches=1, mix_blocks=world * case.micro_batches)
        return step_gradients(union, None, 1, 0, arch_path)
    parts = [step_gradients(dataclasses.replace(case, micro_batches=1, mix_blocks=case.micro_batches), None, world, r,
                            arch_path)
             for r in range(world)]
    return {"loss": sum(p["loss"] for p in parts) / world,
            "grads": {n: sum(p["grads"][n] for p in parts) / world for n in parts[0]["grads"]},
            "staged": {n: sum(p["staged"][n] for p in parts) / world for n in parts[0]["staged"]}}


def _compare_with_rank_zero(result: dict, rank: int) -> None:
    """Ranks other than 0 keep only the largest difference of their gradients from rank 0's.

    DDP leaves every rank the same averaged gradients, and rank 0's are compared with the reference
    in full; writing every rank's float64 gradients of every case took gigabytes of disk per launch.
    """
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1) for g in result["grads"].values()])
    rank_zero = flat.clone()
    dist.broadcast(rank_zero, src=0)
    if rank != 0:
        result["grads_vs_rank0"] = (flat - rank_zero).abs().max()
        del result["grads"]


def main() -> None:
    import json

    import torch.distributed as dist

    from clipx.train.runtime import make_accelerator

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    arch_path = out / "arch.json"
    if rank == 0:
        arch_path.write_text(json.dumps(TINY_VIT))
        small_vocabulary(arch_path).write_text(json.dumps(SMALL_VOCABULARY))
        ensemble_shards(out / "ensemble")
    dist.barrier()
    results = {}
    for case in cases():  # compared at once: the other ranks keep one number per case, not its gradients
        results[case.name] = step_gradients(case, accelerator, world, rank, arch_path)
        _compare_with_rank_zero(results[case.name], rank)
    torch.save({"cases": results, "rank": rank, "world_size": world}, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
