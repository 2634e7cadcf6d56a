"""Class names and prompt templates from YAML files (shipped ones by name, or any path)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from clipx.errors import ClipxError


def shipped_template_names() -> list[str]:
    folder = resources.files("eval") / "templates"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_templates(name_or_path: str) -> tuple[list[str], list[str]]:
    """(classnames, templates) from a shipped name ("digits", "imagenet") or a YAML path.

    The YAML holds ``classnames: [...]`` and ``templates: [...]``, each template with one ``{}``.
    """
    path = Path(name_or_path)
    if not path.is_file():
        shipped = resources.files("eval") / "templates" / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise ClipxError(
                f"templates {name_or_path!r} is neither a file nor a shipped set ({', '.join(shipped_template_names())})"
            )
        text = shipped.read_text()
    else:
        text = path.read_text()
    doc = yaml.safe_load(text) or {}
    classnames, templates = doc.get("classnames"), doc.get("templates")
    if not classnames or not templates:
        raise ClipxError(f"templates file {name_or_path} needs non-empty 'classnames' and 'templates' lists")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ClipxError(f"template {bad[0]!r} in {name_or_path} has no '{{}}' for the class name")
    return [str(c) for c in classnames], [str(t) for t in templates]
