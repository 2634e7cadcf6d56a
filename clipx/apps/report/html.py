"""`clipx report RUN_DIR`: one self-contained HTML page about a run.

The page holds the run's plots (drawn from metrics.jsonl), its config, a table of final metrics,
and, when the run has validation shards, a retrieval gallery (for a few captions, the top-5
retrieved images, the right one marked) and a zero-shot confusion matrix; when `clipx wise-ft --alphas`
wrote its curve into the run directory (wise_ft.json), that curve's plot and table. Every image is inlined
as a data: URI, so the file can be mailed or archived alone. A script on the page records whether
every image decoded (see clipx/apps/report/page.py), which the browser test reads.
"""

from __future__ import annotations

import html
import json
import tarfile
from pathlib import Path

import torch

from clipx.apps.report.page import data_uri, section, write_page
from clipx.apps.report.plots import png_bytes, pyplot, write_plots
from clipx.errors import ClipxError

GALLERY_QUERIES = 4
GALLERY_TOP = 5


def _metrics_table(summary: dict) -> str:
    from eval.run import flatten_metrics

    rows = {"steps": summary.get("steps"), "train samples/s": summary.get("samples_per_second"),
            "final loss": summary.get("final_loss"), "train seconds": summary.get("train_seconds")}
    # Skip counts only when something was skipped: a clean run's table stays about results.
    rows.update({k: v for k, v in flatten_metrics(summary.get("eval") or {}).items()
                 if not (k.startswith("skipped.") and v == 0)})
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td class='num'>{v:.4g}</td></tr>" if isinstance(v, float)
                    else f"<tr><th>{html.escape(str(k))}</th><td class='num'>{html.escape(str(v))}</td></tr>"
                    for k, v in rows.items() if v is not None)
    return f"<table>{cells}</table>"


def _raw_images(shards: str, keys: set[str]) -> dict[str, tuple[str, bytes]]:
    """{key: (mime, bytes)} of the image members of ``keys`` in the shards, read as stored."""
    from clipx.data.opener import ShardOpener
    from clipx.data.shards import expand_shards

    mimes = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
    found = {}
    opener = ShardOpener()  # remote shards too, reached through each store's own environment
    for url in expand_shards(shards, "data.val"):
        with opener.open(url) as stream, tarfile.open(fileobj=stream) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                body = tar.extractfile(member) if key in keys and suffix in mimes and key not in found else None
                if body is not None:  # None for members that are not regular files
                    found[key] = (mimes[suffix], body.read())
    return found


def _gallery(embeddings, captions: list[str], shards: str) -> str:
    """For the first captions, the top images by similarity; the caption's own image is marked."""
    queries = list(range(min(GALLERY_QUERIES, len(captions))))
    scores = embeddings.text_features[queries] @ embeddings.image_features.T  # (Q, N)
    top = scores.topk(min(GALLERY_TOP, scores.shape[1]), dim=1).indices
    wanted = {embeddings.keys[int(i)] for row in top for i in row}
    images = _raw_images(shards, wanted)
    blocks = []
    for query, row in zip(queries, top):
        right = int(embeddings.text_to_image[query])
        hits = []
        for rank, index in enumerate(row.tolist(), 1):
            key = embeddings.keys[index]
            mime, data = images[key]
            mark = " right" if index == right else ""
            hits.append(f"<div class='hit{mark}'><img src='{data_uri(data, mime)}' alt='{html.escape(key)}'>"
                        f"<br>{rank}. {html.escape(key)}{' ✓' if mark else ''}</div>")
        blocks.append(f"<div class='query'>“{html.escape(captions[query])}”<div class='hits'>{''.join(hits)}</div></div>")
    return ("<p>For each caption, the five most similar validation images; a green frame and ✓ mark the "
            "image the caption belongs to.</p>" + "".join(blocks))


