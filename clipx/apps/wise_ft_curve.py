"""WiSE-FT's curve: task and held-out accuracy at each alpha (clipx wise-ft --alphas), the
wise_ft.json that holds it, its plain-text table and its plot (which the run report also draws).

The weights of one alpha come from clipx.apps.wise_ft's ``Endpoints``; this module only evaluates them.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Optional, Protocol, Sequence

from torch import nn

from clipx.errors import ClipxError
from clipx.fileio import replace_atomically, write_json_atomic


class Endpoints(Protocol):
    """What the curve reads of clipx.apps.wise_ft's ``Endpoints`` (named here, not imported: wise_ft
    imports this module, so an import back would be a cycle)."""

    config: Any
    model: nn.Module
    sources: dict

    def at(self, alpha: float) -> nn.Module: ...

CURVE_JSON = "wise_ft.json"
CURVE_PNG = "wise_ft.png"


@dataclass(frozen=True)
class EvalSet:
    """A held-out evaluation: zero-shot top-1 over ``classes`` (None: all) of ``templates`` on ``data``."""

    name: str
    data: str
    classes: Optional[tuple[int, ...]]
    templates: str


def held_out_sets(paths: Sequence[str], classes: Optional[Sequence[int]], templates: str) -> list[EvalSet]:
    """One EvalSet per shard pattern, named by its last path part (the whole pattern if those clash);
    the shards, templates and classes are checked now, before anything is computed or written."""
    from clipx.data.shards import expand_shards
    from clipx.templates import chosen_classes, load_templates

    count = len(load_templates(templates)[0])
    chosen = chosen_classes(classes, count, "--held-out-classes") if classes is not None else None
    for path in paths:
        expand_shards(path, "--held-out")
    short = [Path(p.rstrip("/")).name or p for p in paths]
    names = short if len(set(short)) == len(short) else list(paths)
    if len(set(names)) != len(names):
        raise ClipxError("--held-out names the same shards twice")
    return [EvalSet(name, path, chosen, templates) for name, path in zip(names, paths)]


class _Towers:
    """The model without its head: evaluate() scores a head over its task's classes, which a held-out
    set need not contain."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __getattr__(self, name: str):
        if name in ("head", "classes"):
            raise AttributeError(name)
        return getattr(self.model, name)


def wise_ft_curve(ends: Endpoints, alphas: Iterable[float], task_data: str, held_out: Sequence[EvalSet], device,
                  batch_size: int = 256, workers: int = 2, precision: str = "fp32") -> list[dict]:
    """One row per alpha: {"alpha", "task_top1", "held_out_top1": {name: top1}}.

    The task's accuracy is the head's (``classifier.top1``) when the fine-tuned model has one, else
    zero-shot top-1 over the fine-tuned config's eval.templates and eval.classes; each held-out set
    is scored zero-shot. Labels come from the fine-tuned config's eval.label_key."""
    from clipx.data.tokenizer import Tokenizer
    from eval.run import evaluate

    config = ends.config
    tokenizer = Tokenizer(config.model)
    has_head = hasattr(ends.model, "head")
    common: dict[str, Any] = dict(label_key=config.eval.label_key, batch_size=batch_size, workers=workers, precision=precision,
                  retrieval=False)
    rows = []
    for alpha in alphas:
        model = ends.at(alpha)
        task = evaluate(model, tokenizer, config.model, task_data, device, zero_shot=not has_head,
                        templates=config.eval.templates, classes=config.eval.classes, **common)
        held = {s.name: evaluate(_Towers(model), tokenizer, config.model, s.data, device, zero_shot=True,
                                 templates=s.templates, classes=s.classes, **common)["zero_shot"]["top1"]
                for s in held_out}
        rows.append({"alpha": alpha, "task_top1": task["classifier" if has_head else "zero_shot"]["top1"],
                     "held_out_top1": held})
    return rows


