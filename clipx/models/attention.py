"""Which scaled-dot-product attention kernel a run uses, chosen by timing the run's own attention calls.

PyTorch picks an SDPA kernel by rules. On this project's CPU in bf16, its pick (the fused CPU
flash kernel) spends more time in attention's backward than all the matmuls of the step together,
while the unfused "math" path (two batched matmuls and a softmax) is 1.5x faster for the step;
on a GPU the fused kernels win. The right kernel depends on the device, the precision and the
sequence lengths, so a run measures instead of guessing:

1. ``record_attention_calls`` runs one forward pass under a dispatch mode and notes the shape,
   dtype and mask of every fused attention call (towers from open_clip, timm or transformers alike);
2. ``choose_kernel`` times forward (and backward, for training) of exactly those calls under each
   kernel the device has, and keeps PyTorch's own pick unless another is clearly faster;
3. ``AttentionKernel.scope()`` restricts SDPA to the chosen kernel around the run's forward passes.

Besides SDPA's kernels there is ``explicit``: attention as the three plain ops it is (scores,
softmax, weighted sum), for the calls clipx's own towers make (``attend``, which
``FusedSelfAttention`` calls). On this project's CPU it runs the bench model's attention faster
than SDPA's math path (BENCHMARKS.md), which copies q and k to scale them and scans every row of
the scores for being fully masked (``aten::all`` over (B, H, L, S)) before its softmax. It is a candidate only
when every recorded call came through ``attend`` with a mask that leaves each row a key to attend
to (without the scan, a fully masked row would give NaN instead of zeros).

Choices are cached on disk (``$CLIPX_CACHE_DIR``, else ``~/.cache/clipx``; ``CLIPX_CACHE_DIR=off``
measures in every process and writes nothing), keyed by the calls, device, precision, thread count
and torch version, so runs of one machine agree (two runs with the same seed stay bitwise equal)
and a process pays for the measurement once. The cache is not what keeps a run on its kernel: a
training checkpoint records the kernel (``AttentionKernel.resume_with``), so a resume on another
machine or thread count continues with it, and ranks never decide apart: rank 0 measures and
broadcasts its choice, in training and in a sharded evaluation (``InferenceEncoder.settle``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from clipx import dist
from clipx.config import ATTENTION_SETTINGS
from clipx.errors import ClipxError
from clipx.fileio import write_json_atomic

KERNELS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
EXPLICIT = "explicit"  # scores, softmax and weighted sum as plain ops (explicit_attention)
# The settings of train.attention: "auto" measures; "default" leaves the choice to PyTorch.
SETTINGS = ATTENTION_SETTINGS  # train.attention's Literal: auto, default, KERNELS, EXPLICIT
# Another kernel replaces PyTorch's pick only when it is this much faster: small differences are
# noise, and staying with the default keeps numerics unchanged where nothing is gained.
MARGIN = 0.05


@dataclass(frozen=True)
class AttentionCall:
    """One fused SDPA call as a run makes it: (B, H, L, D) shapes, dtype, mask and causality."""

    query: tuple[int, ...]
    key: tuple[int, ...]
    value: tuple[int, ...]
    dtype: str
    device: str
    mask: Optional[tuple[int, ...]] = None
    mask_dtype: Optional[str] = None
    causal: bool = False
    dropout: float = 0.0
    chosen_by_torch: str = "flash"  # the kernel PyTorch's rules picked for this call
    # Made through ``attend`` with no mask or an additive (L, S) one that leaves every row a key:
    # explicit_attention computes exactly what SDPA does (with attention dropout, the same
    # distribution from other random draws).
    explicit_exact: bool = False


class _Route:
    """Module state ``attend`` reads: whether the explicit kernel's scope is open, and whether a call
    of ``attend`` is on its way to SDPA (so the recorder can tell clipx's calls from other towers')."""

    explicit = False
    in_attend = False


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                       is_causal: bool = False) -> torch.Tensor:
    """SDPA's function as three plain ops: softmax(q k^T / sqrt(D) + mask) v, (B, H, L, D) -> (B, H, L, D).
    ``attn_mask``: additive, broadcastable to (B, H, L, S). Under autocast the softmax runs in fp32,
    as autocast runs every softmax."""
    scores = (query * query.shape[-1] ** -0.5) @ key.transpose(-2, -1)
    if is_causal:
        length, keys = scores.shape[-2:]
        blocked = torch.ones(length, keys, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(blocked, float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = scores.softmax(-1)
    if dropout_p:
        weights = F.dropout(weights, dropout_p)
    return weights.to(value.dtype) @ value


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
           dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """The attention of clipx's own towers: SDPA under the run's kernel, or explicit_attention inside
    the explicit kernel's scope. ``attn_mask``: additive (a float tensor) or None."""
    if _Route.explicit:
        return explicit_attention(query, key, value, attn_mask, dropout_p, is_causal)
    _Route.in_attend = True
    try:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal)
    finally:
        _Route.in_attend = False


