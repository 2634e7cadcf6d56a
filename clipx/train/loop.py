"""The training loop: build everything from a Config, then step, log, evaluate and checkpoint.

The loop is method-agnostic: it calls ``objective(batch)``, backpropagates ``out["loss"]``, lets the
update guard decide, steps if allowed, and calls ``objective.end_step(step, total_steps, accepted)``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from clipx import dist
from clipx.config import Config, config_to_dict, dump_config
from clipx.data.shards import expand_shards
from clipx.data.tokenizer import Tokenizer
from clipx.data.transforms import image_transform
from clipx.errors import ClipxError
from clipx.models import image_size
from clipx.models.lock import lock_towers
from clipx.models.pretrained import init_from_pretrained
from clipx.objectives import IMAGE_TEXT, VIEWS, build_model, build_objective, objective_spec
from clipx.objectives.clip import unwrap
from clipx.ssl.batchnorm import check_sync_batchnorm, sync_batchnorm
from clipx.train.checkpoint import (Stateful, TrainerState, load_training_state, remove_partial_checkpoints,
                                    resolve_resume, save_checkpoint)
from clipx.train.guards import StopRequest, UpdateGuard
from clipx.train.host_memory import retain_freed_host_memory
from clipx.train.metrics_log import MetricsLog, SampleKeysLog
from clipx.train.optim import build_optimizer
from clipx.train.runtime import launched_processes, make_accelerator
from clipx.train.schedule import cosine_with_warmup
from clipx.train.skips import SkipLedger, summed_over_ranks
from clipx.train.step import BufferSnapshot, micro_batch_gradients
from clipx.train.stream import TrainStream


@dataclass
class Trainer:
    """Everything a training step needs, built once by ``build_trainer``."""

    config: Config
    accelerator: Accelerator
    model: torch.nn.Module
    objective: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokenizer: Tokenizer
    stream: TrainStream
    total_steps: int
    log: MetricsLog
    guard: UpdateGuard
    skips: SkipLedger
    keys_log: SampleKeysLog | None = None
    # False when the caller formed the process group before the run (a script training several
    # runs in one torchrun): then the run must leave the group alive for the caller.
    owns_process_group: bool = True

    def stateful(self) -> Stateful:
        """What checkpoints save and restore besides the counters."""
        return Stateful(unwrap(self.model), self.optimizer, self.scheduler, self.objective, self.accelerator.scaler)


def total_steps(train_cfg, batches_per_epoch: int) -> int:
    """Optimizer steps for the run: ``train.steps`` if set, else ``epochs`` worth of batches."""
    if train_cfg.steps is not None:
        return train_cfg.steps
    return max(1, train_cfg.epochs * batches_per_epoch // train_cfg.accum_steps)


def train_transform(config: Config, inputs: str):
    """PIL image -> what the objective's batches hold: one tensor, or a list of augmented views."""
    size, mean, std = image_size(config.model), config.model.image_mean, config.model.image_std
    if inputs == IMAGE_TEXT:
        return image_transform(size, mean, std, train=True, crop_scale_min=config.data.crop_scale_min)
    from clipx.ssl.views import ssl_views

    return ssl_views(config.ssl, size, mean, std, config.data.crop_scale_min)


def check_inputs(config: Config) -> None:
    """Fail before any process group forms, not after training, when the training or validation
    shards, the initial weights or the templates are unusable."""
    expand_shards(config.data.train, "data.train", allow_pipe=config.data.allow_pipe_urls)
    if objective_spec(config.loss.name).inputs == VIEWS and config.ssl.batchnorm == "sync":
        check_sync_batchnorm(launched_processes(), "cuda" if torch.accelerator.is_available() else "cpu")
    if config.model.pretrained and not Path(config.model.pretrained).exists():
        raise ClipxError(f"model.pretrained {config.model.pretrained} does not exist")
    if not config.data.val:
        return
    from eval.templates import load_templates

    expand_shards(config.data.val, "data.val")
    if config.eval.zero_shot:
        load_templates(config.eval.templates)


