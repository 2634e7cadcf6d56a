"""evaluate(): embed a shard set once and compute the requested metrics (used by the CLI and training)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from clipx import dist
from clipx.data.eval_loader import build_eval_loader
from clipx.data.skips import SkipCounter
from clipx.data.transforms import eval_transform
from clipx.models import image_size
from clipx.models.inference import InferenceEncoder
from clipx.templates import chosen_classes, load_templates
from eval.embed import embed_dataset, merge_embeddings
from eval.retrieval import retrieval_eval
from eval.zero_shot import build_zero_shot_classifier, zero_shot_metrics


def evaluate(model, tokenizer, model_cfg, shards: str, device, zero_shot: bool = True, retrieval: bool = True,
             templates: str = "digits", label_key: str = "label", batch_size: int = 256, workers: int = 2,
             opener=None, precision: str = "fp32", classes: Optional[Sequence[int]] = None) -> dict:
    """{"zero_shot": {...}, "retrieval": {...}, "num_images": N, "skipped": {...}} for ``shards``, and
    for a model with a classification head (clipx.models.classifier) that head's "classifier" metrics.

    ``classes``: the label indices zero-shot classification chooses among (eval.classes); images of
    other labels are left out of it. None: every class of ``templates``.

    In a process group every rank must call this: each embeds the samples whose keys hash to it,
    the embeddings are gathered, and every rank computes the same metrics on all of them.
    ``opener`` (a clipx.data.opener.ShardOpener): how remote shards are reached; training passes the
    one its data config describes. ``precision``: fp32, or bf16 for the towers (features and
    metrics stay fp32).
    """
    transform = eval_transform(image_size(model_cfg), model_cfg.image_mean, model_cfg.image_std)
    counter = SkipCounter()
    rank, world = dist.rank(), dist.world_size()
    loader = build_eval_loader(shards, transform, label_key, batch_size, workers, counter, rank=rank, world=world,
                               opener=opener)
    was_training = model.training
    model = InferenceEncoder(model, device, precision)
    if dist.is_distributed():
        # One attention kernel per tower on every rank: rank 0's, chosen on inputs of a full batch's
        # shapes (a rank may own no sample, so its own first batch cannot be the example). A single
        # process chooses at its first batch instead, without this extra forward pass.
        model.settle(_kernel_examples(model_cfg, tokenizer if zero_shot or retrieval else None, batch_size, device))
    local = embed_dataset(model, loader, tokenizer, device, model_cfg.arch["embed_dim"], with_texts=retrieval)
    embeddings = merge_embeddings(dist.gather_objects(local))
    results: dict = {"num_images": int(embeddings.image_features.shape[0])}
    if zero_shot:
        classnames, prompts = load_templates(templates)
        chosen = chosen_classes(classes, len(classnames))
        classifier = build_zero_shot_classifier(model, tokenizer, [classnames[c] for c in chosen], prompts, device)
        results["zero_shot"] = zero_shot_metrics(embeddings, classifier, chosen if classes is not None else None)
    head = getattr(model, "head", None)
    # A classifier's head scores its own classes; shards of other classes only (a held-out task) have
    # nothing for it to score.
    if head is not None and bool(torch.isin(embeddings.labels, torch.tensor(model.classes)).any()):
        results["classifier"] = zero_shot_metrics(embeddings, head.weight.detach().float().cpu().T, model.classes,
                                                  head.bias.detach().float().cpu())
    if retrieval:
        results["retrieval"] = retrieval_eval(embeddings)
        results["num_captions"] = int(embeddings.text_features.shape[0])
    results["skipped"] = _sum_counts(dist.gather_objects(counter.snapshot()))
    results["skipped"]["duplicate_key"] = embeddings.duplicates
    model.train(was_training)
    return results


def _kernel_examples(model_cfg, tokenizer, rows: int, device) -> dict[str, torch.Tensor]:
    """Inputs shaped as an evaluation batch ({"image": (rows, 3, S, S), "text": (rows, L)} without
    "text" when no tokenizer is given), for InferenceEncoder.settle."""
    size = image_size(model_cfg)
    examples = {"image": torch.zeros(rows, 3, size, size, device=device)}
    if tokenizer is not None:
        examples["text"] = tokenizer(["a photo"] * rows).to(device)
    return examples


# Every rank reads every shard and only then keeps its own samples: failures found before that
# split are seen by all ranks alike and count once; the others are summed.
_SEEN_BY_EVERY_RANK = ("unreadable_shard", "corrupt_tar")


def _sum_counts(per_rank: list[dict[str, int]]) -> dict[str, int]:
    return {reason: per_rank[0][reason] if reason in _SEEN_BY_EVERY_RANK else sum(c[reason] for c in per_rank)
            for reason in per_rank[0]}


def flatten_metrics(results: dict, prefix: str = "") -> dict[str, float]:
    """{"zero_shot": {"top1": x}} -> {"zero_shot.top1": x}, for logs and tables."""
    flat = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)):
            flat[name] = value
    return flat


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
