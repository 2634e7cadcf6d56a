"""k-nearest-neighbour classification and linear probes on frozen image features (pure functions)."""

from __future__ import annotations

import numpy as np
import torch


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> torch.Tensor:
    """Class scores (Q, C) from the k most cosine-similar training samples, each voting exp(sim / T).

    Features must be unit norm: train (N, D), query (Q, D); labels (N,) in [0, C).
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    similarity = query_features @ train_features.T  # (Q, N)
    top, index = similarity.topk(min(k, train_features.shape[0]), dim=1)  # (Q, k)
    votes = torch.zeros(query_features.shape[0], num_classes)
    votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
    return votes


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 regularisation=(0.01, 0.1, 1.0, 10.0, 100.0), validation_fraction: float = 0.2,
                 seed: int = 0) -> tuple[np.ndarray, float]:
    """Logistic regression on frozen features: (test class scores, the chosen C).

    C (inverse L2 strength) is picked on a stratified validation split of the training features,
    then the probe is refit on all of them.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    fit_x, val_x, fit_y, val_y = train_test_split(train_features, train_labels, test_size=validation_fraction,
                                                  stratify=train_labels, random_state=seed)
    scores = {c: LogisticRegression(C=c, max_iter=2000).fit(fit_x, fit_y).score(val_x, val_y) for c in regularisation}
    best = max(regularisation, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    probe = LogisticRegression(C=best, max_iter=2000).fit(train_features, train_labels)
    return probe.predict_proba(test_features), best
