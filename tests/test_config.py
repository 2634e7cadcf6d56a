"""Config loading: overrides, types, unknown keys, round trip, and every shipped recipe builds."""


import pytest
import torch

from clipx.config import Config, config_to_dict, dump_config, load_config
from clipx.errors import ClipxError
from tests.conftest import REPO, tiny_overrides

DEMO = REPO / "configs" / "demo-digits.yaml"


def test_demo_config_loads_and_resolves_the_model_json():
    config = load_config(DEMO)
    assert isinstance(config, Config)
    assert config.model.arch["vision_cfg"]["image_size"] == 32
    assert config.loss.name == "clip" and config.loss.gather == "local"


def test_overrides_are_typed():
    config = load_config(DEMO, ["train.lr=1e-3", "train.steps=7", "data.resampled=true", "train.grad_clip_norm=1"])
    assert config.train.lr == 1e-3 and isinstance(config.train.lr, float)
    assert config.train.steps == 7 and config.data.resampled is True
    assert config.train.grad_clip_norm == 1.0


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ClipxError, match=r"unknown config key 'train\.lrr' \(did you mean 'train\.lr'\?\)"):
        load_config(DEMO, ["train.lrr=0.1"])


def test_unknown_section_is_rejected():
    with pytest.raises(ClipxError, match="did you mean 'train'"):
        load_config(DEMO, ["trian.lr=0.1"])


@pytest.mark.parametrize("override, message", [
    ("train.steps=ten", "expects int"),
    ("train.batch_size=1.5", "expects int"),
    ("data.resampled=maybe", "expects bool"),
    ("train.lr=-1", "positive"),
    ("train.lr=.nan", "positive"),
    ("loss.gather=both", "one of none, global, local"),
    ("train.precision=fp8", "one of no, bf16, fp16"),
    ("model.name=ViT-Q-99", "unknown open_clip architecture"),
    ("train.compile=sometimes", "expects bool"),
])
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(ClipxError, match=message) as info:
        load_config(DEMO, [override])
    assert "\n" not in str(info.value)


# No key of the schema has two types since train.compile became a plain bool, but the coercion of
# one (bool or a Literal, say) stays for the next: it is checked on the mechanism itself.
@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("auto", "auto")])
def test_a_key_of_two_types_takes_either(value, expected):
    from typing import Literal, Union

    from clipx.config_io import coerce

    assert coerce("train.x", value, Union[bool, Literal["auto"]]) == expected
    with pytest.raises(ClipxError, match="expects bool or auto"):
        coerce("train.x", "sometimes", Union[bool, Literal["auto"]])


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("auto", False)])
def test_train_compile_is_a_bool_and_older_configs_auto_means_false(value, expected, tmp_path):
    """train.compile: auto was a constant that meant eager; older configs that say so still load, as false."""
    assert load_config(DEMO, [f"train.compile={value}"]).train.compile is expected
    (tmp_path / "old.yaml").write_text(f"train: {{compile: {value}}}\n")
    assert load_config(tmp_path / "old.yaml").train.compile is expected
    assert load_config(DEMO).train.compile is False  # the default: eager


FLAT_SSL_YAML = """\
loss: {name: moco}
ssl:
  head_out: 32
  views: 4
  recipe: mocov2
  small_crop_scale: [0.1, 0.2]
  moco_version: 3
  momentum: 0.9
  queue_size: 256
  prototypes: 50
  sinkhorn_iters: 5
"""


def test_flat_ssl_keys_of_older_configs_land_in_their_subsections(tmp_path):
    """An older checkpoint's config.yaml (flat ssl keys) loads as the same settings in the grouped
    schema, and a flat override means what it meant; ssl.queue_size was one setting for MoCo and SwAV."""
    (tmp_path / "old.yaml").write_text(FLAT_SSL_YAML)
    old = load_config(tmp_path / "old.yaml")
    s = old.ssl
    assert (s.head_out, s.views.count, s.views.recipe, s.views.small_crop_scale) == (32, 4, "mocov2", (0.1, 0.2))
    assert (s.moco.version, s.moco.momentum, s.moco.queue_size) == (3, 0.9, 256)
    assert (s.swav.prototypes, s.swav.sinkhorn_iters, s.swav.queue_size) == (50, 5, 256)
    grouped = load_config(None, ["loss.name=moco", "ssl.head_out=32", "ssl.views.count=4", "ssl.views.recipe=mocov2",
                                 "ssl.views.small_crop_scale=[0.1, 0.2]", "ssl.moco.version=3", "ssl.moco.momentum=0.9",
                                 "ssl.moco.queue_size=256", "ssl.swav.queue_size=256", "ssl.swav.prototypes=50",
                                 "ssl.swav.sinkhorn_iters=5"])
    assert grouped == old
    overridden = load_config(tmp_path / "old.yaml", ["ssl.views=2", "ssl.moco_version=2", "ssl.queue_size=512"])
    assert (overridden.ssl.views.count, overridden.ssl.moco.version) == (2, 2)
    assert overridden.ssl.moco.queue_size == overridden.ssl.swav.queue_size == 512
    assert overridden.ssl.views.recipe == "mocov2"  # a flat override does not reset its new section
    dump_config(old, tmp_path / "dumped.yaml")  # written grouped, read back equal
    assert "moco_version" not in (tmp_path / "dumped.yaml").read_text()
    assert load_config(tmp_path / "dumped.yaml") == old