def _explicit_exact(mask: Any) -> bool:
    """Whether explicit_attention computes a call made through ``attend`` with ``mask`` exactly."""
    if mask is None:
        return True
    return (torch.is_tensor(mask) and mask.is_floating_point() and mask.dim() == 2
            and not bool(torch.isneginf(mask).all(-1).any()))


def _kernel_of(op_name: str) -> str:
    """The KERNELS name of a fused aten op, e.g. _scaled_dot_product_flash_attention_for_cpu -> flash."""
    for name, marker in (("flash", "flash"), ("efficient", "efficient"), ("cudnn", "cudnn")):
        if marker in op_name:
            return name
    return "default"  # a backend-specific op (e.g. _fused_attention_overrideable) has no KERNELS name


class _Recorder(TorchDispatchMode):
    """Notes every fused attention op that reaches the dispatcher (math attention decomposes before)."""

    def __init__(self):
        super().__init__()
        self.calls: list[AttentionCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "scaled_dot_product" in func.__name__ and not func.__name__.endswith("backward"):
            named = {a.name: v for a, v in zip(func._schema.arguments, args)} | kwargs
            mask = named.get("attn_mask", named.get("attn_bias"))
            q, k, v = named["query"], named["key"], named["value"]
            self.calls.append(AttentionCall(
                tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype).removeprefix("torch."), q.device.type,
                tuple(mask.shape) if torch.is_tensor(mask) else None,
                str(mask.dtype).removeprefix("torch.") if torch.is_tensor(mask) else None,
                bool(named.get("is_causal", False)), float(named.get("dropout_p", 0.0)), _kernel_of(func.__name__),
                _Route.in_attend and _explicit_exact(mask)))
        return func(*args, **kwargs)


def record_attention_calls(forward: Callable[[], Any]) -> list[AttentionCall]:
    """The fused attention calls ``forward()`` makes (run without autograd and without torch.compile)."""
    recorder = _Recorder()
    with torch.no_grad(), recorder:
        torch.compiler.disable(forward, recursive=True)()
    return recorder.calls


def _inputs(call: AttentionCall, backward: bool) -> dict:
    dtype, device = getattr(torch, call.dtype), torch.device(call.device)
    tensors = {name: torch.randn(getattr(call, name), dtype=dtype, device=device, requires_grad=backward)
               for name in ("query", "key", "value")}
    if call.mask is not None:
        mask_dtype = getattr(torch, call.mask_dtype or "float32")
        tensors["attn_mask"] = (torch.ones(call.mask, dtype=mask_dtype, device=device) if mask_dtype == torch.bool
                                else torch.zeros(call.mask, dtype=mask_dtype, device=device))
    return tensors


