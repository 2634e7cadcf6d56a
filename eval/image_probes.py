"""Runners for `clipx eval knn` and `clipx eval linear-probe`: any image encoder, labelled shards."""

from __future__ import annotations

import torch

from clipx.data.eval_loader import build_eval_loader
from clipx.data.skips import SkipCounter
from clipx.data.transforms import eval_transform
from clipx.errors import ClipxError
from clipx.models import image_size
from clipx.models.inference import InferenceEncoder
from eval.embed import embed_dataset, merge_embeddings
from eval.knn import knn_predict, linear_probe
from eval.metrics import classification_metrics


def labelled_features(model, model_cfg, shards: str, device, label_key: str = "label", batch_size: int = 256,
                      workers: int = 2, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image features (N, F) and labels (N,) of every labelled sample, in key order."""
    model = InferenceEncoder(model, device, precision)
    transform = eval_transform(image_size(model_cfg), model_cfg.image_mean, model_cfg.image_std)
    loader = build_eval_loader(shards, transform, label_key, batch_size, workers, SkipCounter())
    dim = getattr(model, "feature_dim", None) or model_cfg.arch["embed_dim"]
    embeddings = merge_embeddings([embed_dataset(model, loader, None, device, dim, with_texts=False)])
    labelled = embeddings.labels >= 0
    if not labelled.any():
        raise ClipxError(f"{shards}: no sample has a .cls member or a '{label_key}' field in its .json")
    return embeddings.image_features[labelled], embeddings.labels[labelled]


def knn_eval(train, test, k: int = 20, temperature: float = 0.07) -> dict:
    """train, test: (features, labels). top1/top5 and mean per-class recall of cosine kNN."""
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    scores = knn_predict(train[0], train[1], test[0], k, temperature, num_classes)
    return {**classification_metrics(scores, test[1]), "k": k, "temperature": temperature}


def linear_probe_eval(train, test) -> dict:
    """Logistic regression fit on train features (C chosen on a validation split), scored on test."""
    probabilities, best_c = linear_probe(train[0].numpy(), train[1].numpy(), test[0].numpy())
    classes = sorted(set(train[1].tolist()))
    scores = torch.full((len(test[1]), int(max(classes)) + 1), -1.0)
    scores[:, classes] = torch.from_numpy(probabilities).float()
    return {**classification_metrics(scores, test[1]), "C": best_c}
