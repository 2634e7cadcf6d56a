"""PNG plots of a run's metrics.jsonl: loss, learning rate, logit scale, throughput, evaluation metrics."""

from __future__ import annotations

from pathlib import Path

from clipx.train.metrics_log import read_metrics

# (file name, title, metric keys of "train" records); a plot is drawn when its keys were logged.
TRAIN_PLOTS = (
    ("loss.png", "training loss", ("loss",)),
    ("lr.png", "learning rate", ("lr",)),
    ("logit_scale.png", "logit scale (1 / temperature)", ("logit_scale",)),
    ("throughput.png", "throughput, samples/s", ("samples_per_second",)),
)
EVAL_KEYS = ("zero_shot.top1", "zero_shot.top5", "retrieval.image_to_text.R@1", "retrieval.text_to_image.R@1",
             "retrieval.text_to_image.R@10")


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in records of ``kind``; a step logged twice (after a resume) keeps its last value."""
    points = {r["step"]: r[key] for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def write_plots(run_dir: str | Path) -> list[Path]:
    """Draw every plot the run's log has data for into RUN_DIR/plots/; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    charts = [(name, title, "train", keys) for name, title, keys in TRAIN_PLOTS]
    charts.append(("eval.png", "evaluation during training", "eval", EVAL_KEYS))
    for name, title, kind, keys in charts:
        lines = [(key, *_series(records, kind, key)) for key in keys]
        lines = [line for line in lines if line[1]]
        if not lines:
            continue
        figure, axis = plt.subplots(figsize=(6, 3.2))
        for key, steps, values in lines:
            axis.plot(steps, values, marker="o" if len(steps) < 20 else None, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(lines) > 1:
            axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        written.append(out / name)
    return written
