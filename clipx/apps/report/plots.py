"""PNG plots for the reports: a run's metrics.jsonl (loss, learning rate, logit scale, throughput, evaluation
metrics) drawn into RUN_DIR/plots, and score histograms drawn to PNG bytes for a curation report."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

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


# Bar colours of the histogram series a curation report draws, by series name.
SERIES_COLOURS = {"kept": "#2a9d2a", "removed": "#d0543a", "pool": "#4a78b0"}


def pyplot():
    """matplotlib.pyplot on the Agg backend: reports draw to files, never to a screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes (100 dpi); the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot().close(figure)
    return buffer.getvalue()


def histogram_png(edges: Sequence[float], series: dict[str, Sequence[float]], title: str,
                  threshold: float | None = None) -> bytes:
    """Stacked bars of per-bin counts (each series len(edges) - 1 long, stacked in dict order) over the
    bin ``edges``, with ``threshold`` drawn as a dashed vertical line when given; PNG bytes."""
    plt = pyplot()
    lefts, widths = list(edges[:-1]), [b - a for a, b in zip(edges[:-1], edges[1:])]
    figure, axis = plt.subplots(figsize=(6.4, 3.2))
    bottom = [0.0] * len(lefts)
    for name, counts in series.items():
        axis.bar(lefts, counts, width=widths, bottom=bottom, align="edge", label=f"{name} ({int(sum(counts)):,})",
                 color=SERIES_COLOURS.get(name), edgecolor="white", linewidth=0.3)
        bottom = [b + c for b, c in zip(bottom, counts)]
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.3g}")
    axis.set_title(title)
    axis.set_xlabel("score (cosine of image and caption embeddings)")
    axis.set_ylabel("samples")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return png_bytes(figure)


def write_plots(run_dir: str | Path) -> list[Path]:
    """Draw every plot the run's log has data for into RUN_DIR/plots/; returns the files written."""
    plt = pyplot()
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    charts: list[tuple[str, str, str, tuple[str, ...]]] = [(name, title, "train", keys) for name, title, keys in TRAIN_PLOTS]
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
