"""Cross-modal retrieval: Recall@k between images and their captions."""

from __future__ import annotations

from clipx.errors import ClipxError
from eval.embed import Embeddings
from eval.metrics import retrieval_metrics


def retrieval_eval(embeddings: Embeddings, ks=(1, 5, 10)) -> dict:
    """image->text and text->image Recall@k, with all captions of every image as candidates."""
    if embeddings.text_features.shape[0] == 0:
        raise ClipxError("retrieval evaluation needs captions: no sample has a non-empty .txt member")
    return retrieval_metrics(embeddings.image_features, embeddings.text_features, embeddings.text_to_image, ks)
