"""Faults: checkpoints that are torn, damaged, malicious or from another world size; SIGTERM; NaNs."""

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.train.checkpoint import MANIFEST, file_digest, list_checkpoints, verify_checkpoint
from tests.conftest import DEMO, REPO, run_training, tiny_overrides


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run)[-1] / "model.safetensors")


class Payload:
    """Unpickling this creates a file: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_only_complete_checkpoints_count_and_old_ones_are_pruned(tmp_path, digits_dir, tiny_model_json):
    from clipx.train.loop import train

    run = tmp_path / "run"
    config = load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, run, **{
        "train.steps": 4, "train.checkpoint_every": 1, "train.keep_checkpoints": 2, "data.val": "null"}))
    train(config)
    assert [p.name for p in list_checkpoints(run)] == ["step-000000003", "step-000000004"]
    for checkpoint in list_checkpoints(run):
        verify_checkpoint(checkpoint)
    # A save that died half way: a temporary directory, and a step directory without a manifest.
    torn = run / "checkpoints" / ".tmp-step-000000005"
    shutil.copytree(list_checkpoints(run)[-1], torn)
    (torn / MANIFEST).unlink()
    no_manifest = run / "checkpoints" / "step-000000006"
    shutil.copytree(torn, no_manifest)
    assert list_checkpoints(run)[-1].name == "step-000000004"  # what --resume latest would load
    train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, run, **{
        "train.steps": 5, "train.checkpoint_every": 1, "train.keep_checkpoints": 2, "data.val": "null"})),
        resume="latest")
    assert not torn.exists()  # removed at start, before anything else was written


def test_a_damaged_or_foreign_checkpoint_is_refused_with_the_file_named(tmp_path, digits_dir, tiny_model_json):
    from clipx.train.loop import train

    run = tmp_path / "run"
    overrides = tiny_overrides(digits_dir, tiny_model_json, run, **{"train.steps": 2, "data.val": "null"})
    train(load_config(DEMO, overrides))
    checkpoint = list_checkpoints(run)[-1]
    state = checkpoint / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ClipxError, match="state.safetensors is missing or does not match its checksum"):
        train(load_config(DEMO, overrides), resume=str(checkpoint))
    # Claims 2 processes (with a manifest that vouches for it) but holds one rank's state: refused.
    # (A real 2-process checkpoint resumes on another number of processes: tests/test_elastic_resume.py.)
    train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "run2", **{
        "train.steps": 1, "data.val": "null"})))
    other = list_checkpoints(tmp_path / "run2")[-1]
    trainer_state = json.loads((other / "trainer_state.json").read_text())
    (other / "trainer_state.json").write_text(json.dumps({**trainer_state, "world_size": 2}))
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["sha256"]["trainer_state.json"] = file_digest(other / "trainer_state.json")
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ClipxError, match="written by 2 process.*holds no state of rank 1"):
        train(load_config(DEMO, overrides), resume=str(other))


def test_malicious_pickles_in_a_checkpoint_or_a_shard_never_run(tmp_path, digits_dir, tiny_model_json):
    import io
    import tarfile

    from clipx.train.loop import train

    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    run = tmp_path / "run"
    overrides = tiny_overrides(digits_dir, tiny_model_json, run, **{"train.steps": 1, "data.val": "null"})
    train(load_config(DEMO, overrides))
    checkpoint = list_checkpoints(run)[-1]
    # Accelerate's pickle files, planted beside ours, are not read; a pickle posing as our state is refused.
    for name in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "scheduler.bin"):
        (checkpoint / name).write_bytes(payload)
    (checkpoint / "state.safetensors").write_bytes(payload)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["sha256"]["state.safetensors"] = file_digest(checkpoint / "state.safetensors")
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ClipxError, match="cannot resume"):
        train(load_config(DEMO, overrides), resume=str(checkpoint))
    assert not marker.exists()

    # A shard whose samples carry pickles (.pyd / .pickle members, webdataset's pickle decoders).
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in sorted((digits_dir / "train").glob("*.tar")):
        with tarfile.open(shard) as source, tarfile.open(shards / shard.name, "w") as target:
            for member in source.getmembers():
                target.addfile(member, source.extractfile(member))
                if member.name.endswith(".txt"):
                    for extension in (".pyd", ".pickle"):
                        extra = tarfile.TarInfo(member.name[:-4] + extension)
                        extra.size = len(payload)
                        target.addfile(extra, io.BytesIO(payload))
    shutil.copy(digits_dir / "train" / "sizes.json", shards / "sizes.json")
    summary = train(load_config(DEMO, tiny_overrides(shards.parent, tiny_model_json, tmp_path / "run2", **{
        "data.train": shards, "train.steps": 2, "data.val": "null"})))
    assert summary["steps"] == 2 and not marker.exists()


def test_a_model_directory_with_its_own_code_is_refused_and_the_code_never_runs(tmp_path):
    from clipx.models.towers import HFTextTower

    marker = tmp_path / "code-ran"
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "custom", "hidden_size": 8,
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}}))
    (tmp_path / "configuration_custom.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')\n")
    with pytest.raises(ClipxError, match="contains custom code"):
        HFTextTower(str(tmp_path), 8)
    assert not marker.exists()


def test_non_finite_steps_apply_no_update_and_too_many_stop_the_run(tmp_path, digits_dir, tiny_model_json,
                                                                     monkeypatch):
    import clipx.train.loop as loop

    real = loop.micro_batch_gradients
    poisoned_steps = {2, 3}
    calls = {"n": 0}

    def poisoned(accelerator, model, objective, micro_batches, mode):
        calls["n"] += 1
        out = real(accelerator, model, objective, micro_batches, mode)
        if calls["n"] in poisoned_steps:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return out

    monkeypatch.setattr(loop, "micro_batch_gradients", poisoned)
    run = tmp_path / "run"
    summary = loop.train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, run, **{
        "train.steps": 3, "train.checkpoint_every": 1, "data.val": "null"})))
    assert summary["nonfinite_steps"] == 2
    step1 = load_file(run / "checkpoints" / "step-000000001" / "model.safetensors")
    step3 = load_file(run / "checkpoints" / "step-000000003" / "model.safetensors")
    assert all(torch.equal(step1[k], step3[k]) for k in step1)  # steps 2 and 3 applied nothing
    assert all(torch.isfinite(v).all() for v in step3.values())

    calls["n"], poisoned_steps = 0, set(range(1, 100))
    monkeypatch.setattr(loop, "micro_batch_gradients", poisoned)
    with pytest.raises(ClipxError, match="step 2: .* not finite .*; 2 consecutive steps applied no update"):
        loop.train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "run2", **{
            "train.steps": 5, "train.max_nonfinite_steps": 2, "data.val": "null"})))


def test_a_loss_spike_applies_no_update_and_the_running_mean_travels_in_checkpoints(tmp_path, digits_dir,
                                                                                      tiny_model_json, monkeypatch):
    import clipx.train.loop as loop

    real = loop.micro_batch_gradients
    calls = {"n": 0}

    def spiking(accelerator, model, objective, micro_batches, mode):
        calls["n"] += 1
        out = real(accelerator, model, objective, micro_batches, mode)
        return {**out, "loss": out["loss"] * 50} if calls["n"] == 5 else out

    monkeypatch.setattr(loop, "micro_batch_gradients", spiking)
    run = tmp_path / "run"
    summary = loop.train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, run, **{
        "train.steps": 6, "train.checkpoint_every": 1, "data.val": "null", "train.loss_spike_factor": 3.0,
        "train.loss_spike_warmup": 3})))
    assert summary["loss_spike_steps"] == 1 and summary["nonfinite_steps"] == 0
    step4 = load_file(run / "checkpoints" / "step-000000004" / "model.safetensors")
    step5 = load_file(run / "checkpoints" / "step-000000005" / "model.safetensors")
    step6 = load_file(run / "checkpoints" / "step-000000006" / "model.safetensors")
    assert all(torch.equal(step4[k], step5[k]) for k in step4)  # the spike applied nothing
    assert not all(torch.equal(step5[k], step6[k]) for k in step5)  # the next step did
    guard = json.loads((run / "checkpoints" / "step-000000006" / "trainer_state.json").read_text())["guard"]
    assert guard["spikes"] == 1 and guard["accepted"] == 5 and guard["streak"] == 0 and guard["loss_mean"] > 0


def test_sigterm_saves_at_one_step_exits_75_and_resumes_to_the_same_weights(tmp_path, digits_dir, tiny_model_json):
    extra = {"train.steps": 40, "train.checkpoint_every": 1000, "data.val": "null", "train.batch_size": 32}
    full = tmp_path / "full"
    run_training(tiny_overrides(digits_dir, tiny_model_json, full, **extra))

    run = tmp_path / "run"
    command = [sys.executable, "-m", "clipx.cli", "train", "--config", str(DEMO),
               *tiny_overrides(digits_dir, tiny_model_json, run, **extra)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):  # a few steps in
        assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-2000:]
    saved = list_checkpoints(run)
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("-")[1]) < 40
    assert "--resume latest" in stderr

    run_training(tiny_overrides(digits_dir, tiny_model_json, run, **extra), "--resume", "latest")
    expected, actual = weights(full), weights(run)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_a_save_that_outlasts_the_grace_period_still_exits_75():
    """The watchdog: a process stuck after SIGTERM (a hung save) leaves with status 75 at the deadline."""
    script = ("import time; from clipx.train.guards import StopRequest; stop = StopRequest(0.5); "
              "print('ready', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 75


def test_ten_sigkills_anywhere_then_resume_give_the_uninterrupted_weights(tmp_path, digits_dir, tiny_model_json):
    """SIGKILL at 10 random moments (checkpoints are saved every step, so several land inside a
    save); after each, every complete checkpoint verifies; the resumed run ends bitwise equal,
    having trained on the same sample keys in the same order."""
    from bench.fault_injection import run_fault_injection

    overrides = tiny_overrides(digits_dir, tiny_model_json, tmp_path, **{
        "train.steps": 60, "train.batch_size": 32, "train.checkpoint_every": 1, "train.keep_checkpoints": 3,
        "data.val": "null"})
    report = run_fault_injection(tmp_path, overrides, kills=10, seed=0)
    assert report["kills"] == 10
    assert report["bitwise_equal"], report
    assert report["sample_keys_equal"] and report["sample_keys_logged"] == 60 * 32
    assert report["stray_temporary_dirs"] == 0 and report["complete_checkpoints_verified"] == 3
    assert report["events"][-1]["complete_checkpoints"] >= 1


def test_sigkills_of_every_rank_during_sharded_saves_then_resume_give_the_uninterrupted_weights(
        tmp_path, digits_dir, tiny_model_json):
    """train.sharding=fsdp on 2 processes, every rank writing its shards each step: all processes
    SIGKILLed together 4 times (bench/fault_injection.py --processes 2 --sharding fsdp does 12, see
    RELIABILITY.md); no torn checkpoint ever verifies, and the resumed run ends bitwise equal."""
    from bench.fault_injection import run_fault_injection

    overrides = tiny_overrides(digits_dir, tiny_model_json, tmp_path, **{
        "train.steps": 24, "train.batch_size": 16, "train.checkpoint_every": 1, "train.keep_checkpoints": 3,
        "data.val": "null", "data.workers": 0, "train.sharding": "fsdp"})
    report = run_fault_injection(tmp_path, overrides, kills=4, seed=0, processes=2)
    assert report["kills"] == 4
    assert report["bitwise_equal"], report
    assert report["sample_keys_equal"]
    assert report["stray_temporary_dirs"] == 0 and report["complete_checkpoints_verified"] == 3
    assert report["events"][-1]["complete_checkpoints"] >= 1
