"""clipx.compat: every private name of another library that clipx relies on still exists in the
installed version and still does what clipx expects; and the class swaps that used to change
modules in place (``module.__class__ = ...``) are gone for good.

The existence checks fail with the name that disappeared; the behaviour checks fail when a name
survives but its library stopped reading it (a fused AdamW that ignores ``found_inf`` would apply
a step the guard refused, silently)."""

from __future__ import annotations

import ast
import copy

import pytest
import torch
from torch import nn

from clipx.compat import accelerate as compat_accelerate
from clipx.compat import open_clip as compat_open_clip
from clipx.compat import torch as compat_torch
from tests.conftest import REPO

# ------------------------------------------------------------------------------------------ open_clip

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}


@pytest.mark.parametrize("name", ["_build_vision_tower", "_build_text_tower"])
def test_open_clip_still_has_its_private_tower_builders(name):
    import open_clip.model

    assert callable(getattr(open_clip.model, name, None)), f"open_clip.model.{name} is gone: see clipx/compat/open_clip.py"


def test_open_clips_tower_builders_take_an_architecture_dict_and_give_features():
    from open_clip.transformer import TextTransformer, VisionTransformer

    vision = compat_open_clip.build_vision_tower(TINY["embed_dim"], TINY["vision_cfg"], quick_gelu=True)
    text = compat_open_clip.build_text_tower(TINY["embed_dim"], TINY["text_cfg"])
    assert isinstance(vision, VisionTransformer) and isinstance(text, TextTransformer)
    assert vision(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    assert text(torch.randint(0, 100, (2, 8))).shape == (2, 16)


def test_open_clips_coca_decoder_still_has_what_clipx_caption_transformer_reads():
    from open_clip.coca_model import CoCa

    arch = {**TINY, "text_cfg": {**TINY["text_cfg"], "embed_cls": True, "output_tokens": True},
            "vision_cfg": {**TINY["vision_cfg"], "output_tokens": True},
            "multimodal_cfg": {"width": 32, "heads": 2, "layers": 1, "context_length": 8, "vocab_size": 100}}
    theirs = CoCa(arch["embed_dim"], arch["multimodal_cfg"], arch["text_cfg"], arch["vision_cfg"]).eval()
    torch.nn.init.normal_(theirs.text_decoder.text_projection)  # open_clip leaves it torch.empty
    ours = compat_open_clip.build_multimodal_decoder(100, arch["multimodal_cfg"]).eval()
    assert ours.load_state_dict(theirs.text_decoder.state_dict()) is not None  # the same parameters, same names
    image, text = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    positions = torch.tensor([0, 1, 2, 7, 8, 13])  # flat indices into the 2 x 7 positions
    torch.testing.assert_close(ours(image, text), theirs.text_decoder(image, text))
    torch.testing.assert_close(ours(image, text, positions), theirs.text_decoder(image, text).flatten(0, 1)[positions])


# ----------------------------------------------------------------------------------------- accelerate

@pytest.fixture
def fresh_accelerate_state():
    """Each test starts and ends with Accelerate's process-wide settings forgotten (a later test's
    Accelerator must not inherit this one's fp16)."""
    compat_accelerate.reset_accelerator_state()
    yield
    compat_accelerate.reset_accelerator_state()


def test_accelerate_still_has_the_names_clipx_writes():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    assert callable(getattr(AcceleratorState, "_reset_state", None)), "AcceleratorState._reset_state is gone"
    compat_accelerate.reset_accelerator_state()
    accelerator = Accelerator(cpu=True)
    assert hasattr(accelerator, "native_amp") and hasattr(accelerator, "scaler")
    compat_accelerate.reset_accelerator_state()


def test_resetting_accelerates_state_lets_the_next_accelerator_take_another_precision(fresh_accelerate_state):
    from accelerate import Accelerator

    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
    with pytest.raises(ValueError):  # what the reset is for: the singleton refuses another precision
        Accelerator(mixed_precision="no", cpu=True)
    compat_accelerate.reset_accelerator_state()
    assert Accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"


def test_accelerate_reads_native_amp_and_the_scaler_clipx_gives_it(fresh_accelerate_state):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    compat_accelerate.enable_native_autocast(accelerator)
    with accelerator.autocast():  # Accelerate alone leaves fp16 off on the CPU
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float16
    scaler = torch.amp.GradScaler("cpu")
    compat_accelerate.set_grad_scaler(accelerator, scaler)
    optimizer = accelerator.prepare(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    assert optimizer.scaler is scaler


# ---------------------------------------------------------------------------------------------- torch

def test_torch_still_has_the_batchnorm_base_and_every_batchnorm_derives_from_it():
    assert hasattr(nn.modules.batchnorm, "_BatchNorm"), "torch.nn.modules.batchnorm._BatchNorm is gone"
    for bn in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2), nn.SyncBatchNorm(2)):
        assert compat_torch.is_batchnorm(bn), type(bn).__name__
    for other in (nn.LayerNorm(2), nn.GroupNorm(1, 2), nn.InstanceNorm2d(2), nn.Linear(2, 2)):
        assert not compat_torch.is_batchnorm(other), type(other).__name__