def build_trainer(config: Config) -> Trainer:
    tcfg = config.train
    check_inputs(config)
    owns_process_group = not torch.distributed.is_initialized()
    accelerator = make_accelerator(tcfg.precision, tcfg.collective_timeout_s, tcfg.fp16_init_scale)
    if tcfg.retain_host_memory:
        retain_freed_host_memory()  # before the loader workers fork, so that they inherit it
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    set_seed(tcfg.seed)
    spec = objective_spec(config.loss.name)
    model = build_model(config)
    if config.model.pretrained:
        init_from_pretrained(model, config.model.pretrained, config.model.text_tower)
    lock_towers(model, config.model)
    if spec.inputs == VIEWS and config.ssl.batchnorm == "sync":
        model = sync_batchnorm(model, accelerator)
    model = model.to(accelerator.device)
    if tcfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = Tokenizer(config.model) if spec.inputs == IMAGE_TEXT else None
    optimizer = build_optimizer(model, tcfg)
    stream = TrainStream(config.data, train_transform(config, spec.inputs), tcfg.batch_size, tcfg.seed, tokenizer,
                         accelerator.process_index, accelerator.num_processes)
    steps = total_steps(tcfg, stream.batches_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(cosine_with_warmup, total_steps=steps, warmup_steps=tcfg.warmup_steps))
    # The scheduler is stepped by us once per optimizer step; Accelerate's wrapper would step it once
    # per process. Checkpoints carry it (see Trainer.stateful).
    model, optimizer = accelerator.prepare(model, optimizer)
    if tcfg.compile:
        # Compile the DDP-wrapped model: torch.compile then splits graphs at DDP's gradient buckets so
        # communication still overlaps backward. The first step includes compilation.
        model = torch.compile(model)
    objective = build_objective(model, config)
    log = MetricsLog(tcfg.output_dir, enabled=accelerator.is_main_process, wandb_project=tcfg.wandb_project,
                     config=config_to_dict(config))
    guard = UpdateGuard(tcfg.max_nonfinite_steps, tcfg.loss_spike_factor, tcfg.loss_spike_warmup)
    keys_log = SampleKeysLog(tcfg.output_dir, accelerator.process_index) if tcfg.log_sample_keys else None
    return Trainer(config, accelerator, model, objective, optimizer, scheduler, tokenizer, stream, steps, log,
                   guard, SkipLedger(config.data.max_skip_fraction), keys_log, owns_process_group)


def to_device(batch: dict, device) -> dict:
    """Move a batch's tensors, and lists of tensors (views), to ``device``; keys stay on the host."""
    def move(value):
        if torch.is_tensor(value):
            return value.to(device, non_blocking=True)
        if isinstance(value, list) and value and torch.is_tensor(value[0]):
            return [v.to(device, non_blocking=True) for v in value]
        return value

    return {k: move(v) for k, v in batch.items()}


def train_step(t: Trainer, batches, step: int) -> dict:
    """Optimizer step number ``step`` (1-based) over ``train.accum_steps`` micro-batches; returns
    detached metrics, and the learning rate this step's update used."""
    micro_batches = []
    for _ in range(t.config.train.accum_steps):
        epoch, batch = next(batches)
        if t.keys_log is not None:
            t.keys_log.write(step, batch["key"])
        micro_batches.append(to_device(batch, t.accelerator.device))
    lr = t.scheduler.get_last_lr()[0]
    buffers = BufferSnapshot(unwrap(t.model))  # BatchNorm statistics move in forward: undone if refused
    out = micro_batch_gradients(t.accelerator, t.model, t.objective, micro_batches, t.config.train.accum_mode)
    # The norm is needed anyway to decide on the step; with no clipping configured, clip at infinity.
    # Under fp16 this also unscales the gradients, recording the scaler's overflow check.
    grad_norm = t.accelerator.clip_grad_norm_(t.model.parameters(), t.config.train.grad_clip_norm or float("inf"))
    scaler = t.accelerator.scaler
    accepted = t.guard.allows_update(out["loss"], grad_norm, step,
                                     scaler.get_scale() if scaler is not None else None)  # same on every rank
    if accepted:
        t.optimizer.step()  # under fp16 Accelerate's wrapper also calls scaler.update()
    else:
        buffers.restore()
        if scaler is not None:
            scaler.update()  # the refused step's overflow check still backs the scale off
    t.objective.end_step(step, t.total_steps, accepted)
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    # Tensors, not floats: reading them forces a device sync, so the caller reads only when logging.
    return {"loss": out["loss"], "grad_norm": grad_norm, "epoch": epoch, "lr": lr, **out["metrics"]}


