"""Class names and prompt templates from YAML files (shipped ones by name, or any path).

A leaf of the library: data_prep writes captions from them and the evaluators build zero-shot
classifiers from them, so both read this one place without importing each other. Also here: the
lists of class indices that pick a task's classes out of a set of class names (eval.classes).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import yaml

from clipx.config_rules import check_classes
from clipx.errors import ClipxError


def shipped_template_names() -> list[str]:
    folder = resources.files("clipx.templates")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_templates(name_or_path: str | Path) -> tuple[list[str], list[str]]:
    """(classnames, templates) from a shipped name ("digits", "imagenet"), a YAML path, or a folder in
    CLIP_benchmark's layout (classnames.txt and zeroshot_classification_templates.txt).

    The YAML holds ``classnames: [...]`` and ``templates: [...]``, each template with one ``{}``.
    Every problem with the file is a one-line ClipxError.
    """
    path = Path(name_or_path)
    shipped_name = (resources.files("clipx.templates") / f"{name_or_path}.yaml").is_file()
    # A folder that merely shares a shipped set's name (a user's photos/ beside `clipx prep photos`)
    # is taken for templates only when it holds CLIP_benchmark's files.
    if path.is_dir() and not (shipped_name and not (path / CLIP_BENCHMARK_FILES[0]).is_file()):
        return load_clip_benchmark_templates(path)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        shipped = resources.files("clipx.templates") / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise ClipxError(f"templates {str(name_or_path)!r} is neither a file nor a shipped set "
                             f"({', '.join(shipped_template_names())})")
        text = shipped.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ClipxError(f"templates file {name_or_path} is not valid YAML: {str(error).splitlines()[0]}") from None
    classnames = doc.get("classnames") if isinstance(doc, dict) else None
    templates = doc.get("templates") if isinstance(doc, dict) else None
    if not isinstance(classnames, list) or not isinstance(templates, list) or not classnames or not templates:
        raise ClipxError(f"templates file {name_or_path} needs non-empty lists 'classnames' and 'templates'")
    for template in templates:
        if not _is_template(template):
            raise ClipxError(f"templates file {name_or_path}: template {template!r} must be text with exactly one "
                             "'{}' for the class name")
    return [str(c) for c in classnames], list(templates)


def _is_template(template) -> bool:
    if not isinstance(template, str) or template.count("{}") != 1:
        return False
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return False
    return True


CLIP_BENCHMARK_FILES = ("classnames.txt", "zeroshot_classification_templates.txt")


def load_clip_benchmark_templates(folder: Path) -> tuple[list[str], list[str]]:
    """CLIP_benchmark's class-name and template files (one per line, templates with ``{c}``)."""
    lines = []
    for name in CLIP_BENCHMARK_FILES:
        file = folder / name
        if not file.is_file():
            raise ClipxError(f"{folder} has no {name}: a CLIP_benchmark dataset folder holds "
                             f"{' and '.join(CLIP_BENCHMARK_FILES)}")
        lines.append([line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()])
    classnames, templates = lines[0], [t.replace("{c}", "{}") for t in lines[1]]
    for template in templates:
        if not _is_template(template):
            raise ClipxError(f"{folder / CLIP_BENCHMARK_FILES[1]}: template {template!r} must hold exactly one '{{c}}'")
    if not classnames or not templates:
        raise ClipxError(f"{folder}: {' and '.join(CLIP_BENCHMARK_FILES)} must not be empty")
    return classnames, templates


def parse_classes(text: str) -> tuple[int, ...]:
    """``"5-9"`` or ``"0,2,4"`` or ``"0-2,7"`` -> the class indices, in the order given (a CLI helper)."""
    out: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            first, _, last = part.partition("-")
            out.extend(range(int(first), int(last) + 1) if last else [int(first)])
    except ValueError:
        raise ClipxError(f"classes {text!r}: give class indices as 5-9, 0,2,4 or 0-2,7") from None
    return check_classes(out, "classes")


def chosen_classes(classes: Optional[Sequence[int]], count: int, what: str = "eval.classes") -> tuple[int, ...]:
    """The class indices a task uses: ``classes`` (checked against the ``count`` class names), or all."""
    if classes is None:
        return tuple(range(count))
    bad = [c for c in classes if c >= count]
    if bad:
        raise ClipxError(f"{what} names class {bad[0]} but the templates list only {count} class names")
    return tuple(classes)
