"""What the benchmark scripts share: measure once, keep the JSON, print the Markdown table from it.

Every script's figures come from its JSON report, and BENCHMARKS.md's tables are its ``--markdown``
rendering of that file, so a table is never typed in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def add_report_arguments(parser, name: str) -> None:
    """``--work`` (scratch folder: shards, runs), ``--out`` (the JSON report, runs/bench/NAME.json)
    and ``--markdown`` (print an existing report's table instead of measuring)."""
    bench = Path(__file__).resolve().parents[1] / "runs" / "bench"
    parser.add_argument("--work", type=Path, default=bench)
    parser.add_argument("--out", type=Path, default=bench / f"{name}.json")
    parser.add_argument("--markdown", type=Path, help="print the table of an existing JSON report")


def run_or_render(args, measure: Callable[[], dict], markdown: Callable[[dict], str]) -> None:
    """With ``--markdown FILE``, print FILE's table; otherwise measure, write ``args.out``, print the table."""
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    results = measure()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


def finished(run: Path, steps: int) -> dict | None:
    """The summary of a training run already finished in ``run`` at ``steps`` steps (a rerun of a
    benchmark reuses it rather than train it again), or None."""
    path = run / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("steps") == steps and "eval" in summary else None


def digits_shards(work: Path) -> str:
    """The digits' training shards under ``work`` (written once): real shards for ``build_trainer``,
    which checks that data exists, where the timed steps themselves use a synthetic batch."""
    from data_prep import prep_digits

    digits = work / "digits"
    if not (digits / "train").is_dir():
        prep_digits(digits, image_size=32, shard_size=256, workers=0)
    return str(digits / "train")
