"""FSDP's GPU paths on one GPU: NCCL, bf16 and fp16 policies, CPU offload, sharded save, resume, consumers.

    python bench/gpu_fsdp_check.py --out runs/bench/gpu_fsdp_check.json     # on a machine with a GPU

The CPU tests cover these paths over gloo; this runs the ones a CPU cannot (CPU offload needs CUDA)
and the rest on NCCL. Each case trains the tiny digits model for 4 steps with a checkpoint at step 2,
resumes a copy from step 2, and compares the two step-4 checkpoints (bitwise where the GPU's kernels
are deterministic; the largest difference is reported either way). The sharded checkpoint is then
consolidated and evaluated zero-shot.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import digits_shards, run_or_render  # noqa: E402

CASES = {
    "fsdp bf16": ["train.precision=bf16"],
    "fsdp fp16": ["train.precision=fp16", "train.fp16_init_scale=1024"],
    "fsdp bf16, CPU offload": ["train.precision=bf16", "train.fsdp_cpu_offload=true"],
    "fsdp fp32, no reshard after forward": ["train.fsdp_reshard_after_forward=false"],
}


def run_case(name: str, extra: list[str], data: str, work: Path) -> dict:
    import torch

    from clipx.api import consolidate, load_model, read_weights
    from clipx.config import load_config
    from clipx.data.tokenizer import Tokenizer
    from clipx.train.loop import train
    from eval.run import evaluate

    def config(out: Path):
        return load_config(REPO / "configs" / "demo-digits.yaml", [
            f"model.name={REPO / 'configs' / 'models' / 'tiny-digits.json'}", f"data.train={data}", "data.val=null",
            "data.workers=2", "train.batch_size=64", "train.steps=4", "train.checkpoint_every=2",
            "train.sharding=fsdp", f"train.output_dir={out}", *extra])

    first, second = work / "unbroken", work / "resumed"
    summary = train(config(first))
    (second / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "step-000000002", second / "checkpoints" / "step-000000002")
    train(config(second), resume="latest")
    final, again = (run / "checkpoints" / "step-000000004" for run in (first, second))
    a, b = read_weights(final, {}), read_weights(again, {})
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    consolidate(first)
    model, loaded = load_model(first)
    result = evaluate(model.cuda(), Tokenizer(loaded.model), loaded.model, str(Path(data).parent / "test"),
                      torch.device("cuda"), retrieval=False, workers=1)
    return {"final_loss": summary["final_loss"], "overflow_steps": summary["overflow_steps"],
            "resume_bitwise": worst == 0.0, "resume_max_difference": worst,
            "shards": sorted(p.name for p in final.glob("*-shard*.safetensors")),
            "consolidated_zero_shot_top1": result["zero_shot"]["top1"]}


def measure(args) -> dict:
    import torch

    data = digits_shards(args.work)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    for index, (name, extra) in enumerate(CASES.items()):
        if args.only and args.only not in name:
            continue
        try:
            results["cases"][name] = run_case(name, extra, data, args.work / f"case{index}")
        except Exception as error:  # report every case, whatever one of them does
            import traceback

            traceback.print_exc()
            results["cases"][name] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        print(name, results["cases"][name], file=sys.stderr, flush=True)
    return results


def markdown(results: dict) -> str:
    lines = [f"{results['gpu']}, torch {results['torch']}; the tiny digits model, 4 steps, one process (NCCL).", "",
             "| case | final loss | resumed at step 2, bitwise equal at 4 | largest difference | "
             "zero-shot top-1 of the consolidated checkpoint |", "|---|---:|:---:|---:|---:|"]
    for name, case in results["cases"].items():
        if "error" in case:
            lines.append(f"| {name} | error: {case['error'][:200]} | | | |")
            continue
        lines.append(f"| {name} | {case['final_loss']:.4f} | {case['resume_bitwise']} | "
                     f"{case['resume_max_difference']:.2e} | {case['consolidated_zero_shot_top1']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "gpu-fsdp-check")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "gpu_fsdp_check.json")
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS.json")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