def evaluate_curve(ends: Endpoints, alphas: Iterable[float], task_data: str, held_out: Sequence[EvalSet], device,
                   batch_size: int = 256, workers: int = 2, precision: str = "fp32") -> dict:
    """What wise_ft.json holds: the inputs (checkpoints, task, held-out sets) and ``wise_ft_curve``'s rows."""
    config = ends.config
    task = {"data": task_data, "templates": config.eval.templates, "classes": config.eval.classes,
            "metric": "classifier.top1" if hasattr(ends.model, "head") else "zero_shot.top1"}
    rows = wise_ft_curve(ends, alphas, task_data, held_out, device, batch_size, workers, precision)
    return {**ends.sources, "task": task, "held_out": [asdict(s) for s in held_out], "precision": precision,
            "rows": rows}


def read_curve(path: str | Path) -> dict:
    """A wise_ft.json (or the folder holding one), checked enough to draw."""
    path = Path(path)
    path = path / CURVE_JSON if path.is_dir() else path
    try:
        curve = json.loads(path.read_text())
        rows = curve["rows"]
        assert all({"alpha", "task_top1", "held_out_top1"} <= set(row) for row in rows) and rows
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise ClipxError(f"{path} is not a curve written by `clipx wise-ft --alphas` (rerun it)") from None
    return curve


def curve_table(rows: list[dict]) -> str:
    """Plain-text table: alpha, task top-1, one column per held-out set."""
    names = list(rows[0]["held_out_top1"]) if rows else []
    header = ["alpha", "task top1", *(f"{name} top1" for name in names)]
    lines = [[f"{row['alpha']:.3g}", f"{row['task_top1']:.4f}", *(f"{row['held_out_top1'][n]:.4f}" for n in names)]
             for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [header, *lines])


def plot_curve(rows: list[dict], target: str | Path | BinaryIO) -> None:
    """PNG: task accuracy (x) against each held-out set's accuracy (y), one line per set through the
    alphas in order, each point labelled with its alpha, the zero-shot (0) and fine-tuned (1) ends marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda row: row["alpha"])
    names = list(rows[0]["held_out_top1"]) if rows else []
    figure, axis = plt.subplots(figsize=(6, 4.5))
    x = [row["task_top1"] for row in rows]
    for name in names:
        y = [row["held_out_top1"][name] for row in rows]
        axis.plot(x, y, marker="o", markersize=4, label=name)
        labels: dict[tuple[float, float], list[str]] = {}  # alphas that land on one point share a label
        for row, xi, yi in zip(rows, x, y):
            labels.setdefault((xi, yi), []).append(f"{row['alpha']:.2g}")
        for point, alphas in labels.items():
            axis.annotate(", ".join(alphas), point, textcoords="offset points", xytext=(7, 5), fontsize=7)
        for alpha, marker, label in ((0.0, "*", "zero-shot (α=0)"), (1.0, "s", "fine-tuned (α=1)")):
            at_end = [(xi, yi) for row, xi, yi in zip(rows, x, y) if row["alpha"] == alpha]
            if at_end:
                axis.scatter([p[0] for p in at_end], [p[1] for p in at_end], marker=marker, s=140, color="black",
                             zorder=3, label=label if name == names[0] else None)
    axis.set_xlabel("accuracy on the fine-tuning task (top-1)")
    axis.set_ylabel("accuracy on held-out tasks (zero-shot top-1)")
    axis.set_title("WiSE-FT: (1 − α)·zero-shot + α·fine-tuned")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(target, format="png", dpi=100)
    plt.close(figure)


def curve_png(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    plot_curve(rows, buffer)
    return buffer.getvalue()


def write_curve(curve: dict, out: str | Path) -> tuple[Path, Path]:
    """OUT/wise_ft.json and OUT/wise_ft.png, each replaced atomically; returns their paths."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClipxError(f"--out {out} is a file; give a folder for {CURVE_JSON} and {CURVE_PNG}")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / CURVE_JSON, curve)
    replace_atomically(out / CURVE_PNG, lambda tmp: tmp.write_bytes(curve_png(curve["rows"])))
    return out / CURVE_JSON, out / CURVE_PNG
