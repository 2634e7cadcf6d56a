"""Reading configs: YAML 1.2, dotted ``key=value`` overrides, dataclasses built from mappings with values
checked against their type hints, and model JSON files. Used by clipx.config; knows nothing of its sections."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from clipx.errors import ClipxError


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read `precision: no` as False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def read_yaml(text: str):
    """Parse YAML with 1.2 booleans (see _Loader)."""
    return yaml.load(text, Loader=_Loader)


def suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or "." not in key:
        raise ClipxError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
    try:
        value = read_yaml(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type hint, with the few lossless conversions YAML needs."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed or isinstance(value, bool):
            raise ClipxError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # several types (e.g. bool or a Literal): the first that takes the value
            try:
                return coerce(key, value, option)
            except ClipxError:
                pass
        try:
            return coerce(key, value, options[-1])
        except ClipxError:
            if len(options) == 1:
                raise
        choices = [", ".join(map(str, typing.get_args(o))) if typing.get_origin(o) is Literal
                   else getattr(o, "__name__", str(o)) for o in options]
        raise ClipxError(f"config key '{key}' expects {' or '.join(choices)}; got {value!r}") from None
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if (hint is tuple or origin is tuple) and isinstance(value, (list, tuple)):
        return tuple(value)  # the elements of a tuple[Literal[...], ...] are checked by config_rules
    if hint in (int, str, bool, dict) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise ClipxError(f"config key '{key}' expects {expected}; got {value!r} ({type(value).__name__})")


def resolve_path(value: str, base_dir: Path, what: str) -> Path:
    """A path relative to the YAML file's folder, else to the current directory; must exist."""
    candidates = [Path(value)] if Path(value).is_absolute() else [base_dir / value, Path.cwd() / value]
    found = next((p for p in candidates if p.exists()), None)
    if found is None:
        raise ClipxError(f"{what} {value} not found (looked in {', '.join(str(p.parent) for p in candidates)})")
    return found.resolve()


def read_model_json(path: Path) -> dict:
    """An open_clip-format model JSON: embed_dim, vision_cfg and text_cfg."""
    try:
        arch = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ClipxError(f"model config {path} is not valid JSON: {error}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(arch, dict) or k not in arch]
    if missing:
        raise ClipxError(f"model config {path} lacks {', '.join(missing)} (open_clip's model JSON format)")
    return arch


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """raw["a"]["b"]["c"] = value for key "a.b.c", creating the mappings on the way."""
    *path, name = key.split(".")
    node, where = raw, []
    for part in path:
        where.append(part)
        if node.get(part) is None:  # absent, or an empty `section:` line in the YAML
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ClipxError(f"config section '{'.'.join(where)}' must be a mapping")
    node[name] = value


def build_dataclass(cls, values: Any, prefix: str = "", root=None):
    """A (frozen) dataclass from a mapping whose keys are its fields; fields that are dataclasses
    themselves (config sections) recurse. Unknown keys and wrongly typed values are one-line errors
    that suggest the closest key of the ``root`` schema."""
    root = root or cls
    what = prefix or "config"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ClipxError(f"config section '{what}' must be a mapping, got {values!r}")
    known, hints, kwargs = _fields(cls), _hints(cls), {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in known:
            noun = "section" if not prefix else "key"
            raise ClipxError(f"unknown config {noun} '{key}'{suggest(key, _all_keys(root))}")
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_dataclass(hints[name], value, key, root)
        else:
            kwargs[name] = coerce(key, value, hints[name])
    return cls(**kwargs)


def _all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key (sections included) of a dataclass schema."""
    keys = []
    for name, hint in _hints(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, key + ".")
    return keys


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)
