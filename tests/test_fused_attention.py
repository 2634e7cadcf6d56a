"""FusedSelfAttention computes what open_clip's nn.MultiheadAttention computes, from the same state dict."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from clipx.models.attention import AttentionKernel
from clipx.models.fused_attention import FusedSelfAttention, fuse_self_attention_

ARCH = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 48, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 100, "width": 48, "heads": 3, "layers": 2}}


def open_clip_towers():
    from open_clip.model import _build_text_tower, _build_vision_tower

    torch.manual_seed(0)
    return (_build_vision_tower(ARCH["embed_dim"], ARCH["vision_cfg"]),
            _build_text_tower(ARCH["embed_dim"], ARCH["text_cfg"]))


@pytest.mark.parametrize("kernel", ["default", "explicit"])
@pytest.mark.parametrize("tower", ["vision", "text"])
def test_fused_towers_equal_open_clips_in_output_and_gradients(tower, kernel):
    reference = open_clip_towers()[0 if tower == "vision" else 1].train()
    fused = fuse_self_attention_(copy.deepcopy(reference))
    assert sum(isinstance(m, FusedSelfAttention) for m in fused.modules()) == 2  # one per block
    assert list(fused.state_dict()) == list(reference.state_dict())  # checkpoints and exports unchanged
    torch.manual_seed(1)
    inputs = torch.randn(4, 3, 32, 32) if tower == "vision" else torch.randint(0, 100, (4, 12))
    with AttentionKernel(kernel).scope():  # the text tower's causal mask reaches the explicit kernel too
        fused_output = fused(inputs)
    outputs = [reference(inputs), fused_output]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    for output in outputs:
        output.square().sum().backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), fused.named_parameters()):
        # The explicit kernel sums in another fp32 order, whose error scales with the gradient, not
        # with each element; SDPA's path keeps the flat bound it always had.
        atol = 1e-6 if kernel == "default" else 1e-6 * float(a.grad.abs().max())
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("mask", ["none", "bool", "float-per-head", "causal-flag"])
def test_masks_mean_what_they_mean_to_multihead_attention(mask):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(24, 3, batch_first=True)
    fused = fuse_self_attention_(copy.deepcopy(reference))
    x = torch.randn(2, 5, 24)
    kwargs: dict = {"need_weights": False}
    if mask == "bool":  # True: may not attend (nn.MultiheadAttention's meaning)
        kwargs["attn_mask"] = torch.rand(5, 5) < 0.3
        kwargs["attn_mask"].fill_diagonal_(False)
    elif mask == "float-per-head":  # (B * H, L, S), additive
        kwargs["attn_mask"] = torch.randn(2 * 3, 5, 5)
    elif mask == "causal-flag":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(5)
        kwargs["is_causal"] = True
    expected, _ = reference(x, x, x, **kwargs)
    actual, weights = fused(x, x, x, **kwargs)
    assert weights is None
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_calls_outside_the_fused_path_go_to_multihead_attention():
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(24, 3, batch_first=True)
    fused = fuse_self_attention_(copy.deepcopy(reference))
    x, memory = torch.randn(2, 5, 24), torch.randn(2, 7, 24)
    for args, kwargs in (((x, x, x), {"need_weights": True}),  # attention weights asked for
                         ((x, memory, memory), {}),  # cross-attention
                         ((x, x, x), {"key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2])})):
        for a, b in zip(reference(*args, **kwargs), fused(*args, **kwargs)):
            torch.testing.assert_close(b, a)


def test_only_layouts_it_reads_exactly_are_fused():
    kept = [nn.MultiheadAttention(24, 3),  # sequence first
            nn.MultiheadAttention(24, 3, batch_first=True, add_bias_kv=True),
            nn.MultiheadAttention(24, 3, batch_first=True, kdim=12, vdim=12)]
    for module in kept:
        assert type(fuse_self_attention_(module)) is nn.MultiheadAttention
