"""ssl.mix (i-Mix / MixCo) and data.randaugment: the mixed losses against references written from
the papers' definitions with explicit loops, lam = 1 against the unmixed losses, the mixer's draws,
RandAugment's per-sample reproducibility, and one-line config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipx.errors import ClipxError
from clipx.losses import ClipLoss, NTXentLoss
from clipx.losses.mixed import mixed_batch_infonce, mixed_clip, mixed_ntxent, mixed_queue_infonce
from clipx.losses.moco import batch_infonce, queue_infonce
from clipx.ssl.mixing import Mixer

B, D = 6, 5


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def draws(seed: int = 0, identity: bool = False):
    g = torch.Generator().manual_seed(seed)
    lam = 0.5 + 0.5 * torch.rand(B, generator=g)
    perm = torch.arange(B) if identity else torch.randperm(B, generator=g)
    return lam, perm, perm - torch.arange(B)


def unit(*shape, seed=1):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def ce(logits: list[float], target: list[float]) -> float:
    """-sum_j t_j log softmax(logits)_j, skipping -inf logits (whose target is 0)."""
    top = max(v for v in logits if v != -math.inf)
    log_z = top + math.log(sum(math.exp(v - top) for v in logits if v != -math.inf))
    return -sum(t * (v - log_z) for v, t in zip(logits, target) if t > 0)


def reference_ntxent(z1, z2, lam, perm, t):
    """NT-Xent's 2B anchors over the other 2B - 1 views; mixed anchor i (view 1): lam_i on view 2 of
    i, 1 - lam_i on view 2 of perm[i]; clean anchor j (view 2): the share of j in each view 1, normalised."""
    views = F.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for a in range(2 * B):
        logits = [(-math.inf if c == a else float(views[a] @ views[c]) / t) for c in range(2 * B)]
        target = [0.0] * (2 * B)
        if a < B:
            target[B + a] += float(lam[a])
            target[B + int(perm[a])] += 1 - float(lam[a])
        else:
            j = a - B
            for k in range(B):
                target[k] += float(lam[k]) * (k == j) + (1 - float(lam[k])) * (int(perm[k]) == j)
            s = sum(target)
            target = [x / s for x in target]
        total += ce(logits, target)
    return total / (2 * B)


def test_mixed_ntxent_equals_its_reference():
    z1, z2 = torch.randn(B, D), torch.randn(B, D)
    lam, perm, shift = draws()
    got = mixed_ntxent(z1, z2, lam, shift, 0.3)
    assert abs(got.item() - reference_ntxent(z1, z2, lam, perm, 0.3)) < 1e-6


def test_mixed_queue_infonce_equals_mixco_reference():
    q, k, queue = torch.randn(B, D), torch.randn(B, D), unit(7, D)
    lam, perm, shift = draws()
    got = mixed_queue_infonce(q, k, queue, lam, shift, 0.2)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = 0.0
    for i in range(B):
        own, other = float(qn[i] @ kn[i]) / 0.2, float(qn[i] @ kn[perm[i]]) / 0.2
        negatives = [float(qn[i] @ n) / 0.2 for n in queue]
        if int(perm[i]) == i:
            expected += ce([own, *negatives], [1.0] + [0.0] * 7)
        else:
            expected += ce([own, other, *negatives], [float(lam[i]), 1 - float(lam[i])] + [0.0] * 7)
    assert abs(got.item() - expected / B) < 1e-6


def test_mixed_batch_infonce_equals_its_reference():
    q, k = torch.randn(B, D), torch.randn(B, D)
    lam, perm, shift = draws()
    got = mixed_batch_infonce(q, k, lam, shift, 0.2)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = 0.0
    for i in range(B):
        target = [0.0] * B
        target[i] += float(lam[i])
        target[int(perm[i])] += 1 - float(lam[i])
        expected += ce([float(qn[i] @ kn[c]) / 0.2 for c in range(B)], target)
    assert abs(got.item() - expected / B * 2 * 0.2) < 1e-6


def test_mixed_clip_equals_its_reference():
    images, texts, scale = unit(B, D, seed=2), unit(B, D, seed=3), torch.tensor(7.0)
    lam, perm, shift = draws()
    got = mixed_clip(images, texts, scale, lam, shift, gather="none")
    i2t = t2i = 0.0
    for i in range(B):
        target = [0.0] * B
        target[i] += float(lam[i])
        target[int(perm[i])] += 1 - float(lam[i])
        i2t += ce([7.0 * float(images[i] @ texts[c]) for c in range(B)], target)
    for j in range(B):
        target = [float(lam[k]) * (k == j) + (1 - float(lam[k])) * (int(perm[k]) == j) for k in range(B)]
        target = [x / sum(target) for x in target]
        t2i += ce([7.0 * float(texts[j] @ images[k]) for k in range(B)], target)
    assert abs(got.item() - (i2t + t2i) / (2 * B)) < 1e-6


def test_lam_one_is_the_unmixed_loss_whatever_the_partners():
    z1, z2 = torch.randn(B, D), torch.randn(B, D)
    ones = torch.ones(B)
    _, _, shift = draws()
    assert torch.allclose(mixed_ntxent(z1, z2, ones, shift, 0.3), NTXentLoss(0.3)(z1, z2), atol=1e-12)
    assert torch.allclose(mixed_batch_infonce(z1, z2, ones, shift, 0.2), batch_infonce(z1, z2, 0.2), atol=1e-12)
    images, texts, scale = unit(B, D, seed=2), unit(B, D, seed=3), torch.tensor(7.0)
    assert torch.allclose(mixed_clip(images, texts, scale, ones, shift, "none"), ClipLoss("none")(images, texts, scale),
                          atol=1e-12)
    # MoCo v2 (MixCo's form): unmixed rows (their own partner) have no partner-key column.
    queue = unit(7, D)
    _, _, same = draws(identity=True)
    assert torch.allclose(mixed_queue_infonce(z1, z2, queue, ones, same, 0.2), queue_infonce(z1, z2, queue, 0.2),
                          atol=1e-12)


def test_lam_receives_no_gradient_and_features_do():
    z1, z2 = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    lam, _, shift = draws()
    lam.requires_grad_(True)
    mixed_ntxent(z1, z2, lam, shift, 0.3).backward()
    assert lam.grad is None and z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_mixup_mixes_each_row_with_its_partner_by_its_own_lam():
    torch.manual_seed(0)
    images = torch.randn(B, 3, 4, 4)
    mix = Mixer("mixup", alpha=1.0)(images)
    partner = torch.arange(B) + mix.shift
    assert sorted(partner.tolist()) == list(range(B))
    assert ((mix.lam >= 0.5) & (mix.lam <= 1)).all()
    lam = mix.lam.view(-1, 1, 1, 1)
    assert torch.allclose(mix.images, lam * images + (1 - lam) * images[partner])


def test_cutmix_lam_is_the_share_of_each_image_left_its_own():
    torch.manual_seed(3)
    images = torch.zeros(B, 3, 8, 8) + torch.arange(B).view(-1, 1, 1, 1).double()
    mix = Mixer("cutmix", alpha=1.0)(images)
    partner = torch.arange(B) + mix.shift
    own = (mix.images == images).all(dim=1).double().mean(dim=(1, 2))
    moved = partner != torch.arange(B)
    assert torch.allclose(own[moved], mix.lam[moved])
    assert (mix.lam == mix.lam[0]).all()  # one box per batch, as CutMix


def test_the_mixer_is_reproducible_from_the_generator_and_mix_prob_zero_is_the_identity():
    images = torch.randn(B, 3, 4, 4)
    torch.manual_seed(5)
    first = Mixer("mixup")(images)
    torch.manual_seed(5)
    second = Mixer("mixup")(images)
    assert torch.equal(first.images, second.images) and torch.equal(first.shift, second.shift)
    none = Mixer("mixup", prob=0.0)(images)
    assert torch.equal(none.images, images) and (none.lam == 1).all() and (none.shift == 0).all()


def test_randaugment_draws_are_reproducible_per_sample_seed():
    from clipx.config import ViewsConfig
    from clipx.config_rules import parse_randaugment
    from clipx.data.crops import TrainImage
    from clipx.data.pipeline import sample_rng
    from clipx.data.transforms import rand_augment
    from clipx.ssl.views import ssl_views

    image = Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy())
    for transform in (TrainImage(32, 0.5, rand_augment(parse_randaugment("3,9"))),  # CLIP's training crop
                      ssl_views(ViewsConfig(), 32, (0.5,) * 3, (0.5,) * 3, 0.5, parse_randaugment("3,9"))):
        def at(index):
            with sample_rng(0, 0, 0, 0, index):
                out = transform(image)
            return torch.cat(out) if isinstance(out, list) else out

        assert torch.equal(at(7), at(7))
        assert not torch.equal(at(7), at(8))
    # data.randaugment reaches the image-text methods' training crop
    from clipx.config import load_config
    from clipx.methods import method_of
    from tests.conftest import DEMO

    config = load_config(DEMO, ["data.randaugment=2,9"])
    assert any(type(t).__name__ == "RandAugment" for t in method_of(config).train_transform(config).augment)


@pytest.mark.parametrize("overrides, message", [
    (["data.randaugment=2"], "data.randaugment"),
    (["data.randaugment=0,9"], "data.randaugment must be"),
    (["data.randaugment=2,31"], "data.randaugment must be"),
    (["ssl.mix=mixup", "ssl.mix_alpha=0"], "ssl.mix_alpha must be positive"),
    (["ssl.mix=mixup", "ssl.mix_prob=1.5"], "ssl.mix_prob in"),
    (["ssl.mix=blend"], "ssl.mix"),
    (["ssl.mix=mixup", "loss.name=swav"], "ssl.mix=mixup (i-Mix) has a mixed loss for"),
    (["ssl.mix=cutmix", "loss.name=siglip"], "not siglip"),
    (["ssl.mix=mixup", "loss.name=clip", "data.hard_negative_key=negative"], "does not combine"),
])
def test_config_errors_are_one_line(overrides, message):
    from clipx.config import load_config
    from clipx.methods import method_of

    with pytest.raises(ClipxError) as error:
        method_of(load_config(None, overrides))
    assert message in str(error.value) and "\n" not in str(error.value)
