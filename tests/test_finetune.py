"""Classification fine-tuning (loss.name: classify), its zero-shot-initialised head, FLYP's class-prompt
captions, and evaluation on a subset of classes (eval.classes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipx.config import load_config
from clipx.errors import ClipxError
from tests.conftest import clipx_in_process, tiny_overrides, train_in_process

LOW = [0, 1, 2, 3, 4]


def write_clip_checkpoint(out: Path, model_json: Path, seed: int = 7) -> Path:
    """A seeded random tiny CLIP saved as a clipx checkpoint: what classification fine-tuning starts from."""
    from safetensors.torch import save_file

    from clipx.config import dump_config
    from clipx.methods import build_model

    out.mkdir(parents=True, exist_ok=True)
    config = load_config(None, [f"model.name={model_json}"])
    torch.manual_seed(seed)
    save_file(build_model(config).state_dict(), str(out / "model.safetensors"))
    dump_config(config, out / "config.yaml")
    return out


def _classify_config(digits_dir, model_json, out, *extra):
    return load_config(None, tiny_overrides(digits_dir, model_json, out, **{
        "loss.name": "classify", "model.pretrained": str(out.parent / "clip"), "eval.classes": str(LOW),
        "data.max_skip_fraction": "null"}) + list(extra))


def test_the_head_starts_as_the_zero_shot_classifier_of_the_task(digits_dir, tiny_model_json, tmp_path):
    """Before any step the head's predictions are zero-shot classification's, on the same classes."""
    from clipx.data.tokenizer import Tokenizer
    from clipx.methods import method_of
    from clipx.models.classifier import zero_shot_weights
    from clipx.models.pretrained import init_from_pretrained
    from clipx.templates import load_templates
    from eval.run import evaluate

    write_clip_checkpoint(tmp_path / "clip", tiny_model_json)
    config = _classify_config(digits_dir, tiny_model_json, tmp_path / "run")
    method = method_of(config)
    model = method.build_model(config)
    init_from_pretrained(model, config.model.pretrained, "open_clip")
    model = method.prepare(model, None, config)
    assert model.training and model.classes == tuple(LOW)

    classnames, templates = load_templates("digits")
    expected = zero_shot_weights(model, Tokenizer(config.model), classnames[:5], templates, "cpu") * model.scale()
    torch.testing.assert_close(model.head.weight, expected, rtol=0, atol=1e-6)
    assert not model.head.bias.any()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("text.") or n == "logit_scale" for n in frozen)
    assert model.head.weight.requires_grad and all(p.requires_grad for p in model.visual.parameters())

    results = evaluate(model, Tokenizer(config.model), config.model, str(digits_dir / "test"), "cpu", retrieval=False,
                       classes=LOW, workers=0)
    assert results["classifier"] == results["zero_shot"]  # same argmax, same numbers
    assert 0.0 <= results["zero_shot"]["top1"] <= 1.0


def test_a_fine_tuning_run_trains_the_image_tower_and_head_and_leaves_the_rest(digits_dir, tiny_model_json, tmp_path):
    clip = write_clip_checkpoint(tmp_path / "clip", tiny_model_json)
    out = tmp_path / "run"
    train_in_process(tiny_overrides(digits_dir, tiny_model_json, out, **{
        "loss.name": "classify", "model.pretrained": str(clip), "eval.classes": str(LOW),
        "data.max_skip_fraction": "null", "train.lr": 1e-3}))
    start = load_file(str(clip / "model.safetensors"))
    final = load_file(str(sorted((out / "checkpoints").iterdir())[-1] / "model.safetensors"))
    assert {k for k in final if k.startswith("head.")} == {"head.weight", "head.bias"}
    for key, value in start.items():
        if key.startswith("text.") or key == "logit_scale":
            assert torch.equal(value, final[key]), key
    assert not torch.equal(start["visual.proj"], final["visual.proj"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert all(0.0 <= r["train_top1"] <= 1.0 for r in train)
    evaluation = [r for r in records if r["kind"] == "eval"][-1]
    assert {"classifier.top1", "zero_shot.top1"} <= set(evaluation)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"]["no_class_label"] > 0  # the digits 5-9 of the shards are not this task's


def test_the_loss_is_cross_entropy_of_the_head(tiny_model_json):
    from clipx.methods.classify import ClassifyObjective

    logits = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    out = ClassifyObjective(None).loss_from_features({"logits": logits, "label": labels})
    reference = -torch.log_softmax(logits, dim=1)[torch.arange(6), labels].mean()
    torch.testing.assert_close(out["loss"], reference, rtol=0, atol=1e-12)
    assert out["metrics"]["train_top1"] == (logits.argmax(1) == labels).double().mean()


def test_class_prompt_captions_fill_the_task_templates_with_the_sample_class(tmp_path):
    from clipx.data.captions import caption_chooser
    from clipx.templates import load_templates

    config = load_config(None, ["data.caption_keys={class_prompt: 1}", f"eval.classes={LOW}"])
    choose = caption_chooser(config.data, config.eval)
    _, templates = load_templates("digits")
    three = {"__key__": "a", "json": json.dumps({"label": 3}).encode()}
    drawn = {choose(three, seed) for seed in range(200)}
    assert drawn == {t.format("three") for t in templates}  # every template, uniformly drawn
    assert choose(three, 5) == choose(three, 5)  # the sample's seed decides: resumes draw the same
    assert choose({"__key__": "b", "cls": b"8"}, 0) is None  # a class outside eval.classes
    assert choose({"__key__": "c", "json": b"{not json"}, 0) is None
    plain = caption_chooser(load_config(None, []).data, config.eval)
    assert plain({"__key__": "d", "txt": b"a caption"}, 0) == "a caption"


def test_zero_shot_on_a_subset_leaves_other_labels_out_and_scores_only_those_classes():
    from eval.embed import Embeddings
    from eval.zero_shot import zero_shot_metrics

    features = torch.eye(4)
    labels = torch.tensor([5, 6, 0, 7])
    classifier = torch.eye(4)[:, [1, 0, 3]]  # column c scores label (5, 6, 7)[c]
    embeddings = Embeddings(features, labels, ["a", "b", "c", "d"], torch.empty(0, 4), torch.empty(0))
    metrics = zero_shot_metrics(embeddings, classifier, classes=[5, 6, 7])
    # Image 2 (label 0) is left out. Image 0 scores highest in column 1 (label 6): wrong; image 1 in
    # column 0 (label 5): wrong; image 3 in column 2 (label 7): right.
    assert metrics["top1"] == pytest.approx(1 / 3)
    assert metrics["top5"] == 1.0  # three classes: every label is among the top "5"
    with pytest.raises(ClipxError, match="no evaluated sample has a label among the classes"):
        zero_shot_metrics(embeddings, classifier[:, :1], classes=[9])


def test_prep_digits_writes_only_the_classes_asked_for(tmp_path):
    from clipx.data.eval_loader import build_eval_loader
    from data_prep import prep_digits

    summaries = prep_digits(tmp_path, workers=0, classes=[5, 6, 7, 8, 9])
    loader = build_eval_loader(str(tmp_path / "test"), lambda image: torch.zeros(1), "label", 64, 0)
    labels = torch.cat([batch["label"] for batch in loader])
    assert set(labels.tolist()) == {5, 6, 7, 8, 9}
    assert summaries["train"].written + summaries["test"].written < 1000  # about half of 1,797


@pytest.mark.parametrize("extra, message", [
    (["eval.classes=[3, 12]"], "eval.classes names class 12 but the templates list only 10"),
    (["eval.classes=[1, 1]"], "eval.classes must be distinct non-negative class indices"),
    (["ssl.encoder=resnet18"], "loss.name=classify fine-tunes a CLIP model's image tower"),
    (["eval.templates=nowhere"], "templates 'nowhere' is neither a file nor a shipped set"),
])
def test_classify_settings_it_cannot_train_are_refused_in_one_line(extra, message, tmp_path):
    from clipx.methods import method_of

    with pytest.raises(ClipxError, match=message):
        method_of(load_config(None, ["loss.name=classify", *extra]))


def test_eval_cli_chooses_among_the_classes_given(digits_dir, tiny_model_json, tmp_path, monkeypatch):
    """`--classes 5-9`: exactly the test images labelled 5-9 are classified, each among those 5 classes
    only. Ignoring the option would classify all 10 classes' images among 10 classes, which every
    assertion below refuses: the count, the width of the scores, and top-5 accuracy (certain only
    when there are 5 classes to choose among; the seeded random model is far from it among 10)."""
    from clipx.data.eval_loader import build_eval_loader
    from eval import zero_shot

    high_classes = {5, 6, 7, 8, 9}
    loader = build_eval_loader(str(digits_dir / "test"), lambda image: torch.zeros(1), "label", 128, 0)
    labels = torch.cat([batch["label"] for batch in loader])
    in_high = int(sum(int(label) in high_classes for label in labels))
    assert 0 < in_high < len(labels)  # the shards hold other classes too, which must be left out
    scored = []  # what zero-shot classification scored: (logits (N, C), targets (N,))
    metrics = zero_shot.classification_metrics

    def watched_metrics(logits, targets, *rest):
        scored.append((logits, targets))
        return metrics(logits, targets, *rest)

    monkeypatch.setattr(zero_shot, "classification_metrics", watched_metrics)
    clip = write_clip_checkpoint(tmp_path / "clip", tiny_model_json)
    out = tmp_path / "high.json"
    result = clipx_in_process("eval", "zero-shot", "--checkpoint", clip, "--data", digits_dir / "test", "--out", out,
                              "--classes", "5-9", "--workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    high = json.loads(out.read_text())
    assert high["num_images"] == len(labels)  # every image is embedded; the classes choose which are scored
    [(logits, targets)] = scored
    assert logits.shape == (in_high, len(high_classes)), "only the images of 5-9, each scored against 5-9 only"
    assert set(targets.tolist()) == set(range(len(high_classes)))  # columns 0-4 stand for labels 5-9
    assert high["zero_shot"]["top5"] == 1.0  # among 5 classes every label is in the top 5
    bad = clipx_in_process("eval", "zero-shot", "--checkpoint", clip, "--data", digits_dir / "test", "--out", out,
                           "--classes", "5-x")
    assert bad.returncode != 0 and "give class indices as" in bad.stderr and json.loads(out.read_text()) == high


def test_a_labelled_folder_becomes_labelled_captioned_shards_and_a_templates_file(tmp_path):

    import numpy as np
    from PIL import Image

    from clipx.data.eval_loader import build_eval_loader
    from clipx.templates import load_templates

    for name, colour in (("red fox", (200, 30, 30)), ("blue jay", (30, 30, 200))):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 24, 3), colour, dtype=np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    (tmp_path / "images" / "blue jay" / "notes.txt").write_text("not an image")
    out = tmp_path / "shards"
    result = clipx_in_process("prep", "labelled", "--images", tmp_path / "images", "--out", out, "--image-size", "16",
                              "--workers", "0", "--templates", "a photo of a {}.", "a {} bird.")
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_templates(out / "classes.yaml") == (["blue jay", "red fox"], ["a photo of a {}.", "a {} bird."])
    loader = build_eval_loader(str(out), lambda image: torch.tensor(image.getpixel((8, 8))), "label", 64, 0)
    batch = next(iter(loader))
    for pixel, label, captions in zip(batch["image"], batch["label"], batch["captions"]):
        name = ["blue jay", "red fox"][label]
        assert captions == [f"a photo of a {name}."]
        assert (pixel[2] > pixel[0]) == (name == "blue jay")  # the image is its class's colour
    assert len(batch["label"]) == 6
    bad = clipx_in_process("prep", "labelled", "--images", tmp_path / "none", "--out", tmp_path / "x")
    assert bad.returncode != 0 and "labelled folder" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_a_lora_fine_tuned_classifier_trains_adapters_and_head_and_exports_merged(digits_dir, tiny_model_json,
                                                                                   tmp_path):
    """The fine-tuning path end to end: LoRA on a classifier trains the adapters and the head only, and
    the open_clip export (adapters merged, head left out) embeds as clipx does."""
    import open_clip

    import clipx
    from clipx.apps.export import export_open_clip

    clip = write_clip_checkpoint(tmp_path / "clip", tiny_model_json)
    out = tmp_path / "run"
    train_in_process(tiny_overrides(digits_dir, tiny_model_json, out, **{
        "loss.name": "classify", "model.pretrained": str(clip), "eval.classes": str(LOW), "model.lora_rank": 4,
        "data.max_skip_fraction": "null", "train.lr": 1e-2}))
    start = load_file(str(clip / "model.safetensors"))
    final = load_file(str(sorted((out / "checkpoints").iterdir())[-1] / "model.safetensors"))
    assert all(torch.equal(value, final[key]) for key, value in start.items())  # every pretrained weight frozen
    trained_b = {k for k in final if k.endswith("lora_B.weight") and final[k].any()}  # B starts at zero
    assert trained_b and all(k.startswith("visual.") for k in trained_b)  # the text tower's adapters stay off
    assert "head.weight" in final
    export = export_open_clip(out, tmp_path / "open_clip")
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    ours, _, _ = clipx.load(out)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        error = (ours.encode_image(images) - theirs.eval().encode_image(images, normalize=True)).abs().max()
    assert error < 1e-5
