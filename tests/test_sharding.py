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
def test_fsdp_equals_ddp_equals_one_process_after_five_steps(case, world, launches, references, tiny_vit):
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
    initial = _initial(case, tiny_vit)
    moved = [k for k, v in one["weights"].items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert moved, "the steps changed no weight"


def _initial(case, arch) -> dict:
    """The seeded initial weights, flattened as run_case reports them (to see that training moved them)."""
    from clipx.config import load_config
    from clipx.methods import build_model

    config = load_config(None, [f"model.name={arch}", *[f"{k}={v}" for k, v in case.overrides.items()]])
    torch.manual_seed(0)
    return {k: v.reshape(-1) for k, v in build_model(config).state_dict().items()}


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "tiny-vit.json"
    path.write_text(json.dumps(TINY_VIT))
    return path


@pytest.mark.parametrize("world", [2, 4])
def test_an_overflow_in_one_ranks_shard_skips_the_step_on_every_rank(world, launches):
    """fp16 with sharded gradients (clipx.train.sharding.SyncedGradScaler): only rank 0's shard
    overflows. Every rank must skip the step and halve the scale; a rank that judged its own shard
    alone would apply the step and keep its scale, and the ranks' weights would part for good.
    Computed by the same 2- and 4-process launches as the cases above (tests/matrix/sharded.py,
    ``overflow_on_one_rank``), at no launch of its own."""
    found = launches[world]["cases"]["scaler"]
    assert found["scales"].tolist() == [512.0] * world, "every rank backs off from 1024"
    assert found["moved"].tolist() == [0.0] * world, "no rank applies the step"


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


@pytest.fixture(scope="module")
def sharded_and_plain_runs(digits_dir, tiny_model_json, tmp_path_factory) -> dict:
    """The demo config for 3 steps in this process, sharded over a group of one and not."""
    from clipx.config import load_config
    from clipx.train.loop import train
    from tests.conftest import DEMO, tiny_overrides

    out = tmp_path_factory.mktemp("one-process")
    runs = {}
    for sharding in ("fsdp", "ddp"):
        run = out / sharding
        train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, run, **{
            "train.steps": 3, "data.val": "null", "data.workers": 0, "train.sharding": sharding})))
        runs[sharding] = run
    return runs


def test_consumers_read_a_sharded_checkpoint_and_consolidate_writes_open_clips_layout(sharded_and_plain_runs,
                                                                                      tmp_path):
    """Evaluators, export and clipx.load join the shards on the fly; `clipx consolidate` writes the
    model.safetensors a DDP run writes (logit_scale 0-dim), equal to it here (one process, fp32)."""
    import open_clip
    from safetensors.torch import load_file

    import clipx
    from clipx.run_layout import list_checkpoints
    from tests.conftest import clipx_in_process

    sharded, plain = (list_checkpoints(sharded_and_plain_runs[s])[-1] for s in ("fsdp", "ddp"))
    assert not (sharded / "model.safetensors").exists() and (sharded / "model-shard0.safetensors").is_file()
    model, _, _ = clipx.load(sharded)
    expected = load_file(str(plain / "model.safetensors"))
    assert model.logit_scale.shape == () and all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    export = tmp_path / "export"
    result = clipx_in_process("export", "--checkpoint", sharded, "--format", "open_clip", "--out", export)
    assert result.returncode == 0, result.stderr[-2000:]
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    assert torch.equal(theirs.logit_scale.detach(), expected["logit_scale"])
    result = clipx_in_process("consolidate", sharded_and_plain_runs["fsdp"])
    assert result.returncode == 0, result.stderr[-2000:]
    written = load_file(str(sharded / "model.safetensors"))
    assert written.keys() == expected.keys()
    assert all(written[k].shape == v.shape and torch.equal(written[k], v) for k, v in expected.items())


@pytest.mark.parametrize("overrides, message", [
    (["train.fsdp_cpu_offload=true"], "train.fsdp_cpu_offload needs train.sharding=fsdp"),
    (["train.sharding=fsdp", "train.fsdp_cpu_offload=true"], "on CPU processes they are there already"),
    (["train.sharding=fsdp", "train.compile=true"], "train.compile is not supported with train.sharding=fsdp"),
    (["train.sharding=zero3"], "train.sharding must be one of ddp, fsdp"),
])
def test_sharding_settings_that_cannot_run_are_refused_with_one_line(overrides, message, digits_dir, tmp_path):
    from clipx.config import load_config
    from clipx.errors import ClipxError
    from clipx.train.build import check_inputs
    from tests.conftest import DEMO

    with pytest.raises(ClipxError, match=message) as info:
        check_inputs(load_config(DEMO, [f"data.train={digits_dir / 'train'}", "data.val=null", *overrides]))
    assert "\n" not in str(info.value)


def test_consolidate_refuses_a_checkpoint_that_is_not_sharded(sharded_and_plain_runs):
    from clipx.api import consolidate
    from clipx.errors import ClipxError

    with pytest.raises(ClipxError, match="holds no model shards"):
        consolidate(sharded_and_plain_runs["ddp"])
