"""ClipLoss against a reference written from the CLIP paper's pseudo-code, element by element."""

import math

import pytest
import torch
import torch.nn.functional as F

from clipx.losses import ClipLoss


def reference_clip_loss(image: list[list[float]], text: list[list[float]], scale: float) -> float:
    """Plain-Python symmetric InfoNCE: mean over rows of -log softmax, both directions, averaged."""
    n = len(image)
    logits = [[scale * sum(a * b for a, b in zip(image[i], text[j])) for j in range(n)] for i in range(n)]

    def cross_entropy(rows):
        total = 0.0
        for i, row in enumerate(rows):
            log_norm = math.log(sum(math.exp(v) for v in row))
            total += log_norm - row[i]
        return total / n

    transposed = [[logits[j][i] for j in range(n)] for i in range(n)]
    return (cross_entropy(logits) + cross_entropy(transposed)) / 2


def test_matches_hand_computed_value_on_a_2x2_case():
    # Orthogonal unit vectors, perfectly paired: logits [[s, 0], [0, s]].
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scale = 2.0
    expected = math.log(math.exp(2.0) + 1.0) - 2.0  # each row: -log(e^s / (e^s + e^0))
    loss = ClipLoss(gather="none")(image, text, torch.tensor(scale))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_matches_reference_on_random_features():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(5, 3), dim=-1)
    text = F.normalize(torch.randn(5, 3), dim=-1)
    loss = ClipLoss(gather="none")(image, text, torch.tensor(10.0))
    assert loss.item() == pytest.approx(reference_clip_loss(image.tolist(), text.tolist(), 10.0), abs=1e-5)


def reference_rank_loss(image: list[list[float]], text: list[list[float]], scale: float, rows: range,
                        gather: str) -> float:
    """What one rank's loss must be, written out: ``global``, the whole batch's loss; ``local``, this
    rank's rows against every column, both directions, averaged over its rows."""
    if gather == "global":
        return reference_clip_loss(image, text, scale)
    n = len(image)

    def row_loss(queries, candidates, i):
        logits = [scale * sum(a * b for a, b in zip(queries[i], candidates[j])) for j in range(n)]
        return math.log(sum(math.exp(v) for v in logits)) - logits[i]

    return sum(row_loss(image, text, i) + row_loss(text, image, i) for i in rows) / (2 * len(rows))


@pytest.mark.parametrize("world", [3, 4])
@pytest.mark.parametrize("gather", ["global", "local"])
def test_each_rank_of_an_emulated_group_matches_a_hand_built_reference(gather, world, monkeypatch):
    """The distributed paths (gathered columns, label offsets, chunked streaming with a partial last
    chunk) in one process: clipx.dist answers as rank r of ``world``, and its all-gather returns the
    other ranks' rows around this rank's own. The ranks' mean is the whole batch's loss."""
    from clipx import dist

    per_rank = 3
    torch.manual_seed(world)
    image = F.normalize(torch.randn(world * per_rank, 4), dim=-1)
    text = F.normalize(torch.randn(world * per_rank, 4), dim=-1)
    losses = []
    for rank in range(world):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)

        def gather_with_grad(x, rows=rows):
            full = image if torch.equal(x, image[rows]) else text
            return torch.cat([full[:rows.start], x, full[rows.stop:]])

        monkeypatch.setattr(dist, "is_distributed", lambda: True)
        monkeypatch.setattr(dist, "world_size", lambda: world)
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "gather_with_grad", gather_with_grad)
        loss = ClipLoss(gather=gather, chunk_size=5)(image[rows], text[rows], torch.tensor(10.0))
        expected = reference_rank_loss(image.tolist(), text.tolist(), 10.0, range(rows.start, rows.stop), gather)
        assert loss.item() == pytest.approx(expected, abs=1e-5), f"rank {rank}"
        losses.append(loss.item())
    whole = reference_clip_loss(image.tolist(), text.tolist(), 10.0)
    assert sum(losses) / world == pytest.approx(whole, abs=1e-5)


def test_loss_is_symmetric_in_modalities_and_falls_with_alignment():
    torch.manual_seed(1)
    image = F.normalize(torch.randn(8, 4), dim=-1)
    text = F.normalize(torch.randn(8, 4), dim=-1)
    loss = ClipLoss()
    scale = torch.tensor(5.0)
    assert loss(image, text, scale).item() == pytest.approx(loss(text, image, scale).item(), abs=1e-6)
    assert loss(image, image, scale) < loss(image, text, scale)


def test_gradient_reaches_features_and_temperature():
    image = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    ClipLoss()(image, text, log_scale.exp()).backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and log_scale.grad.abs() > 0


def test_unknown_gather_mode_is_rejected():
    with pytest.raises(ValueError, match="gather"):
        ClipLoss(gather="both")


def test_chunked_cross_entropy_matches_the_dense_one_and_passes_gradcheck():
    from clipx.losses.chunked import ChunkedCrossEntropy

    torch.manual_seed(0)
    queries = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1).requires_grad_()
    keys = F.normalize(torch.randn(11, 4, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, 0, 10, 5, 7])
    for chunk in (1, 3, 11, 64):
        value = ChunkedCrossEntropy.apply(queries, keys, scale, targets, chunk)
        assert value.item() == pytest.approx(F.cross_entropy(scale * queries @ keys.T, targets).item(), abs=1e-12)
    assert torch.autograd.gradcheck(lambda q, k, s: ChunkedCrossEntropy.apply(q, k, s, targets, 3),
                                    (queries, keys, scale))
