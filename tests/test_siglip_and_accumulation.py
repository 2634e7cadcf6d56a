"""SigLIP against a dense reference; gradient caching against one large batch."""

import pytest
import torch
import torch.nn.functional as F

from clipx.losses import ClipLoss, SigLipLoss
from clipx.methods.image_text import ContrastiveObjective
from clipx.train.runtime import make_accelerator
from clipx.train.step import micro_batch_gradients
from tests.distributed.cases import tiny_problem


def dense_siglip(image, text, scale, bias):
    """The paper's pseudo-code: all-pairs logits, +1 labels on the diagonal, -1 elsewhere."""
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(len(image)) - 1
    return -F.logsigmoid(labels * logits).sum() / len(image)


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def test_siglip_value_and_gradients_match_the_dense_reference():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(6, 5), dim=-1)
    text = F.normalize(torch.randn(6, 5), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = leaves(image, text, scale, bias)
    reference = leaves(image, text, scale, bias)
    loss = SigLipLoss()(*ours)
    expected = dense_siglip(*reference)
    loss.backward()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


def test_siglip_hand_computed_on_two_pairs():
    # Orthogonal pairs, scale 1, bias 0: positives z = 1, negatives z = 0.
    image = text = torch.eye(2)
    loss = SigLipLoss()(image, text, torch.tensor(1.0), torch.tensor(0.0))
    expected = (2 * -F.logsigmoid(torch.tensor(1.0)) + 2 * -F.logsigmoid(torch.tensor(0.0))) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_feature_cache_equals_one_step_on_the_whole_batch(loss_name):
    siglip = loss_name == "siglip"
    loss = SigLipLoss() if siglip else ClipLoss()
    accelerator = make_accelerator()

    model, images, tokens = tiny_problem(siglip=siglip)
    objective = ContrastiveObjective(model, loss, uses_bias=siglip)
    expected = objective({"image": images, "text": tokens})["loss"]
    expected.backward()
    expected_grads = grads_of(model)

    model, images, tokens = tiny_problem(siglip=siglip)
    objective = ContrastiveObjective(model, loss, uses_bias=siglip)
    micro = [{"image": images[i:i + 2], "text": tokens[i:i + 2]} for i in range(0, 8, 2)]
    out = micro_batch_gradients(accelerator, model, objective, micro, "features")
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    grads = grads_of(model)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        scale = max(1.0, expected_grads[name].abs().max().item())
        assert (grads[name] - expected_grads[name]).abs().max().item() <= 1e-6 * scale, name


def test_naive_accumulation_is_a_different_objective():
    accelerator = make_accelerator()
    model, images, tokens = tiny_problem()
    objective = ContrastiveObjective(model, ClipLoss())
    full = objective({"image": images, "text": tokens})["loss"].item()
    micro = [{"image": images[i:i + 2], "text": tokens[i:i + 2]} for i in range(0, 8, 2)]
    naive = micro_batch_gradients(accelerator, model, objective, micro, "naive")["loss"].item()
    assert abs(naive - full) > 0.1  # 2 candidates per query instead of 8
