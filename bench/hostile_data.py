"""Hostile data and bad configs: what clipx skips, counts, stops on and refuses, as a JSON report.

    .venv/bin/python bench/hostile_data.py > runs/bench/hostile_data.json
    .venv/bin/python bench/hostile_data.py --markdown runs/bench/hostile_data.json   # RELIABILITY.md tables

1. One pass of the training loader over the hostile corpus (bench/hostile_corpus.py): skips
   by reason against the faults planted, and whether every good sample came exactly once.
2. `clipx train` on the corpus (2 workers, 20 steps, under a time limit: a hang fails it):
   exit status and the per-epoch skip summary of its checkpoint.
3. The same run with data.max_skip_fraction=0.1: exit status and its one-line message.
4. One `clipx train` per kind of bad config: exit status, seconds to the refusal, the message.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "demo-digits.yaml"

from bench.hostile_corpus import build_hostile_corpus, read_one_pass  # noqa: E402

# One override set per kind of config mistake the reliability issue names, plus the SSL ones.
BAD_CONFIGS = {
    "unknown key": ["train.batchsize=32"],
    "wrong type": ["train.batch_size=many"],
    "non-positive learning rate": ["train.lr=0"],
    "NaN learning rate": ["train.lr=nan"],
    "empty shard pattern": ["data.train="],
    "shard pattern matching nothing": ["data.train=/nonexistent/shard-{000..009}.tar"],
    "pipe: URL without opt-in": ["data.train=pipe:curl -s http://example.com/shard.tar"],
    "MoCo queue not a multiple of the global batch": ["loss.name=moco", "ssl.moco.queue_size=1000", "train.batch_size=64"],
    "conflicting options (SigLIP with global gather)": ["loss.name=siglip", "loss.gather=global"],
    "skip fraction out of range": ["data.max_skip_fraction=1.5"],
}


def train(overrides: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    command = [sys.executable, "-m", "clipx.cli", "train", "--config", str(CONFIG), *overrides]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return result, time.perf_counter() - started


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench/hostile_data"))
    parser.add_argument("--markdown", type=Path, metavar="REPORT.json", help="print a saved report as tables")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    work = args.work.resolve()

    from data_prep import prep_digits

    if not (work / "digits" / "train" / "sizes.json").is_file():
        prep_digits(work / "digits", image_size=32, shard_size=256, workers=2)
    corpus = build_hostile_corpus(work / "digits" / "train", work / "corpus")
    keys, counter = read_one_pass(corpus)
    report = {"one_pass": {
        "planted": corpus.expected_skips, "counted": {k: v for k, v in counter.snapshot().items() if v},
        "good_samples": len(corpus.good_keys), "delivered": len(keys), "distinct_delivered": len(set(keys)),
        "every_good_sample_exactly_once": sorted(keys) == sorted(corpus.good_keys),
    }}

    corpus.vanishing_shard.unlink()  # a folder lists what is there; the vanishing case is covered above
    model = REPO / "configs" / "models" / "tiny-digits.json"
    base = [f"model.name={model}", f"data.train={corpus.folder}", "data.train_num_samples=53", "data.val=null",
            "data.workers=2", "data.shuffle_buffer=16", "train.batch_size=8", "train.steps=20",
            "train.checkpoint_every=5", "train.threads=1", "train.warmup_steps=1"]
    for name in ("run", "stop"):
        shutil.rmtree(work / name, ignore_errors=True)
    result, seconds = train([*base, f"train.output_dir={work / 'run'}", "data.max_skip_fraction=0.4"], timeout=600)
    summary = json.loads((work / "run" / "summary.json").read_text()) if result.returncode == 0 else {}
    report["training"] = {"exit_status": result.returncode, "seconds": round(seconds, 1),
                          "skipped_by_epoch": summary.get("skipped_by_epoch"), "error": last_line(result.stderr)
                          if result.returncode else None}
    result, seconds = train([*base, f"train.output_dir={work / 'stop'}", "data.max_skip_fraction=0.1"], timeout=600)
    report["skip_fraction_stop"] = {"exit_status": result.returncode, "seconds": round(seconds, 1),
                                    "message": last_line(result.stderr)}

    shutil.rmtree(work / "bad", ignore_errors=True)
    clean = [f"model.name={model}", f"data.train={work / 'digits' / 'train'}", "data.val=null",
             f"train.output_dir={work / 'bad'}"]
    report["bad_configs"] = {}
    for kind, overrides in BAD_CONFIGS.items():
        result, seconds = train([*clean, *overrides], timeout=300)
        report["bad_configs"][kind] = {"exit_status": result.returncode, "seconds": round(seconds, 1),
                                       "stderr_lines": len(result.stderr.strip().splitlines()),
                                       "message": last_line(result.stderr),
                                       "output_dir_created": (work / "bad").exists()}
    print(json.dumps(report, indent=2))


def markdown(report: dict) -> str:
    one = report["one_pass"]
    lines = ["| reason | planted | counted |", "|---|---:|---:|"]
    lines += [f"| {r} | {n} | {one['counted'].get(r, 0)} |" for r, n in one["planted"].items()]
    lines += ["", f"Good samples: {one['good_samples']}; delivered: {one['delivered']} ({one['distinct_delivered']} "
              f"distinct); every good sample exactly once: {one['every_good_sample_exactly_once']}.", ""]
    run, stop = report["training"], report["skip_fraction_stop"]
    lines += [f"Training on the corpus: exit status {run['exit_status']} after {run['seconds']} s.",
              "", "| epoch | " + " | ".join(next(iter(run["skipped_by_epoch"].values()))) + " |",
              "|---|" + "---:|" * len(next(iter(run["skipped_by_epoch"].values())))]
    lines += [f"| {epoch} | " + " | ".join(str(v) for v in counts.values()) + " |"
              for epoch, counts in run["skipped_by_epoch"].items()]
    lines += ["", f"With `data.max_skip_fraction=0.1`: exit status {stop['exit_status']} after {stop['seconds']} s:",
              "", f"    {stop['message']}", "",
              "| bad config | exit status | seconds | stderr lines | output dir created | message |",
              "|---|---:|---:|---:|:---:|---|"]
    lines += [f"| {kind} | {r['exit_status']} | {r['seconds']} | {r['stderr_lines']} | "
              f"{'yes' if r['output_dir_created'] else 'no'} | {r['message'].replace('|', '/')} |"
              for kind, r in report["bad_configs"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
