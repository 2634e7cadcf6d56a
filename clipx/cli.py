"""`clipx prep|train|eval|demo|...`: parse arguments, call the library, turn ClipxError into one line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from clipx.apps.caption_cli import add_caption
from clipx.apps.checkpoint_cli import add_checkpoint_commands, add_precision, add_weights
from clipx.apps.curate_cli import add_curate
from clipx.apps.prep_cli import add_prep
from clipx.apps.text_eval import add_text_eval
from clipx.errors import ClipxError
from clipx.fileio import write_json_atomic
from clipx.templates import parse_classes


def main(argv: list[str] | None = None) -> int:
    # No clipx command may download weights or datasets: the Hugging Face libraries read local files
    # only. Set for this process (and the loader workers it forks) before they are imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ClipxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipx", description="CLIP-style contrastive training on webdataset shards")
    commands = parser.add_subparsers(dest="command", required=True)
    add_prep(commands)
    add_curate(commands)
    add_caption(commands)
    _add_train(commands)
    _add_eval(commands)
    _add_demo(commands)
    _add_plan(commands)
    _add_config(commands)
    add_checkpoint_commands(commands)
    _add_report(commands)
    _add_wise_ft(commands)
    table = commands.add_parser("table", help="Markdown table of demo results.json files")
    table.add_argument("results", nargs="+")
    table.set_defaults(func=_table)
    return parser


# ---- train ------------------------------------------------------------------------------------

def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train from a YAML config (+ section.key=value overrides)")
    add_train_arguments(train)
    train.set_defaults(func=_train)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo-digits.yaml")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 data.workers=4")


def _train(args) -> int:
    from clipx.apps.run_hooks import run_hooks
    from clipx.config import load_config
    from clipx.train.guards import EXIT_PREEMPTED
    from clipx.train.loop import train

    config = load_config(args.config, args.overrides)
    summary = train(config, resume=args.resume, hooks=run_hooks())  # evaluation during training, plots
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    if summary["preempted"]:
        print(f"stopped by a signal at step {summary['steps']} after saving {summary['checkpoint']}; continue with "
              "--resume latest", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


# ---- eval -------------------------------------------------------------------------------------

def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on shards, write JSON")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    for task in ("knn", "linear-probe"):
        sub = tasks.add_parser(task, help="frozen image features of any encoder (CLIP image tower or SSL)")
        sub.add_argument("--checkpoint", required=True, help="checkpoint directory (or a run directory: its latest)")
        sub.add_argument("--train-data", required=True, help="labelled shards: the kNN memory bank / probe training set")
        sub.add_argument("--data", required=True, help="labelled shards to classify")
        sub.add_argument("--out", required=True, help="JSON file to write")
        sub.add_argument("--label-key", default="label", help="field of the .json holding the class index")
        sub.add_argument("--batch-size", type=int, default=256)
        sub.add_argument("--workers", type=int, default=2)
        add_precision(sub)
        add_weights(sub)
        if task == "knn":
            sub.add_argument("--k", type=int, default=20)
            sub.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
        sub.set_defaults(func=_eval_probe)
    for task in ("zero-shot", "retrieval"):
        sub = tasks.add_parser(task)
        sub.add_argument("--checkpoint", required=True, help="checkpoint directory (or a run directory: its latest)")
        sub.add_argument("--data", required=True, help="shard pattern, folder of shards, or a CLIP_benchmark "
                         "dataset folder (test/{0..n}.tar, nshards.txt, classnames.txt, templates)")
        sub.add_argument("--out", required=True, help="JSON file to write")
        sub.add_argument("--batch-size", type=int, default=256)
        sub.add_argument("--workers", type=int, default=2)
        add_precision(sub)
        add_weights(sub)
        if task == "zero-shot":
            sub.add_argument("--templates", default=None,
                             help="shipped name (digits, imagenet) or YAML path; default: the checkpoint's eval.templates")
            sub.add_argument("--label-key", default=None, help="field of the .json holding the class index")
            sub.add_argument("--classes", default=None, help="choose among these labels only, e.g. 5-9 (other "
                             "images are left out); default: the checkpoint's eval.classes, else every class")
        sub.set_defaults(func=_eval)
    for sub in add_text_eval(tasks):
        add_precision(sub)
        add_weights(sub)


def _eval(args) -> int:
    from clipx.api import choose_weights, load_model
    from clipx.data.shards import clip_benchmark_shards
    from clipx.data.tokenizer import Tokenizer
    from eval.run import default_device, evaluate

    device = default_device()
    weights = choose_weights(args.checkpoint, args.weights)
    model, config = load_model(args.checkpoint, device, weights)
    zero_shot = args.task == "zero-shot"
    data, templates = args.data, getattr(args, "templates", None) or config.eval.templates
    clip_benchmark = clip_benchmark_shards(args.data)
    if clip_benchmark:  # a CLIP_benchmark dataset folder: its test split, and its class names and templates
        data = clip_benchmark
        templates = getattr(args, "templates", None) or args.data
    results = evaluate(model, Tokenizer(config.model), config.model, data, device,
                       zero_shot=zero_shot, retrieval=not zero_shot,
                       templates=templates,
                       label_key=(getattr(args, "label_key", None) or config.eval.label_key),
                       batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                       classes=parse_classes(args.classes) if getattr(args, "classes", None) else config.eval.classes)
    results["checkpoint"] = str(args.checkpoint)
    results["precision"] = args.precision
    results["weights"] = weights
    write_json_atomic(Path(args.out), results)
    print(json.dumps(results, indent=2))
    return 0


def _eval_probe(args) -> int:
    from clipx.api import choose_weights, load_model
    from eval.image_probes import knn_eval, labelled_features, linear_probe_eval
    from eval.run import default_device

    device = default_device()
    weights = choose_weights(args.checkpoint, args.weights)
    model, config = load_model(args.checkpoint, device, weights)
    train, test = (labelled_features(model, config.model, shards, device, args.label_key, args.batch_size,
                                     args.workers, args.precision) for shards in (args.train_data, args.data))
    key = "knn" if args.task == "knn" else "linear_probe"
    metrics = knn_eval(train, test, args.k, args.temperature) if key == "knn" else linear_probe_eval(train, test)
    results = {key: metrics, "num_train": len(train[1]), "num_test": len(test[1]), "checkpoint": str(args.checkpoint),
               "weights": weights}
    write_json_atomic(Path(args.out), results)
    print(json.dumps(results, indent=2))
    return 0


# ---- demo -------------------------------------------------------------------------------------

def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="digits end to end: prep, train, evaluate, results.json")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--mode", default="clip", choices=["clip", "simclr", "moco", "swav"],
                      help="clip: image-text; simclr, moco, swav: image-only self-supervised, with kNN and "
                      "linear probes")
    demo.add_argument("--config", default=None,
                      help="default: configs/demo-digits.yaml (clip) or configs/<mode>-digits.yaml of this checkout")
    demo.add_argument("--shuffle-captions", action="store_true",
                      help="control run: captions shuffled across images, so the pairing carries no signal")
    demo.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=100")
    demo.set_defaults(func=_demo)


def _demo(args) -> int:
    if args.mode != "clip":
        from clipx.apps.demo_ssl import print_ssl_table, run_ssl_demo

        out = Path(args.out if args.out != "runs/demo" else f"runs/{args.mode}-demo")
        print_ssl_table(run_ssl_demo(args.mode, out, config_path=args.config, overrides=args.overrides))
        print(f"wrote {out / 'results.json'}")
        return 0
    from clipx.apps.demo import print_table, run_demo

    results = run_demo(Path(args.out), config_path=args.config, overrides=args.overrides,
                       shuffle_captions=args.shuffle_captions)
    print_table(results)
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0


def _add_report(commands) -> None:
    report = commands.add_parser("report", help="one self-contained HTML page about a training run or a curation folder")
    report.add_argument("run_dir", metavar="RUN_DIR|CUR", help="a training run directory (`clipx train`) or a "
                        "curation folder (`clipx curate`, it holds curation.json)")
    report.add_argument("--out", default=None, help="HTML file to write (default RUN_DIR/report.html or CUR/report.html)")
    report.add_argument("--data", default=None, help="a run's shards for the gallery and confusion matrix "
                        "(default data.val); a curation report reads the shards its curation.json lists")
    report.set_defaults(func=_report)


def _report(args) -> int:
    from clipx.apps.report.curation import is_curation_dir, write_curation_report
    from clipx.apps.report.html import write_report

    if not is_curation_dir(args.run_dir):
        print(f"wrote {write_report(args.run_dir, args.out, args.data)}")
        return 0
    if args.data:
        raise ClipxError(f"--data is for a run's report, and {args.run_dir} is a curation folder (it reads the "
                         "shards its curation.json lists): drop --data")
    print(f"wrote {write_curation_report(args.run_dir, args.out)}")
    return 0


def _add_wise_ft(commands) -> None:
    wise = commands.add_parser("wise-ft", help="WiSE-FT: average a zero-shot and a fine-tuned checkpoint's weights")
    wise.add_argument("--zero-shot", required=True, help="the CLIP the fine-tuning started from (checkpoint or run)")
    wise.add_argument("--fine-tuned", required=True, help="its fine-tuned descendant (checkpoint or run)")
    wise.add_argument("--alpha", type=float, default=None, help="write the checkpoint (1 - alpha)*zero-shot + "
                      "alpha*fine-tuned to --out; alpha in [0, 1]")
    wise.add_argument("--alphas", default=None, help="evaluate the curve: START:STOP:STEP (0:1:0.1, STOP included) "
                      "or 0,0.5,1; writes OUT/wise_ft.json and OUT/wise_ft.png")
    wise.add_argument("--out", required=True, help="folder for the checkpoint and/or the curve")
    wise.add_argument("--task-data", default=None, help="the fine-tuning task's evaluation shards (default: the "
                      "fine-tuned run's data.val)")
    wise.add_argument("--held-out", nargs="+", action="extend", default=[], help="shards of held-out tasks, scored "
                      "zero-shot")
    wise.add_argument("--held-out-classes", default=None, help="their labels, e.g. 5-9 (default: every class)")
    wise.add_argument("--held-out-templates", default=None, help="their class names and prompts (default: the "
                      "fine-tuned run's eval.templates)")
    wise.add_argument("--batch-size", type=int, default=256)
    wise.add_argument("--workers", type=int, default=2)
    add_precision(wise)
    add_weights(wise)
    wise.set_defaults(func=_wise_ft)


def _wise_ft(args) -> int:
    from clipx.apps import wise_ft
    from clipx.data.shards import expand_shards
    from eval.run import default_device

    if args.alpha is None and args.alphas is None:
        raise ClipxError("clipx wise-ft needs --alpha X (write that checkpoint) or --alphas 0:1:0.1 (evaluate the "
                         "curve), or both")
    if args.alphas is None and (args.task_data or args.held_out):
        raise ClipxError("--task-data and --held-out evaluate the curve: give --alphas too")
    if args.alphas is not None and not args.held_out:
        raise ClipxError("the curve plots task accuracy against held-out accuracy: give --held-out SHARDS")
    alpha = wise_ft.check_alpha(args.alpha) if args.alpha is not None else None
    alphas = wise_ft.parse_alphas(args.alphas) if args.alphas is not None else []
    if Path(args.out).is_file():
        raise ClipxError(f"--out {args.out} is a file; give a folder")
    if alpha is not None:
        wise_ft.check_checkpoint_out(args.out)
    device = default_device()
    ends = wise_ft.load_endpoints(args.zero_shot, args.fine_tuned, args.weights, device)
    task_data = args.task_data or ends.config.data.val
    if alphas:  # every input of the curve is checked before anything is written
        if not task_data:
            raise ClipxError("the fine-tuned run has no data.val: give --task-data SHARDS for the curve")
        expand_shards(task_data, "--task-data")
        classes = parse_classes(args.held_out_classes) if args.held_out_classes else None
        held_out = wise_ft.held_out_sets(args.held_out, classes, args.held_out_templates or ends.config.eval.templates)
    if alpha is not None:
        out = wise_ft.write_checkpoint(ends.at(alpha), ends.config, args.out, {"alpha": alpha, **ends.sources})
        print(f"wrote {out}: (1 - {alpha}) * zero-shot + {alpha} * fine-tuned")
    if alphas:
        curve = wise_ft.evaluate_curve(ends, alphas, task_data, held_out, device, args.batch_size, args.workers,
                                       args.precision)
        print(wise_ft.curve_table(curve["rows"]))
        print("wrote " + " and ".join(map(str, wise_ft.write_curve(curve, args.out))))
    return 0


def _add_plan(commands) -> None:
    plan = commands.add_parser("plan", help="per-rank memory estimate for a config, before launching")
    plan.add_argument("--config", required=True)
    plan.add_argument("--world-size", type=int, default=1, help="number of ranks (GPUs)")
    plan.add_argument("--global-batch", type=int, default=None,
                      help="samples per optimizer step over all ranks (default: train.batch_size x world size)")
    plan.add_argument("--loader-target", type=float, default=None, metavar="SAMPLES_PER_S",
                      help="also time the loader on one core on data.train and say how many cores this "
                           "training rate (over all ranks) needs")
    plan.add_argument("--loader-samples", type=int, default=512, help="samples to time for --loader-target")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.gather=global")
    plan.set_defaults(func=_plan)


def _plan(args) -> int:
    from clipx.apps.plan import PLANNED_LOSSES, plan_loader, plan_memory
    from clipx.config import load_config

    if args.world_size < 1 or (args.global_batch is not None and args.global_batch < args.world_size):
        raise ClipxError("--world-size must be >= 1 and --global-batch at least the world size")
    if args.loader_target is not None and (args.loader_target <= 0 or args.loader_samples < 1):
        raise ClipxError("--loader-target must be > 0 samples/s and --loader-samples at least 1")
    config = load_config(args.config, args.overrides)
    if args.loader_target is None or config.loss.name in PLANNED_LOSSES:
        print(plan_memory(config, args.world_size, args.global_batch).table())
    if args.loader_target is not None:
        print(plan_loader(config, args.loader_target, args.world_size, args.loader_samples).table())
    return 0


def _add_config(commands) -> None:
    config = commands.add_parser("config", help="the reference of every config key (docs/CONFIG.md)")
    config.add_argument("--reference", action="store_true", required=True,
                        help="write the Markdown reference: each key's type, allowed values, default and meaning")
    config.add_argument("--out", default=None, help="file to write, e.g. docs/CONFIG.md (default: stdout)")
    config.set_defaults(func=_config)


def _config(args) -> int:
    from clipx.apps.config_reference import all_keys, write_reference

    write_reference(args.out)
    if args.out is not None:
        print(f"wrote {args.out} ({len(all_keys())} keys)")
    return 0


def _table(args) -> int:
    from clipx.apps.demo import markdown_table
    from clipx.apps.demo_ssl import ssl_markdown_table

    missing = [p for p in args.results if not Path(p).is_file()]
    if missing:
        raise ClipxError(f"results file {missing[0]} does not exist; run `clipx demo` first")
    image_only = ["knn" in json.loads(Path(p).read_text()) for p in args.results]
    if len(set(image_only)) > 1:
        raise ClipxError("give either image-text demo results or self-supervised ones, not both in one table")
    print(ssl_markdown_table(args.results) if image_only[0] else markdown_table(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
