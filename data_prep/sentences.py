"""`clipx prep sentences`: a text-only training set and its evaluation files, built offline from the
class names and prompt templates clipx ships (or any templates YAML), for SimCSE-style training of a
text tower.

A sentence is ``template.format(classname)``. The templates and the class names are each split in
two, fixed by the seed: training uses train templates x train classes only, and the evaluation files
use held-out templates x held-out classes only, so the evaluation measures generalisation to unseen
wording *and* unseen nouns. Class names listed twice (ImageNet's "missile" and "sunglasses") are
one class here, labelled by their first index, so a held-out noun can never reach training text.

Written under ``out_dir``:

- ``train/``: shards (``ShardWriter``) and ``sizes.json``; one sample per (train class, train
  template), or ``samples`` of them drawn with the seed (in whole shuffled passes when more than
  there are), in seeded order. Members: ``.txt`` the sentence; ``.pos.txt`` with ``pairs`` (a
  paraphrase for supervised SimCSE: the same class under another train template); ``.json``
  {"label": class index, "classname", "template": template index}.
- ``sts.tsv``: header ``sentence1<TAB>sentence2<TAB>score``, then ``sts_pairs`` pairs of held-out
  sentences, half of each kind. Gold score 1.0: the same class in two different held-out templates
  (the same meaning, reworded). 0.0: two different held-out classes, each in a held-out template
  drawn independently (sometimes the same one: then only the noun differs). With two gold levels the
  Spearman correlation of cosine similarity with the score is a linear function of the AUC of
  ranking same-class pairs above different-class pairs. Read it with ``eval.text_similarity.read_sts_tsv``.
- ``retrieval.tsv``: header ``query<TAB>positive``; one row per held-out class, the query in one
  held-out template and the positive in another (``eval.text_similarity.read_pairs_tsv``).
- ``manifest.json``: the seed, which templates and classes went where, and the counts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipx.errors import ClipxError
from clipx.fileio import write_json_atomic
from clipx.templates import load_templates
from data_prep.writer import PrepSummary, ShardWriter

TRAIN_DIR = "train"
STS_FILE = "sts.tsv"
RETRIEVAL_FILE = "retrieval.tsv"
MANIFEST_FILE = "manifest.json"
GOLD_SCORE = "1.0: same class, two different held-out templates; 0.0: two different held-out classes"


@dataclass(frozen=True)
class SentenceSplit:
    """Indices into the template list and the class-name list (one index per distinct name)."""

    train_templates: list[int]
    heldout_templates: list[int]
    train_classes: list[int]
    heldout_classes: list[int]


def prep_sentences(out_dir, templates: str | Path = "imagenet", *, seed: int = 0,
                   heldout_templates: int | None = None, heldout_classes: int | None = None,
                   samples: int | None = None, pairs: bool = False, shard_size: int = 1000,
                   sts_pairs: int = 2000) -> tuple[PrepSummary, dict]:
    """Write the training shards, sts.tsv, retrieval.tsv and manifest.json; return the training
    shards' summary and the manifest.

    ``templates``: a shipped set ("imagenet", "digits") or a YAML path. ``heldout_templates`` and
    ``heldout_classes`` default to a quarter of the templates and a fifth of the distinct class names
    (20 of 80 and 200 of ImageNet's names), at least 2 each. Bad arguments are one-line ClipxErrors.
    """
    start = time.perf_counter()
    classnames, template_list = load_templates(templates)
    _check_texts(classnames, template_list, templates)
    if samples is not None and samples < 1:
        raise ClipxError(f"--samples must be at least 1, got {samples}")
    if sts_pairs < 2:
        raise ClipxError(f"--sts-pairs must be at least 2 (a correlation needs 2 pairs), got {sts_pairs}")
    split = split_sentences(classnames, template_list, seed, heldout_templates, heldout_classes, pairs)
    out_dir = Path(out_dir)
    summary = _write_train(out_dir / TRAIN_DIR, classnames, template_list, split, seed=seed, samples=samples,
                           pairs=pairs, shard_size=shard_size)
    sts = sts_rows(classnames, template_list, split, sts_pairs, seed)
    retrieval = retrieval_rows(classnames, template_list, split, seed)
    write_tsv(out_dir / STS_FILE, ("sentence1", "sentence2", "score"), [(a, b, f"{s:.1f}") for a, b, s in sts])
    write_tsv(out_dir / RETRIEVAL_FILE, ("query", "positive"), retrieval)
    manifest = _manifest(classnames, template_list, split, templates, seed, pairs,
                         {"train_samples": summary.written, "shards": summary.shards, "sts_pairs": len(sts),
                          "retrieval_queries": len(retrieval)})
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    summary.seconds = time.perf_counter() - start
    return summary, manifest


def _check_texts(classnames: list[str], templates: list[str], source) -> None:
    # The evaluation files are TSV: a tab or line break inside a sentence would shift its columns.
    for kind, texts in (("class name", classnames), ("template", templates)):
        for text in texts:
            if "\t" in text or "\n" in text or "\r" in text:
                raise ClipxError(f"templates {source}: {kind} {text!r} holds a tab or line break; "
                                 "sentences must fit on one TSV line")
    if any(not name.strip() for name in classnames):
        raise ClipxError(f"templates {source}: a class name is blank; every sentence needs its noun")


def split_sentences(classnames: list[str], templates: list[str], seed: int, heldout_templates: int | None,
                    heldout_classes: int | None, pairs: bool) -> SentenceSplit:
    """Seeded split of the templates and of the distinct class names into train and held-out parts
    (each part sorted by index). Held-out counts out of range are one-line ClipxErrors."""
    first_index: dict[str, int] = {}
    for index, name in enumerate(classnames):
        first_index.setdefault(name, index)
    distinct = list(first_index.values())  # ascending
    n_templates, n_classes = len(templates), len(distinct)
    heldout_templates = max(2, round(n_templates / 4)) if heldout_templates is None else heldout_templates
    heldout_classes = max(2, round(n_classes / 5)) if heldout_classes is None else heldout_classes
    # Two held-out templates pair one class with itself reworded; --pairs needs two train templates too.
    most = n_templates - (2 if pairs else 1)
    if not 2 <= heldout_templates <= most:
        raise ClipxError(f"--heldout-templates {heldout_templates}: give 2 to {most} of the {n_templates} templates "
                         f"(2 held out reword a sentence; {n_templates - most} must stay for training"
                         f"{' with --pairs' if pairs else ''})")
    if not 2 <= heldout_classes <= n_classes - 1:
        raise ClipxError(f"--heldout-classes {heldout_classes}: give 2 to {n_classes - 1} of the {n_classes} distinct "
                         "class names (2 held out make a different-class pair; 1 must stay for training)")
    template_order = np.random.default_rng([seed, 0]).permutation(n_templates)
    class_order = np.random.default_rng([seed, 1]).permutation(n_classes)
    held_t = {int(t) for t in template_order[:heldout_templates]}
    held_c = {distinct[int(c)] for c in class_order[:heldout_classes]}
    return SentenceSplit(
        train_templates=[t for t in range(n_templates) if t not in held_t],
        heldout_templates=sorted(held_t),
        train_classes=[c for c in distinct if c not in held_c],
        heldout_classes=sorted(held_c),
    )


def _write_train(train_dir: Path, classnames: list[str], templates: list[str], split: SentenceSplit, *,
                 seed: int, samples: int | None, pairs: bool, shard_size: int) -> PrepSummary:
    combos = [(c, t) for c in split.train_classes for t in range(len(split.train_templates))]
    order = draw_order(len(combos), samples or len(combos), np.random.default_rng([seed, 2]))
    # One offset per sample in 1..T-1 picks another train template for its paraphrase.
    offsets = np.random.default_rng([seed, 3]).integers(1, max(2, len(split.train_templates)), size=len(order))
    with ShardWriter(train_dir, shard_size) as writer:
        for key, (combo, offset) in enumerate(zip(order, offsets)):
            label, position = combos[combo]
            template = split.train_templates[position]
            texts = {"txt": templates[template].format(classnames[label])}
            if pairs:
                other = split.train_templates[(position + int(offset)) % len(split.train_templates)]
                texts["pos.txt"] = templates[other].format(classnames[label])
            writer.add_text(f"{key:09d}", texts, {"label": label, "classname": classnames[label], "template": template})
    return PrepSummary(written=writer.written, shards=len(writer.sizes), out_dir=str(train_dir))


def draw_order(population: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices into ``range(population)``: shuffled whole passes, cut to length, so each
    index appears ``count // population`` or one more times, and a count up to the population is a
    sample without repeats."""
    passes = -(-count // population)
    return np.concatenate([rng.permutation(population) for _ in range(passes)])[:count]


def sts_rows(classnames: list[str], templates: list[str], split: SentenceSplit, count: int,
             seed: int) -> list[tuple[str, str, float]]:
    """``count`` (sentence1, sentence2, gold) rows of held-out sentences, half scored 1.0 (same class,
    two different templates) and half 0.0 (two different classes), in seeded order."""
    rng = np.random.default_rng([seed, 4])
    same_class = rng.permutation(np.arange(count) < (count + 1) // 2)
    held_t, held_c = split.heldout_templates, split.heldout_classes
    rows = []
    for same in same_class:
        if same:
            label = held_c[rng.integers(len(held_c))]
            first, second = rng.choice(held_t, size=2, replace=False)
            rows.append((templates[first].format(classnames[label]), templates[second].format(classnames[label]), 1.0))
        else:
            labels = rng.choice(held_c, size=2, replace=False)
            chosen = rng.choice(held_t, size=2)
            rows.append((templates[chosen[0]].format(classnames[labels[0]]),
                         templates[chosen[1]].format(classnames[labels[1]]), 0.0))
    return rows


def retrieval_rows(classnames: list[str], templates: list[str], split: SentenceSplit,
                   seed: int) -> list[tuple[str, str]]:
    """One (query, positive) row per held-out class: the class in two different held-out templates."""
    rng = np.random.default_rng([seed, 5])
    rows = []
    for label in split.heldout_classes:
        first, second = rng.choice(split.heldout_templates, size=2, replace=False)
        rows.append((templates[first].format(classnames[label]), templates[second].format(classnames[label])))
    return rows


def write_tsv(path: Path, header: tuple[str, ...], rows) -> None:
    """Header and rows as UTF-8 tab-separated lines, written under a temporary name and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    lines = ["\t".join(header)] + ["\t".join(row) for row in rows]
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _manifest(classnames: list[str], templates: list[str], split: SentenceSplit, source, seed: int,
              pairs: bool, counts: dict) -> dict:
    def classes(labels: list[int]) -> dict:
        return {"labels": labels, "names": [classnames[c] for c in labels]}

    return {
        "templates_source": str(source),
        "seed": seed,
        "pairs": pairs,
        "templates": {"train": [templates[t] for t in split.train_templates],
                      "heldout": [templates[t] for t in split.heldout_templates]},
        "classes": {"train": classes(split.train_classes), "heldout": classes(split.heldout_classes)},
        "counts": counts,
        "files": {"train": f"{TRAIN_DIR}/", "sts": STS_FILE, "retrieval": RETRIEVAL_FILE},
        "sts_gold_score": GOLD_SCORE,
    }