def evaluate_now(t: Trainer, step: int) -> dict | None:
    """Zero-shot and retrieval on data.val, sharded across all ranks (each embeds its share).

    Image-only objectives have no text tower: they are evaluated afterwards with kNN and linear probes.
    """
    if t.tokenizer is None or not t.config.data.val or not (t.config.eval.zero_shot or t.config.eval.retrieval):
        return None
    from eval.run import evaluate, flatten_metrics

    e = t.config.eval
    results = evaluate(unwrap(t.model), t.tokenizer, t.config.model, t.config.data.val,
                       t.accelerator.device, e.zero_shot, e.retrieval, e.templates, e.label_key, e.batch_size,
                       t.config.data.workers)
    t.log.log(step, "eval", flatten_metrics(results))
    return results


def write_run_plots(run_dir) -> None:
    """PNG plots beside the metrics log. A plotting failure is reported, never fatal: the weights
    and metrics are already saved."""
    from clipx.report.plots import write_plots

    try:
        write_plots(run_dir)
    except Exception as error:  # matplotlib or a font problem must not fail a finished run
        print(f"warning: could not draw the run's plots: {str(error).splitlines()[0] if str(error) else error}")


def train(config: Config, resume: str | None = None) -> dict:
    """Train as ``config`` says; returns (and writes to summary.json) the run's summary."""
    return fit(build_trainer(config), resume)


