"""Counts of skipped inputs by reason, shared by the data-loader workers and the process that reads them.

Every pipeline that reads shards (training, evaluation, encoding) counts what it had to skip here;
the training stream turns the counts into per-epoch accounts (clipx/train/skips.py).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
from typing import Callable


class SkipCounter:
    """Counts skipped inputs by reason, and usable samples, across worker processes.

    The counts live in shared memory created before the workers fork. The training stream resets
    them at each epoch start (workers are idle then) and reads them when the epoch's loader is
    exhausted, which gives per-epoch figures that do not depend on timing.

    Reasons: a shard that cannot be opened or read as a tar (each such event counts once, since
    the samples it held are unknown), a sample key repeated within a shard, a sample with no image
    member, an image that does not decode (garbage, HTML), an image header over the pixel cap, a
    sample with no or an empty caption, a malformed label, a training sample of a classifier whose
    label is missing or not one of its classes.
    """

    REASONS = ("unreadable_shard", "corrupt_tar", "duplicate_key", "missing_image", "undecodable_image",
               "oversized_image", "missing_caption", "missing_member", "bad_label",
               "no_class_label")
    USED = "used"

    def __init__(self):
        self._values = {reason: mp.Value("q", 0) for reason in self.REASONS}
        self._used = mp.Value("q", 0)
        # This process's own counts since ``start_local``: what a training worker's saved data
        # position carries, since the shared counts run ahead of what training consumed.
        self._local: dict[str, int] = {}

    def add(self, reason: str, n: int = 1) -> None:
        with self._values[reason].get_lock():
            self._values[reason].value += n
        self._local[reason] = self._local.get(reason, 0) + n

    def add_used(self) -> None:
        with self._used.get_lock():
            self._used.value += 1
        self._local[self.USED] = self._local.get(self.USED, 0) + 1

    def start_local(self, counts: dict[str, int] | None = None) -> None:
        """Start this process's own counts (from a saved position's, after a resume)."""
        self._local = dict(counts or {})

    def local_counts(self) -> dict[str, int]:
        return dict(self._local)

    def add_counts(self, counts: dict[str, int]) -> None:
        """Add counts (reasons and "used") made before a resume to the shared ones (a reason this
        version does not know, from another version's checkpoint, is left out)."""
        for name, value in counts.items():
            target = self._used if name == self.USED else self._values.get(name)
            if target is not None:
                target.value += value

    def snapshot(self) -> dict[str, int]:
        return {reason: value.value for reason, value in self._values.items()}

    def used(self) -> int:
        """Samples that decoded and went on to batching."""
        return self._used.value

    def counts(self) -> dict[str, int]:
        """Skips by reason, plus "used"."""
        return {**self.snapshot(), self.USED: self.used()}

    def total(self) -> int:
        return sum(self.snapshot().values())

    def reset(self) -> None:
        for value in (*self._values.values(), self._used):
            value.value = 0

    def handler(self, reason: str) -> Callable[[Exception], bool]:
        """A webdataset exception handler that counts the failure and carries on."""
        return functools.partial(_count_and_continue, self, reason)


def _count_and_continue(counter: SkipCounter, reason: str, exn: Exception) -> bool:
    # webdataset raises this when one sample holds the same member twice (a.jpg, a.txt, a.jpg): the
    # later member is dropped, the sample keeps its first.
    counter.add("duplicate_key" if "duplicate file name" in str(exn) else reason)
    return True
