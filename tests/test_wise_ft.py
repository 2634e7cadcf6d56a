"""WiSE-FT (clipx wise-ft): the interpolated checkpoint's ends and middle, the curve and its report,
and the one-line refusals. A is a seeded random tiny CLIP, B a classifier fine-tuned from it for
three steps on digits 0-4 (the shards hold all ten digits, so the others are skipped)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipx.api import load_model
from clipx.apps.wise_ft import interpolate, parse_alphas
from clipx.cli import main
from clipx.config import dump_config, load_config
from clipx.errors import ClipxError
from clipx.methods import build_model
from clipx.run_layout import as_checkpoint
from tests.conftest import tiny_overrides, train_in_process, write_tiny_teacher

TASK = (0, 1, 2, 3, 4)


def write_random_checkpoint(out: Path, overrides: list[str], seed: int = 7) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    config = load_config(None, overrides)
    torch.manual_seed(seed)
    save_file(build_model(config).state_dict(), str(out / "model.safetensors"))
    dump_config(config, out / "config.yaml")
    return out


@pytest.fixture(scope="module")
def ends(tmp_path_factory, digits_dir):
    root = tmp_path_factory.mktemp("wise-ft")
    zero_shot = write_tiny_teacher(root / "A")
    train_in_process(tiny_overrides(digits_dir, zero_shot / "arch.json", root / "B", **{
        "loss.name": "classify", "model.pretrained": str(zero_shot), "eval.classes": "[0,1,2,3,4]",
        "data.max_skip_fraction": "null", "train.steps": 3, "eval.zero_shot": "false"}))
    return zero_shot, root / "B"


def wise_ft(*args: str) -> int:
    return main(["wise-ft", *map(str, args)])


def written(ends, tmp_path, alpha) -> dict[str, torch.Tensor]:
    zero_shot, fine_tuned = ends
    assert wise_ft("--zero-shot", zero_shot, "--fine-tuned", fine_tuned, "--alpha", alpha, "--out", tmp_path / "C") == 0
    return load_file(str(tmp_path / "C" / "model.safetensors"))


def zero_shot_head(zero_shot: Path, fine_tuned: Path):
    """What classification fine-tuning started B's head as: A's zero-shot classifier times A's scale."""
    from clipx.data.tokenizer import Tokenizer
    from clipx.models.classifier import zero_shot_weights
    from clipx.templates import load_templates

    model, _ = load_model(zero_shot)
    config = load_config(as_checkpoint(fine_tuned) / "config.yaml")
    classnames, templates = load_templates(config.eval.templates)
    weights = zero_shot_weights(model, Tokenizer(config.model), [classnames[c] for c in TASK], templates, "cpu")
    return weights * model.scale().item()


def test_alpha_zero_is_the_zero_shot_model_with_its_zero_shot_head(ends, tmp_path, digits_dir):
    from clipx.data.tokenizer import Tokenizer
    from eval.run import evaluate

    zero_shot, fine_tuned = ends
    state = written(ends, tmp_path, 0)
    a = load_file(str(zero_shot / "model.safetensors"))
    assert set(state) == set(a) | {"head.weight", "head.bias"}
    assert all(torch.equal(state[k], a[k]) for k in a)
    assert torch.equal(state["head.weight"], zero_shot_head(zero_shot, fine_tuned))
    assert torch.equal(state["head.bias"], torch.zeros(len(TASK)))

    # Its head classifies digits 0-4 exactly as A does zero-shot.
    model, config = load_model(tmp_path / "C")
    a_model, a_config = load_model(zero_shot)
    common = dict(retrieval=False, workers=0, label_key="label", templates="digits")
    head = evaluate(model, Tokenizer(config.model), config.model, str(digits_dir / "test"), "cpu", zero_shot=False,
                    **common)["classifier"]
    zero = evaluate(a_model, Tokenizer(a_config.model), a_config.model, str(digits_dir / "test"), "cpu",
                    classes=TASK, **common)["zero_shot"]
    assert head["top1"] == zero["top1"]


def test_alpha_one_is_the_fine_tuned_checkpoint_bit_for_bit(ends, tmp_path):
    _, fine_tuned = ends
    state = written(ends, tmp_path, 1)
    b = load_file(str(as_checkpoint(fine_tuned) / "model.safetensors"))
    assert set(state) == set(b) and all(torch.equal(state[k], b[k]) for k in b)
    assert load_config(tmp_path / "C" / "config.yaml") == load_config(as_checkpoint(fine_tuned) / "config.yaml")
    assert json.loads((tmp_path / "C" / "provenance.json").read_text())["alpha"] == 1.0


