"""Typed, immutable run configuration: YAML file + dotted ``key=value`` overrides.

``load_config`` validates everything before any model, data loader or process group exists, so
a typo in a key or a value of the wrong type costs a one-line error, not a crashed job. The
sections themselves live in clipx/config_schema.py (importable from here too); this module reads,
upgrades (the keys and values of older configs), validates, resolves and writes them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from clipx.config_io import (
    build_dataclass,
    parse_override,
    read_model_json,
    read_yaml,
    resolve_path,
    set_dotted,
    suggest,
)
from clipx.config_rules import validate
from clipx.config_schema import (
    ATTENTION_SETTINGS,
    BATCHNORM_MODES,
    GATHER_MODES,
    LORA_TARGETS,
    Config,
    DataConfig,
    DistillConfig,
    EvalConfig,
    GatherMode,
    LossConfig,
    MixMode,
    MoCoConfig,
    ModelConfig,
    SigLip2Config,
    SSLConfig,
    SwAVConfig,
    TrainConfig,
    ViewsConfig,
)
from clipx.errors import ClipxError

__all__ = ["ATTENTION_SETTINGS", "BATCHNORM_MODES", "GATHER_MODES", "LORA_TARGETS", "Config", "DataConfig",
           "DistillConfig", "EvalConfig", "GatherMode", "LossConfig", "MixMode", "ModelConfig", "MoCoConfig", "SigLip2Config",
           "SSLConfig", "SwAVConfig", "TrainConfig", "ViewsConfig", "FLAT_SSL_KEYS", "LEGACY_VALUES", "load_config",
           "config_from_dict", "config_to_dict", "dump_config"]

# The flat ssl keys of earlier versions (still in older checkpoints' config.yaml), and where each lives now.
# ssl.queue_size served MoCo and SwAV alike, so it sets both.
FLAT_SSL_KEYS = {
    "recipe": ("views.recipe",), "views": ("views.count",), "flip_prob": ("views.flip_prob",),
    "jitter_strength": ("views.jitter_strength",), "jitter_prob": ("views.jitter_prob",),
    "grayscale_prob": ("views.grayscale_prob",), "blur_prob": ("views.blur_prob",),
    "small_crops": ("views.small_crops",), "small_crop_size": ("views.small_crop_size",),
    "small_crop_scale": ("views.small_crop_scale",),
    "moco_version": ("moco.version",), "momentum": ("moco.momentum",), "momentum_cosine": ("moco.momentum_cosine",),
    "predictor_hidden": ("moco.predictor_hidden",), "queue_size": ("moco.queue_size", "swav.queue_size"),
    "prototypes": ("swav.prototypes",), "sinkhorn_epsilon": ("swav.sinkhorn_epsilon",),
    "sinkhorn_iters": ("swav.sinkhorn_iters",), "freeze_prototypes_steps": ("swav.freeze_prototypes_steps",),
    "queue_start_step": ("swav.queue_start_step",),
}

# Values of earlier versions that mean another value now: {key: {old value: value read}}.
# train.compile: auto was a constant that meant eager (compiling was measured not to pay).
LEGACY_VALUES: dict[str, dict[str, Any]] = {"train.compile": {"auto": False}}


def _current_keys(key: str, value: Any) -> tuple[str, ...]:
    """The dotted keys a (possibly flat, older) key sets: ``ssl.moco_version`` -> ``ssl.moco.version``.
    ``ssl.views`` is both the old count and the new section; a mapping means the section."""
    section, _, name = key.partition(".")
    if section != "ssl" or name not in FLAT_SSL_KEYS or (name == "views" and isinstance(value, dict)):
        return (key,)
    return tuple(f"ssl.{new}" for new in FLAT_SSL_KEYS[name])


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``section.key=value`` overrides, validate, resolve the model arch."""
    raw: dict = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        raw = _read_config_file(path)
        base_dir = path.resolve().parent
    raw = _nest_flat_ssl_keys(raw)
    for item in overrides:
        key, value = parse_override(item)
        for current in _current_keys(key, value):
            set_dotted(raw, current, value)
        if key == "model.name" and isinstance(raw["model"], dict):
            raw["model"].pop("arch", None)  # a new architecture replaces one inlined in a saved config
    config = config_from_dict(_read_legacy_values(raw))
    config = _resolve_model_arch(config, base_dir)
    validate(config)
    return config


def _read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise ClipxError(f"config file {path} does not exist")
    try:
        raw = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ClipxError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ClipxError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def _nest_flat_ssl_keys(raw: dict) -> dict:
    """A YAML ``ssl:`` section written with the flat keys of clipx 0.1, moved to their sections."""
    ssl = raw.get("ssl")
    if not isinstance(ssl, dict) or not any(_current_keys(f"ssl.{k}", v) != (f"ssl.{k}",) for k, v in ssl.items()):
        return raw
    nested: dict = {}
    for name, value in sorted(ssl.items(), key=lambda item: not isinstance(item[1], dict)):  # sections first
        for current in _current_keys(f"ssl.{name}", value):
            set_dotted(nested, current, value)
    return {**raw, "ssl": nested["ssl"]}


def _read_legacy_values(raw: dict) -> dict:
    """``raw`` with the LEGACY_VALUES of older configs replaced by what they mean now."""
    for key, table in LEGACY_VALUES.items():
        section, _, name = key.partition(".")
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(name), str) and node[name] in table:
            raw = {**raw, section: {**node, name: table[node[name]]}}
    return raw


def config_from_dict(raw: dict) -> Config:
    """Build a Config from nested dicts, rejecting unknown keys and values of the wrong type."""
    return build_dataclass(Config, raw)


def config_to_dict(config: Config) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML or JSON."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def dump_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML; ``load_config`` of that file gives back an equal Config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _resolve_model_arch(config: Config, base_dir: Path) -> Config:
    """Fill ``model.arch`` from a JSON file or open_clip's built-in configs, unless already set.

    Local paths (model JSON, Hugging Face text model) become absolute, so a checkpoint's config
    works from any directory.
    """
    model = config.model
    if model.hf_text_path:
        hf_path = str(resolve_path(model.hf_text_path, base_dir, "model.hf_text_path"))
        model = dataclasses.replace(model, hf_text_path=hf_path)
    if model.pretrained and not Path(model.pretrained).is_absolute() and (base_dir / model.pretrained).exists():
        # Only made absolute here: a checkpoint's config must load after its initial weights are gone.
        model = dataclasses.replace(model, pretrained=str((base_dir / model.pretrained).resolve()))
    if model.arch is not None:
        return dataclasses.replace(config, model=model)
    name = model.name
    if name.endswith(".json"):
        arch = read_model_json(resolve_path(name, base_dir, "model config"))
    else:
        import open_clip

        arch = open_clip.get_model_config(name)
        if arch is None:
            raise ClipxError(
                f"unknown open_clip architecture '{name}'{suggest(name, open_clip.list_models())}; "
                "give an open_clip model name or a path to a model JSON"
            )
    return dataclasses.replace(config, model=dataclasses.replace(model, arch=arch))
