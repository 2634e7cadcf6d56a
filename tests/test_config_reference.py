"""docs/CONFIG.md: generated from clipx/config_schema.py by `clipx config --reference`, current, complete;
and every list of allowed values defined once."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from clipx.apps.config_reference import COMMAND, Key, all_keys, field_comments, reference
from clipx.cli import main
from clipx.config import Config
from tests.conftest import REPO

CONFIG_MD = REPO / "docs" / "CONFIG.md"


def schema_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, nested sections walked, found independently of the generator."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        keys += schema_keys(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else [prefix + f.name]
    return keys


def test_the_reference_file_is_what_its_command_writes():
    assert CONFIG_MD.read_bytes() == reference().encode(), f"docs/CONFIG.md is stale: run `{COMMAND}`"


def test_the_command_writes_the_file_and_prints_it(tmp_path, capsys):
    assert main(["config", "--reference", "--out", str(tmp_path / "CONFIG.md")]) == 0
    assert (tmp_path / "CONFIG.md").read_bytes() == CONFIG_MD.read_bytes()
    capsys.readouterr()
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == reference()


def test_every_key_has_a_one_line_explanation_and_a_row_in_the_file():
    keys = {key.name: key for key in all_keys()}
    assert sorted(keys) == sorted(schema_keys()) and len(keys) >= 126
    text = CONFIG_MD.read_text()
    for name, key in keys.items():
        assert key.explanation and "\n" not in key.explanation, f"{name} has no explanation in clipx/config_schema.py"
        assert f"| `{name}` |" in text, name


def test_explanations_are_the_comments_above_and_after_each_field():
    source = '''
class Section:
    """Intro."""

    # Above, first line;
    # above, second line.
    a: int = 1  # after
    b: str = "x"

    # Not attached: a blank line follows.

    c: bool = False  # only after
'''
    assert field_comments(source) == {("Section", "a"): "Above, first line; above, second line. after",
                                      ("Section", "b"): "", ("Section", "c"): "only after"}


def test_run_time_defaults_are_marked():
    keys = {key.name: key for key in all_keys()}
    assert {"model.arch", "data.train_num_samples", "train.attention", "ssl.views.crop_scale_min"} <= {
        name for name, key in keys.items() if key.run_time}
    assert not keys["train.lr"].run_time and "[run time]" not in CONFIG_MD.read_text()
    assert isinstance(keys["train.lr"], Key) and keys["train.compile"].default == "`false`"


def test_older_keys_and_values_are_in_the_reference():
    text = CONFIG_MD.read_text()
    assert "| `ssl.queue_size` | `ssl.moco.queue_size` and `ssl.swav.queue_size` |" in text
    assert "| `train.compile: auto` | `train.compile: false` |" in text


@pytest.mark.parametrize("key, values", [
    ("loss.gather", "one of `none`, `global`, `local`"),
    ("train.attention", "one of `auto`, `default`, `math`, `flash`, `efficient`, `cudnn`, `explicit`"),
    ("model.lora_targets", "list, each one of `attn`, `mlp`"),
    ("loss.name", "`clip`"),  # the registry's names
])
def test_allowed_values_come_from_the_types_and_the_registry(key, values):
    assert values in {k.name: k for k in all_keys()}[key].type


def test_lists_of_allowed_values_are_defined_once():
    """The modules that check a choice use the schema's Literal (or the loss's own subset)."""
    from clipx import config
    from clipx.losses.siglip import SIGLIP_GATHER_MODES
    from clipx.methods import METHODS
    from clipx.models import lora
    from clipx.models.attention import EXPLICIT, KERNELS, SETTINGS

    assert SETTINGS is config.ATTENTION_SETTINGS and set(SETTINGS) == {"auto", "default", *KERNELS, EXPLICIT}
    assert lora.TARGETS is config.LORA_TARGETS == Config().model.lora_targets
    assert METHODS.get("siglip").gather_modes is SIGLIP_GATHER_MODES
    assert set(SIGLIP_GATHER_MODES) < set(config.GATHER_MODES)
    for name in ("clip", "ntxent", "slip", "supcon", "simcse"):
        assert METHODS.get(name).gather_modes is config.GATHER_MODES, name
    assert METHODS.get("moco").batchnorm_modes is config.BATCHNORM_MODES