def _confusion_png(labels: torch.Tensor, predictions: torch.Tensor, classnames: list[str]) -> bytes:
    plt = pyplot()
    count = len(classnames)
    matrix = torch.zeros(count, count, dtype=torch.long)
    matrix.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.imshow(matrix.numpy(), cmap="Blues")
    axis.set_xticks(range(count), classnames, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(count), classnames, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for i in range(count):
        for j in range(count):
            if matrix[i, j]:
                axis.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                          color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    axis.set_title("zero-shot confusion matrix")
    figure.tight_layout()
    return png_bytes(figure)


def _evaluation_sections(run_dir: Path, shards: str, templates: str | None) -> str:
    """Gallery and confusion matrix from the run's newest checkpoint on ``shards``."""
    from clipx.api import load_model
    from clipx.data.eval_loader import build_eval_loader
    from clipx.data.tokenizer import Tokenizer
    from clipx.data.transforms import eval_transform
    from clipx.models import image_size
    from clipx.templates import load_templates
    from eval.embed import embed_dataset
    from eval.zero_shot import build_zero_shot_classifier

    model, config = load_model(run_dir)
    if not hasattr(model, "encode_text"):
        return section("Evaluation", "<p>Image-only model: see its kNN and linear-probe results.</p>")
    tokenizer = Tokenizer(config.model)
    preprocess = eval_transform(image_size(config.model), config.model.image_mean, config.model.image_std)
    captions: list[str] = []  # the texts behind embeddings.text_features, in the order embed_dataset meets them

    def recording_captions(loader):
        for batch in loader:
            captions.extend(caption for sample in batch["captions"] for caption in sample)
            yield batch

    loader = build_eval_loader(shards, preprocess, config.eval.label_key, 256, 0)
    embeddings = embed_dataset(model, recording_captions(loader), tokenizer, "cpu", config.model.arch["embed_dim"])
    out = ""
    if len(embeddings.text_features):
        out += section("Retrieval gallery", _gallery(embeddings, captions, shards))
    labelled = embeddings.labels >= 0
    if templates and labelled.any():
        classnames, prompts = load_templates(templates)
        classifier = build_zero_shot_classifier(model, tokenizer, classnames, prompts, "cpu")
        predictions = (embeddings.image_features[labelled] @ classifier).argmax(dim=1)
        png = _confusion_png(embeddings.labels[labelled], predictions, classnames)
        out += section("Zero-shot confusion matrix", f"<img src='{data_uri(png)}' alt='confusion matrix'>")
    return out


def _wise_ft_section(run_dir: Path) -> str:
    """The WiSE-FT curve `clipx wise-ft --alphas ... --out RUN_DIR` wrote, as a plot and a table ("" if none)."""
    from clipx.apps.wise_ft import CURVE_JSON, curve_png, read_curve

    if not (run_dir / CURVE_JSON).is_file():
        return ""
    curve = read_curve(run_dir / CURVE_JSON)
    rows = sorted(curve["rows"], key=lambda row: row["alpha"])
    names = list(rows[0]["held_out_top1"])
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["α", "task top-1", *(f"{n} top-1" for n in names)])
    body = "".join("<tr>" + "".join(f"<td class='num'>{v:.4g}</td>" for v in
                                    [row["alpha"], row["task_top1"], *(row["held_out_top1"][n] for n in names)])
                   + "</tr>" for row in rows)
    task = curve.get("task", {})
    intro = (f"<p>Weights (1 − α)·zero-shot + α·fine-tuned (WiSE-FT, Wortsman et al. 2022), zero-shot "
             f"{html.escape(str(curve.get('zero_shot')))}; task accuracy is {html.escape(str(task.get('metric')))} "
             f"on {html.escape(str(task.get('data')))}, held-out sets are scored zero-shot.</p>")
    return section("WiSE-FT curve", intro + f"<img src='{data_uri(curve_png(rows))}' alt='WiSE-FT curve'>"
                    f"<table><tr>{head}</tr>{body}</table>")


def write_report(run_dir: str | Path, out: str | Path | None = None, data: str | None = None) -> Path:
    """Render RUN_DIR's report to ``out`` (default RUN_DIR/report.html); returns the path."""
    from clipx.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "config.yaml").is_file():
        raise ClipxError(f"{run_dir} is neither a clipx run directory (no metrics.jsonl and config.yaml) nor a curation "
                         "folder (no curation.json): pass a folder that `clipx train` or `clipx curate` wrote")
    config = load_config(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    plots = write_plots(run_dir)
    sections = section("Final metrics", _metrics_table(summary))
    sections += section("Training curves", "<div class='plots'>" + "".join(
        f"<img src='{data_uri(p.read_bytes())}' alt='{p.stem}'>" for p in plots) + "</div>")
    shards = data or config.data.val
    if shards:
        sections += _evaluation_sections(run_dir, shards, config.eval.templates if config.eval.zero_shot else None)
    sections += _wise_ft_section(run_dir)
    sections += section("Config", f"<pre>{html.escape((run_dir / 'config.yaml').read_text())}</pre>")
    title = f"{run_dir.resolve().parent.name}/{run_dir.name}"
    return write_page(Path(out) if out else run_dir / "report.html", title, sections)
