"""Shared fixtures: tiny digits shards and a tiny model config, built in temporary folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}


@pytest.fixture(scope="session", autouse=True)
def attention_kernel_cache(tmp_path_factory):
    """Runs' measured attention-kernel choices go to a folder of this session, not ~/.cache (the
    variable is inherited by the training processes tests start)."""
    import os

    os.environ["CLIPX_CACHE_DIR"] = str(tmp_path_factory.mktemp("clipx-cache"))
    yield
    os.environ.pop("CLIPX_CACHE_DIR", None)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn digits as shards: <dir>/train (6 shards of <=256) and <dir>/test (2 shards)."""
    from data_prep import prep_digits

    out = tmp_path_factory.mktemp("digits")
    prep_digits(out, image_size=32, shard_size=256, workers=0)
    return out


@pytest.fixture(scope="session")
def tiny_model_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.json"
    path.write_text(json.dumps(TINY_ARCH))
    return path


def tiny_overrides(digits_dir: Path, model_json: Path, out: Path, **extra) -> list[str]:
    """Overrides that turn any config into a seconds-long CPU run on the digits shards."""
    base = {
        "model.name": str(model_json), "data.train": str(digits_dir / "train"), "data.val": str(digits_dir / "test"),
        "data.workers": 2, "data.shuffle_buffer": 200, "train.batch_size": 64, "train.steps": 4,
        "train.warmup_steps": 1, "train.output_dir": str(out), "train.log_every": 1, "train.threads": 1,
        "train.precision": "no",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


DEMO = REPO / "configs" / "demo-digits.yaml"


def run_training(config_overrides: list[str], *extra: str, check: bool = True,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """`clipx train --config configs/demo-digits.yaml OVERRIDES EXTRA` in a fresh process."""
    command = [sys.executable, "-m", "clipx.cli", "train", "--config", str(DEMO), *config_overrides, *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result
