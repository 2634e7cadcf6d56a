"""Small file helpers shared by the trainer, the evaluators and the shard writers."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file and rename it, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def replace_atomically(target: Path, write) -> None:
    """``write(tmp)``, fsync, rename onto ``target``: a reader sees the old file or the whole new one."""
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
