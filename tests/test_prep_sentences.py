"""data_prep.sentences (`clipx prep sentences`): determinism, the train/held-out split as seen in the
written tars, paraphrase pairs, the evaluation files, and the command line."""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from clipx.errors import ClipxError
from clipx.templates import load_templates
from data_prep.sentences import prep_sentences, split_sentences
from eval.text_similarity import read_pairs_tsv, read_sts_tsv, sts_metrics, text_retrieval_metrics
from tests.conftest import clipx_in_process

CLASSNAMES, TEMPLATES = load_templates("digits")  # 10 names, 8 templates: 2 and 2 held out by default


def read_text_shards(train_dir: Path) -> list[dict]:
    """Every sample of the text shards in order: {"txt", "pos.txt"?, "json"} decoded, checked against sizes.json."""
    sizes = json.loads((train_dir / "sizes.json").read_text())
    assert sorted(sizes) == sorted(p.name for p in train_dir.glob("*.tar"))
    samples: list[dict] = []
    for name in sorted(sizes):
        with tarfile.open(train_dir / name) as tar:
            grouped: dict[str, dict] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read().decode("utf-8")
                grouped.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
        assert len(grouped) == sizes[name]
        samples.extend(grouped[key] for key in sorted(grouped))
    return samples


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sentences")
    prep_sentences(out, "digits", pairs=True, shard_size=10, sts_pairs=40)
    return out


