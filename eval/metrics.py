"""Pure metric functions on tensors: no models, no data loading, no devices."""

from __future__ import annotations

import torch


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy and mean per-class recall.

    logits: (N, C) scores; labels: (N,) class indices in [0, C). A k larger than C counts as C.
    Mean per-class recall averages top-1 recall over the classes that occur in ``labels``.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, C) and labels (N,); got {tuple(logits.shape)} and {tuple(labels.shape)}")
    num_classes = logits.shape[1]
    ranked = logits.topk(min(max(ks), num_classes), dim=1).indices  # (N, k_max)
    hits = ranked == labels.unsqueeze(1)  # (N, k_max)
    metrics = {f"top{k}": hits[:, : min(k, num_classes)].any(dim=1).float().mean().item() for k in ks}
    top1 = hits[:, 0].float()
    recalls = [top1[labels == c].mean().item() for c in labels.unique().tolist()]
    metrics["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return metrics


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks=(1, 5, 10)) -> dict[str, dict[str, float]]:
    """Recall@k both ways, with several captions per image (the Flickr30k/COCO protocol).

    image_features: (N, D), text_features: (M, D), both unit norm; text_to_image: (M,) index of the
    image each caption describes. Text->image: a caption scores a hit when its image is among the k
    most similar images. Image->text: an image scores a hit when any of its captions is among the k
    most similar captions.
    """
    if text_to_image.shape != (text_features.shape[0],):
        raise ValueError("text_to_image must give one image index per caption")
    similarity = image_features @ text_features.T  # (N, M)
    num_images, num_texts = similarity.shape
    positives = torch.zeros(num_images, num_texts, dtype=torch.bool)
    positives[text_to_image, torch.arange(num_texts)] = True

    # An image without captions can never be found; it does not count as an image->text query.
    has_caption = positives.any(dim=1)  # (N,)
    image_to_text, text_to_image_recall = {}, {}
    for k in ks:
        top_texts = similarity.topk(min(k, num_texts), dim=1).indices  # (N, k)
        hits = positives.gather(1, top_texts).any(dim=1)[has_caption]
        image_to_text[f"R@{k}"] = hits.float().mean().item()
        top_images = similarity.T.topk(min(k, num_images), dim=1).indices  # (M, k)
        text_to_image_recall[f"R@{k}"] = (top_images == text_to_image.unsqueeze(1)).any(dim=1).float().mean().item()
    return {"image_to_text": image_to_text, "text_to_image": text_to_image_recall}
