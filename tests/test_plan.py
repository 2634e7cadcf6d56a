"""`clipx plan`: its logit-matrix estimate against a measured peak, and how it scales."""

import subprocess
import sys
import time

import pytest

from clipx.apps.plan import logit_bytes, plan_memory
from clipx.config import load_config
from tests.conftest import REPO, tiny_overrides

# Measured in a fresh process: a training run earlier in the test session leaves malloc tuned to
# keep freed memory (clipx.train.host_memory), and reused memory does not show as resident growth.
MEASURE_LOSS_PEAK = """
import sys, torch, torch.nn.functional as F
from clipx.losses import ClipLoss
from bench.memory import peak_bytes_during
batch = int(sys.argv[1])
torch.manual_seed(0)
images = F.normalize(torch.randn(batch, 512), dim=-1).requires_grad_()
texts = F.normalize(torch.randn(batch, 512), dim=-1).requires_grad_()
scale = torch.tensor(10.0, requires_grad=True)
step = lambda: ClipLoss(gather="none")(images, texts, scale).backward()
step()
print(peak_bytes_during(step))
"""


@pytest.mark.parametrize("batch", [2048, 4096])
def test_logit_estimate_matches_the_measured_peak_of_the_loss(batch):
    result = subprocess.run([sys.executable, "-c", MEASURE_LOSS_PEAK, str(batch)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = int(result.stdout.split()[-1])
    estimate = logit_bytes("none", batch, 1)
    assert 0.85 * estimate <= measured <= 1.15 * estimate, (measured, estimate)


def test_local_logits_stay_bounded_and_global_grow_quadratically_with_ranks():
    per_rank = 256
    """The properties the planner promises (the constants are checked against a measured peak above):
    streamed local logits stop growing once N exceeds the chunk; dense global ones grow with N^2."""
    local = [logit_bytes("local", per_rank, world, chunk=1024) for world in (2, 4, 8, 64)]
    global_ = [logit_bytes("global", per_rank, world) for world in (1, 2, 4, 8)]
    assert local[0] < local[1] == local[2] == local[3]  # N = 512 < chunk; then (B, chunk) blocks whatever N
    assert local[1] == 2 * local[0]  # linear in min(N, chunk)
    assert [x / global_[0] for x in global_] == [1, 4, 16, 64]
    assert logit_bytes("none", per_rank, 8) == global_[0]  # local negatives only: as one process


def test_plan_for_the_laion_recipe_and_the_cli(tiny_model_json):
    config = load_config(REPO / "configs" / "vit-b-32-laion.yaml")
    plan = plan_memory(config, world_size=128)
    assert plan.micro_batch == 256 and plan.global_batch == 32768
    assert plan.logits == 3 * 256 * 1024 * 4  # streamed (B, chunk) blocks, not (B, 32768)
    assert plan.model_state == 16 * 151_277_313  # ViT-B/32 CLIP parameters
    # FSDP: each rank's rows of every parameter (torch.chunk along dim 0), checked against measured
    # runs in bench/fsdp_memory.py; at least 1/N, and rows that do not divide evenly cost a little more.
    assert plan.model_state / 128 <= plan.model_state_fsdp <= 1.01 * plan.model_state / 128
    assert plan.activations > 0
    out = subprocess.run([sys.executable, "-m", "clipx.cli", "plan", "--config", str(REPO / "configs" / "demo-digits.yaml"),
                          "--world-size", "4", "--global-batch", "1024", "loss.gather=global"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "global batch 1024" in out.stdout and "logit matrices" in out.stdout and "fsdp" in out.stdout
    assert "16.0 MiB" in out.stdout  # 4 copies x 1024 x 1024 x 4 bytes, on every rank


def test_loader_plan_measures_the_loader_on_the_configs_shards(digits_dir, tiny_model_json, tmp_path, monkeypatch):
    from clipx.apps import plan as planner
    from clipx.methods.image_text import ImageTextMethod

    config = load_config(REPO / "configs" / "demo-digits.yaml", tiny_overrides(digits_dir, tiny_model_json, tmp_path))
    fast = planner.plan_loader(config, target=4000, world_size=8, samples=128)
    assert fast.per_core > 0 and fast.measured == 128
    assert fast.cores == -(-4000 // fast.per_core) and fast.workers_per_rank == -(-500 // fast.per_core)
    assert "data.workers=" in fast.table()
    # Measured, not assumed: a transform that takes 5 ms a sample caps the rate at 200 samples/s.
    transform = ImageTextMethod.train_transform

    def slow(self, config):
        crop = transform(self, config)

        def slowed(data):
            time.sleep(0.005)
            return crop(data)
        slowed.takes_bytes = True
        return slowed
    monkeypatch.setattr(ImageTextMethod, "train_transform", slow)
    slow_plan = planner.plan_loader(config, target=4000, world_size=8, samples=128)
    assert slow_plan.per_core < 200 < fast.per_core
    assert slow_plan.cores > fast.cores


def test_loader_plan_from_the_command_line(digits_dir, tiny_model_json, tmp_path):
    out = subprocess.run([sys.executable, "-m", "clipx.cli", "plan", "--config", str(REPO / "configs" / "demo-digits.yaml"),
                          "--world-size", "8", "--loader-target", "3651", "--loader-samples", "128",
                          *tiny_overrides(digits_dir, tiny_model_json, tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "per-rank memory" in out.stdout and "samples/s per core" in out.stdout and "loader core(s)" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "clipx.cli", "plan", "--config", str(REPO / "configs" / "demo-digits.yaml"),
                          "--loader-target", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--loader-target must be > 0" in bad.stderr and "Traceback" not in bad.stderr
