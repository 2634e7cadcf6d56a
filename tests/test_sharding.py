"""train.sharding=fsdp: FSDP2 equals DDP equals one process, and sharded state reshards 2 -> 4 -> 2.

The 2- and 4-process runs happen in torchrun launches (tests/matrix/sharded.py); the one-process
reference runs here. The combination matrix (tests/test_matrix.py) trains every flavour sharded on
2 processes and resumes it bitwise; tests/test_reliability.py kills sharded saves.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.launch import torchrun
from tests.matrix import sharded
from tests.matrix.combos import TINY_VIT


@pytest.fixture(scope="module")
def launches(digits_dir, tmp_path_factory) -> dict:
    """2 processes, then 4 (loading what 2 saved), then 2 again (loading what 4 saved)."""
    out = tmp_path_factory.mktemp("sharded")
    plan = [(2, []), (4, [str(out / "state-w2")]), (2, [str(out / "reloaded-w4"), "reload-only"])]
    for index, (world, extra) in enumerate(plan):
        folder = out if index < 2 else out / "again"
        folder.mkdir(exist_ok=True)
        result = torchrun(["-m", "tests.matrix.sharded", str(folder), str(digits_dir), *extra], folder, timeout=900,
                          processes=world)
        assert result.returncode == 0, result.stderr[-4000:]
    return {"out": out, 2: torch.load(out / "results-w2.pt", weights_only=True),
            4: torch.load(out / "results-w4.pt", weights_only=True)}


@pytest.fixture(scope="module")
def references(digits_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharded-reference")
    (out / "arch.json").write_text(json.dumps(TINY_VIT))
    found = {}
    for case in sharded.CASES:
        result = sharded.run_case(case, 1, 0, digits_dir, out, "ddp")
        result.pop("trainer")
        found[case.name] = result
    return found


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", sharded.CASES, ids=[c.name for c in sharded.CASES])
def test_fsdp_equals_ddp_equals_one_process_after_five_steps(case, world, launches, references):
    results = launches[world]
    assert results["world_size"] == world
    fsdp, ddp, one = results["cases"][f"{case.name}/fsdp"], results["cases"][f"{case.name}/ddp"], references[case.name]
    refused = 1 if case.nan_at_step else 0
    assert fsdp["refused"] == ddp["refused"] == one["refused"] == refused
    for name, run in (("fsdp", fsdp), ("ddp", ddp)):
        _close(torch.tensor(run["losses"]), torch.tensor(one["losses"]), f"{case.name} {name} losses")
        assert run["weights"].keys() == one["weights"].keys()
        for key, value in one["weights"].items():
            _close(run["weights"][key], value, f"{case.name} {name} {key}")
    moved = [k for k, v in one["weights"].items() if v.is_floating_point() and not torch.equal(v, _initial(case)[k])]
    assert moved, "the steps changed no weight"


def _initial(case) -> dict:
    """The seeded initial weights, flattened as run_case reports them (to see that training moved them)."""
    from clipx.config import load_config
    from clipx.methods import build_model

    config = load_config(None, [f"model.name={_arch()}", *[f"{k}={v}" for k, v in case.overrides.items()]])
    torch.manual_seed(0)
    return {k: v.reshape(-1) for k, v in build_model(config).state_dict().items()}


def _arch():
    import tempfile
    from pathlib import Path

    path = Path(tempfile.gettempdir()) / "clipx-sharded-arch.json"
    path.write_text(json.dumps(TINY_VIT))
    return path


@pytest.mark.parametrize("world", [2, 4])
def test_an_overflow_in_one_ranks_shard_skips_the_step_on_every_rank(world, launches):
    found = launches[world]["cases"]["scaler"]
    assert found["scales"].tolist() == [512.0] * world  # backed off everywhere, from 1024
    assert found["moved"].tolist() == [0.0] * world  # no rank applied the step


def test_sharded_state_reshards_two_to_four_to_two_bitwise(launches):
    """Model and optimizer state written by 2 processes, loaded by 4 and written again, then loaded by
    2 and written again: once gathered, all three equal each other bitwise."""
    from clipx.train.state_io import load_tree, merge_shards

    out = launches["out"]

    def gathered(folder, world):
        return {part: merge_shards([load_tree(folder / f"{part}-shard{r}") for r in range(world)])
                for part in ("model", "optimizer")}

    written_by_2 = gathered(out / "state-w2", 2)
    via_4 = gathered(out / "reloaded-w4", 4)
    back_at_2 = gathered(out / "again" / "reloaded-w2", 2)
    assert len(written_by_2["optimizer"]["state"]) > 0
    for other in (via_4, back_at_2):
        _equal_trees(written_by_2, other, "")


def _equal_trees(a, b, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _equal_trees(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _equal_trees(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """As the gather tests: max |actual - expected| <= 1e-6 * max(1, max |expected|), NaN where NaN."""
    assert actual.shape == expected.shape, what
    same_nan = torch.isnan(actual) == torch.isnan(expected)
    assert bool(same_nan.all()), f"{what}: NaN in different places"
    finite = ~torch.isnan(expected)
    error = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    scale = max(1.0, expected[finite].abs().max().item()) if finite.any() else 1.0
    assert error <= 1e-6 * scale, f"{what}: max error {error:.3g} (scale {scale:.3g})"
