"""scikit-learn's handwritten digits (1,797 real 8x8 scans, no download) as captioned shards."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from clipx.errors import ClipxError
from clipx.templates import load_templates
from data_prep.pipeline import Sample, write_samples
from data_prep.writer import PrepSummary


def prep_digits(
    out_dir,
    image_size: int = 32,
    shard_size: int = 256,
    test_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 2,
    templates_file=None,
    classes: Optional[Sequence[int]] = None,
) -> dict[str, PrepSummary]:
    """Write `out_dir/train` and `out_dir/test` shards of the digits; return both summaries.

    The split is stratified by class and fixed by `seed`. Each caption is one prompt template
    (also picked by `seed`) filled with the class name, both read from `templates_file`
    (a path or a shipped name; default: `clipx/templates/digits.yaml`). Meta: label, classname, source_index,
    and negative: the same template filled with another class name, a hard negative caption for
    ``data.hard_negative_key: negative``. ``classes``: write only the digits of these labels (labels
    and captions unchanged), e.g. a fine-tuning task of some classes; the split is made before, so a
    sample falls in the same split either way.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ClipxError(f"test fraction must be between 0 and 1, got {test_fraction}")
    classnames, templates = load_templates(templates_file or "digits")
    from sklearn.datasets import load_digits  # heavy import, only needed here

    digits = load_digits()
    # Scans hold 0..16 ink levels; stretch to the full 8-bit range for JPEG.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    labels = digits.target
    if labels.max() >= len(classnames):
        raise ClipxError(f"templates file lists {len(classnames)} class names; digits need 10")
    # One draw per source image, so a sample's caption does not depend on the split.
    template_ids = np.random.default_rng(seed).integers(len(templates), size=len(labels))
    negative_labels = (labels + np.random.default_rng([seed, 1]).integers(1, 10, size=len(labels))) % 10
    summaries = {}
    for split, indices in zip(("train", "test"), _split(labels, test_fraction, seed)):
        if classes is not None:
            indices = indices[np.isin(labels[indices], list(classes))]
        samples = (
            Sample(
                source=pixels[i],
                caption=templates[template_ids[i]].format(classnames[labels[i]]),
                meta={"label": int(labels[i]), "classname": classnames[labels[i]], "source_index": int(i),
                      "negative": templates[template_ids[i]].format(classnames[negative_labels[i]])},
            )
            for i in indices
        )
        summaries[split] = write_samples(
            samples, Path(out_dir) / split, image_size=image_size, shard_size=shard_size,
            workers=workers, total=len(indices), desc=f"digits {split}",
        )
    return summaries


def _split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(
            np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
        )
    except ValueError as error:  # e.g. too few test samples to hold every class
        raise ClipxError(f"cannot split digits with test fraction {test_fraction}: {error}") from error
