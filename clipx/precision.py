"""Numeric precision outside training's Accelerate: whether bf16 is fast here, and autocast for inference.

Training's precision is ``train.precision`` (Accelerate's names: no, bf16, fp16). Evaluation and
``clipx encode`` take ``--precision fp32|bf16``: bf16 autocasts the towers' matmuls and attention,
while features are returned, normalised and compared in fp32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from clipx.errors import ClipxError

INFERENCE_PRECISIONS = ("fp32", "bf16")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are. Losses take features through this: the
    softmax over many negatives wants fp32, and a float64 check of exactness must stay float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run in hardware here: on a CPU, AMX or AVX512-BF16 (without them,
    bf16 is emulated and slower than fp32); on a GPU, native bf16 (Ampere and later)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return bool(found.get("amx_bf16") or found.get("avx512_bf16"))
    try:  # older torch: the kernel's CPU flags
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def fastest_precision(device: torch.device | str = "cpu") -> str:
    """train.precision for a run that should simply be fast here: bf16 where the hardware has it."""
    return "bf16" if bf16_is_fast(device) else "no"


def inference_autocast(device: torch.device | str, precision: str):
    """The context an inference pass runs in: autocast to bf16, or nothing for fp32."""
    if precision not in INFERENCE_PRECISIONS:
        raise ClipxError(f"precision {precision!r} is not one of {', '.join(INFERENCE_PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