def fit(t: Trainer, resume: str | None = None) -> dict:
    """Run a built trainer to its last step (resuming from ``resume``: a checkpoint path or "latest")."""
    config = t.config
    stop = StopRequest(config.train.preempt_grace_s)
    try:
        state = TrainerState(world_size=t.accelerator.num_processes)
        if t.accelerator.is_main_process:
            for stray in remove_partial_checkpoints(config.train.output_dir):
                t.accelerator.print(f"removed {stray}, left by a save that did not finish")
        t.accelerator.wait_for_everyone()
        path = resolve_resume(config.train.output_dir, resume) if resume else None
        if path is not None:
            state = load_training_state(t.accelerator, path, t.stateful())
            t.guard.load_state_dict(state.guard)
            t.skips.epochs = dict(state.skips_by_epoch)
            t.accelerator.print(f"resumed from {path} at step {state.step}")
        elif resume:
            t.accelerator.print(f"--resume {resume}: no checkpoint in {config.train.output_dir} yet; starting at step 0")
        if t.keys_log is not None:
            t.keys_log.open(after_step=state.step)
        if t.accelerator.is_main_process:
            dump_config(config, Path(config.train.output_dir) / "config.yaml")
        with dist.collective_timeout_guard(config.train.collective_timeout_s):
            summary = run_loop(t, state, stop)
        if t.accelerator.is_main_process:
            (Path(config.train.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
            write_run_plots(config.train.output_dir)
    finally:
        stop.close()
        t.log.close()
        if t.keys_log is not None:
            t.keys_log.close()
        if t.owns_process_group:
            t.accelerator.end_training()  # destroys the process group this run formed
        # Accelerate keeps its settings in a process-wide singleton; forget them (not the process
        # group) so that another run in this process may choose a different precision.
        AcceleratorState._reset_state(reset_partial_state=False)
    return summary


class Throughput:
    """Samples per second over training time only: evaluation and checkpoint pauses are excluded."""

    def __init__(self, samples_per_step: int, step: int):
        self.samples_per_step = samples_per_step
        self.start = self.window_start = time.perf_counter()
        self.window_step = step
        self.paused_seconds = 0.0

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        yield
        pause = time.perf_counter() - began
        self.paused_seconds += pause
        self.window_start += pause

    def window_rate(self, step: int) -> float:
        """Rate since the previous call, then start a new window."""
        now = time.perf_counter()
        rate = (step - self.window_step) * self.samples_per_step / max(now - self.window_start, 1e-9)
        self.window_start, self.window_step = now, step
        return rate

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.start

    def train_seconds(self) -> float:
        return self.wall_seconds() - self.paused_seconds


def log_train_step(t: Trainer, state: TrainerState, out: dict, clock: Throughput, bar) -> dict:
    """Read the step's scalars (the one device sync per log interval) and write them out.

    Values are averaged over ranks: with gathered negatives each rank's loss covers only its rows.
    """
    values = {k: float(t.accelerator.reduce(v.detach().float(), reduction="mean")) if torch.is_tensor(v) else v
              for k, v in out.items()}
    values.update(epoch=state.epoch, samples_per_second=clock.window_rate(state.step),
                  skipped=t.stream.skipped.total(), refused_steps=t.guard.refused)
    t.log.log(state.step, "train", values)
    bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
    return values


@dataclass
class LoopRecord:
    """What the loop reports at the end: the latest logged values, evaluation and checkpoint."""

    logged: dict = field(default_factory=dict)
    evaluation: dict | None = None
    checkpoint: Path | None = None
    first_step_seconds: float = 0.0
    preempted: bool = False  # stopped early by SIGTERM/SIGINT, after saving


def run_step(t: Trainer, state: TrainerState, batches, clock: Throughput, bar, record: LoopRecord,
             stop: StopRequest) -> None:
    """One optimizer step, then whatever logging, checkpointing and evaluation falls due; on a stop
    request (any rank's), a checkpoint of this step and no evaluation."""
    cfg = t.config
    out = train_step(t, batches, state.step + 1)
    state.step += 1
    state.batches += cfg.train.accum_steps
    state.epoch = int(out.pop("epoch"))
    bar.update(1)
    t.skips.settle(t.stream.take_finished(), t.accelerator.device)
    finished = state.step == t.total_steps
    record.preempted = not finished and stop.agreed(t.accelerator.device)
    if state.step % cfg.train.log_every == 0 or finished or record.preempted:
        record.logged = log_train_step(t, state, out, clock, bar)
        t.skips.judge_running(state.epoch, t.stream.skipped.counts(), t.accelerator.device)
    with clock.paused():
        # Save before evaluating, so an evaluation failure never costs the trained weights.
        if state.step % cfg.train.checkpoint_every == 0 or finished or record.preempted:
            state.guard, state.skips_by_epoch = t.guard.state_dict(), dict(t.skips.epochs)
            if t.keys_log is not None:
                t.keys_log.flush()  # the keys of every saved step are on disk with the checkpoint
            record.checkpoint = save_checkpoint(t.accelerator, cfg.train.output_dir, cfg, state, t.stateful(),
                                                keep=cfg.train.keep_checkpoints)
        if (cfg.eval.every and state.step % cfg.eval.every == 0 and not record.preempted) or finished:
            record.evaluation = evaluate_now(t, state.step)


def run_loop(t: Trainer, state: TrainerState, stop: StopRequest) -> dict:
    cfg = t.config
    clock = Throughput(cfg.train.batch_size * t.accelerator.num_processes * cfg.train.accum_steps, state.step)
    batches = t.stream.batches(state.batches)
    bar = tqdm(total=t.total_steps, initial=state.step, disable=not t.accelerator.is_main_process,
               unit="step", dynamic_ncols=True)
    first_step, record = state.step, LoopRecord()
    with bar:  # closed on errors too, so a failure message starts on its own line
        while state.step < t.total_steps and not record.preempted:
            started = time.perf_counter()
            run_step(t, state, batches, clock, bar, record, stop)
            if state.step == first_step + 1:
                # Worker start-up, first decode and (with train.compile) compilation: reported apart.
                record.first_step_seconds = time.perf_counter() - started
    return {
        "steps": state.step,
        "epochs": state.epoch + 1,
        "wall_seconds": clock.wall_seconds(),
        "train_seconds": clock.train_seconds(),
        "samples_per_second": (state.step - first_step) * clock.samples_per_step / max(clock.train_seconds(), 1e-9),
        "final_loss": record.logged.get("loss"),
        "checkpoint": str(record.checkpoint) if record.checkpoint else None,
        "eval": record.evaluation,
        # Inputs skipped by reason, summed over ranks: finished epochs, and the run's epochs overall
        # (the last one possibly in progress).
        "skipped_by_epoch": t.skips.epochs,
        "skipped": skipped_overall(t),
        "world_size": t.accelerator.num_processes,
        "first_step_seconds": record.first_step_seconds,
        "preempted": record.preempted,
        "nonfinite_steps": t.guard.nonfinite,
        "loss_spike_steps": t.guard.spikes,
        "overflow_steps": t.guard.overflows,
    }


def skipped_overall(t: Trainer) -> dict[str, int]:
    """Finished epochs' counts plus the epoch in progress (an all-reduce: every rank calls it)."""
    running = summed_over_ranks(t.stream.skipped.counts(), t.accelerator.device)
    finished = t.skips.totals()
    return {name: finished.get(name, 0) + value for name, value in running.items()}
