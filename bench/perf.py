"""Training throughput of clipx against open_clip's own trainer on identical work, and how far both are
from the machine's limit.

    make bench        # = bench/openclip_env.sh, then this script; writes runs/bench/results.json
    .venv/bin/python bench/perf.py --markdown runs/bench/results.json   # BENCHMARKS.md's tables

What "identical work" means here: the same model config file (configs/models/bench-small.json), the
same shards, batch size, fp32, torch thread count and loader worker count, open_clip's default
augmentation on both sides (configs/bench-small.yaml), one epoch of N steps, no evaluation and no
checkpoint inside the timed steps. Runs alternate (clipx, open_clip, open_clip, clipx, ...).

How samples/s is measured, the same way for both: each trainer logs every step's samples/s from the
time between the ends of consecutive steps (data wait included); the first WARMUP_STEPS are dropped
(worker start-up, allocator warm-up) and the rate is total samples over total time of the rest.
Peak memory is the largest sum of resident memory over the trainer's process tree (main process
and loader workers), polled every 0.2 s.

Also measured: the clipx loader alone (decode + augment + tokenize, per worker), the model's FLOPs per
sample (forward and backward, both towers, counted by torch's FlopCounterMode), the machine's dense
fp32 matmul rate, hence model FLOPs utilisation; and step time against batch size and resolution.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.profile_step import phase_seconds  # noqa: E402

CONFIG = REPO / "configs" / "bench-small.yaml"
MODEL = REPO / "configs" / "models" / "bench-small.json"
PEER_SITE = REPO / "runs" / "bench" / "openclip-site"
WARMUP_STEPS = 5
SHARD_SIZE = 512


# ---------------------------------------------------------------------------------------------- data

def write_bench_shards(work: Path, image_size: int, samples: int) -> Path:
    """``samples`` image-caption pairs at ``image_size`` px in shards of 512 with a sizes.json.

    The digits (1437 training images) are repeated under new keys: both trainers decode the same
    JPEG bytes, and one epoch of the benchmark never runs out of data.
    """
    out = work / f"shards-{image_size}px-{samples}"
    if (out / "sizes.json").is_file():
        return out
    from data_prep import prep_digits

    source = work / f"digits-{image_size}px"
    if not (source / "train" / "sizes.json").is_file():
        prep_digits(source, image_size=image_size, shard_size=256, workers=0)
    pool: dict[str, list[tuple[str, bytes]]] = {}
    for shard in sorted((source / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                pool.setdefault(key, []).append((suffix, tar.extractfile(member).read()))
    originals = list(pool.values())
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for shard_index in range(samples // SHARD_SIZE):
        name = f"shard-{shard_index:06d}.tar"
        with tarfile.open(tmp / name, "w") as tar:
            for i in range(SHARD_SIZE):
                index = shard_index * SHARD_SIZE + i
                for suffix, data in originals[index % len(originals)]:
                    info = tarfile.TarInfo(f"{index:09d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = SHARD_SIZE
    (tmp / "sizes.json").write_text(json.dumps(sizes))
    tmp.rename(out)
    return out


def native_size(model: Path) -> int:
    return json.loads(model.read_text())["vision_cfg"]["image_size"]


def shard_pattern(folder: Path) -> str:
    count = len(list(folder.glob("shard-*.tar")))
    return str(folder / f"shard-{{000000..{count - 1:06d}}}.tar")


def model_config_for(work: Path, model: Path, image_size: int) -> Path:
    """``model`` at another image size (same patch size: more tokens), named by its size."""
    if image_size == native_size(model):
        return model
    arch = json.loads(model.read_text())
    arch["vision_cfg"]["image_size"] = image_size
    path = work / "models" / f"{model.stem}-{image_size}px.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(arch, indent=1))
    return path


# ------------------------------------------------------------------------------------------- running

class PeakMemory:
    """Largest resident memory of a process and its children, polled from a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        import threading

        import psutil

        self.peak = 0
        self._process, self._interval = psutil.Process(pid), interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._done.is_set():
            try:
                tree = [self._process, *self._process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            self._done.wait(self._interval)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def run_measured(command: list[str], env: dict | None = None, timeout: float = 1200) -> tuple[float, int, str]:
    """(wall seconds, peak tree RSS bytes, stderr tail) of ``command``; raises when it fails."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(process.pid)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        peak = memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({process.returncode}):\n{(err or out)[-3000:]}")
    return time.perf_counter() - started, peak, err


def steady_rate(per_step_rates: list[float], batch: int) -> float:
    """Samples/s over the steps after WARMUP_STEPS: total samples over total time."""
    rates = per_step_rates[WARMUP_STEPS:]
    if not rates:
        raise RuntimeError(f"only {len(per_step_rates)} steps logged; need more than {WARMUP_STEPS}")
    return len(rates) * batch / sum(batch / r for r in rates)


# The ablation row of a compiled bf16 run (runs are eager by default, train.compile=false: bench/compile_ab.py).
COMPILED = "with torch.compile (train.compile=true)"

# Each trainer's name for the same numerics.
CLIPX_PRECISION = {"fp32": "no", "bf16": "bf16"}
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}


def run_clipx(run_dir: Path, shards: Path, model: Path, batch: int, steps: int, workers: int, threads: int,
              precision: str = "fp32", overrides: list[str] = (), env: dict | None = None) -> dict:
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "clipx.cli", "train", "--config", str(CONFIG), f"model.name={model}",
               f"data.train={shard_pattern(shards)}", f"data.train_num_samples={batch * steps}",
               f"data.workers={workers}", f"train.batch_size={batch}", f"train.steps={steps}",
               f"train.threads={threads}", f"train.output_dir={run_dir}",
               f"train.precision={CLIPX_PRECISION[precision]}", *overrides]
    wall, peak, _ = run_measured(command, env=env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_second"] for r in records if r["kind"] == "train"]
    return {"samples_per_second": steady_rate(rates, batch), "wall_seconds": wall, "peak_rss_mb": peak / 2**20,
            "steps_logged": len(rates)}


OPEN_CLIP_RATE = re.compile(r"Batch \(t\): [0-9.]+, ([0-9.e+]+)/s,")


def run_open_clip(run_dir: Path, shards: Path, model: Path, batch: int, steps: int, workers: int,
                  threads: int, precision: str = "fp32") -> dict:
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, str(REPO / "bench" / "open_clip_peer.py"), "--model-config", str(model),
               "--threads", str(threads), "--", "--model", model.stem, "--train-data", shard_pattern(shards),
               "--train-num-samples", str(batch * steps), "--dataset-type", "webdataset", "--batch-size", str(batch),
               "--epochs", "1", "--workers", str(workers), "--precision", OPEN_CLIP_PRECISION[precision], "--lr", "5e-4", "--wd", "0.2",
               "--warmup", "1", "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
               "--report-to", "", "--logs", str(run_dir.parent), "--name", run_dir.name, "--log-every-n-steps", "1",
               "--seed", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PEER_SITE), str(REPO)])}
    wall, peak, _ = run_measured(command, env=env)
    rates = [float(m.group(1)) for m in OPEN_CLIP_RATE.finditer((run_dir / "out.log").read_text())]
    return {"samples_per_second": steady_rate(rates, batch), "wall_seconds": wall, "peak_rss_mb": peak / 2**20,
            "steps_logged": len(rates)}


TRAINERS = {"clipx": run_clipx, "open_clip": run_open_clip}


def side_by_side(work: Path, shards: Path, model: Path, batch: int, steps: int, workers: int, threads: int,
                 alternations: int, precisions: list[str]) -> dict:
    """Alternating runs of both trainers in every precision; per precision, medians and the ratio.

    One alternation runs each (precision, trainer) pair once, the order reversed every other time,
    so the comparisons across precisions (clipx bf16 against clipx fp32) are as close in time as
    those across trainers: this machine's speed drifts by more than the effects measured."""
    pairs = [(precision, name) for precision in precisions for name in TRAINERS]
    runs = []
    for index in range(alternations):
        for precision, name in (pairs if index % 2 == 0 else pairs[::-1]):
            result = TRAINERS[name](work / "runs" / f"{name}-{precision}-{index}", shards, model, batch, steps,
                                    workers, threads, precision)
            runs.append({"trainer": name, "precision": precision, "alternation": index, **result})
            print(f"  {name:9s} {precision} run {index}: {result['samples_per_second']:.1f} samples/s, "
                  f"peak {result['peak_rss_mb']:.0f} MB", file=sys.stderr)
    out = {}
    for precision in precisions:
        mine = [r for r in runs if r["precision"] == precision]
        medians = {name: statistics.median(r["samples_per_second"] for r in mine if r["trainer"] == name)
                   for name in TRAINERS}
        peaks = {name: max(r["peak_rss_mb"] for r in mine if r["trainer"] == name) for name in TRAINERS}
        out[precision] = {"clipx_samples_per_second": medians["clipx"],
                          "open_clip_samples_per_second": medians["open_clip"],
                          "ratio": medians["clipx"] / medians["open_clip"], "clipx_peak_rss_mb": peaks["clipx"],
                          "open_clip_peak_rss_mb": peaks["open_clip"], "runs": mine}
    return out


# ------------------------------------------------------------------------------------ loader and FLOPs

def loader_throughput(shards: Path, model: Path, batch: int, workers: int, batches: int = 24) -> dict:
    """clipx's training loader alone: decode, augment, tokenize and collate, no model."""
    from clipx.config import load_config
    from clipx.data.pipeline import SharedEpoch, build_train_loader
    from clipx.data.skips import SkipCounter
    from clipx.methods import method_of

    config = load_config(CONFIG, [f"model.name={model.resolve()}", f"data.train={shard_pattern(shards)}",
                                  f"data.workers={workers}",
                                  f"data.train_num_samples={batch * (batches + 4)}"])
    method = method_of(config)
    loader, _ = build_train_loader(config.data, batch, method.train_transform(config), method.collate(config),
                                   0, 0, 1, SharedEpoch(), SkipCounter())
    iterator = iter(loader)
    for _ in range(4):  # worker start-up
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * batch / (time.perf_counter() - started)
    del iterator
    return {"workers": workers, "samples_per_second": rate, "per_worker": rate / max(workers, 1)}


def clipx_text_length(shards: Path, model: Path, batch: int) -> int:
    """The longest token batch clipx trains on with these shards (data.trim_padding ends each batch
    after its longest caption); open_clip_train always runs the full context."""
    from clipx.config import load_config
    from clipx.data.tokenizer import Tokenizer

    config = load_config(CONFIG, [f"model.name={model.resolve()}", "data.train=unused"])
    tokenizer = Tokenizer(config.model, trim_padding=config.data.trim_padding)
    captions = []
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            captions += [tar.extractfile(m).read().decode().splitlines()[0] for m in tar if m.name.endswith(".txt")]
    return max(tokenizer(captions[i:i + batch]).shape[1] for i in range(0, len(captions), batch))


def flops_per_sample(model: Path, batch: int = 16, text_length: int | None = None) -> float:
    """Forward + backward FLOPs of both towers and the loss, per sample (torch's FlopCounterMode), on
    token batches of ``text_length`` (None: the model's context length)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clipx.config import load_config
    from clipx.methods import build_model, build_objective

    config = load_config(CONFIG, [f"model.name={model.resolve()}", "data.train=unused"])
    clip = build_model(config)
    objective = build_objective(clip, config)
    size = config.model.arch["vision_cfg"]["image_size"]
    context = text_length or config.model.arch["text_cfg"]["context_length"]
    batch_inputs = {"image": torch.randn(batch, 3, size, size), "text": torch.randint(0, 49408, (batch, context))}
    with FlopCounterMode(display=False) as counter:
        objective(batch_inputs)["loss"].backward()
    return counter.get_total_flops() / batch


def matmul_flops_per_second(threads: int, precision: str = "fp32", n: int = 2048, repeats: int = 10) -> float:
    """Measured dense matmul rate (GPU if present, else CPU at ``threads`` threads): the practical peak for MFU."""
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n, repeats = (8192, 50) if device == "cuda" else (n, repeats)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------- main

def display_path(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "perf")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "results.json")
    parser.add_argument("--model", type=Path, default=MODEL, help="an open_clip model config JSON (both trainers)")
    parser.add_argument("--precision", default="bf16,fp32",
                        help="comma list of fp32 and bf16, each compared side by side; the first is the headline, "
                             "which the ablations, scaling and evaluator model use")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--scaling-batches", default="32,64,128,256")
    parser.add_argument("--scaling-sizes", default="32,64,96")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("--eval-model-steps", type=int, default=200, help="training of the model the evaluators compare on")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS.json", help="print saved results as tables")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="with --markdown: also draw the scaling plot")
    args = parser.parse_args()
    if args.markdown:
        from bench.perf_report import markdown, plot_scaling

        results = json.loads(args.markdown.read_text())
        if args.plot:
            plot_scaling(results, args.plot)
        print(markdown(results))
        return
    if not (PEER_SITE / "webdataset").is_dir():
        sys.exit("run bench/openclip_env.sh first (open_clip_train needs webdataset < 1.0 beside clipx)")

    args.work.mkdir(parents=True, exist_ok=True)
    precisions = args.precision.split(",")
    if not precisions or any(p not in CLIPX_PRECISION for p in precisions):
        sys.exit(f"--precision: a comma list of {', '.join(CLIPX_PRECISION)}")
    args.precision, args.precisions = precisions[0], precisions  # the headline: ablations, evaluator model and scaling run in it
    size = native_size(args.model)
    shards = write_bench_shards(args.work, size, args.batch * args.steps * 2)
    flops = flops_per_sample(args.model)
    text_length = clipx_text_length(shards, args.model, args.batch)
    clipx_flops = flops_per_sample(args.model, text_length=text_length)
    by_precision = {}
    print(f"side by side, {', '.join(precisions)}", file=sys.stderr)
    trains = side_by_side(args.work, shards, args.model, args.batch, args.steps, args.workers, args.threads,
                          args.alternations, precisions)
    for precision, train in trains.items():
        peak = matmul_flops_per_second(args.threads, precision)
        breakdown = phase_seconds(args.model, args.batch, args.threads, precision, text_length=text_length)
        by_precision[precision] = {
            "train": train,
            # Each trainer's MFU counts the FLOPs it runs: clipx's token batches end after the longest
            # caption (clipx_text_length), open_clip_train's run the whole context.
            "flops": {"model_flops_per_sample": flops, "matmul_flops_per_second": peak,
                      "clipx_model_flops_per_sample": clipx_flops, "clipx_text_length": text_length,
                      "clipx_mfu": clipx_flops * train["clipx_samples_per_second"] / peak,
                      "open_clip_mfu": flops * train["open_clip_samples_per_second"] / peak},
            # Compute alone (random inputs, no loader); the rest of an end-to-end step is data wait,
            # logging and the update guard.
            "breakdown": {**breakdown, "end_to_end_step_seconds": args.batch / train["clipx_samples_per_second"]},
        }
    headline = by_precision[args.precision]
    results = {
        "machine": machine(),
        "command": "make bench",
        "settings": {"model": display_path(args.model), "image_size": size, "batch": args.batch, "steps": args.steps,
                     "warmup_steps_dropped": WARMUP_STEPS, "workers": args.workers, "threads": args.threads,
                     "precision": args.precision, "precisions": precisions, "alternations": args.alternations,
                     "interleaved": True},
        "by_precision": by_precision,
        "train": headline["train"],
        "flops": headline["flops"],
        "loader": [loader_throughput(shards, args.model, args.batch, w) for w in (1, args.workers)],
    }
    if {"bf16", "fp32"} <= set(by_precision):
        results["clipx_bf16_over_fp32"] = (by_precision["bf16"]["train"]["clipx_samples_per_second"]
                                           / by_precision["fp32"]["train"]["clipx_samples_per_second"])
    if not args.skip_ablations:
        print("ablations", file=sys.stderr)
        results["ablations"] = ablations(args, shards, results["train"]["clipx_samples_per_second"])
        compiled = results["ablations"]["clipx"].get(COMPILED)
        if compiled and "fp32" in by_precision:  # bf16 compiled (train.compile=true) against fp32 (eager)
            results["clipx_bf16_long_run_over_fp32"] = (compiled["samples_per_second"]
                                                        / by_precision["fp32"]["train"]["clipx_samples_per_second"])
    print("evaluators against CLIP_benchmark", file=sys.stderr)
    results["eval"] = evaluators(args, shards)
    if not args.skip_scaling:
        results["scaling"] = scaling(args, [int(b) for b in args.scaling_batches.split(",")],
                                     [int(s) for s in args.scaling_sizes.split(",")])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    for precision, row in by_precision.items():
        print(precision, json.dumps({k: v for k, v in row["train"].items() if k != "runs"}, indent=2))


# Each speed change in clipx, switched off (or, for compile, on) one at a time against the default,
# in the headline precision unless one is named. The benchmark's runs are eager, as
# train.compile=false (the default) leaves every run eager; the compiled rows are train.compile=true, in both
# precisions (bench/compile_ab.py is the alternating measurement behind that default).
ABLATIONS = {
    "PyTorch's attention kernel (train.attention=default)": (["train.attention=default"], None),
    "SDPA's math path, not the explicit kernel (train.attention=math)": (["train.attention=math"], None),
    "without host-memory retention (train.retain_host_memory=false)": (["train.retain_host_memory=false"], None),
    "token batches at the full context (data.trim_padding=false)": (["data.trim_padding=false"], None),
    COMPILED: (["train.compile=true"], "bf16"),
    "with torch.compile in fp32 (train.compile=true)": (["train.compile=true"], "fp32"),
}


def ablations(args, shards: Path, default_rate: float) -> dict:
    """clipx's samples/s with each change toggled (median of the alternations), and AdamW step times."""
    rows = {"default (as shipped)": {"samples_per_second": default_rate, "precision": args.precision}}
    for name, (overrides, precision) in ABLATIONS.items():
        precision = precision or args.precision
        if precision not in args.precisions:
            continue
        rates, first_steps = [], []
        for index in range(args.alternations):
            run = args.work / "runs" / f"ablation-{len(rows)}-{index}"
            # A fresh compile cache per run: the first step then shows the full compile time.
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(run / "inductor-cache")}
            result = run_clipx(run, shards, args.model, args.batch, args.steps, args.workers, args.threads,
                               precision, overrides, env)
            rates.append(result["samples_per_second"])
            first_steps.append(json.loads((run / "summary.json").read_text())["first_step_seconds"])
        rows[name] = {"samples_per_second": statistics.median(rates), "runs": rates, "precision": precision,
                      "first_step_seconds": statistics.median(first_steps)}
        print(f"  {name}, {precision}: {rows[name]['samples_per_second']:.1f} samples/s", file=sys.stderr)
    return {"clipx": rows, "adamw_step_ms": adamw_step_times(args.model, args.threads)}