@pytest.mark.parametrize("override, message", [
    ("ssl.moco.queue=3", r"unknown config key 'ssl\.moco\.queue' \(did you mean 'ssl\.moco\.queue_size'\?\)"),
    ("ssl.views.count=two", "ssl.views.count' expects int"),
    ("ssl.moco=3", "config section 'ssl.moco' must be a mapping"),
])
def test_grouped_ssl_keys_are_checked_like_any_other(override, message):
    with pytest.raises(ClipxError, match=message):
        load_config(DEMO, [override])


def test_dump_and_reload_is_identity(tmp_path):
    config = load_config(DEMO, ["train.lr=2e-4"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert config_to_dict(load_config(tmp_path / "config.yaml")) == config_to_dict(config)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ClipxError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_builds_its_model(recipe):
    """Real-scale recipes load as written; their model builds (a forward pass on 2 samples)."""
    from clipx.data.tokenizer import Tokenizer
    from clipx.methods import build_model, method_of
    from clipx.models import image_size

    config = load_config(recipe)
    model = build_model(config).eval()
    size = image_size(config.model)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        if method_of(config).text_only:  # a text tower alone: sentence embeddings
            tokens = Tokenizer(config.model)(["a photo of a cat", "a dog"])
            assert model.encode_text(tokens).shape == (2, config.model.arch["embed_dim"])
            return
        if "zero_shot" not in method_of(config).evaluators:  # image-only: the features probes use
            assert model.encode_image(images).shape == (2, model.feature_dim)
            return
        tokens = Tokenizer(config.model)(["a photo of a cat", "a dog"])
        image_features, text_features, scale, _ = model(images, tokens)
    assert image_features.shape == text_features.shape == (2, config.model.arch["embed_dim"])
    assert scale.item() == pytest.approx(1 / config.model.init_temperature, rel=1e-4)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_trains_with_tiny_overrides(recipe, digits_dir, tiny_model_json, tmp_path):
    """Two steps of each recipe on the tiny model and digits, that run as the recipe says."""
    import math
    from pathlib import Path

    import yaml
    from safetensors import safe_open

    from clipx.train.loop import train
    from clipx.train.metrics_log import read_metrics

    overrides = {"train.steps": 2}
    if load_config(recipe).distill.embedded:  # its shards carry the teacher's embeddings
        overrides["data.train"] = str(digits_dir / "train-teacher")
    if load_config(recipe).model.pretrained:  # another run's weights (LoRA's): the tiny model starts random here
        overrides["model.pretrained"] = "null"
    if load_config(recipe).eval.classes is not None:  # a task of some digits: the others are skipped, by design
        overrides["data.max_skip_fraction"] = "null"
    asked = load_config(recipe)
    # The recipe's own precision (bf16 for the real-scale ones), not the tiny runs' fp32.
    tiny = [o for o in tiny_overrides(digits_dir, tiny_model_json, tmp_path, **overrides)
            if not o.startswith("train.precision=")]
    summary = train(load_config(recipe, tiny))
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    # What the recipe asks for is what ran and what its checkpoint says (evaluators rebuild from it):
    # every key its YAML sets and the tiny overrides leave alone (method, precision, LoRA, EMA...).
    checkpoint = Path(summary["checkpoint"])
    written = load_config(checkpoint / "config.yaml")
    overridden = {o.split("=", 1)[0] for o in tiny}
    keys = [k for k in _recipe_keys(yaml.safe_load(recipe.read_text()), asked) if k not in overridden]
    assert "loss.name" in keys, keys  # the method, at least: a walk of the YAML that found nothing checks nothing
    assert {k: _at(written, k) for k in keys} == {k: _at(asked, k) for k in keys}
    assert summary["compiled"] is (asked.train.compile is True)  # never compiled unless asked
    trained = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in trained] == [1, 2] and all(math.isfinite(r["loss"]) for r in trained)
    assert (checkpoint / "model_ema.safetensors").is_file() is (asked.train.ema_decay is not None)
    adapters = [k for k in safe_open(str(checkpoint / "model.safetensors"), "pt").keys() if "lora_" in k]
    assert bool(adapters) is bool(asked.model.lora_rank)


def _recipe_keys(tree: dict, section, prefix: str = ""):
    """The dotted config keys a recipe's YAML sets; a mapping that is one key's value (such as
    data.caption_keys) is one key."""
    import dataclasses

    for name, value in tree.items():
        child = getattr(section, name)
        if isinstance(value, dict) and dataclasses.is_dataclass(child):
            yield from _recipe_keys(value, child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _at(config, key: str):
    import functools

    return functools.reduce(getattr, key.split("."), config)