def test_multihead_attention_still_says_whether_its_projection_is_packed():
    packed, separate = nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    assert hasattr(packed, "_qkv_same_embed_dim"), "nn.MultiheadAttention._qkv_same_embed_dim is gone"
    assert compat_torch.has_packed_projection(packed) and packed.in_proj_weight is not None
    assert not compat_torch.has_packed_projection(separate) and separate.in_proj_weight is None


def _fused_adamw(eps: float = 1e-8):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    layer(torch.randn(5, 4)).square().sum().backward()
    return layer, torch.optim.AdamW(layer.parameters(), lr=0.1, eps=eps, fused=True)


def test_a_fused_adamw_skips_its_whole_update_where_found_inf_is_one():
    layer, optimizer = _fused_adamw()
    before = copy.deepcopy(layer.state_dict())
    with compat_torch.fused_step_skipped_where(optimizer, torch.tensor(1.0)):
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())  # a renamed flag would be ignored
    assert all(float(s["step"]) == 0 for s in optimizer.state.values())  # nor does the step count advance
    with compat_torch.fused_step_skipped_where(optimizer, torch.tensor(0.0)):
        optimizer.step()
    assert not torch.equal(before["weight"], layer.weight)
    assert optimizer.found_inf is None  # the flag does not outlive the step


def test_a_fused_adamw_reads_grad_scale_which_clipx_clears():
    """With eps = 1 Adam's update depends on the gradients' scale, so a grad_scale the kernel divides
    by shows; clipx's flag must come with no scale (stale or GradScaler's) applied."""
    reference, plain = _fused_adamw(eps=1.0)
    plain.step()
    scaled, optimizer = _fused_adamw(eps=1.0)
    optimizer.grad_scale = torch.tensor(1e3)
    optimizer.step()
    assert not torch.equal(scaled.weight, reference.weight), "a fused AdamW no longer reads grad_scale"
    cleared, optimizer = _fused_adamw(eps=1.0)
    optimizer.grad_scale = torch.tensor(1e3)
    with compat_torch.fused_step_skipped_where(optimizer, torch.tensor(0.0)):
        optimizer.step()
    torch.testing.assert_close(cleared.weight, reference.weight)


def test_a_grad_scalers_overflow_flags_decide_whether_it_steps():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(layer(torch.randn(5, 4)).square().sum()).backward()
    scaler.unscale_(optimizer)
    assert hasattr(scaler, "_per_optimizer_states"), "GradScaler._per_optimizer_states is gone"
    flags = compat_torch.scaler_overflow_flags(scaler, optimizer)
    assert flags and all(float(f) == 0.0 for f in flags)  # finite gradients
    before = layer.weight.detach().clone()
    for flag in flags:
        flag.fill_(1.0)  # as SyncedGradScaler's maximum over ranks does when another rank overflowed
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(layer.weight, before) and scaler.get_scale() == 4.0  # skipped, and backed off


def test_lambda_lr_reads_the_multipliers_clipx_replaces():
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (1.0, 0.1)]
    optimizer = torch.optim.SGD(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert isinstance(getattr(scheduler, "lr_lambdas", None), list), "LambdaLR.lr_lambdas is gone"
    compat_torch.set_lr_lambdas(scheduler, lambda step: 0.5)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.05])  # each group's own rate


