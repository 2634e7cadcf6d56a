"""`clipx plan`: per-rank memory estimates, so batches are sized before a job is launched, and
(``--loader-target``) the loader cores a training rate needs, from the loader's rate measured on one
core (``plan_loader``).

Estimates, per rank, for one training step:
  logits       the contrastive logit matrices: (B, B) for gather none, (N, N) for global, both times
               LOGIT_COPIES (fp32: both directions' logits and log-probabilities); for local, the
               (B, chunk) blocks that ClipLoss streams, times LOCAL_BLOCK_COPIES
  features     the gathered image and text features and their gradients
  activations  what autograd saves in the towers' forward pass, measured on a 2-sample forward and
               scaled to the micro-batch
  model state  fp32 parameters, gradients and AdamW's two moments (16 bytes a trainable parameter,
               4 a frozen one), and with train.ema_decay the fp32 average of every trainable one
               (4 bytes more): whole on every rank with DDP; with FSDP each rank holds its rows of
               every parameter (torch.chunk along dim 0, as fully_shard splits them), so about 1/N.
               FSDP also gathers one block at a time for compute (not counted: one block is small
               next to the whole model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from clipx.config import Config

FP32 = 4
# Each direction's cross-entropy keeps the fp32 logits and their log-softmax until backward.
LOGIT_COPIES = 4
# The chunked local loss holds a block's similarities, probabilities and gradient at once.
LOCAL_BLOCK_COPIES = 3
LOCAL_CHUNK = 1024  # ClipLoss's default chunk_size
PLANNED_LOSSES = ("clip", "siglip")  # the losses whose memory plan_memory estimates


@dataclass
class MemoryPlan:
    world_size: int
    micro_batch: int  # per rank, per forward
    global_batch: int  # negatives the loss sees: world x micro-batch x (accum_steps with feature caching)
    logits: int
    features: int
    activations: int
    model_state: int  # DDP: the whole model's state on every rank
    model_state_fsdp: int  # train.sharding=fsdp: the largest rank's share

    @property
    def total(self) -> int:
        return self.logits + self.features + self.activations + self.model_state

    @property
    def total_fsdp(self) -> int:
        return self.logits + self.features + self.activations + self.model_state_fsdp

    def table(self) -> str:
        rows = [("logit matrices", self.logits, self.logits),
                ("gathered features + grads", self.features, self.features),
                ("tower activations (micro-batch)", self.activations, self.activations),
                ("params + grads + AdamW (+ EMA)", self.model_state, self.model_state_fsdp),
                ("total", self.total, self.total_fsdp)]
        head = (f"per-rank memory: world size {self.world_size}, micro-batch {self.micro_batch}, "
                f"global batch {self.global_batch}")
        columns = f"  {'':<32} {'ddp':>10} {'fsdp':>10}"
        return "\n".join([head, columns] + [f"  {name:<32} {_human(ddp):>10} {_human(fsdp):>10}"
                                             for name, ddp, fsdp in rows])


def logit_bytes(gather: str, local_rows: int, world_size: int, chunk: int = LOCAL_CHUNK) -> int:
    """Bytes of the loss's logit matrices on one rank, for ``local_rows`` samples per rank."""
    total_rows = local_rows * world_size
    if gather == "local" and world_size > 1:
        return LOCAL_BLOCK_COPIES * local_rows * min(total_rows, chunk) * FP32
    rows = total_rows if gather == "global" else local_rows  # one process: local == none == dense
    return LOGIT_COPIES * rows * rows * FP32


def feature_bytes(gather: str, local_rows: int, world_size: int, embed_dim: int) -> int:
    """Bytes of the (gathered) image and text features and their gradients on one rank."""
    rows = local_rows if gather == "none" else local_rows * world_size
    return 2 * 2 * rows * embed_dim * FP32


def siglip_bytes(local_rows: int, embed_dim: int) -> tuple[int, int]:
    """(logits, features) for SigLipLoss: one (B, B) block at a time (similarities, logits, gradient);
    own features and gradients plus one travelling text block with its gradient, sent and received."""
    return 3 * local_rows * local_rows * FP32, (2 * 2 + 2 * 2) * local_rows * embed_dim * FP32


