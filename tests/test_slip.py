"""SLIP: CLIP's loss plus NT-Xent on two views through the image tower and its own head."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import clipx
from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.losses import ClipLoss, NTXentLoss
from clipx.methods import build_model, method_of
from clipx.methods.slip import SlipObjective
from tests.conftest import REPO, clipx_in_process, tiny_overrides, train_in_process

SLIP = REPO / "configs" / "slip-digits.yaml"


def reference_slip(image, text, scale, view1, view2, temperature, weight) -> torch.Tensor:
    """The SLIP loss written out: symmetric cross-entropy over image-text similarities, plus
    ``weight`` x the mean over all 2B views of -log softmax to the other view of the same image."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = scale * image @ text.T
    targets = torch.arange(len(image))
    clip = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    z = F.normalize(torch.cat([view1, view2]), dim=-1)
    n = len(view1)
    terms = []
    for i in range(2 * n):
        others = [j for j in range(2 * n) if j != i]
        sims = torch.stack([z[i] @ z[j] / temperature for j in others])
        positive = others.index((i + n) % (2 * n))
        terms.append(-torch.log_softmax(sims, 0)[positive])
    return clip + weight * torch.stack(terms).mean()


@pytest.mark.parametrize("gather", ["none", "global", "local"])
def test_the_loss_is_clip_plus_weighted_ntxent(gather):
    torch.manual_seed(0)
    view1, view2 = (torch.randn(5, 8, dtype=torch.float64) for _ in range(2))
    # The towers' embeddings arrive unit-norm (DualEncoder.encode_*); the head's projections do not.
    image, text = (F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1) for _ in range(2))
    scale = torch.tensor(7.0, dtype=torch.float64)
    objective = SlipObjective(None, ClipLoss(gather), NTXentLoss(0.3, gather), ssl_weight=0.7)
    out = objective.loss_from_features({"image": image, "text": text, "logit_scale": scale,
                                        "view1": view1, "view2": view2})
    expected = reference_slip(image, text, scale, view1, view2, temperature=0.3, weight=0.7)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["metrics"]["clip_loss"] + 0.7 * out["metrics"]["ssl_loss"], expected,
                               rtol=1e-6, atol=1e-6)


def test_the_model_exports_without_its_head_and_the_views_reach_the_head():
    config = load_config(SLIP)
    model = build_model(config).eval()
    assert any(k.startswith("image_head.") for k in model.state_dict())
    assert not any(k.startswith("image_head.") for k in model.clip_state_dict())
    assert set(model.clip_state_dict()) == set(model.state_dict()) - {k for k in model.state_dict()
                                                                     if k.startswith("image_head.")}
    images, views = torch.randn(3, 3, 32, 32), torch.randn(6, 3, 32, 32)
    tokens = torch.randint(0, 100, (3, config.model.arch["text_cfg"]["context_length"]))
    out = model(images, tokens, views)
    assert len(out) == 5 and out[4].shape == (6, config.ssl.head_out)
    torch.testing.assert_close(out[4], model.image_head(model.visual(views)))
    torch.testing.assert_close(out[0], model.encode_image(images))


def test_a_batch_carries_the_captioned_image_and_two_views():
    from PIL import Image

    config = load_config(SLIP)
    method = method_of(config)
    sample = method.train_transform(config)(Image.new("RGB", (32, 32), (128, 64, 32)))
    assert len(sample) == 3 and all(t.shape == (3, 32, 32) for t in sample)
    batch = method.collate(config)([{"image": sample, "text": "a photo of the digit 3", "key": "k"}] * 2)
    assert batch["image"].shape == (2, 3, 32, 32) and [v.shape for v in batch["views"]] == [(2, 3, 32, 32)] * 2
    assert batch["text"].shape[0] == 2


@pytest.mark.parametrize("override, message", [
    ("loss.ssl_weight=-1", "ssl_weight must be >= 0"),
    ("ssl.views.count=3", "two views per image"),
    ("ssl.views.crop_scale_min=0", r"must be in \(0, 1\]"),
])
def test_bad_settings_give_one_line_errors(override, message):
    with pytest.raises(ClipxError, match=message):
        method_of(load_config(SLIP, [override]))


def test_slip_trains_and_its_checkpoint_serves_zero_shot_and_knn(digits_dir, tiny_model_json, tmp_path):
    out = tmp_path / "run"
    train_in_process(["loss.name=slip", "ssl.views.crop_scale_min=0.3", "ssl.head_hidden=32", "ssl.head_out=16",
                  *tiny_overrides(digits_dir, tiny_model_json, out, **{"train.steps": 3})])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "clip_loss" in r]
    assert len(train) == 3 and all(r["ssl_loss"] > 0 for r in train)
    for r in train:
        assert r["loss"] == pytest.approx(r["clip_loss"] + r["ssl_loss"], rel=1e-5)
    assert [r for r in rows if r["kind"] == "eval"][-1]["zero_shot.top1"] >= 0

    # The same checkpoint serves the image-only probes (its image embeddings) and exports to open_clip
    # without the head, where it embeds images as clipx does.
    probe = tmp_path / "knn.json"
    result = clipx_in_process("eval", "knn", "--checkpoint", out, "--train-data", digits_dir / "train",
                              "--data", digits_dir / "test", "--out", probe, "--workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert 0.1 < json.loads(probe.read_text())["knn"]["top1"] <= 1.0
    export = tmp_path / "export"
    result = clipx_in_process("export", "--checkpoint", out, "--format", "open_clip", "--out", export)
    assert result.returncode == 0, result.stderr[-2000:]
    import open_clip

    theirs = open_clip.create_model_and_transforms(f"local-dir:{export}")[0].eval()
    ours = clipx.load(out)[0]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images, normalize=True),
                                   rtol=1e-5, atol=1e-5)
