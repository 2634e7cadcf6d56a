"""Run metrics: JSON lines in the run directory and TensorBoard scalars, main process only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    """Appends ``{"step": n, "kind": ..., **values}`` to metrics.jsonl and mirrors scalars to TensorBoard,
    and to Weights & Biases when ``wandb_project`` is given (wandb is then imported; it is never required)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, wandb_project: str | None = None,
                 config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            drop_torn_tail(self.path)  # a run killed mid-write; the resumed run appends after whole lines
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            if wandb_project:
                self._wandb = start_wandb(wandb_project, run_dir, config)

    def log(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"{kind}/{name}": value for name, value in record.items()
                   if name not in ("step", "kind") and isinstance(value, (int, float)) and math.isfinite(value)}
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def start_wandb(project: str, run_dir: str | Path, config: dict | None):
    """A wandb run named after the run directory (offline unless the user's WANDB_MODE says otherwise)."""
    try:
        import wandb
    except ImportError:
        from clipx.errors import ClipxError

        raise ClipxError("train.wandb_project is set but wandb is not installed: pip install wandb, or unset "
                         "train.wandb_project (TensorBoard logs are always written)") from None
    # clipx never reaches the network on its own: offline unless the user's WANDB_MODE (which wandb
    # reads itself) says otherwise. Passed to init rather than set in os.environ, which the process
    # would keep after the run.
    mode = {} if os.environ.get("WANDB_MODE") else {"mode": "offline"}
    return wandb.init(project=project, name=Path(run_dir).name, dir=str(run_dir), config=config or {}, **mode)


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that a crash left without its newline."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def _plain(value):
    return float(value) if hasattr(value, "__float__") and not isinstance(value, (int, bool)) else value


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class SampleKeysLog:
    """This rank's audit trail of what it trained on: one line ``{"step": n, "keys": [...]}`` per micro-batch.

    On (re)start, lines after the resumed step (steps that will be redone) and a line torn by a
    crash are dropped, so the file always reads as the exact sequence of trained steps.
    """

    def __init__(self, run_dir: str | Path, rank: int):
        self.path = Path(run_dir) / f"sample_keys.rank{rank}.jsonl"
        self._file = None

    def open(self, after_step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for step, line in _complete_records(self.path) if step <= after_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
        self._file = self.path.open("a")

    def write(self, step: int, keys: list[str]) -> None:
        self._file.write(json.dumps({"step": step, "keys": list(keys)}) + "\n")

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _complete_records(path: Path):
    """(step, line) of each whole JSON line of ``path``, stopping at the first torn one."""
    if not path.exists():
        return
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return
        if not line.endswith("\n"):
            return
        yield record["step"], line


def read_sample_keys(run_dir: str | Path) -> dict[int, list[tuple[int, list[str]]]]:
    """rank -> [(step, keys of one micro-batch), ...] from a run's sample_keys.rank*.jsonl files."""
    out = {}
    for path in sorted(Path(run_dir).glob("sample_keys.rank*.jsonl")):
        rank = int(path.stem.removeprefix("sample_keys.rank"))
        out[rank] = [(step, json.loads(line)["keys"]) for step, line in _complete_records(path)]
    return out