def adamw_step_times(model_config: Path, threads: int, repeats: int = 20) -> dict:
    """Milliseconds per AdamW step over the benchmark model's parameters, per implementation."""
    import torch

    from clipx.config import load_config
    from clipx.methods import build_model

    torch.set_num_threads(threads)
    model = build_model(load_config(CONFIG, [f"model.name={model_config.resolve()}", "data.train=unused"]))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    times = {}
    for name, options in (("per-tensor loop (torch's CPU default)", {"foreach": False}), ("foreach", {"foreach": True}),
                          ("fused (clipx)", {"fused": True})):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **options)
        for _ in range(3):
            optimizer.step()
        started = time.perf_counter()
        for _ in range(repeats):
            optimizer.step()
        times[name] = (time.perf_counter() - started) / repeats * 1000
    return times


def evaluators(args, shards: Path) -> dict:
    """Train the benchmark model long enough to be worth evaluating, then clipx's evaluators against
    CLIP_benchmark's on it (bench/eval_vs_clip_benchmark.py)."""
    import shutil

    from bench.eval_vs_clip_benchmark import compare

    run = args.work / "runs" / "eval-model"
    if not (run / "summary.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        command = [sys.executable, "-m", "clipx.cli", "train", "--config", str(CONFIG), f"data.train={shards}",
                   f"model.name={args.model.resolve()}", f"train.precision={CLIPX_PRECISION[args.precision]}",
                   f"train.steps={args.eval_model_steps}", "train.lr=1e-3", "train.warmup_steps=20",
                   f"train.threads={args.threads}", f"train.output_dir={run}", "train.log_every=50"]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    return compare(args.work / "eval", checkpoint, args.work / f"digits-{native_size(args.model)}px",
                   threads=args.threads)


def scaling(args, batches: list[int], sizes: list[int]) -> list[dict]:
    """Step time of both trainers against batch size (at the model's size) and image size (at batch 64)."""
    size = native_size(args.model)
    points = [("batch", b, size, b) for b in batches] + [("image_size", s, s, 64) for s in sizes]
    rows = []
    steps = WARMUP_STEPS + 15
    for axis, value, size, batch in points:
        shards = write_bench_shards(args.work, size, max(batch * steps, 2 * SHARD_SIZE * args.workers))
        model = model_config_for(args.work, args.model, size)
        row = {"axis": axis, "value": value, "image_size": size, "batch": batch}
        for name, run in TRAINERS.items():
            result = run(args.work / "runs" / f"scale-{name}-{axis}-{value}", shards, model, batch, steps,
                         args.workers, args.threads, args.precision)
            row[f"{name}_step_seconds"] = batch / result["samples_per_second"]
            row[f"{name}_samples_per_second"] = result["samples_per_second"]
        print(f"  scaling {axis}={value}: clipx {row['clipx_step_seconds']:.3f} s/step, "
              f"open_clip {row['open_clip_step_seconds']:.3f} s/step", file=sys.stderr)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
