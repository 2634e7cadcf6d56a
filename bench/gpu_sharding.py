"""ViT-B/32 CLIP at 224 px in bf16 on one GPU: DDP against FSDP (train.sharding), 50 steps each.

    python bench/gpu_sharding.py --out runs/bench/gpu_sharding.json     # on a machine with a GPU
    python bench/gpu_sharding.py --markdown runs/bench/gpu_sharding.json

Each setting builds the trainer a run builds (``build_trainer``: the model, its sharding, AdamW,
the loss scaler and the guard) and calls the real ``train_step`` on one synthetic batch already on
the GPU, so that the figure is the training step's and not the data loader's. Reported: samples/s
over the timed steps (after warm-up, CUDA-synchronised), peak GPU memory allocated, and model
FLOPs utilisation: the model's forward + backward FLOPs per sample (torch's FlopCounterMode) times
samples/s over the GPU's dense bf16 rate (the spec's, and one measured with a large matmul here).
Settings alternate (ddp, fsdp, ..., then backwards), medians reported. One GPU: FSDP shards over a
group of one, so this measures what its hooks and casts cost, not what sharding saves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import digits_shards, run_or_render  # noqa: E402

SPEC_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16, SXM
SETTINGS = {"ddp": ["train.sharding=ddp"], "fsdp": ["train.sharding=fsdp"],
            "fsdp, no reshard after forward": ["train.sharding=fsdp", "train.fsdp_reshard_after_forward=false"]}


def build(setting: str, data: str, batch: int, out: Path):
    from clipx.config import load_config
    from clipx.train.build import build_trainer

    config = load_config(REPO / "configs" / "vit-b-32-laion.yaml", [
        "model.name=ViT-B-32", f"data.train={data}", "data.val=null", "data.workers=0", f"train.batch_size={batch}",
        "train.steps=1000", "train.precision=bf16", f"train.output_dir={out}", "train.grad_checkpointing=false",
        "model.pretrained=null", "train.accum_steps=1", *SETTINGS[setting]])
    return build_trainer(config)


def time_steps(setting: str, args, batch_on_gpu: dict) -> dict:
    import gc

    import torch

    from clipx.train.loop import train_step

    gc.collect()  # the previous setting's trainer must not count in this one's peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = build(setting, args.data, args.batch, args.work / setting.replace(" ", "_").replace(",", ""))
    for step in range(1, args.warmup + 1):
        train_step(trainer, [batch_on_gpu], step)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for step in range(args.warmup + 1, args.warmup + args.steps + 1):
        train_step(trainer, [batch_on_gpu], step)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    found = {"samples_per_second": args.steps * args.batch / seconds,
             "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    del trainer
    torch.cuda.empty_cache()
    return found


def flops_per_sample(data: str, batch: int = 8) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    trainer = build("ddp", data, batch, Path("/tmp/flops"))
    sample = synthetic_batch(batch)
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        out = trainer.objective(sample)
        out["loss"].backward()
    return counter.get_total_flops() / batch


def synthetic_batch(batch: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    return {"image": torch.randn(batch, 3, 224, 224, generator=generator).cuda(),
            "text": torch.randint(1, 49000, (batch, 77), generator=generator).cuda()}


def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def measure(args) -> dict:
    import torch

    args.data = args.data or digits_shards(args.work)
    name = torch.cuda.get_device_name()
    batch = synthetic_batch(args.batch)
    runs: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    for index in range(args.alternations):
        for setting in (list(SETTINGS) if index % 2 == 0 else list(reversed(SETTINGS))):
            runs[setting].append(time_steps(setting, args, batch))
            print(setting, runs[setting][-1], file=sys.stderr, flush=True)
    flops = flops_per_sample(args.data)
    spec = next((rate for key, rate in SPEC_BF16_FLOPS.items() if key in name), None)
    measured = matmul_rate()
    results = {"gpu": name, "torch": torch.__version__, "batch": args.batch, "steps": args.steps,
               "flops_per_sample": flops, "spec_bf16_flops": spec, "measured_matmul_bf16_flops": measured, "runs": {}}
    for setting, found in runs.items():
        rate = statistics.median(r["samples_per_second"] for r in found)
        results["runs"][setting] = {
            "samples_per_second": rate, "all": [round(r["samples_per_second"], 1) for r in found],
            "peak_memory_gib": max(r["peak_memory_gib"] for r in found),
            "mfu_spec": flops * rate / spec if spec else None, "mfu_measured_matmul": flops * rate / measured}
    return results


def markdown(results: dict) -> str:
    lines = [f"{results['gpu']}, torch {results['torch']}; ViT-B/32 at 224 px, bf16, batch {results['batch']}, "
             f"{results['steps']} timed steps per run; {results['flops_per_sample'] / 1e9:.1f} GFLOP per sample "
             f"(forward + backward); bf16 matmul measured at {results['measured_matmul_bf16_flops'] / 1e12:.0f} "
             "TFLOP/s.", "",
             "| setting | samples/s (median) | ms per step | runs | peak GPU memory, GiB | MFU (spec peak) | "
             "MFU (measured matmul) |", "|---|---:|---:|---|---:|---:|---:|"]
    for setting, run in results["runs"].items():
        spec = f"{run['mfu_spec']:.1%}" if run["mfu_spec"] is not None else "n/a"
        lines.append(f"| {setting} | {run['samples_per_second']:.0f} | "
                     f"{1000 * results['batch'] / run['samples_per_second']:.0f} | {', '.join(map(str, run['all']))} | "
                     f"{run['peak_memory_gib']:.1f} | {spec} | {run['mfu_measured_matmul']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "gpu-sharding")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "gpu_sharding.json")
    parser.add_argument("--data", default=None, help="any training shards (default: digits under --work)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--alternations", type=int, default=2)
    parser.add_argument("--markdown", type=Path, metavar="RESULTS.json")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
