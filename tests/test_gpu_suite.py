"""bench/gpu_suite.py, the one script a lent GPU machine runs, must never be found broken there: its
``--dry-run`` runs every part at toy size on the CPU (part 2 with the host-read probe standing in for
CUDA's sync-debug mode, part 4 on 2 gloo processes), and its report renders as Markdown."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("throughput", "sync_free_step", "switches", "multi_gpu")


def markdown(results: dict) -> str:
    sys.path.insert(0, str(REPO))
    from bench.gpu_suite import markdown

    return markdown(results)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, Path]:
    if not (REPO / "runs" / "bench" / "openclip-site" / "webdataset").is_dir():
        pytest.skip("open_clip_train's webdataset < 1.0 is not installed: make peers (bench/openclip_env.sh)")
    work = tmp_path_factory.mktemp("gpu-suite")
    out = work / "gpu_suite.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--dry-run", "--work", str(work),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the dry run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(out.read_text()), out


def test_the_dry_run_runs_every_part_with_sane_values(dry_run):
    results, _ = dry_run
    assert results["dry_run"] and "--dry-run" in results["command"] and results["torch"] and results["device"]
    assert [name for name in results["parts"]] == list(PARTS)
    assert all(part["status"] == "ok" for part in results["parts"].values()), results["parts"]

    throughput = results["parts"]["throughput"]
    rows = throughput["rows"]
    assert {"clipx, batch on the device (the step's ceiling)", "open_clip_train"} <= set(rows)
    assert any(name.startswith("clipx") and row["source"] == "loader" for name, row in rows.items())
    for row in rows.values():
        assert positive(row["samples_per_second"]) and positive(row["flops_per_sample"])
        assert row["mfu_spec"] is None  # no spec peak for a CPU
        assert 0 < row["mfu_measured_matmul"] < 1
    assert throughput["clipx_text_length"] <= 16 and positive(throughput["measured_matmul_bf16_flops"])

    sync = results["parts"]["sync_free_step"]
    assert sync["checked_steps"] == 2 and sync["lagged_reads"] == 2 and sync["accepted_steps"] == sync["steps"] == 4
    assert "HostReads" in sync["how"]

    switches = results["parts"]["switches"]
    variants = switches["variants"]
    assert all(positive(v["samples_per_second"]) and len(v["all"]) == results["sizes"]["rounds"]
               for v in variants.values())
    assert variants["torch.compile (train.compile=true)"]["compiled"] and not variants["default"]["compiled"]
    assert variants["attention flash (train.attention=flash)"]["attention_kernel"] == "flash"
    assert variants["attention explicit (train.attention=explicit)"]["attention_kernel"] == "explicit"
    assert all(positive(ratio) for ratio in switches["ratios"].values()) and len(switches["ratios"]) == 4

    multi = results["parts"]["multi_gpu"]
    assert multi["processes"] == 2 and multi["backend"] == "gloo"
    assert set(multi["sharding"]) == set(multi["resume"]) == {"ddp", "fsdp"}
    for name, row in multi["sharding"].items():
        assert positive(row["samples_per_second"]) and positive(row["scaling_efficiency"])
        assert multi["resume"][name] == {"bitwise": True, "max_difference": 0.0}


def test_the_report_renders_as_markdown(dry_run):
    results, out = dry_run
    text = markdown(json.loads(out.read_text()))  # what `--markdown FILE` prints
    assert results["device"] in text and f"torch {results['torch']}" in text and results["command"] in text
    for index, name in enumerate(PARTS, 1):
        assert f"**{index}. {name}** (ok," in text
    assert "| open_clip_train | loader |" in text and "| compile on / off |" in text and "| fsdp |" in text


def test_skipped_and_failed_parts_render_with_their_reason(dry_run):
    results = copy.deepcopy(dry_run[0])
    results["parts"]["multi_gpu"] = {"status": "skipped", "reason": "one GPU (NVIDIA H200): DDP and FSDP across GPUs "
                                     "need several", "seconds": 0.0}
    results["parts"]["switches"] = {"status": "failed", "error": "RuntimeError: broken on purpose", "seconds": 1.0}
    text = markdown(results)
    assert "**4. multi_gpu** (skipped, 0 s)" in text and "Skipped: one GPU (NVIDIA H200)" in text
    assert "**3. switches** (failed, 1 s)" in text and "FAILED: RuntimeError: broken on purpose" in text
