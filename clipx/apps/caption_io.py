"""`clipx caption`'s files: a shard copied with each sample's caption added to its .json, the sample
counts of finished shards (sizes.json) and the settings that produced them (caption.json).

A shard is copied member by member, in the order the tar reader hands them (clipx.data.tar_reader),
each member's bytes as they were; only the .json of a captioned sample changes: parsed, the caption
set as one field, serialised again. A captioned sample without a .json gets one holding that field
alone, after its other members. Member headers are fixed (data_prep.writer.add_member), so the same
samples and captions give the same bytes, whichever process writes them.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Iterable

from clipx.data.captions import json_object
from clipx.data.tar_reader import member_key
from clipx.errors import ClipxError
from clipx.fileio import replace_atomically

SETTINGS = "caption.json"
# What changes the captions of each method: a resumed folder must agree on these.
RELEVANT = {"greedy": ("checkpoint", "weights", "method", "max_tokens", "min_tokens", "key"),
            "beam": ("checkpoint", "weights", "method", "max_tokens", "min_tokens", "key", "beams"),
            "sample": ("checkpoint", "weights", "method", "max_tokens", "min_tokens", "key", "temperature", "top_k",
                       "seed", "batch_size")}


def with_caption(sample: dict, key: str, caption: str | None) -> dict:
    """``sample`` with ``caption`` as field ``key`` of its .json (added last when it had none);
    the sample itself when ``caption`` is None."""
    if caption is None:
        return sample
    meta = json_object(sample)
    if meta is None:
        raise ValueError("a sample whose .json is not an object cannot be captioned")
    meta[key] = caption
    return {**sample, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def write_shard(path: Path, samples: Iterable[dict]) -> int:
    """Write ``samples`` (tar-reader dicts: "__key__" and suffix -> bytes) as the shard ``path``,
    through a temporary file renamed when complete; returns how many were written."""
    from data_prep.writer import add_member

    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                for suffix, data in sample.items():
                    if suffix != "__key__":
                        add_member(tar, f"{sample['__key__']}.{suffix}", data)
                count += 1

    replace_atomically(path, write)
    return count


def count_samples(path: Path) -> int:
    """Samples in a shard this module wrote (its keys are unique), from its member headers alone."""
    count, last = 0, None
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            named = member_key(info.name) if info.isreg() else None
            if named is not None and named[0] != last:
                count, last = count + 1, named[0]
    return count


def write_sizes_when_complete(out: Path, names: list[str]) -> bool:
    """OUT/sizes.json (clipx.data.shards reads it: shard name -> samples) once every one of ``names``
    is written; False while some are missing. Several ranks may finish together: each writes
    through a temporary file of its own, with the same content."""
    from data_prep.writer import SIZES_FILE

    if not all((out / name).is_file() for name in names):
        return False
    sizes = {name: count_samples(out / name) for name in names}
    tmp = out / f".{SIZES_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / SIZES_FILE)
    return True


def check_settings(out: Path, settings: dict, writer: bool, relevant: tuple[str, ...] | None = None,
                   name: str = SETTINGS) -> None:
    """Record ``settings`` in OUT/``name`` (``writer``: the one process that does), or check that a
    folder being resumed is written as it was: a change to one of ``relevant`` (by default what
    changes the captions of the decoding method) is refused."""
    path = out / name
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ClipxError(f"{path} cannot be read ({error}); give another --out") from None
        changed = [key for key in relevant or RELEVANT[settings["method"]] if old.get(key) != settings[key]]
        if changed:
            was = ", ".join(f"{key}={old.get(key)!r}" for key in changed)
            now = ", ".join(f"{key}={settings[key]!r}" for key in changed)
            raise ClipxError(f"{out} was written with {was}, not {now}; resume with the same settings or give "
                             "another --out")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ClipxError(f"--out {out} is a file; give a folder") from None
    if writer:
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