def plan_memory(config: Config, world_size: int, global_batch: int | None = None) -> MemoryPlan:
    """Estimate one rank's memory for ``config`` at ``world_size`` (and optionally a global batch)."""
    from clipx.errors import ClipxError
    from clipx.models import create_model

    if config.loss.name not in PLANNED_LOSSES:
        raise ClipxError(f"clipx plan's memory estimate covers loss.name={', '.join(PLANNED_LOSSES)}, not "
                         f"{config.loss.name} (--loader-target works for every method)")
    t = config.train
    accum = t.accum_steps
    micro = global_batch // (world_size * accum) if global_batch else t.batch_size
    features_per_rank = micro * accum if t.accum_mode == "features" else micro
    model = create_model(config.model)
    embed_dim = config.model.arch["embed_dim"]
    gathered = 1 if config.loss.gather == "none" else world_size
    if config.loss.name == "siglip":
        logits, features = siglip_bytes(features_per_rank, embed_dim)
    else:
        logits = logit_bytes(config.loss.gather, features_per_rank, world_size)
        features = feature_bytes(config.loss.gather, features_per_rank, world_size, embed_dim)
    return MemoryPlan(
        world_size=world_size,
        micro_batch=micro,
        global_batch=features_per_rank * gathered,
        logits=logits,
        features=features,
        activations=activation_bytes(model, config, micro),
        model_state=model_state_bytes(model, 1, t.ema_decay is not None),
        model_state_fsdp=model_state_bytes(model, world_size, t.ema_decay is not None),
    )


def model_state_bytes(model: torch.nn.Module, shards: int, ema: bool = False) -> int:
    """fp32 parameters, gradients and AdamW moments (and with ``ema`` their average) of the rank
    holding the most, with every parameter split into ``shards`` row blocks along dim 0 (1: not
    sharded). Frozen parameters: weights only."""
    trainable = 16 + (FP32 if ema else 0)
    total = 0
    for parameter in model.parameters():
        rows = parameter.shape[0] if parameter.ndim else 1
        share = -(-rows // shards) * (parameter.numel() // max(rows, 1))  # rank 0 holds the largest chunk
        total += (trainable if parameter.requires_grad else FP32) * share
    return total


def activation_bytes(model, config: Config, batch: int, probe: int = 2) -> int:
    """Bytes autograd saves in one forward of ``batch`` samples, measured at ``probe`` and scaled."""
    from clipx.data.tokenizer import Tokenizer
    from clipx.models import image_size

    size = image_size(config.model)
    tokens = Tokenizer(config.model)(["a photo of something"] * probe)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # weights saved for backward are not activations
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if config.train.precision == "bf16"
                else contextlib.nullcontext())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(torch.randn(probe, 3, size, size), tokens)
    return sum(seen.values()) * batch // probe


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size:.1f} GiB"


@dataclass
class LoaderPlan:
    """How many loader cores a training rate needs, from the loader's rate on one core, measured on
    the config's own shards with its own transform, decode setting and collation."""

    per_core: float  # samples/s that one core decodes, augments, tokenizes and collates
    target: float  # samples/s over all ranks
    world_size: int
    measured: int  # samples timed
    decode: str  # data.decode

    @property
    def cores(self) -> int:
        return math.ceil(self.target / self.per_core)

    @property
    def workers_per_rank(self) -> int:
        return math.ceil(self.target / self.world_size / self.per_core)

    def table(self) -> str:
        shared = ("; the device decodes the JPEGs, which this rate leaves out" if self.decode == "device" else "")
        return "\n".join([
            f"loader: {self.per_core:.0f} samples/s per core, measured on data.train ({self.measured} samples, "
            f"data.decode={self.decode}{shared})",
            f"  a target of {self.target:.0f} samples/s over {self.world_size} rank(s) needs {self.cores} loader "
            f"core(s) in all; spread over the ranks: data.workers={self.workers_per_rank} per rank "
            f"({self.workers_per_rank * self.world_size} in all), each on a core of its own besides the "
            f"cores the training processes use"])


def plan_loader(config: Config, target: float, world_size: int, samples: int = 512) -> LoaderPlan:
    """Time the training loader of ``config`` (its method's transform and collation, on its shards)
    in this process on one thread for ``samples`` samples after a first batch, and size it for
    ``target`` samples/s over ``world_size`` ranks."""
    import time

    from clipx.data.pipeline import SharedEpoch, build_train_loader
    from clipx.data.skips import SkipCounter
    from clipx.methods import method_of

    batch = min(config.train.batch_size, samples)
    data = dataclasses.replace(config.data, workers=0, train_num_samples=batch * (samples // batch + 2))
    method = method_of(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as one loader worker has
    try:
        loader, _ = build_train_loader(data, batch, method.train_transform(config), method.collate(config),
                                       config.train.seed, 0, 1, SharedEpoch(), SkipCounter())
        batches = iter(loader)
        next(batches)  # opens the first shard and fills the shuffle buffer's first draw
        started = time.perf_counter()
        for _ in range(samples // batch):
            next(batches)
        per_core = (samples // batch) * batch / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return LoaderPlan(per_core, target, world_size, (samples // batch) * batch, config.data.decode)
