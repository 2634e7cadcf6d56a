"""A sample's class label: a ``.cls`` member or a field of its ``.json``, as the evaluators and the
classification methods read it, and which classes a task keeps.

One home for both readers: the evaluation loader (every sample, -1 where there is no label) and the
training pipeline (``LabelReader``): a classifier's row of the head, or None to skip the sample; or,
for supervised contrastive learning, the label itself and -1 for a sample without one.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence


def sample_label(sample: dict, label_key: str) -> int:
    """The class index from a .cls member or the .json field ``label_key``; -1 when there is none.
    Malformed members raise ValueError, TypeError or UnicodeDecodeError (counted as bad_label)."""
    if "cls" in sample:
        return int(sample["cls"].decode().strip())
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict) and label_key in meta:
            return int(meta[label_key])
    return -1


class LabelReader:
    """sample -> the row of a classifier over ``classes`` (label indices) that its label selects, or
    None (no label, or a class the classifier does not have). Picklable: it travels to data workers.

    With ``classes=None`` every label is its own row; with ``unlabelled=-1`` a sample without a label
    (none, or a negative one) gives -1 instead of None, so the pipeline keeps it (SupCon's instance
    positives). A malformed label gives None (skipped) either way.
    """

    def __init__(self, label_key: str, classes: Optional[Sequence[int]] = None, unlabelled: Optional[int] = None):
        self.label_key = label_key
        self.rows = None if classes is None else {label: row for row, label in enumerate(classes)}
        self.unlabelled = unlabelled

    def __call__(self, sample: dict) -> Optional[int]:
        try:
            label = sample_label(sample, self.label_key)
        except (ValueError, TypeError, UnicodeDecodeError):
            return None
        if label < 0:
            return self.unlabelled
        return label if self.rows is None else self.rows.get(label)
