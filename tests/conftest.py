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
    """scikit-learn digits as shards: <dir>/train (6 shards of <=256) and <dir>/test (2 shards), and
    <dir>/teacher, a seeded untrained tiny CLIP checkpoint that distillation runs use as their teacher,
    <dir>/train-teacher, the training shards with its embeddings (for distill.embedded),
    <dir>/teacher2, another such teacher, and <dir>/train-reinforced, the training shards reinforced
    with the two as an ensemble (2 views per image; each .json's class name as its one "synthetic"
    caption, a list in field "classname"), and
    <dir>/keep.parquet, a keep-list of three training samples in four (for data.keep)."""
    from clipx.data.reinforce import ViewRecipe
    from data_prep import prep_digits
    from data_prep.embed_teacher import embed_teacher
    from data_prep.reinforce import reinforce_shards

    out = tmp_path_factory.mktemp("digits")
    prep_digits(out, image_size=32, shard_size=256, workers=0)
    write_tiny_teacher(out / "teacher")
    embed_teacher(out / "teacher", str(out / "train"), out / "train-teacher")
    write_tiny_teacher(out / "teacher2", seed=4321)
    reinforce_shards([str(out / "teacher"), str(out / "teacher2")], str(out / "train"), out / "train-reinforced",
                     augmentations=2, captions=1, caption_key="classname", image_size=32,
                     recipe=ViewRecipe(crop_scale_min=0.8, flip_prob=0.0), batch_size=256)
    write_keep_list(out / "train", out / "keep.parquet")
    return out


def write_keep_list(shards: Path, out: Path) -> Path:
    """A keep-list (``clipx curate apply``'s format) of every sample of ``shards`` but each fourth."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipx.data.opener import ShardOpener
    from clipx.data.skips import SkipCounter
    from clipx.data.tar_reader import shard_samples

    rows: dict[str, list] = {"shard": [], "index": [], "key": []}
    for path in sorted(shards.glob("*.tar")):
        with ShardOpener().open(str(path)) as stream:
            for index, sample in shard_samples(stream, SkipCounter()):
                if index % 4 != 3:
                    rows["shard"].append(path.name)
                    rows["index"].append(index)
                    rows["key"].append(sample["__key__"])
    pq.write_table(pa.table({**rows, "index": pa.array(rows["index"], pa.int32())}), out)
    return out


def write_tiny_teacher(out: Path, seed: int = 1234) -> Path:
    """A clipx checkpoint (config.yaml + model.safetensors) of a seeded random tiny CLIP whose
    embeddings are 24 wide, unlike the students' 32: the distillation loss must not need them alike."""
    import torch
    from safetensors.torch import save_file

    from clipx.config import dump_config, load_config
    from clipx.methods import build_model

    out.mkdir(parents=True, exist_ok=True)
    arch = out / "arch.json"
    arch.write_text(json.dumps({**TINY_ARCH, "embed_dim": 24}))
    config = load_config(None, [f"model.name={arch}"])
    torch.manual_seed(seed)
    save_file(build_model(config).state_dict(), str(out / "model.safetensors"))
    dump_config(config, out / "config.yaml")
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
        "train.precision": "no", "train.plots": False,  # seconds of matplotlib per run; test_report draws them
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


DEMO = REPO / "configs" / "demo-digits.yaml"


def clipx_in_process(*args, check: bool = False) -> subprocess.CompletedProcess:
    """``clipx ARGS`` through ``clipx.cli.main`` in this process: its exit status and what it printed,
    as a subprocess would report them, without a fresh interpreter's imports (about 8 s each on the
    2-core machine, most of a refused command's time). What a command must show as a process (the
    console script, signals, exit codes set by ``sys.exit``, torchrun) stays in real subprocesses:
    ``tests/test_end_to_end.py`` runs prep, train and both evaluators and a refusal that way.

    An exception that escapes ``main`` propagates, failing the test, where a subprocess would print
    a traceback (which the one-line-error checks refuse)."""
    import contextlib
    import io

    from clipx.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    result = subprocess.CompletedProcess(["clipx", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check:
        assert code == 0, err.getvalue()[-3000:]
    return result


def train_evaluated(config, resume: str | None = None) -> dict:
    """``clipx.train.loop.train`` with the hooks `clipx train` hands it (clipx/apps/run_hooks.py):
    data.val evaluated during training and the run's plots drawn, which a bare ``train(config)``
    (training imports no evaluator) leaves out."""
    from clipx.apps.run_hooks import run_hooks
    from clipx.train.loop import train

    return train(config, resume=resume, hooks=run_hooks())


def train_in_process(config_overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    """`clipx train --config configs/demo-digits.yaml OVERRIDES EXTRA` through ``clipx_in_process``;
    it must succeed. ``run_training`` is the same in a fresh process, for runs that must be one."""
    return clipx_in_process("train", "--config", DEMO, *config_overrides, *extra, check=True)


def run_training(config_overrides: list[str], *extra: str, check: bool = True,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """`clipx train --config configs/demo-digits.yaml OVERRIDES EXTRA` in a fresh process."""
    command = [sys.executable, "-m", "clipx.cli", "train", "--config", str(DEMO), *config_overrides, *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def on_device(batch: dict, config, device="cpu") -> dict:
    """A collated training batch as the loop hands it to the objective (``loop.fetch``): its images
    decoded (data.decode=device) and normalised on the device by the run's ``DeviceImages``."""
    from clipx.data.crops import DeviceImages
    from clipx.models import image_size

    m = config.model
    return DeviceImages(m.image_mean, m.image_std, image_size(m))(batch, device)
