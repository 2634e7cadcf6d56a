"""Self-supervised pieces: NT-Xent against a per-anchor loop, views, kNN and linear probes, the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from clipx.config import load_config
from clipx.losses import NTXentLoss
from tests.conftest import REPO, clipx_in_process, tiny_overrides

SIMCLR = REPO / "configs" / "simclr-digits.yaml"


def ntxent_reference(z1: list[list[float]], z2: list[list[float]], temperature: float) -> float:
    """SimCLR's loss written from the paper: for each of the 2B anchors, -log of its partner's share
    of exp(sim / T) over the 2B - 1 other views; averaged over anchors."""
    views = z1 + z2
    n = len(z1)

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    total = 0.0
    for i, anchor in enumerate(views):
        partner = i + n if i < n else i - n
        others = [math.exp(cosine(anchor, v) / temperature) for j, v in enumerate(views) if j != i]
        total -= math.log(math.exp(cosine(anchor, views[partner]) / temperature) / sum(others))
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_matches_the_per_anchor_reference(temperature):
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)  # not normalised: the loss normalises
    loss = NTXentLoss(temperature)(z1, z2)
    assert loss.item() == pytest.approx(ntxent_reference(z1.tolist(), z2.tolist(), temperature), abs=1e-5)


def test_ntxent_is_low_when_views_agree_and_gradients_flow():
    torch.manual_seed(1)
    z = torch.randn(8, 16)
    agree = NTXentLoss(0.1)(z, z + 0.01 * torch.randn(8, 16))
    disagree = NTXentLoss(0.1)(z, torch.randn(8, 16))
    assert agree < disagree
    z1 = torch.randn(4, 3, requires_grad=True)
    NTXentLoss(0.2)(z1, torch.randn(4, 3)).backward()
    assert z1.grad.abs().sum() > 0


def test_knn_votes_weighted_by_similarity():
    from eval.knn import knn_predict

    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1])
    query = F.normalize(torch.tensor([[1.0, 0.05], [0.1, 1.0]]), dim=-1)
    scores = knn_predict(train, labels, query, k=2, temperature=0.1, num_classes=2)
    assert scores.argmax(dim=1).tolist() == [0, 1]
    # k=1: only the nearest neighbour votes.
    assert (knn_predict(train, labels, query, k=1, num_classes=2) > 0).sum(dim=1).tolist() == [1, 1]


def test_linear_probe_separates_separable_classes_and_picks_a_regulariser():
    from eval.knn import linear_probe

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=generator)
    y = (x[:, 0] > 0).long()
    probabilities, c = linear_probe(x[:150].numpy(), y[:150].numpy(), x[150:].numpy())
    assert (probabilities.argmax(axis=1) == y[150:].numpy()).mean() > 0.9
    assert c in (0.01, 0.1, 1.0, 10.0, 100.0)


def test_views_batches_hold_two_augmented_views_and_no_text(digits_dir, tiny_model_json):
    from clipx.data.pipeline import POSITION_KEY, SharedEpoch, build_train_loader
    from clipx.data.skips import SkipCounter
    from clipx.methods import method_of

    config = load_config(SIMCLR, [f"model.name={tiny_model_json}", f"data.train={digits_dir / 'train'}",
                                  "data.workers=0"])
    method = method_of(config)
    loader, _ = build_train_loader(config.data, 16, method.train_transform(config), method.collate(config), 0, 0,
                                   1, SharedEpoch(), SkipCounter())
    batch = next(iter(loader))
    assert set(batch) == {"views", "key", POSITION_KEY} and len(batch["views"]) == 2
    assert batch["views"][0].shape == (16, 3, 32, 32)
    assert not torch.equal(batch["views"][0], batch["views"][1])  # independent augmentations


def test_simclr_trains_and_both_probes_run_through_the_cli(tmp_path, digits_dir, tiny_model_json):
    from clipx.train.loop import train

    run = tmp_path / "run"
    summary = train(load_config(SIMCLR, tiny_overrides(digits_dir, tiny_model_json, run, **{
        "train.steps": 3, "data.val": "null"})))
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    for task, key in (("knn", "knn"), ("linear-probe", "linear_probe")):
        out = tmp_path / f"{task}.json"
        result = clipx_in_process("eval", task, "--checkpoint", run, "--train-data", digits_dir / "train",
                                  "--data", digits_dir / "test", "--out", out)
        assert result.returncode == 0, result.stderr[-2000:]
        metrics = json.loads(out.read_text())[key]
        assert 0.3 < metrics["top1"] <= metrics["top5"], metrics  # 10 classes: chance is 0.1
    assert json.loads((tmp_path / "knn.json").read_text())["num_test"] == 360