def time_call(call: AttentionCall, kernel: str, backward: bool, repeats: int = 5) -> float:
    """Median seconds of ``call`` (forward, plus backward if asked) under ``kernel``; inf if it cannot run it."""
    inputs = _inputs(call, backward)
    device = torch.device(call.device)

    def once() -> float:
        started = time.perf_counter()
        with _restricted_to(kernel):
            out = attend(**inputs, dropout_p=call.dropout, is_causal=call.causal)
        if backward:
            out.backward(torch.ones_like(out))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    try:
        once()  # warm-up: kernel selection, allocator, lazy initialisation
        return statistics.median(once() for _ in range(repeats))
    except RuntimeError:  # "No available kernel": this kernel does not serve this shape, mask or device
        return float("inf")


def _restricted_to(kernel: Optional[str]):
    """SDPA limited to ``kernel`` (``attend`` computing explicitly for "explicit"); PyTorch's own
    choice for "default" or None."""
    if kernel == EXPLICIT:
        return _explicit_scope()
    return sdpa_kernel([KERNELS[kernel]]) if kernel in KERNELS else contextlib.nullcontext()


@contextlib.contextmanager
def _explicit_scope():
    before, _Route.explicit = _Route.explicit, True
    try:
        yield
    finally:
        _Route.explicit = before


def candidates(calls: list[AttentionCall], backward: bool) -> list[str]:
    """The kernels worth timing for ``calls`` (the CPU has SDPA's math and flash kernels only);
    explicit for training where it computes every call exactly. Inference keeps SDPA's kernels:
    forward-only timings of explicit and SDPA are close, so two processes of one machine (a
    single-process evaluation and a sharded one, each measuring) chose differently and their
    features no longer matched to the last bit."""
    sdpa = ["math", "flash"] if calls[0].device == "cpu" else list(KERNELS)
    return sdpa + [EXPLICIT] if backward and all(call.explicit_exact for call in calls) else sdpa


def choose_kernel(calls: list[AttentionCall], backward: bool) -> tuple[str, dict[str, float]]:
    """(kernel, seconds per kernel for all ``calls`` together, "default" being PyTorch's picks).

    "default" unless one kernel runs every call and beats PyTorch's picks by more than MARGIN.
    """
    if not calls:
        return "default", {}
    counts = Counter(calls)
    kernels = candidates(calls, backward)
    seconds = {(call, kernel): time_call(call, kernel, backward) for call in counts for kernel in kernels}
    totals = {kernel: sum(n * seconds[call, kernel] for call, n in counts.items()) for kernel in kernels}
    # PyTorch's own picks, per call, from the same timings (so that noise cannot tell a kernel from itself).
    for call in counts:
        if (call, call.chosen_by_torch) not in seconds:  # a pick outside the candidates: timed as is
            seconds[call, call.chosen_by_torch] = time_call(call, "default", backward)
    totals["default"] = sum(n * seconds[call, call.chosen_by_torch] for call, n in counts.items())
    best = min(totals, key=lambda k: totals[k])
    if totals[best] < totals["default"] * (1 - MARGIN):
        return best, totals
    return "default", totals


def cache_dir() -> Optional[Path]:
    """Where measured choices are kept: ``$CLIPX_CACHE_DIR``, else ``~/.cache/clipx``; None with
    ``CLIPX_CACHE_DIR=off`` (each process measures, nothing is written)."""
    setting = os.environ.get("CLIPX_CACHE_DIR", "")
    if setting.lower() == "off":
        return None
    return Path(setting or Path.home() / ".cache" / "clipx")


def _machine(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def _cache_key(calls: list[AttentionCall], backward: bool) -> str:
    device_type = calls[0].device
    identity = {"calls": sorted(json.dumps(asdict(c)) for c in set(calls)), "backward": backward,
                "machine": _machine(device_type), "threads": torch.get_num_threads(), "torch": torch.__version__}
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cached_choice(calls: list[AttentionCall], backward: bool) -> tuple[str, dict[str, float], bool]:
    """choose_kernel, remembered on disk: (kernel, seconds per kernel, whether it came from the cache)."""
    if not calls:
        return "default", {}, False
    if cache_dir() is None:
        return (*choose_kernel(calls, backward), False)
    path = cache_dir() / "attention-kernels.json"
    key = _cache_key(calls, backward)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]["kernel"], known[key]["seconds"], True
    kernel, seconds = choose_kernel(calls, backward)
    try:
        write_json_atomic(path, {**known, key: {"kernel": kernel, "seconds": seconds}})
    except OSError:  # a read-only home: the choice still holds for this process
        pass
    return kernel, seconds, False


