"""Hard negatives (NegCLIP): each sample's negative caption joins the image-to-text columns of the CLIP loss."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
import torch.nn.functional as F

from clipx.config import load_config
from clipx.data.captions import CaptionChooser
from clipx.errors import ClipxError
from clipx.losses import ClipLoss
from clipx.methods import method_of
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo-digits.yaml"


def reference(images, texts, scale, negatives, mask) -> torch.Tensor:
    """Written out per row: image i's softmax runs over every caption and every present negative;
    caption i's over every image."""
    terms_i2t, terms_t2i = [], []
    present = [h for h in range(len(negatives)) if mask[h]]
    for i in range(len(images)):
        columns = [scale * images[i] @ texts[j] for j in range(len(texts))]
        columns += [scale * images[i] @ negatives[h] for h in present]
        terms_i2t.append(-torch.log_softmax(torch.stack(columns), 0)[i])
        rows = torch.stack([scale * texts[i] @ images[j] for j in range(len(images))])
        terms_t2i.append(-torch.log_softmax(rows, 0)[i])
    return (torch.stack(terms_i2t).mean() + torch.stack(terms_t2i).mean()) / 2


def unit(*shape) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("gather", ["none", "global", "local"])
def test_the_loss_equals_the_reference_and_masked_negatives_get_no_gradient(gather):
    torch.manual_seed(0)
    images, texts, negatives = unit(6, 8), unit(6, 8), unit(6, 8).requires_grad_()
    mask = torch.tensor([True, False, True, True, False, True])
    scale = torch.tensor(5.0, dtype=torch.float64)
    loss = ClipLoss(gather)(images, texts, scale, negatives=negatives, negative_mask=mask)
    torch.testing.assert_close(loss, reference(images, texts, scale, negatives, mask), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert torch.all(negatives.grad[~mask] == 0) and torch.all(negatives.grad[mask].abs().sum(1) > 0)
    assert loss > ClipLoss(gather)(images, texts, scale)  # more columns to beat


def test_no_present_negative_is_the_plain_loss():
    torch.manual_seed(1)
    images, texts, negatives = unit(4, 8), unit(4, 8), unit(4, 8)
    scale = torch.tensor(3.0, dtype=torch.float64)
    plain = ClipLoss()(images, texts, scale)
    none = ClipLoss()(images, texts, scale, negatives=negatives, negative_mask=torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(none, plain, rtol=0, atol=0)


SAMPLE = {"__key__": "k", "txt": b"a red cube", "neg.txt": b"a blue cube\na red sphere\n",
          "json": json.dumps({"negative": "a green cube", "negatives": ["x", "y"]}).encode()}


def test_the_negative_comes_from_the_member_or_a_json_field_and_several_are_drawn_reproducibly():
    assert CaptionChooser().negative(SAMPLE, 0) is None  # off unless data.hard_negative_key is set
    assert CaptionChooser(negative_key="negative").negative(SAMPLE, 0) == "a green cube"
    member = CaptionChooser(negative_key="neg.txt")
    drawn = [member.negative(SAMPLE, seed) for seed in range(100)]
    assert set(drawn) == {"a blue cube", "a red sphere"} and drawn == [member.negative(SAMPLE, s) for s in range(100)]
    assert {CaptionChooser(negative_key="negatives").negative(SAMPLE, s) for s in range(100)} == {"x", "y"}
    assert CaptionChooser(negative_key="neg.txt").negative({"__key__": "k", "txt": b"c"}, 0) is None
    assert CaptionChooser(negative_key="missing").negative(SAMPLE, 0) is None
    # The caption's own draw does not move when negatives are drawn.
    assert CaptionChooser(negative_key="neg.txt")(SAMPLE, 5) == CaptionChooser()(SAMPLE, 5) == "a red cube"


def _shard(path, with_negative) -> None:
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for index, has in enumerate(with_negative):
            image = io.BytesIO()
            Image.new("RGB", (32, 32), (index * 20, 0, 0)).save(image, format="PNG")
            members = {"png": image.getvalue(), "txt": f"caption {index}".encode()}
            if has:
                members["neg.txt"] = f"not caption {index}".encode()
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{index:04d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_batches_carry_tokenized_negatives_and_which_samples_have_one(tmp_path):
    from clipx.data.pipeline import SharedEpoch, build_train_loader
    from clipx.data.skips import SkipCounter

    with_negative = [i % 3 != 0 for i in range(12)]
    _shard(tmp_path / "shard-0.tar", with_negative)
    config = load_config(DEMO, [f"data.train={tmp_path}/shard-0.tar", "data.workers=0", "data.shuffle_buffer=1",
                                "data.hard_negative_key=neg.txt"])
    method = method_of(config)
    collate = method.collate(config)
    loader, _ = build_train_loader(config.data, 12, method.train_transform(config), collate, 0, 0, 1, SharedEpoch(),
                                   SkipCounter(), num_samples=12)
    batch = next(iter(loader))
    order = [int(key) for key in batch["key"]]
    assert batch["negative_mask"].tolist() == [with_negative[i] for i in order]
    expected = collate.tokenizer([f"not caption {i}" if with_negative[i] else "" for i in order])
    assert torch.equal(batch["negative_text"], expected)


@pytest.mark.parametrize("loss", ["siglip", "ntxent", "moco"])
def test_methods_whose_loss_takes_no_negatives_refuse_them(loss):
    with pytest.raises(ClipxError, match="data.hard_negative_key .* is used by loss.name=clip, simcse, slip, not"):
        method_of(load_config(DEMO, [f"loss.name={loss}", "data.hard_negative_key=negative"]))
