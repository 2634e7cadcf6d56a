"""Everything a training run needs, built once from a Config: the method, its model and objective,
the optimizer and schedule, the data stream, the guards and logs."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from clipx.compat.torch import set_lr_lambdas
from clipx.config import Config, config_to_dict
from clipx.data.crops import DeviceImages
from clipx.data.keep import load_keep
from clipx.data.remote import RemoteOptions
from clipx.data.shards import expand_shards
from clipx.dist import unwrap
from clipx.errors import ClipxError
from clipx.methods import Method, Objective, method_of
from clipx.models import image_size
from clipx.models.attention import AttentionKernel
from clipx.models.lock import lock_towers
from clipx.models.patch_dropout import PatchDropoutSchedule
from clipx.models.pretrained import init_from_pretrained
from clipx.templates import load_templates
from clipx.train.checkpoint import Stateful
from clipx.train.ema import ModelEma
from clipx.train.guards import UpdateGuard
from clipx.train.metrics_log import MetricsLog, SampleKeysLog
from clipx.train.optim import build_optimizer
from clipx.train.runtime import launched_processes, make_accelerator
from clipx.train.schedule import cosine_with_warmup
from clipx.train.sharded_init import build_sharded_model
from clipx.train.sharding import autocast_forward, check_sharding, shard_model, use_sharded_scaler
from clipx.train.stream import TrainStream


@dataclass
class Trainer:
    """Everything a training step needs, built once by ``build_trainer``."""

    config: Config
    method: Method
    accelerator: Accelerator
    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: TrainStream
    total_steps: int
    log: MetricsLog
    guard: UpdateGuard
    keys_log: SampleKeysLog | None = None
    attention: AttentionKernel = field(default_factory=AttentionKernel)
    # False when the caller formed the process group before the run (a script training several
    # runs in one torchrun): then the run must leave the group alive for the caller.
    owns_process_group: bool = True
    compiled: bool = False  # torch.compile wraps the model (train.compile)
    patch_dropout: PatchDropoutSchedule | None = None  # FLIP's unmasked tuning at the end of the run
    ema: ModelEma | None = None  # train.ema_decay: the moving average of the trainable weights

    @functools.cached_property
    def device_images(self) -> DeviceImages:
        """What finishes each batch on the device: decodes, crops and normalises its images."""
        m = self.config.model
        return DeviceImages(m.image_mean, m.image_std, image_size(m))

    def stateful(self) -> Stateful:
        """What checkpoints save and restore besides the counters."""
        return Stateful(unwrap(self.model), self.optimizer, self.scheduler, self.objective, self.accelerator.scaler,
                        self.stream, self.ema)


def total_steps(train_cfg, batches_per_epoch: int) -> int:
    """Optimizer steps for the run: ``train.steps`` if set, else ``epochs`` worth of batches."""
    if train_cfg.steps is not None:
        return train_cfg.steps
    return max(1, train_cfg.epochs * batches_per_epoch // train_cfg.accum_steps)


def retime_epoch_run(trainer: "Trainer", batches_done: int) -> None:
    """The total steps of a resumed epoch-counted run (``train.steps`` unset): the micro-batches
    done, plus the rest of the current epoch and the remaining epochs at this run's size. Unchanged
    for a run resumed as it was saved; after a resume on another number of processes (or loader
    workers, or batch size) epochs have another length, and the cosine schedule continues from the
    current step towards the new total."""
    tcfg, stream = trainer.config.train, trainer.stream
    if tcfg.steps is not None or stream.resume_point is None:
        return
    epoch, in_epoch = stream.resume_point
    rest = stream.epoch_length(epoch) - in_epoch + max(tcfg.epochs - epoch - 1, 0) * stream.batches_per_epoch
    trainer.total_steps = max(1, (batches_done + rest) // tcfg.accum_steps)
    schedule = functools.partial(cosine_with_warmup, total_steps=trainer.total_steps, warmup_steps=tcfg.warmup_steps)
    # LambdaLR keeps one multiplier per parameter group (weight decay, layer decay): all follow the new total.
    set_lr_lambdas(trainer.scheduler, schedule)


def check_inputs(config: Config) -> Method:
    """Fail before any process group forms, not after training, when the method cannot train this
    config, or the training or validation shards, the keep-list, the initial weights or the templates
    are unusable.
    Returns the method."""
    method = method_of(config)
    options = RemoteOptions.from_config(config.data)
    urls = expand_shards(config.data.train, "data.train", allow_pipe=config.data.allow_pipe_urls, options=options)
    keep = load_keep(config.data)
    if keep is not None:
        keep.shards(urls)  # refuses a keep-list that keeps no sample of data.train
    method.check_processes(config, launched_processes(), "cuda" if torch.accelerator.is_available() else "cpu")
    check_sharding(config.train, "cuda" if torch.accelerator.is_available() else "cpu")
    if config.model.pretrained and not Path(config.model.pretrained).exists():
        raise ClipxError(f"model.pretrained {config.model.pretrained} does not exist")
    if config.data.val and evaluates_during_training(method, config):
        expand_shards(config.data.val, "data.val", options=options)
        if config.eval.zero_shot:
            load_templates(config.eval.templates)
    return method


def evaluates_during_training(method: Method, config: Config) -> bool:
    """Whether data.val is evaluated during training: by the zero-shot and retrieval evaluators,
    for the methods they apply to. Image-only methods are probed after training instead."""
    e = config.eval
    return bool(config.data.val) and ((e.zero_shot and "zero_shot" in method.evaluators)
                                      or (e.retrieval and "retrieval" in method.evaluators))


def build_model_eagerly(method: Method, config: Config, accelerator: Accelerator,
                        pretrained: bool = True, device: torch.device | str | None = None) -> torch.nn.Module:
    """The whole model on ``device`` (default: this process's): built, initialised from
    ``model.pretrained`` (if ``pretrained``), locked, prepared by the method."""
    model = method.build_model(config)
    if pretrained and config.model.pretrained:
        init_from_pretrained(model, config.model.pretrained, config.model.text_tower)
    lock_towers(model, config.model)
    model = method.prepare(model, accelerator, config).to(device or accelerator.device)
    if config.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_trainer(config: Config) -> Trainer:
    """Check the config and its inputs, then form the processes and build everything a run needs."""
    tcfg = config.train
    method = check_inputs(config)
    owns_process_group = not torch.distributed.is_initialized()
    accelerator = make_accelerator(tcfg.precision, tcfg.collective_timeout_s, tcfg.fp16_init_scale)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    set_seed(tcfg.seed)
    eager = functools.partial(build_model_eagerly, method, config, accelerator)
    if tcfg.sharding == "fsdp" and not method.prepare_reads_weights:
        # Only each rank's rows are materialised (train/sharded_init.py), before the optimizer exists
        # (sharding replaces the parameters). The reference rank 0 streams them from stays in host
        # memory: a model sharded because it does not fit one device must not be built whole on one.
        model = build_sharded_model(method, config, accelerator, functools.partial(eager, pretrained=False, device="cpu"))
    else:
        model = eager()
        if tcfg.sharding == "fsdp":
            model = shard_model(model, tcfg, accelerator.device.type, accelerator.num_processes)
    optimizer = build_optimizer(model, tcfg)
    ema = ModelEma(unwrap(model), tcfg.ema_decay) if tcfg.ema_decay is not None else None  # the initial weights
    stream = TrainStream(config.data, method.train_transform(config), tcfg.batch_size, tcfg.seed,
                         method.collate(config), accelerator.process_index, accelerator.num_processes)
    steps = total_steps(tcfg, stream.batches_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(cosine_with_warmup, total_steps=steps, warmup_steps=tcfg.warmup_steps))
    # The scheduler is stepped by us once per optimizer step; Accelerate's wrapper would step it once
    # per process. Checkpoints carry it (see Trainer.stateful).
    if tcfg.sharding == "fsdp":  # Accelerate would wrap a sharded model in DDP: it gets the optimizer only
        if accelerator.scaler is not None:
            use_sharded_scaler(accelerator, tcfg.fp16_init_scale)
        optimizer = accelerator.prepare(optimizer)
        if tcfg.precision != "no":
            autocast_forward(model, accelerator)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    compiled = tcfg.compile
    if compiled:
        # Compile the DDP-wrapped model: torch.compile then splits graphs at DDP's gradient buckets so
        # communication still overlaps backward. The first step includes compilation. dynamic=False:
        # one static graph per input shape (trimmed token batches come in a few lengths). Dynamo's
        # default turns a shape dynamic when a second one appears, so which graph served a length
        # would depend on the order lengths came in, and a resumed run would not repeat it bitwise.
        model = torch.compile(model, dynamic=False)
    objective = method.objective(model, config)
    log = MetricsLog(tcfg.output_dir, enabled=accelerator.is_main_process, wandb_project=tcfg.wandb_project,
                     config=config_to_dict(config))
    guard = UpdateGuard(tcfg.max_nonfinite_steps, tcfg.loss_spike_factor, tcfg.loss_spike_warmup)
    keys_log = SampleKeysLog(tcfg.output_dir, accelerator.process_index) if tcfg.log_sample_keys else None
    m = config.model
    patch_dropout = (PatchDropoutSchedule(unwrap(model), m.patch_dropout, m.patch_dropout_unmasked_steps)
                     if m.patch_dropout and m.patch_dropout_unmasked_steps else None)
    return Trainer(config, method, accelerator, model, objective, optimizer, scheduler, stream, steps, log,
                   guard, keys_log, AttentionKernel(tcfg.attention), owns_process_group, compiled, patch_dropout, ema)
