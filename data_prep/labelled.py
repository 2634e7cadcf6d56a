"""A labelled image folder (one subfolder per class, as torchvision's ImageFolder reads it) as
captioned, labelled shards, plus the class names and prompt templates of the task.

    root/cat/0001.jpg, root/cat/0002.png, root/dog/0003.jpg, ...

Classes are the subfolder names in sorted order; a sample's label is its class's index. Each sample
gets the JSON fields ``label`` and ``classname`` (what ``eval.label_key`` and the classification
methods read) and a caption made from the first prompt template, so the same shards serve CLIP
training, zero-shot evaluation and fine-tuning. ``classes.yaml`` (class names and templates) goes
beside the shards: give it as ``eval.templates`` (edit the names into words and add templates first;
the zero-shot head is only as good as its prompts).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from clipx.errors import ClipxError
from data_prep.pipeline import Sample, write_samples
from data_prep.writer import PrepSummary

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CLASSES_FILE = "classes.yaml"
DEFAULT_TEMPLATES = ["a photo of a {}."]


def prep_labelled_folder(root, out_dir, templates: list[str] | None = None, image_size: int = 224,
                         shard_size: int = 10_000, workers: int = 2) -> PrepSummary:
    """Write shards of every image under ``root``'s class subfolders to ``out_dir``, and
    ``out_dir/classes.yaml``; return the summary (undecodable images are skipped and counted)."""
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise ClipxError(f"labelled folder {root} not found; pass a folder with one subfolder of images per class")
    classnames = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classnames:
        raise ClipxError(f"labelled folder {root} has no class subfolders (root/<class>/<image>)")
    templates = templates or DEFAULT_TEMPLATES
    if any(template.count("{}") != 1 for template in templates):
        raise ClipxError(f"prompt templates need exactly one {{}} for the class name; got {templates!r}")
    files = [(label, path) for label, name in enumerate(classnames) for path in sorted((root / name).rglob("*"))
             if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ClipxError(f"labelled folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    samples = (Sample(source=str(path), caption=templates[0].format(classnames[label]),
                      meta={"label": label, "classname": classnames[label], "path": str(path.relative_to(root))})
               for label, path in files)
    summary = write_samples(samples, out_dir, image_size=image_size, shard_size=shard_size, workers=workers,
                            total=len(files), desc="labelled folder")
    (out_dir / CLASSES_FILE).write_text(yaml.safe_dump({"classnames": classnames, "templates": list(templates)},
                                                        sort_keys=False))
    return summary
