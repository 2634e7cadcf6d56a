"""The training loop: fetch -> step (forward, backward, guard, update) -> log -> checkpoint -> evaluate.

The loop is method-agnostic: it calls ``objective(batch)``, backpropagates ``out["loss"]``, lets the
update guard decide, steps if allowed, and calls ``objective.end_step(step, total_steps, verdict)``.
Everything it works with is built once by clipx.train.build. Evaluation during training and the
run's plots are the application's: whoever starts the run hands them over as ``RunHooks`` (the
command line's come from clipx/apps/run_hooks.py); training imports no evaluator or report.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from clipx import dist
from clipx.config import Config, dump_config
from clipx.dist import unwrap
from clipx.train.build import Trainer, build_trainer, evaluates_during_training, retime_epoch_run
from clipx.train.checkpoint import (
    TrainerState,
    load_training_state,
    remove_partial_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from clipx.train.guards import StopRequest
from clipx.train.host_memory import release_host_memory, tune_host_memory
from clipx.train.optim import step_optimizer
from clipx.train.runtime import threads_restored
from clipx.train.step import BufferSnapshot, micro_batch_gradients
from clipx.train.throughput import Throughput

__all__ = ["train", "fit", "build_trainer", "Trainer", "RunHooks", "Evaluation"]


class Evaluation(NamedTuple):
    """What an in-training evaluator returns: ``results`` as the summary's "eval" holds them, and the
    same as flat ``metrics`` (``zero_shot.top1``...) for metrics.jsonl."""

    results: dict
    metrics: dict[str, float]


@dataclass(frozen=True)
class RunHooks:
    """What the application that starts a run hands the loop (clipx/apps/run_hooks.py builds the
    command line's). ``evaluate(model, trainer)``: data.val scored with ``model`` (the trained
    weights, or their EMA), called on every rank when ``evaluates_during_training``; ``plots(run_dir)``:
    the run's plots, drawn by the main process at the end when train.plots is set. Without them a
    run neither evaluates during training nor draws plots, and says so."""

    evaluate: Callable[[torch.nn.Module, Trainer], Evaluation] | None = None
    plots: Callable[[Path], object] | None = None


def train(config: Config, resume: str | None = None, hooks: RunHooks | None = None) -> dict:
    """Train as ``config`` says; returns (and writes to summary.json) the run's summary. torch's thread
    count, which building the run sets, is put back when it ends (``fit`` undoes its malloc tuning)."""
    with threads_restored():
        return fit(build_trainer(config), resume, hooks)


def fit(trainer: Trainer, resume: str | None = None, hooks: RunHooks | None = None) -> dict:
    """Run a built trainer to its last step (resuming from ``resume``: a checkpoint path or "latest").
    Building the trainer set torch's thread count (train.threads); ``train`` puts it back, a caller of
    ``build_trainer`` and ``fit`` does so itself (``runtime.threads_restored``)."""
    config, accelerator, hooks = trainer.config, trainer.accelerator, hooks or RunHooks()
    if hooks.evaluate is None and evaluates_during_training(trainer.method, config):
        accelerator.print("data.val is not evaluated during training: this run was started without an evaluator "
                          "(clipx.train.loop.train(config, hooks=...); `clipx train` passes one)")
    stop = StopRequest(config.train.preempt_grace_s)
    # Before the loader workers fork (they inherit it); undone when the run ends.
    tuned_host_memory = tune_host_memory(config.train, accelerator.device.type)
    try:
        state = restore(trainer, resume)
        if trainer.keys_log is not None:
            trainer.keys_log.open(after_step=state.step)
        if accelerator.is_main_process:
            dump_config(config, Path(config.train.output_dir) / "config.yaml")
        with dist.collective_timeout_guard(config.train.collective_timeout_s):
            summary = run_loop(trainer, state, stop, hooks.evaluate)
        if accelerator.is_main_process:
            (Path(config.train.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
            if config.train.plots:
                write_run_plots(config.train.output_dir, hooks.plots)
    finally:
        stop.close()
        trainer.log.close()
        if trainer.keys_log is not None:
            trainer.keys_log.close()
        if trainer.owns_process_group:
            accelerator.end_training()  # destroys the process group this run formed
        if tuned_host_memory:
            release_host_memory()
    return summary


def restore(trainer: Trainer, resume: str | None) -> TrainerState:
    """The state to start from: a fresh one, or the checkpoint ``resume`` names (after clearing what
    an interrupted save left behind)."""
    accelerator, output_dir = trainer.accelerator, trainer.config.train.output_dir
    if accelerator.is_main_process:
        for stray in remove_partial_checkpoints(output_dir):
            accelerator.print(f"removed {stray}, left by a save that did not finish")
    accelerator.wait_for_everyone()
    path = resolve_resume(output_dir, resume) if resume else None
    if path is None:
        if resume:
            accelerator.print(f"--resume {resume}: no checkpoint in {output_dir} yet; starting at step 0")
        return TrainerState(world_size=accelerator.num_processes)
    state = load_training_state(accelerator, path, trainer.stateful())
    retime_epoch_run(trainer, state.batches)
    trainer.guard.load_state_dict(state.guard)
    trainer.stream.ledger.epochs = dict(state.skips_by_epoch)
    trainer.attention.resume_with(state.attention_kernel)
    accelerator.print(f"resumed from {path} at step {state.step}")
    return state


@dataclass
class LoopRecord:
    """What the loop reports at the end: the latest logged values, evaluation and checkpoint."""

    first_step: int  # the step the run (or its resumed part) started from
    logged: dict | None = None
    evaluation: dict | None = None
    checkpoint: Path | None = None
    first_step_seconds: float = 0.0
    preempted: bool = False  # stopped early by SIGTERM/SIGINT, after saving


def run_loop(trainer: Trainer, state: TrainerState, stop: StopRequest, evaluate=None) -> dict:
    """Step until ``train.steps`` (or a stop request, which every rank honours at the same step);
    ``evaluate``: the run's evaluator (``RunHooks.evaluate``), if it has one."""
    train_cfg, eval_every = trainer.config.train, trainer.config.eval.every
    device = trainer.accelerator.device
    clock = Throughput(train_cfg.batch_size * trainer.accelerator.num_processes * train_cfg.accum_steps, state.step)
    batches = trainer.stream.batches(state.batches)
    record = LoopRecord(first_step=state.step)
    bar = tqdm(total=trainer.total_steps, initial=state.step, disable=not trainer.accelerator.is_main_process,
               unit="step", dynamic_ncols=True)
    with bar:  # closed on errors too, so a failure message starts on its own line
        while state.step < trainer.total_steps and not record.preempted:
            started = time.perf_counter()
            epoch, micro_batches = fetch(trainer, batches, state.step + 1)
            if trainer.patch_dropout is not None:
                trainer.patch_dropout.before_step(state.step + 1, trainer.total_steps)
            out = train_step(trainer, micro_batches, state.step + 1)
            trainer.guard.check()  # the previous step's counters: by now on the host without a stall
            state.step, state.batches, state.epoch = state.step + 1, state.batches + len(micro_batches), epoch
            bar.update(1)
            finished = state.step == trainer.total_steps
            record.preempted = not finished and stop.agreed(device)
            log_due = state.step % train_cfg.log_every == 0 or finished or record.preempted
            trainer.stream.account_skips(state.epoch, device, judge_running=log_due)
            if log_due:
                record.logged = log_train_step(trainer, state, out, clock, bar)
            with clock.paused():
                # Save before evaluating, so an evaluation failure never costs the trained weights.
                if state.step % train_cfg.checkpoint_every == 0 or finished or record.preempted:
                    record.checkpoint = save(trainer, state)
                if (eval_every and state.step % eval_every == 0 and not record.preempted) or finished:
                    record.evaluation = evaluate_now(trainer, state.step, evaluate)
            if state.step == record.first_step + 1:
                # Worker start-up, first decode and (with train.compile) compilation: reported apart.
                record.first_step_seconds = time.perf_counter() - started
    return run_summary(trainer, state, clock, record)