def runs_here(kernel: str, calls: list[AttentionCall], backward: bool) -> bool:
    """Whether ``kernel`` serves ``calls`` on their device ("default": PyTorch's picks always do).
    A checkpoint written on a GPU may name a kernel the CPU lacks (efficient, cudnn)."""
    return kernel == "default" or (bool(calls) and kernel in candidates(calls, backward))


class AttentionKernel:
    """A run's attention kernel: fixed by ``setting``, or (``auto``) measured once on the first batch,
    unless a resumed checkpoint recorded the kernel the run trained with (``resume_with``)."""

    def __init__(self, setting: str = "auto"):
        if setting not in SETTINGS:
            raise ClipxError(f"attention kernel {setting!r} is not one of {', '.join(SETTINGS)}")
        self.setting = setting
        self.kernel: Optional[str] = None if setting == "auto" else setting
        self.seconds: dict[str, float] = {}
        self.saved: Optional[str] = None  # a resumed checkpoint's kernel, which ``auto`` settles on
        self.origin = "setting"  # or measured, cache, checkpoint: how ``kernel`` was decided

    @property
    def settled(self) -> bool:
        return self.kernel is not None

    def resume_with(self, kernel: Optional[str]) -> None:
        """``auto`` continues with ``kernel``, the one the resumed checkpoint trained with, instead
        of measuring: another machine, thread count or cache could measure another kernel, and a
        resumed run would no longer compute as the run it continues. None (a checkpoint from before
        kernels were saved) measures as before; so does a kernel this device lacks (see settle).
        A fixed setting keeps its kernel."""
        if self.setting == "auto" and self.kernel is None:
            self.saved = kernel

    def settle(self, forward: Callable[[], Any], backward: bool, share: bool = True) -> str:
        """Measure (once) with the calls ``forward()`` makes. With ``share``, every rank must call
        this (the forward pass may hold collectives) and adopts rank 0's choice, so that ranks
        compute alike; without, the process decides alone. The caller restores any state the
        forward pass touches (BatchNorm statistics, staged queue entries); random number streams
        are restored here, so that measuring leaves a run's random sequence as it was."""
        if self.kernel is None:
            rng = torch.random.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            try:
                calls = record_attention_calls(forward)
                choice = self._decide(calls, backward) if dist.rank() == 0 or not share else None
            finally:
                torch.random.set_rng_state(rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
            self.kernel, self.seconds, self.origin = dist.broadcast_object(choice) if share else choice
        return self.kernel

    def _decide(self, calls: list[AttentionCall], backward: bool) -> tuple[str, dict[str, float], str]:
        """(kernel, seconds per kernel, origin): the saved kernel where it runs here, else measured."""
        if self.saved is not None and runs_here(self.saved, calls, backward):
            return self.saved, {}, "checkpoint"
        kernel, seconds, cached = cached_choice(calls, backward)
        return kernel, seconds, "cache" if cached else "measured"

    def scope(self):
        """SDPA restricted to the chosen kernel, or clipx's attention computing explicitly (PyTorch's
        choice while unsettled or "default")."""
        return _restricted_to(self.kernel)

    def describe(self) -> str:
        measured = ", ".join(f"{k} {1e3 * s:.2f} ms" for k, s in sorted(self.seconds.items(), key=lambda i: i[1]))
        if self.origin == "checkpoint":
            how = "the kernel of the checkpoint this run resumed from"
        else:
            how = f"measured: {measured}" if measured else f"train.attention={self.setting}"
        return f"attention kernel: {self.kernel} ({how})"
