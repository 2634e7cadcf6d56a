"""The one prepared GPU suite (issue #33): ViT-B/32 speed and MFU, the sync-free step, the speed switches, multi-GPU.

How to run it on a lent device (one command, about 8 minutes on one H100 or H200):

    python3 bench/gpu_suite.py --out runs/bench/gpu_suite.json
    python3 bench/gpu_suite.py --markdown runs/bench/gpu_suite.json     # BENCHMARKS.md's section, from the JSON

What to carry: ``runs/bench/openclip-site`` (16 MB; bench/openclip_env.sh writes it here: webdataset
< 1.0 for open_clip_train, put first on PYTHONPATH for that subprocess only), and as wheels in ``.whl``
the pure-Python packages clipx imports that the device image lacks (2026-12: open_clip_torch,
webdataset 1.x, braceexpand, ftfy, wcwidth, dill, boto3, botocore, jmespath, s3transfer; the device's
README has the ``pip download`` line). The image's torch is used as it is (the JSON records its
version); clipx runs from the checkout. Start the command with
``python3 -m pip install -q --no-index --no-deps .whl/*.whl &&`` (into the image's python, so the
suite's subprocesses see them too; a PYTHONPATH of carried packages is also kept for them). Nothing
is downloaded: the shards are written on the spot (bench/photo_shards.py), every model starts from
random weights.

    .venv/bin/python bench/gpu_suite.py --dry-run --out /tmp/gpu_suite.json   # any CPU machine, < 1 min

``--dry-run`` runs every part at toy size on the CPU (configs/models/micro-digits.json at 32 px, a few
steps, a few dozen samples), so the suite is known to work before a device is lent;
tests/test_gpu_suite.py runs it. The parts (each reports ``ok``, ``failed`` with its error, or, only for
"no GPU" / "one GPU", ``skipped`` with the reason; a failed part makes the script exit 1 after the JSON
is written):

1. throughput: clipx on photo shards through its real training loader (``data.workers`` = cores - 1),
   bf16: samples/s and MFU (FLOPs per sample from torch's FlopCounterMode over forward + backward, as
   bench/perf.py counts them, over the device's dense bf16 peak by name: H100 SXM and H200 989 TFLOP/s;
   unknown devices get no spec MFU, only the one against a measured bf16 matmul); the same with
   ``data.decode=device`` (the JPEGs decoded by nvJPEG on the GPU); the same step on one batch already on the
   device (the step's ceiling); and open_clip_train on the same shards, model, batch and workers.
2. sync_free_step: loop iterations (fetch, step, guard check, stop check) under
   ``torch.cuda.set_sync_debug_mode("error")``, so any host-device wait raises; the one read allowed by
   name, ``LaggedRead.read`` (the guard's counters one step late), runs in mode "default". On the CPU the
   same part uses the host-read probe of tests/test_sync_free_step.py (``HostReads``).
3. switches: samples/s of the step on a device batch with torch.compile on and off, AdamW fused or not
   (clipx's fallback when torch has no fused kernel), channels-last (the input and the patch-embedding
   convolution, the ViT's one convolution), and the flash against the explicit attention kernel
   (train.attention); every variant built once, timed in alternating rounds, medians.
4. multi_gpu: with several GPUs, DDP and FSDP across all of them (a torchrun subprocess): samples/s,
   scaling efficiency against part 3's one-GPU rate, and a bitwise resume (4 steps against 2 + 2 resumed,
   the tiny digits model).
   On one GPU it is skipped with that reason; the dry run runs it on 2 CPU processes over gloo.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import perf  # noqa: E402
from bench.gpu_sharding import SPEC_BF16_FLOPS  # noqa: E402
from bench.harness import add_report_arguments, run_or_render  # noqa: E402
from bench.photo_shards import SHARD_SIZE, write_photo_shards  # noqa: E402

PARTS = ("throughput", "sync_free_step", "switches", "multi_gpu")


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the device's sizes or the dry run's toy ones."""

    model: str  # an open_clip model config JSON (both trainers)
    batch: int  # per device
    warmup: int  # steps before timing (worker start-up, attention measurement, compilation)
    steps: int  # timed steps per measurement
    rounds: int  # part 3's alternating rounds
    workers: int  # loader workers
    threads: int | None  # torch threads of the training process (None: torch's default)
    samples: int  # photo samples written (one epoch covers every timed run)
    peer_steps: int  # open_clip_train's steps (its first perf.WARMUP_STEPS are dropped)
    sync_batch: int  # part 2's batch
    resume_model: str  # part 4's bitwise-resume model