def split_of(out: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return (manifest["templates"]["train"], manifest["templates"]["heldout"],
            manifest["classes"]["train"]["names"], manifest["classes"]["heldout"]["names"])


def test_runs_are_byte_identical(pairs_dir, tmp_path):
    prep_sentences(tmp_path, "digits", pairs=True, shard_size=10, sts_pairs=40)
    ours = sorted(p.relative_to(pairs_dir) for p in pairs_dir.rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert ours == theirs and len(ours) == 5 + 4  # 5 shards + sizes.json, sts, retrieval, manifest
    for relative in ours:
        assert (pairs_dir / relative).read_bytes() == (tmp_path / relative).read_bytes(), relative


def test_another_seed_splits_differently(pairs_dir, tmp_path):
    prep_sentences(tmp_path, "digits", seed=1, sts_pairs=4)
    assert split_of(tmp_path) != split_of(pairs_dir)


def test_training_text_holds_only_train_templates_and_classes(pairs_dir):
    train_t, held_t, train_c, held_c = split_of(pairs_dir)
    assert len(held_t) == 2 and len(held_c) == 2 and len(train_t) == 6 and len(train_c) == 8
    assert not set(train_t) & set(held_t) and not set(train_c) & set(held_c)
    allowed = {template.format(name) for template in train_t for name in train_c}
    forbidden = {template.format(name) for template in TEMPLATES for name in CLASSNAMES} - allowed
    samples = read_text_shards(pairs_dir / "train")
    assert len(samples) == 6 * 8
    texts = [s["txt"] for s in samples] + [s["pos.txt"] for s in samples]
    assert set(texts) <= allowed and not set(texts) & forbidden
    assert {s["txt"] for s in samples} == allowed  # every train class x train template, once
    for sample in samples:
        meta = sample["json"]
        assert CLASSNAMES[meta["label"]] == meta["classname"] in train_c
        assert sample["txt"] == TEMPLATES[meta["template"]].format(meta["classname"])
    # the labels are not left in class order: a shard mixes classes for the shuffle buffer
    assert len({s["json"]["label"] for s in samples[:10]}) > 3


def test_pairs_positive_is_same_class_in_another_train_template(pairs_dir):
    train_t, _, train_c, _ = split_of(pairs_dir)
    where = {template.format(name): (name, template) for template in train_t for name in train_c}
    other_templates = Counter()
    for sample in read_text_shards(pairs_dir / "train"):
        name, template = where[sample["pos.txt"]]
        assert name == sample["json"]["classname"] and template != TEMPLATES[sample["json"]["template"]]
        other_templates[template] += 1
    assert len(other_templates) == len(train_t)  # the paraphrase's template is drawn, not fixed


def test_evaluation_files_use_only_heldout_sentences(pairs_dir):
    train_t, held_t, train_c, held_c = split_of(pairs_dir)
    held = {template.format(name): name for template in held_t for name in held_c}
    sts = read_sts_tsv(pairs_dir / "sts.tsv")
    assert len(sts) == 40 and Counter(score for *_, score in sts) == {1.0: 20, 0.0: 20}
    for first, second, score in sts:
        assert held[first] == held[second] if score == 1.0 else held[first] != held[second]
        if score == 1.0:
            assert first != second  # the same meaning, reworded
    retrieval = read_pairs_tsv(pairs_dir / "retrieval.tsv")
    assert sorted(held[q] for q, _ in retrieval) == sorted(held_c)
    assert all(held[q] == held[p] and q != p for q, p in retrieval)
    manifest = json.loads((pairs_dir / "manifest.json").read_text())
    assert manifest["counts"] == {"train_samples": 48, "shards": 5, "sts_pairs": 40, "retrieval_queries": 2}
    assert manifest["seed"] == 0 and manifest["pairs"] is True


def test_an_encoder_that_knows_the_class_scores_perfectly(pairs_dir):
    """The gold scores mean "same class": an encoder of the class alone gets Spearman 1 and R@1 1."""
    _, held_t, _, held_c = split_of(pairs_dir)
    label = {template.format(name): held_c.index(name) for template in held_t for name in held_c}

    def encode(sentences):
        return torch.nn.functional.one_hot(torch.tensor([label[s] for s in sentences]), len(held_c)).float()

    assert sts_metrics(encode, read_sts_tsv(pairs_dir / "sts.tsv"))["spearman"] == pytest.approx(1.0)
    recalls = text_retrieval_metrics(encode, read_pairs_tsv(pairs_dir / "retrieval.tsv"), ks=(1,))
    assert recalls["query_to_positive"]["R@1"] == 1.0 and recalls["positive_to_query"]["R@1"] == 1.0


def test_samples_draws_whole_passes(tmp_path):
    summary, _ = prep_sentences(tmp_path / "few", "digits", samples=20, sts_pairs=4)
    texts = [s["txt"] for s in read_text_shards(tmp_path / "few" / "train")]
    assert summary.written == 20 and len(set(texts)) == 20 and "pos.txt" not in read_text_shards(
        tmp_path / "few" / "train")[0]
    prep_sentences(tmp_path / "many", "digits", samples=100, sts_pairs=4)
    counts = Counter(s["txt"] for s in read_text_shards(tmp_path / "many" / "train"))
    assert len(counts) == 48 and set(counts.values()) == {2, 3}


def test_duplicate_class_names_fall_on_one_side():
    classnames, templates = load_templates("imagenet")
    split = split_sentences(classnames, templates, 0, None, None, pairs=False)
    assert len(split.heldout_templates) == 20 and len(split.heldout_classes) == 200
    train = {classnames[c] for c in split.train_classes}
    held = {classnames[c] for c in split.heldout_classes}
    assert not train & held and len(train | held) == len(set(classnames)) == 998


@pytest.mark.parametrize("options, message", [
    ({"heldout_templates": 1}, "--heldout-templates 1: give 2 to 7"),
    ({"heldout_templates": 7, "pairs": True}, "--heldout-templates 7: give 2 to 6 .* with --pairs"),
    ({"heldout_classes": 10}, "--heldout-classes 10: give 2 to 9"),
    ({"samples": 0}, "--samples must be at least 1"),
    ({"sts_pairs": 1}, "--sts-pairs must be at least 2"),
    ({"shard_size": 0}, "shard size must be at least 1"),
])
def test_bad_options_are_one_line_errors(tmp_path, options, message):
    with pytest.raises(ClipxError, match=message) as error:
        prep_sentences(tmp_path, "digits", **options)
    assert "\n" not in str(error.value)


def test_templates_with_a_tab_are_refused(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text('classnames: [a, b, c]\ntemplates: ["x {}", "y\\t{}", "z {}"]\n')
    with pytest.raises(ClipxError, match="tab or line break"):
        prep_sentences(tmp_path / "out", path)


def run_cli(*args) -> subprocess.CompletedProcess:
    return clipx_in_process("prep", "sentences", *args)


def test_cli_writes_and_summarises(tmp_path):
    result = run_cli("--out", tmp_path, "--templates", "digits", "--pairs", "--samples", 30, "--shard-size", 8,
                     "--sts-pairs", 10, "--seed", 3, "--heldout-templates", 3, "--heldout-classes", 4)
    assert result.returncode == 0, result.stderr
    assert "Wrote 30 samples to 4 shard(s)" in result.stdout
    assert "10 pairs in" in result.stdout and "4 queries in" in result.stdout
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 3 and len(manifest["templates"]["heldout"]) == 3
    assert sum(json.loads((tmp_path / "train" / "sizes.json").read_text()).values()) == 30
    bad = run_cli("--out", tmp_path, "--templates", "digits", "--heldout-classes", 10)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --heldout-classes 10")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_add_text_keeps_member_order_and_refuses_a_json_text(tmp_path):
    from data_prep.writer import ShardWriter

    with ShardWriter(tmp_path, 5) as writer:
        writer.add_text("000000001", {"txt": "héllo", "pos.txt": "hi"}, {"label": 3})
        with pytest.raises(ValueError, match="not 'json'"):
            writer.add_text("000000002", {"json": "{}"}, {})
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000001.txt", "000000001.pos.txt", "000000001.json"]
        assert tar.extractfile("000000001.txt").read() == "héllo".encode()