def fetch(trainer: Trainer, batches, step: int) -> tuple[int, list[dict]]:
    """(epoch, the ``train.accum_steps`` micro-batches of optimizer step ``step``, on the device)."""
    micro_batches = []
    for _ in range(trainer.config.train.accum_steps):
        epoch, batch = next(batches)
        if trainer.keys_log is not None:
            trainer.keys_log.write(step, batch["key"])
        # The images leave the loader as uint8 (or still encoded): normalised (decoded) on the device.
        micro_batches.append(trainer.device_images(to_device(batch, trainer.accelerator.device), trainer.accelerator.device))
    return epoch, micro_batches


def to_device(batch: dict, device) -> dict:
    """Move a batch's tensors, and lists of tensors (views), to ``device``; keys stay on the host."""
    def move(value):
        if torch.is_tensor(value):
            return value.to(device, non_blocking=True)
        if isinstance(value, list) and value and torch.is_tensor(value[0]):
            return [v.to(device, non_blocking=True) for v in value]
        return value

    return {k: move(v) for k, v in batch.items()}


def train_step(trainer: Trainer, micro_batches: list[dict], step: int) -> dict:
    """Optimizer step number ``step`` (1-based): gradients of the micro-batches, the guard's verdict,
    the update if allowed. Returns detached metrics and the learning rate this step's update used."""
    accelerator, scaler = trainer.accelerator, trainer.accelerator.scaler
    lr = max(trainer.scheduler.get_last_lr())  # the schedule's own: layer decay scales other groups below it
    buffers = BufferSnapshot(unwrap(trainer.model))  # BatchNorm statistics move in forward: undone if refused
    if not trainer.attention.settled:
        settle_attention(trainer, micro_batches[0], buffers)
    with trainer.attention.scope():
        out = micro_batch_gradients(accelerator, trainer.model, trainer.objective, micro_batches,
                                    trainer.config.train.accum_mode)
    # The norm is needed anyway to decide on the step; with no clipping configured, clip at infinity.
    # Under fp16 this also unscales the gradients, recording the scaler's overflow check.
    # Sharded gradients give a DTensor norm: the global one, over every rank's shards (computed in
    # host memory when FSDP offloads them there).
    grad_norm = dist.full_tensor(accelerator.clip_grad_norm_(trainer.model.parameters(),
                                                             trainer.config.train.grad_clip_norm or float("inf")))
    # non_blocking: a norm FSDP computed in host memory (CPU offload) goes to the device without waiting.
    grad_norm = grad_norm.to(out["loss"].device, non_blocking=True)
    # The same verdict on every rank, as a device tensor: nothing below waits for it on a GPU
    # (except under fp16, whose scaler reads its scale anyway, and objectives that branch on it).
    verdict = trainer.guard.judge(out["loss"], grad_norm, step, scaler.get_scale() if scaler is not None else None)
    step_optimizer(trainer.optimizer, verdict, scaler)  # under fp16 this also calls scaler.update()
    if trainer.ema is not None:
        trainer.ema.update(verdict.applied)
    buffers.restore_unless(verdict.applied)
    if scaler is not None and not verdict:
        scaler.update()  # the refused step's overflow check still backs the scale off
    trainer.objective.end_step(step, trainer.total_steps, verdict)
    trainer.guard.post()
    with warnings.catch_warnings():
        # The schedule advances on refused steps too (by design); torch warns when the very first
        # optimizer step was refused, as if the order of the two calls were wrong.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    # Tensors, not floats: reading them forces a device sync, so the caller reads only when logging.
    return {"loss": out["loss"], "grad_norm": grad_norm, "lr": lr, **out["metrics"]}