def open_clip_config(name: str) -> str:
    import open_clip

    return str(Path(open_clip.__file__).parent / "model_configs" / f"{name}.json")


def full_sizes() -> Sizes:
    workers = max(1, (os.cpu_count() or 2) - 1)
    batch, warmup, steps = 256, 5, 30
    return Sizes(model=open_clip_config("ViT-B-32"), batch=batch, warmup=warmup, steps=steps, rounds=3,
                 workers=workers, threads=None, samples=batch * (warmup + steps + 2), peer_steps=warmup + steps,
                 sync_batch=64, resume_model=str(REPO / "configs" / "models" / "tiny-digits.json"))


DRY_SIZES = Sizes(model=str(REPO / "configs" / "models" / "micro-digits.json"), batch=8, warmup=1, steps=2,
                  rounds=2, workers=1, threads=2, samples=64, peer_steps=perf.WARMUP_STEPS + 2, sync_batch=8,
                  resume_model=str(REPO / "configs" / "models" / "micro-digits.json"))


@dataclass(frozen=True)
class Context:
    """What every part gets: sizes, scratch folder, shards, device."""

    sizes: Sizes
    work: Path
    data: str  # shard pattern
    shards: Path  # their folder
    cuda: bool
    dry_run: bool

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def say(message: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ shared


def photo_shards(work: Path, samples: int) -> Path:
    """``samples`` photo samples in shards of 256 under ``work/photos-N`` (reused when complete), written
    in parallel: one bench/photo_shards.py folder per shard (seeded by its index), then gathered."""
    out = work / f"photos-{samples}"
    if (out / "sizes.json").is_file():
        return out
    count = -(-samples // SHARD_SIZE)
    parts = [(work / "photo-parts" / f"{i:06d}", min(SHARD_SIZE, samples - i * SHARD_SIZE), i) for i in range(count)]
    if count == 1:
        write_photo_shards(*parts[0])
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(count, os.cpu_count() or 1)) as pool:
            list(pool.map(write_photo_shards, *zip(*parts)))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sizes = {}
    for index, (folder, size, _) in enumerate(parts):
        name = f"shard-{index:06d}.tar"
        shutil.move(str(folder / "shard-000000.tar"), tmp / name)
        sizes[name] = size
    (tmp / "sizes.json").write_text(json.dumps(sizes))
    tmp.rename(out)
    shutil.rmtree(work / "photo-parts", ignore_errors=True)
    return out


def load(ctx: Context, name: str, extra: list[str] = (), batch: int | None = None, model: str | None = None,
         resampled: bool = False):
    """The suite's config: bench/perf.py's (configs/bench-small.yaml) on the suite's model and shards, bf16."""
    from clipx.config import load_config

    s = ctx.sizes
    threads = [f"train.threads={s.threads}"] if s.threads else []
    return load_config(perf.CONFIG, [
        *(["data.resampled=true"] if resampled else []), f"model.name={model or s.model}", f"data.train={ctx.data}", f"data.train_num_samples={s.samples}",
        f"data.workers={s.workers}", f"train.batch_size={batch or s.batch}", "train.steps=100000",
        "train.precision=bf16", f"train.output_dir={ctx.work / 'runs' / name}", "train.log_every=100000",
        "train.checkpoint_every=100000", "train.plots=false", *threads, *extra])


class Stepper:
    """Steps a built trainer as the loop does (fetch, ``train_step``, the guard's lagged check)."""

    def __init__(self, ctx: Context, trainer):
        self.ctx, self.trainer, self.step, self.batches = ctx, trainer, 0, None

    def next_batch(self) -> list[dict]:
        from clipx.train import loop

        if self.batches is None:
            self.batches = self.trainer.stream.batches(0)
        return loop.fetch(self.trainer, self.batches, self.step + 1)[1]

    def run(self, count: int, fixed: list[dict] | None = None) -> float:
        """Seconds for ``count`` steps (the device finished), from the loader or on the ``fixed`` batch."""
        from clipx.train import loop

        self.ctx.sync()
        started = time.perf_counter()
        for _ in range(count):
            micro_batches = fixed if fixed is not None else self.next_batch()
            self.step += 1
            loop.train_step(self.trainer, micro_batches, self.step)
            self.trainer.guard.check()
        self.ctx.sync()
        return time.perf_counter() - started

    def close(self) -> None:
        """Stop the loader's workers and free the trainer (its device memory too)."""
        if self.batches is not None:
            self.batches.close()
        self.trainer.log.close()
        self.trainer = self.batches = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def rate(self, fixed: list[dict] | None = None) -> float:
        """Samples/s over the timed steps after the warm-up ones."""
        s = self.ctx.sizes
        self.run(s.warmup, fixed)
        return s.steps * self.trainer.config.train.batch_size / self.run(s.steps, fixed)


def spec_peak(device: str) -> float | None:
    """The device's dense bf16 FLOP/s by its name (SXM parts; a PCIe or NVL H100 is slower), else None."""
    if any(part in device for part in ("PCIe", "NVL")):
        return None
    return next((rate for key, rate in SPEC_BF16_FLOPS.items() if key in device), None)


# --------------------------------------------------------------------------------- part 1: throughput


def part_throughput(ctx: Context, facts: dict) -> dict:
    s = ctx.sizes
    rows: dict[str, dict] = {}
    from clipx.train.build import build_trainer

    for decode in ("loader", "device"):
        name = f"clipx, data.decode={decode}"
        say(f"throughput: {name}, real loader ({s.workers} workers)")
        stepper = Stepper(ctx, build_trainer(load(ctx, f"throughput-{decode}", [f"data.decode={decode}"])))
        rows[name] = {"samples_per_second": stepper.rate(), "source": "loader",
                      "attention_kernel": stepper.trainer.attention.kernel}
        if decode == "loader":
            say("throughput: the same step on one batch already on the device")
            fixed = stepper.next_batch()
            rows["clipx, batch on the device (the step's ceiling)"] = {
                "samples_per_second": stepper.rate(fixed), "source": "device batch"}
        stepper.close()
    notes: list[str] = []
    say("throughput: open_clip_train on the same shards (subprocess)")
    peer_threads = s.threads or os.cpu_count() or 1
    with peer_site_keeping_pythonpath():
        peer = perf.run_open_clip(ctx.work / "runs" / "open_clip", ctx.shards, Path(s.model), s.batch, s.peer_steps,
                                  s.workers, peer_threads, "bf16")
    rows["open_clip_train"] = {"samples_per_second": peer["samples_per_second"], "source": "loader",
                               "steps_logged": peer["steps_logged"]}
    say("throughput: FLOPs per sample (FlopCounterMode, CPU) and the bf16 matmul rate")
    text_length = perf.clipx_text_length(ctx.shards, Path(s.model), s.batch)
    clipx_flops = perf.flops_per_sample(Path(s.model), batch=4, text_length=text_length)
    peer_flops = perf.flops_per_sample(Path(s.model), batch=4)
    matmul = perf.matmul_flops_per_second(s.threads or os.cpu_count() or 1, "bf16", n=512 if ctx.dry_run else 2048)
    spec = spec_peak(facts["device"])
    for name, row in rows.items():
        flops = peer_flops if name == "open_clip_train" else clipx_flops
        row.update(flops_per_sample=flops, mfu_spec=flops * row["samples_per_second"] / spec if spec else None,
                   mfu_measured_matmul=flops * row["samples_per_second"] / matmul)
    if spec is None:
        notes.append(f"no spec bf16 peak known for {facts['device']}: MFU against the measured matmul only")
    return {"rows": rows, "clipx_text_length": text_length, "spec_bf16_flops": spec,
            "measured_matmul_bf16_flops": matmul, "notes": notes}


@contextlib.contextmanager
def peer_site_keeping_pythonpath():
    """perf.run_open_clip sets PYTHONPATH to the peer site and the repository alone; where this process
    has a PYTHONPATH of its own (carried wheels), keep it behind them."""
    saved, extra = perf.PEER_SITE, os.environ.get("PYTHONPATH")
    if not (perf.PEER_SITE / "webdataset").is_dir():
        raise RuntimeError(f"{perf.PEER_SITE} has no webdataset < 1.0 for open_clip_train: run "
                           "bench/openclip_env.sh (here, then carry runs/bench/openclip-site to the device)")
    if extra:
        perf.PEER_SITE = Path(os.pathsep.join([str(saved), extra]))
    try:
        yield
    finally:
        perf.PEER_SITE = saved


# ---------------------------------------------------------------------------- part 2: sync-free step


def part_sync_free_step(ctx: Context, facts: dict) -> dict:
    """Loop iterations from the fetch of step 2 to the fetch of the last (step 1 measures attention
    kernels, the last logs and saves), with every host-device wait an error, but the lagged read."""
    import torch

    from clipx.train import guards, loop

    total = 4
    config = load(ctx, "sync-free-step", [f"train.steps={total}"], batch=ctx.sizes.sync_batch)
    allowed = {"reads": 0}
    original_fetch, original_read = loop.fetch, guards.LaggedRead.read
    watched = HostReadProbe() if not ctx.cuda else None

    def set_mode(checking: bool) -> None:
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode("error" if checking else "default")
        else:
            watched.recording = checking

    def fetch(trainer, batches, step):
        set_mode(2 <= step < trainer.total_steps)
        return original_fetch(trainer, batches, step)

    def lagged_read(self, latest: bool = False):
        # The one read allowed by name: the previous step's counters, copied to pinned memory long ago.
        allowed["reads"] += 1
        if not ctx.cuda:
            return original_read(self, latest)
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return original_read(self, latest)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    loop.fetch, guards.LaggedRead.read = fetch, lagged_read
    try:
        with watched if watched is not None else contextlib.nullcontext():
            summary = loop.train(config)
    finally:
        loop.fetch, guards.LaggedRead.read = original_fetch, original_read
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode("default")
    result = {"checked_steps": total - 2, "steps": summary["steps"], "accepted_steps": summary["steps"]
              - summary["nonfinite_steps"] - summary["loss_spike_steps"], "lagged_reads": allowed["reads"]}
    if ctx.cuda:
        result["how"] = 'torch.cuda.set_sync_debug_mode("error"); LaggedRead.read in "default"'
    else:
        result["how"] = "CPU stand-in: tests/test_sync_free_step.py's HostReads probe"
        lagged = f"guards.py:{watched.lagged_line}"
        result["lagged_reads"] = sum(n for (_, where), n in watched.seen.items() if where == lagged)
        unexpected = {f"{what} at {where}": n for (what, where), n in watched.seen.items() if where != lagged}
        if unexpected:
            raise RuntimeError(f"a step waits for the device (what at where: count): {unexpected}")
    if result["accepted_steps"] != total:
        raise RuntimeError(f"only {result['accepted_steps']} of {total} steps were applied: not real steps")
    return result


def HostReadProbe():
    """tests/test_sync_free_step.py's probe, with the line of LaggedRead.read's host read."""
    from tests.test_sync_free_step import HostReads, lagged_read_line

    probe = HostReads(recording=False)
    probe.lagged_line = lagged_read_line()
    return probe


# ------------------------------------------------------------------------------------ part 3: switches

# Each variant against "default" (eager, fused AdamW, contiguous input, train.attention=auto); the two
# attention kernels against each other.
VARIANTS = {
    "default": [],
    "torch.compile (train.compile=true)": ["train.compile=true"],
    "AdamW not fused": [],
    "channels-last": [],
    "attention flash (train.attention=flash)": ["train.attention=flash"],
    "attention explicit (train.attention=explicit)": ["train.attention=explicit"],
}
PAIRS = {"compile on / off": ("torch.compile (train.compile=true)", "default"),
         "fused AdamW / not fused": ("default", "AdamW not fused"),
         "channels-last / contiguous": ("channels-last", "default"),
         "flash / explicit attention": ("attention flash (train.attention=flash)",
                                        "attention explicit (train.attention=explicit)")}


@contextlib.contextmanager
def adamw_without_fused():
    """clipx's optimizer as it is built where torch has no fused kernel (clipx/train/optim.py's fallback:
    foreach on a GPU, and the guard's verdict then read on the host before each update)."""
    import torch

    real = torch.optim.AdamW

    def no_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("no fused kernel (gpu_suite)")
        return real(*args, **kwargs)

    torch.optim.AdamW = no_fused
    try:
        yield
    finally:
        torch.optim.AdamW = real


@contextlib.contextmanager
def cheap_compile(dry_run: bool):
    """The dry run compiles with dynamo's "eager" backend: inductor's C++ code generation takes 90 s on
    the 2-core CPU machine; the dry run checks the path through train.compile, not the kernels."""
    import torch

    real = torch.compile
    if dry_run:
        torch.compile = lambda model, **kw: real(model, **{**kw, "backend": "eager"})
    try:
        yield
    finally:
        torch.compile = real


def build_variant(ctx: Context, name: str):
    import torch

    from clipx.dist import unwrap
    from clipx.train.build import build_trainer

    config = load(ctx, "switch-" + name.split(" ")[0].replace(".", "-").replace("/", ""), VARIANTS[name])
    with adamw_without_fused() if name == "AdamW not fused" else contextlib.nullcontext(), cheap_compile(ctx.dry_run):
        trainer = build_trainer(config)
    if name == "channels-last":
        unwrap(trainer.model).to(memory_format=torch.channels_last)  # the patch-embedding conv (in place)
    return trainer


def part_switches(ctx: Context, facts: dict) -> dict:
    import torch

    s = ctx.sizes
    trainers, steppers, rates, first = {}, {}, {name: [] for name in VARIANTS}, {}
    try:
        for name in VARIANTS:
            say(f"switches: building {name}")
            trainers[name] = build_variant(ctx, name)
            steppers[name] = Stepper(ctx, trainers[name])
        batch = steppers["default"].next_batch()
        last = batch[0]["image"].contiguous(memory_format=torch.channels_last)
        batches = {name: [{**batch[0], "image": last}] if name == "channels-last" else batch for name in VARIANTS}
        for name in VARIANTS:  # warm-up: attention measurement, compilation
            first[name] = steppers[name].run(1, batches[name])
            steppers[name].run(s.warmup, batches[name])
        for index in range(s.rounds):
            for name in (list(VARIANTS) if index % 2 == 0 else list(VARIANTS)[::-1]):
                rates[name].append(s.steps * s.batch / steppers[name].run(s.steps, batches[name]))
            say(f"switches: round {index + 1}/{s.rounds}: " + ", ".join(f"{n} {r[-1]:.0f}" for n, r in rates.items()))
        fused = trainers["default"].optimizer.optimizer.defaults.get("fused")
        unfused = trainers["AdamW not fused"].optimizer.optimizer.defaults.get("fused")
        if not fused or unfused:
            raise RuntimeError(f"the AdamW variants are not what they say: fused={fused}, not fused={unfused}")
        kernels = {name: t.attention.kernel for name, t in trainers.items()}
        compiled = {name: t.compiled for name, t in trainers.items()}
    finally:
        for stepper in steppers.values():
            stepper.close()
    variants = {name: {"samples_per_second": statistics.median(r), "all": [round(x, 1) for x in r],
                       "first_step_seconds": first[name], "attention_kernel": kernels[name],
                       "compiled": compiled[name]} for name, r in rates.items()}
    pairs = {pair: variants[a]["samples_per_second"] / variants[b]["samples_per_second"]
             for pair, (a, b) in PAIRS.items()}
    notes = ["channels-last touches the ViT's one convolution (the patch embedding) and its input only"]
    if ctx.dry_run:
        notes.append("dry run: torch.compile with dynamo's eager backend (no inductor kernels)")
    return {"variants": variants, "ratios": pairs, "notes": notes}


# ------------------------------------------------------------------------------------ part 4: multi-GPU


def part_multi_gpu(ctx: Context, facts: dict, one_gpu_rate: float | None) -> dict:
    import torch

    if ctx.cuda and torch.cuda.device_count() < 2:
        return {"status": "skipped", "reason": f"one GPU ({facts['device']}): DDP and FSDP across GPUs need several"}
    processes = torch.cuda.device_count() if ctx.cuda else 2
    out = ctx.work / "multi_gpu.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(Path(__file__).resolve()), "--worker", str(out), "--work", str(ctx.work), "--data", ctx.data,
               *(["--dry-run"] if ctx.dry_run else [])]
    say(f"multi_gpu: torchrun, {processes} processes ({'nccl' if ctx.cuda else 'gloo'})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if not ctx.cuda:
        env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"torchrun failed ({done.returncode}):\n{(done.stderr or done.stdout)[-3000:]}")
    result = json.loads(out.read_text())
    for row in result["sharding"].values():
        row["scaling_efficiency"] = (row["samples_per_second"] / (processes * one_gpu_rate) if one_gpu_rate else None)
    if not one_gpu_rate:
        result["notes"].append("no one-process rate from part 3: no scaling efficiency")
    if not all(r["bitwise"] for r in result["resume"].values()):
        raise RuntimeError(f"resume is not bitwise: {result['resume']}")
    return result


