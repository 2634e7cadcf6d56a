"""Which precision a machine runs fast, and what the demos pick from it."""

from __future__ import annotations

from pathlib import Path

import torch

from clipx.precision import bf16_is_fast, fastest_precision


def test_fast_bf16_on_the_cpu_follows_the_processor_flags():
    flags = Path("/proc/cpuinfo").read_text().split()
    expected = "amx_bf16" in flags or "avx512_bf16" in flags
    assert bf16_is_fast("cpu") is expected
    assert fastest_precision("cpu") == ("bf16" if expected else "no")
    assert bf16_is_fast(torch.device("meta")) is False
