"""Reinforced shards against plain training: a micro CLIP student at equal steps, on two datasets.

    .venv/bin/python bench/reinforce.py [--steps 300] [--seeds 0 1] [--datasets digits photos]
    .venv/bin/python bench/reinforce.py --markdown runs/bench/reinforce.json

Per dataset (scikit-learn's digits, `clipx prep digits`; the photographs shipped with scikit-image
and scikit-learn, `clipx prep photos`; both at 32 px):

1. teachers: two CLIPs of the demo's model (configs/demo-digits.yaml, models/tiny-digits.json:
   4 blocks, 128 wide, 4 px patches), trained --teacher-steps steps with seeds 0 and 1, in bf16;
2. `clipx prep reinforce --teachers A,B --augmentations K --captions 0`, twice: K stored views per
   image as the student's own crops (0.8 to 1 of the area; flips only on the photos, a mirrored
   digit being another sign), and the same with the writer's default colour jitter on top; both
   teachers' float16 embeddings of every view and caption;
3. the student (configs/distill-digits.yaml's micro model: one block per tower, 32 wide, 8 px
   patches) for --steps steps of 128 pairs in bf16, per seed, alternating: plain (the original
   shards, its random crop), reinforced (the crops' shards, data.reinforced, distill.embedded at
   weight 1: the ensemble's averaged similarity distributions, each teacher at its own
   temperature, added to the contrastive loss, open_clip's sum), the same on the jittered views,
   and on the jittered views with the distillation term alone (distill.student_weight=0,
   MobileCLIP's lambda = 1);
4. the loss at step 1 of one-step runs of the offline (stored) and online (teachers run in the
   loop on the replayed view) ensemble forms, same seed.

5. timing: --timing-pairs short runs of each form (--timing-steps steps), alternating, nothing else
   running: the accuracy runs above share the machine with whatever else runs.

Reported: zero-shot top-1 on the held-out split (mean of the seeds, then each), the median seconds
per step of each form (from 5), their ratio, the bytes reinforcement adds per sample, and the
step-1 losses of the two forms and their difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import add_report_arguments, finished, run_or_render  # noqa: E402

TEACHER = REPO / "configs" / "demo-digits.yaml"
STUDENT = REPO / "configs" / "distill-digits.yaml"
FLIPS = {"digits": 0.0, "photos": 0.5}
# The stored views: the student's own augmentation (its crop range, no colour jitter), so that the
# comparison with plain training isolates what reinforcement adds; and the writer's default colour
# jitter on top (brightness, contrast, saturation within 1 +- 0.4, on 80% of the views).
VIEWS = {"crops": {"jitter_prob": 0.0}, "jittered": {}}
# form -> (run folder, the views it reads or None for the plain shards, overrides of the student's config)
FORMS = {"plain": ("plain", None, ["distill.embedded=false"]),
         "reinforced": ("crops", "crops", ["data.reinforced=true"]),
         "reinforced, jittered views": ("reinforced", "jittered", ["data.reinforced=true"]),
         "jittered views, distillation alone": ("distilled", "jittered",
                                                ["data.reinforced=true", "distill.student_weight=0"])}


def dataset(name: str, work: Path) -> Path:
    folder = work / name
    if not (folder / "train").is_dir():
        if name == "digits":
            from data_prep import prep_digits

            prep_digits(folder, image_size=32, shard_size=256, workers=0)
        else:
            from data_prep.photos import prep_photos

            prep_photos(folder, image_size=32, workers=0)
    return folder


def train_run(config: Path, name: str, train: Path, test: Path, out: Path, steps: int, seed: int,
              *overrides: str) -> dict:
    """One bf16 run evaluated at its end: zero-shot top-1, the checkpoint, the median step seconds."""
    from clipx.apps.run_hooks import run_hooks
    from clipx.config import load_config
    from clipx.train.loop import train as train_loop

    values = [f"data.train={train}", f"data.val={test}", f"train.output_dir={out}", f"train.steps={steps}",
              f"train.seed={seed}", f"eval.every={steps}", f"train.checkpoint_every={steps}", f"eval.templates={name}",
              "train.plots=false", "train.precision=bf16", *overrides]
    loaded = load_config(config, values)
    summary = finished(out, steps) or train_loop(loaded, hooks=run_hooks())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [row["samples_per_second"] for row in rows if row.get("kind") == "train" and row.get("samples_per_second")]
    return {"zero_shot_top1": summary["eval"]["zero_shot"]["top1"], "checkpoint": str(summary["checkpoint"]),
            "step_seconds": loaded.train.batch_size / statistics.median(rates)}


def first_step_loss(name: str, data: Path, out: Path, *overrides: str) -> dict:
    """The logged losses of step 1 of a one-step run (no evaluation)."""
    from clipx.config import load_config
    from clipx.train.loop import train as train_loop

    values = [f"data.train={data}", "data.val=null", f"train.output_dir={out}", "train.steps=1", "train.log_every=1",
              "train.checkpoint_every=1", f"eval.templates={name}", "train.plots=false", "train.precision=bf16",
              *overrides]
    if not (out / "summary.json").is_file():
        train_loop(load_config(STUDENT, values))
    row = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(line).get("step") == 1)
    return {key: row[key] for key in ("loss", "student_loss", "distill_loss")}


def measure_dataset(name: str, work: Path, args) -> dict:
    from clipx.data.reinforce import ViewRecipe
    from data_prep.reinforce import reinforce_shards

    data = dataset(name, work)
    teachers = [train_run(TEACHER, name, data / "train", data / "test", work / f"teacher-{seed}", args.teacher_steps,
                          seed) for seed in (0, 1)]
    shards = {views: work / ("reinforced" if views == "jittered" else f"reinforced-{views}") for views in VIEWS}
    written = {views: reinforce_shards([t["checkpoint"] for t in teachers], str(data / "train"), shards[views],
                                       augmentations=args.augmentations, captions=0, image_size=32,
                                       recipe=ViewRecipe(crop_scale_min=0.8, flip_prob=FLIPS[name], **recipe),
                                       batch_size=256)
               for views, recipe in VIEWS.items()}
    reinforced = shards["crops"]
    runs: dict = {name: {} for name in FORMS}
    for seed in args.seeds:  # the forms alternate within each seed
        for form, (folder, views, overrides) in FORMS.items():
            train = shards[views] if views else data / "train"
            runs[form][seed] = train_run(STUDENT, name, train, data / "test", work / f"{folder}-{seed}", args.steps,
                                         seed, *overrides)
    timing = {"plain": [], "reinforced": []}
    for index in range(args.timing_pairs):  # nothing else running: short runs, alternating, for the step times
        for form, train, extra in (("plain", data / "train", "distill.embedded=false"),
                                   ("reinforced", reinforced, "data.reinforced=true")):
            timing[form].append(train_run(STUDENT, name, train, data / "test", work / f"timing-{form}-{index}",
                                          args.timing_steps, index, extra, "train.log_every=5")["step_seconds"])
    online = ",".join(t["checkpoint"] for t in teachers)
    step1 = {"offline": first_step_loss(name, reinforced, work / "step1-offline", "data.reinforced=true"),
             "online": first_step_loss(name, reinforced, work / "step1-online", "data.reinforced=true",
                                       "distill.embedded=false", f"distill.teacher={online}")}
    # A rerun finds the shards written already: their growth on disk, tar padding included.
    per_sample = written["crops"]["bytes_per_sample"] or _bytes_per_sample(reinforced, data / "train")
    return {"teachers": [t["zero_shot_top1"] for t in teachers], "bytes_per_sample": per_sample,
            "runs": runs, "timing": timing, "step1": step1}


def _bytes_per_sample(reinforced: Path, original: Path) -> float:
    sizes = json.loads((original / "sizes.json").read_text())
    grown = sum((reinforced / shard).stat().st_size - (original / shard).stat().st_size for shard in sizes)
    return grown / sum(sizes.values())


def measure(args) -> dict:
    work = Path(args.work) / "reinforce"
    return {"command": "bench/reinforce.py " + " ".join(sys.argv[1:]), "steps": args.steps,
            "teacher_steps": args.teacher_steps, "augmentations": args.augmentations, "seeds": args.seeds,
            "timing_steps": args.timing_steps, "timing_pairs": args.timing_pairs,
            "datasets": {name: measure_dataset(name, work / name, args) for name in args.datasets}}


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def markdown(results: dict) -> str:
    lines = [f"`{results['command']}`: teachers {results['teacher_steps']} steps each; students "
             f"{results['steps']} steps of 128 pairs in bf16, seeds {results['seeds']}; "
             f"{results['augmentations']} stored views per image. Zero-shot top-1 on the held-out split (mean, then "
             f"each seed); seconds per step: the median of {results['timing_pairs']} runs of each form of "
             f"{results['timing_steps']} steps, plain and reinforced alternating (each run's median logged rate, "
             "every 5 steps).", "",
             "| dataset | teachers' top-1 | " + " | ".join(f"{form} top-1" for form in FORMS) + " | plain s/step | "
             "reinforced s/step | ratio | bytes added per sample | step-1 loss offline | online | difference |",
             "|---|---|" + "---:|" * (len(FORMS) + 7)]
    for name, result in results["datasets"].items():
        top1 = {form: [r["zero_shot_top1"] for r in runs.values()] for form, runs in result["runs"].items()}
        step = {form: statistics.median(seconds) for form, seconds in result["timing"].items()}
        offline, online = result["step1"]["offline"]["loss"], result["step1"]["online"]["loss"]
        lines.append(f"| {name} | {', '.join(f'{t:.3f}' for t in result['teachers'])} | "
                     + " | ".join(_mean(top1[form]) for form in FORMS) + f" | {step['plain']:.3f} | {step['reinforced']:.3f} | "
                     f"{step['reinforced'] / step['plain']:.2f} | {result['bytes_per_sample']:.0f} | {offline:.6f} | "
                     f"{online:.6f} | {abs(offline - online):.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--augmentations", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--timing-steps", type=int, default=80)
    parser.add_argument("--timing-pairs", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=["digits", "photos"])
    add_report_arguments(parser, "reinforce")
    args = parser.parse_args()
    run_or_render(args, lambda: measure(args), markdown)


if __name__ == "__main__":
    main()