def multi_gpu_worker(args) -> None:
    """One rank of part 4 (under torchrun): step rates per sharding, then bitwise resume per sharding."""
    import torch
    import torch.distributed as torch_dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # The suite's process group, formed once: every run below leaves it alive (owns_process_group False).
    torch_dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    # Resampled shards: every rank's workers draw from all of them, however few (the rates are timed on a
    # batch on the device; the resume check reads the loader).
    sizes = DRY_SIZES if args.dry_run else full_sizes()
    sizes = replace(sizes, threads=None if cuda else 1, workers=max(1, (os.cpu_count() or 2) // world - 1) if cuda else 1)
    shards = Path(args.data.split("{")[0]).parent
    ctx = Context(sizes, args.work / f"multi-{world}", args.data, shards, cuda, args.dry_run)
    notes = [] if cuda else [f"dry run: {world} CPU processes of one thread on the machine's cores; the rates and "
                              "efficiencies say nothing of GPUs"]
    result = {"processes": world, "backend": torch_dist.get_backend(), "sharding": {}, "resume": {}, "notes": notes}
    for sharding in ("ddp", "fsdp"):
        from clipx.train.build import build_trainer

        stepper = Stepper(ctx, build_trainer(load(ctx, f"rate-{sharding}-r{rank}", [f"train.sharding={sharding}"], resampled=True)))
        fixed = stepper.next_batch()
        per_rank = stepper.rate(fixed)
        stepper.close()
        result["sharding"][sharding] = {"samples_per_second": per_rank * world, "per_process": per_rank}
        result["resume"][sharding] = resume_check(ctx, sharding, rank)
    if rank == 0:
        args.worker.write_text(json.dumps(result, indent=2))
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def resume_check(ctx: Context, sharding: str, rank: int) -> dict:
    """4 steps with a checkpoint at 2, against 2 resumed from it: the step-4 weights, bitwise (the dry
    run: 2 steps, resumed at 1)."""
    import torch.distributed as torch_dist

    from clipx.train.loop import train
    from clipx.weights import read_weights

    base = ctx.work / f"resume-{sharding}"
    first, second = base / "unbroken", base / "resumed"

    half = 1 if ctx.dry_run else 2

    def config(out: Path):
        return load(ctx, "unused", [f"train.sharding={sharding}", f"train.steps={2 * half}",
                                    f"train.checkpoint_every={half}", f"train.log_every={half}",
                                    f"train.output_dir={out}"],
                    batch=ctx.sizes.sync_batch, model=ctx.sizes.resume_model, resampled=True)

    if rank == 0:
        shutil.rmtree(base, ignore_errors=True)
    torch_dist.barrier()
    train(config(first))
    torch_dist.barrier()
    if rank == 0:
        (second / "checkpoints").mkdir(parents=True)
        saved = f"step-{half:09d}"
        shutil.copytree(first / "checkpoints" / saved, second / "checkpoints" / saved)
    torch_dist.barrier()
    train(config(second), resume="latest")
    torch_dist.barrier()
    final, again = (run / "checkpoints" / f"step-{2 * half:09d}" for run in (first, second))
    a, b = read_weights(final, {}), read_weights(again, {})
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return {"bitwise": worst == 0.0 and a.keys() == b.keys(), "max_difference": worst}


# ------------------------------------------------------------------------------------------- the suite


def facts_here() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else "CPU (no GPU)",
            "device_count": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__,
            "cores": os.cpu_count(), "cuda": cuda}


def run_part(results: dict, name: str, run) -> None:
    say(f"part {PARTS.index(name) + 1}/{len(PARTS)}: {name}")
    started = time.perf_counter()
    try:
        found = run()
        results[name] = {"status": found.pop("status", "ok"), **found}
    except Exception as error:  # every part runs and reports, whatever another does; the exit status says it
        traceback.print_exc()
        results[name] = {"status": "failed", "error": f"{type(error).__name__}: {str(error)[:2000]}"}
    results[name]["seconds"] = round(time.perf_counter() - started, 1)
    say(f"part {name}: {results[name]['status']} in {results[name]['seconds']} s")


def measure(args) -> dict:
    facts = facts_here()
    if not facts["cuda"] and not args.dry_run:
        sys.exit("gpu_suite: no GPU here; on a CPU machine run it with --dry-run (toy sizes)")
    started = time.perf_counter()
    sizes = DRY_SIZES if args.dry_run else full_sizes()
    work = args.work / "gpu-suite" / ("dry-run" if args.dry_run else "device")
    say(f"{facts['device']}, torch {facts['torch']}: writing {sizes.samples} photo samples")
    shards = photo_shards(work, sizes.samples)
    ctx = Context(sizes, work, perf.shard_pattern(shards), shards, facts["cuda"], args.dry_run)
    parts: dict[str, dict] = {}
    run_part(parts, "throughput", lambda: part_throughput(ctx, facts))
    run_part(parts, "sync_free_step", lambda: part_sync_free_step(ctx, facts))
    run_part(parts, "switches", lambda: part_switches(ctx, facts))
    one = parts["switches"].get("variants", {}).get("default", {}).get("samples_per_second")
    run_part(parts, "multi_gpu", lambda: part_multi_gpu(ctx, facts, one))
    return {"suite": "bench/gpu_suite.py", "command": shlex.join(["python", *sys.argv]), "dry_run": args.dry_run,
            **facts, "date": time.strftime("%Y-%m-%d"), "sizes": {**asdict(sizes), "model": display(sizes.model), "resume_model": display(sizes.resume_model)},
            "wall_seconds": round(time.perf_counter() - started, 1), "parts": parts}


def display(path: str) -> str:
    return perf.display_path(Path(path)) if "site-packages" not in path else "open_clip " + Path(path).name


# ------------------------------------------------------------------------------------------- Markdown


def markdown(results: dict) -> str:
    s = results["sizes"]
    lines = [f"{results['device']}, torch {results['torch']}, {results['cores']} cores, {results['date']}"
             f"{' (dry run: toy sizes on the CPU)' if results['dry_run'] else ''}; {s['model']}, bf16, batch "
             f"{s['batch']} per device, {s['steps']} timed steps after {s['warmup']}; data.workers {s['workers']}; "
             f"the suite took {results['wall_seconds']:.0f} s.", "", f"`{results['command']}`", ""]
    for name in PARTS:
        part = results["parts"][name]
        lines.append(f"**{PARTS.index(name) + 1}. {name}** ({part['status']}, {part['seconds']:.0f} s)")
        lines.append("")
        if part["status"] == "failed":
            lines += [f"FAILED: {part['error'][:500]}", ""]
        elif part["status"] == "skipped":
            lines += [f"Skipped: {part['reason']}", ""]
        else:
            lines += RENDER[name](part) + [""]
    return "\n".join(lines).rstrip()


def pct(value) -> str:
    return f"{value:.1%}" if value is not None else "n/a"


def render_throughput(part: dict) -> list[str]:
    flops = next(iter(part["rows"].values()))["flops_per_sample"]
    lines = [f"FLOPs per sample (forward + backward): clipx {flops / 1e9:.3g} GFLOP (token batches of "
             f"{part['clipx_text_length']}), open_clip_train {part['rows']['open_clip_train']['flops_per_sample'] / 1e9:.3g}"
             f" GFLOP (full context); bf16 matmul measured at {part['measured_matmul_bf16_flops'] / 1e12:.2f} TFLOP/s.",
             "", "| trainer | input | samples/s | MFU (spec peak) | MFU (measured matmul) |", "|---|---|---:|---:|---:|"]
    for name, row in part["rows"].items():
        lines.append(f"| {name} | {row['source']} | {row['samples_per_second']:.1f} | {pct(row['mfu_spec'])} | "
                     f"{pct(row['mfu_measured_matmul'])} |")
    return lines + [f"\n{note}" for note in part["notes"]]


def render_sync(part: dict) -> list[str]:
    return [f"{part['checked_steps']} loop iterations checked ({part['how']}): no wait for the device; "
            f"{part['lagged_reads']} lagged reads (allowed by name); {part['accepted_steps']} of {part['steps']} "
            "steps applied."]


def render_switches(part: dict) -> list[str]:
    lines = ["| variant | samples/s (median) | rounds | first step s | attention kernel |", "|---|---:|---|---:|---|"]
    for name, row in part["variants"].items():
        lines.append(f"| {name} | {row['samples_per_second']:.1f} | {', '.join(map(str, row['all']))} | "
                     f"{row['first_step_seconds']:.1f} | {row['attention_kernel']} |")
    lines += ["", "| comparison | ratio |", "|---|---:|"]
    lines += [f"| {pair} | {ratio:.3f} |" for pair, ratio in part["ratios"].items()]
    return lines + [f"\n{note}" for note in part["notes"]]


def render_multi(part: dict) -> list[str]:
    lines = [f"{part['processes']} processes ({part['backend']}).", "",
             "| sharding | samples/s (all processes) | scaling efficiency | resume bitwise | largest difference |",
             "|---|---:|---:|:---:|---:|"]
    for name, row in part["sharding"].items():
        resume = part["resume"][name]
        lines.append(f"| {name} | {row['samples_per_second']:.1f} | {pct(row['scaling_efficiency'])} | "
                     f"{resume['bitwise']} | {resume['max_difference']:.2e} |")
    return lines + [f"\n{note}" for note in part["notes"]]


RENDER = {"throughput": render_throughput, "sync_free_step": render_sync, "switches": render_switches,
          "multi_gpu": render_multi}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every part at toy size on the CPU")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # part 4's torchrun ranks
    parser.add_argument("--data", help=argparse.SUPPRESS)
    add_report_arguments(parser, "gpu_suite")
    args = parser.parse_args()
    if args.worker:
        multi_gpu_worker(args)
        return
    results: dict = {}

    def measured() -> dict:
        results.update(measure(args))
        return results

    run_or_render(args, measured, markdown)
    failed = [name for name, part in results.get("parts", {}).items() if part["status"] == "failed"]
    if failed:
        sys.exit(f"gpu_suite: part(s) failed: {', '.join(failed)} (errors in {args.out})")


if __name__ == "__main__":
    main()