def settle_attention(trainer: Trainer, batch: dict, buffers: BufferSnapshot) -> None:
    """train.attention=auto: choose the attention kernel with the attention calls of one forward
    pass over ``batch``, leaving no trace of that pass (statistics, staged queue entries, RNG)."""
    with trainer.patch_dropout.masked() if trainer.patch_dropout is not None else contextlib.nullcontext():
        trainer.attention.settle(lambda: trainer.objective.features(batch), backward=True)
    buffers.restore()
    trainer.objective.drop_staged()
    trainer.accelerator.print(trainer.attention.describe())


def log_train_step(trainer: Trainer, state: TrainerState, out: dict, clock: Throughput, bar) -> dict:
    """Read the step's scalars (the one device sync per log interval) and write them out.

    Values are averaged over ranks: with gathered negatives each rank's loss covers only its rows.
    """
    reduce = trainer.accelerator.reduce
    values = {k: float(reduce(v.detach().float(), reduction="mean")) if torch.is_tensor(v) else v
              for k, v in out.items()}
    values.update(epoch=state.epoch, samples_per_second=clock.window_rate(state.step),
                  skipped=trainer.stream.skipped.total(), refused_steps=trainer.guard.refused)
    trainer.log.log(state.step, "train", values)
    bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
    return values