def test_alpha_one_half_is_the_mean_and_every_consumer_reads_it(ends, tmp_path, digits_dir, capsys):
    zero_shot, fine_tuned = ends
    state = written(ends, tmp_path, 0.5)
    a = {**load_file(str(zero_shot / "model.safetensors")), "head.weight": zero_shot_head(zero_shot, fine_tuned),
         "head.bias": torch.zeros(len(TASK))}
    b = load_file(str(as_checkpoint(fine_tuned) / "model.safetensors"))
    for key in b:
        assert torch.allclose(state[key], (a[key] + b[key]) / 2, atol=1e-6, rtol=0), key
    model, _ = interpolate(zero_shot, fine_tuned, 0.5)  # the library call gives the same model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    loaded, config = load_model(tmp_path / "C")
    assert config.loss.name == "classify" and loaded.classes == TASK
    capsys.readouterr()
    assert main(["eval", "zero-shot", "--checkpoint", str(tmp_path / "C"), "--data", str(digits_dir / "test"),
                 "--out", str(tmp_path / "eval.json"), "--workers", "0"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= results["zero_shot"]["top1"] <= 1 and 0 <= results["classifier"]["top1"] <= 1


def test_the_curve_writes_json_png_and_shows_in_the_report(ends, digits_dir, tmp_path, capsys):
    from clipx.apps.report.html import write_report
    from data_prep import prep_digits

    zero_shot, fine_tuned = ends
    prep_digits(tmp_path / "task", classes=TASK, workers=0)
    prep_digits(tmp_path / "other", classes=(5, 6, 7, 8, 9), workers=0)  # none of the head's classes
    assert wise_ft("--zero-shot", zero_shot, "--fine-tuned", fine_tuned, "--alphas", "0:1:0.5",
                   "--task-data", tmp_path / "task" / "test", "--held-out", tmp_path / "other" / "test",
                   "--held-out-classes", "5-9", "--workers", "0", "--out", fine_tuned) == 0
    assert "alpha  task top1  test top1" in capsys.readouterr().out
    curve = json.loads((fine_tuned / "wise_ft.json").read_text())
    assert [row["alpha"] for row in curve["rows"]] == [0.0, 0.5, 1.0]
    assert curve["task"]["metric"] == "classifier.top1" and curve["held_out"][0]["classes"] == [5, 6, 7, 8, 9]
    assert all(set(row["held_out_top1"]) == {"test"} for row in curve["rows"])
    assert (fine_tuned / "wise_ft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page = write_report(fine_tuned, tmp_path / "report.html").read_text()
    assert "WiSE-FT curve" in page and page.count("<td class='num'>0.5</td>") >= 1


def test_alphas_are_a_range_with_its_stop_or_a_list():
    grid = parse_alphas("0:1:0.1")
    assert len(grid) == 11 and grid[3] == 0.3 and grid[-1] == 1.0
    assert parse_alphas("0:1:0.3") == [0.0, 0.3, 0.6, 0.9]
    assert parse_alphas("1,0,0.5,0.5") == [0.0, 0.5, 1.0]
    for bad in ("0:1:0", "1:0:0.1", "0:1", "a", "0:2:0.5", "1.5", "nan", ""):
        with pytest.raises(ClipxError):
            parse_alphas(bad)


def refused(capsys, *args) -> str:
    assert wise_ft(*args) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


def test_bad_input_is_one_line_and_loses_nothing(ends, tmp_path, tiny_model_json, capsys):
    zero_shot, fine_tuned = ends
    both = ("--zero-shot", zero_shot, "--fine-tuned", fine_tuned)
    out = ("--out", tmp_path / "C")
    assert "outside [0, 1]" in refused(capsys, *both, "--alpha", "1.5", *out)
    assert "outside [0, 1]" in refused(capsys, *both, "--alpha", "-0.1", *out)
    assert "--alpha X" in refused(capsys, *both, *out)
    assert "--held-out" in refused(capsys, *both, "--alphas", "0:1:0.5", *out)
    assert "--zero-shot" in refused(capsys, "--zero-shot", tmp_path / "missing", "--fine-tuned", fine_tuned,
                                    "--alpha", "0.5", *out)
    other = write_random_checkpoint(tmp_path / "other", [f"model.name={tiny_model_json}"])  # 32 wide, not 24
    assert "different architectures" in refused(capsys, "--zero-shot", other, "--fine-tuned", fine_tuned,
                                                "--alpha", "0.5", *out)
    with_bias = write_random_checkpoint(tmp_path / "siglip", [f"model.name={zero_shot / 'arch.json'}",
                                                              "model.init_logit_bias=-10"])
    assert "logit_bias" in refused(capsys, "--zero-shot", zero_shot, "--fine-tuned", with_bias, "--alpha", "0.5", *out)
    assert not (tmp_path / "C").exists()

    # Neither the inputs nor a training run are written over.
    checkpoint = as_checkpoint(fine_tuned)
    before = (checkpoint / "model.safetensors").read_bytes()
    assert "did not write" in refused(capsys, *both, "--alpha", "0.5", "--out", checkpoint)
    assert "training run" in refused(capsys, *both, "--alpha", "0.5", "--out", fine_tuned)
    assert (checkpoint / "model.safetensors").read_bytes() == before


def test_a_lora_fine_tuned_model_is_interpolated_merged(tmp_path, digits_dir):
    """WiSE-FT's line runs between the models a LoRA run computes (adapters folded in): alpha = 1
    classifies as the LoRA model does, and the written checkpoint has no adapters."""
    import clipx

    zero_shot = write_tiny_teacher(tmp_path / "A")
    train_in_process(tiny_overrides(digits_dir, zero_shot / "arch.json", tmp_path / "B", **{
        "loss.name": "classify", "model.pretrained": str(zero_shot), "eval.classes": "[0,1,2,3,4]",
        "model.lora_rank": 4, "train.lr": 1e-2, "data.max_skip_fraction": "null", "train.steps": 2,
        "eval.zero_shot": "false"}))
    assert wise_ft("--zero-shot", zero_shot, "--fine-tuned", tmp_path / "B", "--alpha", 1, "--out", tmp_path / "C") == 0
    ours, _, _ = clipx.load(tmp_path / "C")
    lora, _, _ = clipx.load(tmp_path / "B")
    assert load_config(tmp_path / "C" / "config.yaml").model.lora_rank == 0
    assert not any("lora_" in key for key in load_file(str(tmp_path / "C" / "model.safetensors")))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.classify(images), lora.classify(images), rtol=0, atol=1e-5)