# ----------------------------------------------------------------- class swaps replaced by rebuilding

def _python_files():
    return sorted((REPO / "clipx").rglob("*.py"))


def test_no_module_of_clipx_assigns_a_class_to_an_object():
    swaps = [f"{path.relative_to(REPO)}:{node.lineno}" for path in _python_files()
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign))
             for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
             if isinstance(target, ast.Attribute) and target.attr == "__class__"]
    assert swaps == []


def test_compat_modules_import_nothing_of_clipx_but_its_errors():
    """(Every import, inside functions too: the architecture test's graph.)"""
    from tests.test_architecture import import_graph

    compat = {module: set(imports) for module, imports in import_graph().items()
              if module.startswith("clipx.compat")}
    assert compat and all(imports <= {"clipx.errors"} for imports in compat.values()), compat


def test_locking_and_lora_import_each_other_one_way_only():
    """lock.py (freezing base weights is locking) imports lora.py; lora.py imports nothing of
    locking, not even inside a function."""
    from tests.test_architecture import import_graph

    graph = import_graph()
    assert "clipx.models.lock" not in graph["clipx.models.lora"]
    assert "clipx.models.lora" in graph["clipx.models.lock"]


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64)))


def test_a_locked_batchnorm_is_rebuilt_frozen_with_the_same_tensors_and_keys():
    from clipx.models.lock import FrozenBatchNorm, freeze_locked_batchnorm_

    model = _convnet()
    model(torch.randn(8, 3, 6, 6))  # running statistics away from their initial values
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    model[1].requires_grad_(False)  # the 2d layer is locked, the 1d one trains
    reference = copy.deepcopy(model).eval()
    assert freeze_locked_batchnorm_(model) is model
    assert type(model[1]).__name__ == "FrozenBatchNorm2d" and isinstance(model[1], (FrozenBatchNorm, nn.BatchNorm2d))
    assert not isinstance(model[2][1], FrozenBatchNorm)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(tensors) and all(after[k] is tensors[k] for k in tensors)  # the same objects
    model.train()
    assert not model[1].training and model[2][1].training
    x = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(model[1](model[0](x)), reference[1](reference[0](x)))  # normalised as in eval
    assert torch.equal(model[1].running_mean, reference[1].running_mean)


def test_split_batchnorm_is_rebuilt_with_the_same_tensors_and_keys():
    from clipx.ssl.batchnorm import SplitBatchNorm1d, SplitBatchNorm2d, split_batchnorm_

    model = _convnet()
    tensors, original = model.state_dict(keep_vars=True), model[1]
    original.eps = 1e-3  # a setting the rebuilt layer must carry over, not take from its constructor
    split = split_batchnorm_(model, 2)
    assert isinstance(split[1], SplitBatchNorm2d) and isinstance(split[2][1], SplitBatchNorm1d)
    assert split[1] is not original and split[1].splits == 2 and split[1].eps == 1e-3
    after = split.state_dict(keep_vars=True)
    assert list(after) == list(tensors) and all(after[k] is tensors[k] for k in tensors)
    alone = split_batchnorm_(nn.BatchNorm1d(3), 2)  # a layer that is itself the root comes back rebuilt
    assert isinstance(alone, SplitBatchNorm1d)


def test_a_shared_module_is_rebuilt_once_and_replaced_everywhere():
    from clipx.models.fused_attention import FusedSelfAttention, fuse_self_attention_

    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    model = fuse_self_attention_(nn.ModuleDict({"a": attention, "b": nn.Sequential(attention)}))
    assert isinstance(model["a"], FusedSelfAttention) and model["b"][0] is model["a"]
    assert model["a"].in_proj_weight is attention.in_proj_weight and model["a"].out_proj is attention.out_proj


def test_adopting_refuses_a_module_that_registers_other_names():
    from clipx.models.rebuild import adopt

    with pytest.raises(TypeError, match="registers"):
        adopt(nn.Linear(2, 2, bias=False), nn.Linear(2, 2))