def save(trainer: Trainer, state: TrainerState) -> Path:
    """A checkpoint of this step, with the guard's and the skip ledger's state (every rank calls it)."""
    trainer.guard.check(current=True)  # a run that had to stop saves no checkpoint of that state
    state.guard, state.skips_by_epoch = trainer.guard.state_dict(), dict(trainer.stream.ledger.epochs)
    state.attention_kernel = trainer.attention.kernel
    if trainer.keys_log is not None:
        trainer.keys_log.flush()  # the keys of every saved step are on disk with the checkpoint
    train_cfg = trainer.config.train
    return save_checkpoint(trainer.accelerator, train_cfg.output_dir, trainer.config, state, trainer.stateful(),
                           keep=train_cfg.keep_checkpoints)


def evaluate_now(trainer: Trainer, step: int, evaluate) -> dict | None:
    """``evaluate`` (``RunHooks.evaluate``) run on every rank, of the EMA weights when the run keeps
    them (train.ema_decay), else of the trained ones; the results' ``weights`` says which. None when
    the run has no evaluator or its method and data.val call for none."""
    if evaluate is None or not evaluates_during_training(trainer.method, trainer.config):
        return None
    with trainer.ema.applied() if trainer.ema is not None else contextlib.nullcontext():
        evaluation = evaluate(unwrap(trainer.model), trainer)
    results = {**evaluation.results, "weights": "ema" if trainer.ema is not None else "raw"}
    trainer.log.log(step, "eval", {"weights": results["weights"], **evaluation.metrics})
    return results


def run_summary(trainer: Trainer, state: TrainerState, clock: Throughput, record: LoopRecord) -> dict:
    return {
        "steps": state.step,
        "epochs": state.epoch + 1,
        "wall_seconds": clock.wall_seconds(),
        "train_seconds": clock.train_seconds(),
        "samples_per_second": ((state.step - record.first_step) * clock.samples_per_step
                               / max(clock.train_seconds(), 1e-9)),
        "final_loss": (record.logged or {}).get("loss"),
        "checkpoint": str(record.checkpoint) if record.checkpoint else None,
        "eval": record.evaluation,
        # Inputs skipped by reason, summed over ranks: finished epochs, and the run's epochs overall
        # (the last one possibly in progress).
        "skipped_by_epoch": trainer.stream.ledger.epochs,
        "skipped": trainer.stream.skipped_overall(trainer.accelerator.device),
        # data.decode=device: JPEGs the device decoder could not read, trained on as zero images.
        "zero_images_from_device_decoding": int(dist.all_reduce_sum_(torch.tensor(
            float(trainer.device_images.failed), device=trainer.accelerator.device)).item()),
        "world_size": trainer.accelerator.num_processes,
        "first_step_seconds": record.first_step_seconds,
        "attention_kernel": trainer.attention.kernel,
        "compiled": trainer.compiled,
        "preempted": record.preempted,
        "nonfinite_steps": trainer.guard.nonfinite,
        "loss_spike_steps": trainer.guard.spikes,
        "overflow_steps": trainer.guard.overflows,
    }


def write_run_plots(run_dir, draw) -> None:
    """``draw(run_dir)`` (``RunHooks.plots``): PNG plots beside the metrics log. A plotting failure is
    reported, never fatal: the weights and metrics are already saved."""
    if draw is None:
        print("train.plots: this run was started without a plot writer (clipx.train.loop.train(config, hooks=...); "
              "`clipx train` passes one): no plots drawn")
        return
    try:
        draw(run_dir)
    except Exception as error:  # matplotlib or a font problem must not fail a finished run
        print(f"warning: could not draw the run's plots: {str(error).splitlines()[0] if str(error) else error}")
