"""`clipx report CUR`: a curation folder (written here by hand, as its format specifies) rendered as one
self-contained page, checked in headless Chromium: every image decodes, each stage is named with its counts,
thumbnails come from the right samples, a missing shard or a broken image is a placeholder, captions are escaped."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipx.apps.report.curation import write_curation_report
from data_prep.writer import ShardWriter
from tests.conftest import clipx_in_process
from tests.test_report import rendered_dom

SCRIPT_CAPTION = '<script>document.body.dataset.pwned = "yes"</script> a square'
# Ten samples in two shards of five (s000..s009); a third shard is listed and scored, then missing on disk.
SCORES = [0.31, 0.12, 0.28, float("nan"), 0.25, 0.33, 0.05, 0.29, 0.30, 0.27]
MISSING_SCORES = [0.22, 0.18]
STAGES = [  # name, args, before, removed, after: each acts on what the previous kept
    ("filter", {"threshold": 0.2}, 12, 4, 8),
    ("dedup", {"image": "exact"}, 8, 1, 7),
    ("balance", {"t": 2}, 7, 2, 5),
    ("decontaminate", {"threshold": 0.95}, 5, 1, 4),  # and "against": the evaluation set's curation folder
]
EVAL_COLOUR = (250, 240, 20)  # the evaluation sample v1, in a shard named like the pool's first one


def colour(i: int) -> tuple[int, int, int]:
    return (20 * i + 10, 230 - 20 * i, (90 * i) % 256)


def jpeg(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), rgb).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def caption(i: int) -> str:
    return SCRIPT_CAPTION if i == 4 else f"square number {i}"


def row(i: int, score=None, detail: str = "", shard: str | None = None, index: int | None = None,
        key: str | None = None) -> dict:
    """A report row of sample s00i (its shard and index computed from i unless given)."""
    return {"shard": shard or f"pool-{i // 5:06d}.tar", "index": i % 5 if index is None else index,
            "key": key or f"s{i:03d}", "caption": caption(i) if 0 <= i < 10 else None,
            "score": SCORES[i] if score is None and 0 <= i < 10 else score, "detail": detail}


def write_table(path, columns: dict, types: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in columns.items()}), path)


def write_shards_and_scores(cur, shards_dir) -> list[str]:
    images = {i: (b"not an image at all" if i == 3 else jpeg(colour(i))) for i in range(10)}
    with ShardWriter(shards_dir, shard_size=5, prefix="pool") as writer:
        for i in range(10):
            writer.add(f"s{i:03d}", images[i], caption(i), {})
    types = {"index": pa.int32(), "has_image": pa.bool_(), "score": pa.float32()}
    for shard in range(2):
        ids = range(5 * shard, 5 * shard + 5)
        write_table(cur / "scores" / f"pool-{shard:06d}.tar.parquet", {
            "shard": [f"pool-{shard:06d}.tar"] * 5, "index": [i % 5 for i in ids], "key": [f"s{i:03d}" for i in ids],
            "caption": [caption(i) for i in ids], "sha1": [hashlib.sha1(images[i]).hexdigest() for i in ids],
            "has_image": [i != 3 for i in ids], "score": [SCORES[i] for i in ids]}, types)
    write_table(cur / "scores" / "pool-000002.tar.parquet", {
        "shard": ["pool-000002.tar"] * 2, "index": [0, 1], "key": ["p0", "p1"], "caption": ["gone", "gone too"],
        "sha1": ["0" * 40, "1" * 40], "has_image": [True, True], "score": MISSING_SCORES}, types)
    return [str(shards_dir / f"pool-{shard:06d}.tar") for shard in range(3)]


def stage_reports() -> dict[str, dict]:
    """Each stage's extras: reasons, histogram, examples, and its threshold, pairs or concepts."""
    p1 = row(-1, 0.18, shard="pool-000002.tar", index=1, key="p1")
    matched = {"shard": "pool-000000.tar", "index": 1, "key": "v1", "caption": "an evaluation square",
               "score": 0.3, "detail": ""}
    unknown = {**matched, "shard": "val-000009.tar", "index": 0, "key": "v9"}
    stale = row(0, shard="pool-000000.tar", index=2, key="s999")  # the shard holds s002 there now
    return {
        "filter": {"removed_by_reason": {"low_score": 4}, "threshold": 0.2,
                   "histogram": {"edges": [0, 0.1, 0.2, 0.3, 0.4], "kept": [0, 0, 5, 3], "removed": [1, 2, 0, 0]},
                   "examples": {"kept": [row(0), row(4), row(7)], "removed": [row(1), row(3), p1]}},
        "dedup": {"removed_by_reason": {"exact_duplicate": 1},
                  "histogram": {"edges": [0.2, 0.3, 0.4], "kept": [5, 2], "removed": [0, 1]},
                  "examples": {"kept": [row(2)], "removed": [row(8, detail="s000")]},
                  "pairs": [[row(8, detail="s000"), row(0)]]},
        "balance": {"removed_by_reason": {"balance": 2},
                    "histogram": {"edges": [0.2, 0.3, 0.4], "kept": [4, 1], "removed": [1, 1]},
                    "examples": {"kept": [row(0), stale], "removed": [row(5), row(9)]},
                    "concepts": {"entries": ["square", "number", "gone"], "before": [6, 2, 1], "after": [4, 2, 1],
                                 "t": 2}},
        "decontaminate": {"removed_by_reason": {"contaminated": 1},
                          "histogram": {"edges": [0.2, 0.3, 0.4], "kept": [3, 1], "removed": [1, 0]},
                          "examples": {"kept": [], "removed": [row(7, detail="v0")]},
                          "pairs": [[row(7, detail="pool-000000.tar/v1"), matched],
                                    [row(7, detail="val-000009.tar/v9"), unknown]]},
    }


def write_evaluation_folder(evalcur, shards_dir) -> None:
    """The evaluation set's own curation folder, which decontaminate's args name: its shard's basename
    is the pool's first shard's, so only the folder tells them apart."""
    with ShardWriter(shards_dir, shard_size=5, prefix="pool") as writer:
        writer.add("v0", jpeg((0, 0, 0)), "an evaluation square", {})
        writer.add("v1", jpeg(EVAL_COLOUR), "an evaluation square", {})
    evalcur.mkdir(parents=True)
    (evalcur / "curation.json").write_text(json.dumps({
        "version": 1, "scorer": "runs/tiny/checkpoints/step-6", "scorer_source": "clipx:runs/tiny",
        "shards": [str(shards_dir / "pool-000000.tar")], "embeddings": True, "dim": 32, "stages": []}))


def write_stages(cur, shards: list[str], against) -> None:
    entries = [{"name": n, "args": {**a, "against": str(against)} if n == "decontaminate" else a,
                "before": b, "removed": r, "after": k} for n, a, b, r, k in STAGES]
    reasons = {"filter": "low_score", "dedup": "exact_duplicate", "balance": "balance", "decontaminate": "contaminated"}
    removed = {"filter": [1, 3, 6, -1], "dedup": [8], "balance": [5, 9], "decontaminate": [7]}
    types = {"index": pa.int32(), "score": pa.float32()}
    for entry, (name, extras) in zip(entries, stage_reports().items()):
        rows = [row(i) if i >= 0 else row(-1, 0.18, shard="pool-000002.tar", index=1, key="p1") for i in removed[name]]
        write_table(cur / "stages" / f"{name}.parquet", {
            "shard": [r["shard"] for r in rows], "index": [r["index"] for r in rows], "key": [r["key"] for r in rows],
            "reason": [reasons[name]] * len(rows), "score": [r["score"] for r in rows],
            "detail": [r["detail"] for r in rows]}, types)
        (cur / "stages" / f"{name}.json").write_text(json.dumps({**entry, **extras}))
    manifest = {"version": 1, "scorer": "runs/tiny/checkpoints/step-6", "scorer_source": "clipx:runs/tiny",
                "shards": shards, "embeddings": False, "dim": None, "stages": entries}
    (cur / "curation.json").write_text(json.dumps(manifest))
    kept = [(0, 0), (0, 2), (0, 4)]
    write_table(cur / "keep.parquet", {"shard": ["pool-000000.tar"] * 3 + ["pool-000002.tar"],
                                       "index": [i for _, i in kept] + [0], "key": ["s000", "s002", "s004", "p0"]},
                {"index": pa.int32()})
    (cur / "keep.json").write_text(json.dumps({"kept": 4, "total": 12, "stages": [s[0] for s in STAGES]}))


@pytest.fixture(scope="module")
def cur(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation")
    cur = root / "cur"
    shards = write_shards_and_scores(cur, root / "shards")
    write_evaluation_folder(root / "evalcur", root / "eval-shards")
    write_stages(cur, shards, root / "evalcur")
    return cur


class Tables(HTMLParser):
    """The text of every table cell on a page, by the table's id: {id: [[cell, ...] per row]}."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.table = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.table = self.tables.setdefault(dict(attrs).get("id") or f"table{len(self.tables)}", [])
        elif tag == "tr" and self.table is not None:
            self.table.append([])
        elif tag in ("td", "th") and self.table is not None:
            self.table[-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self.table = None

    def handle_data(self, data):
        if self.table is not None and self.table and self.table[-1]:
            self.table[-1][-1] += data


def thumbnail_colour(text: str, key: str) -> np.ndarray:
    (uri,) = set(re.findall(rf"<img src=\"data:image/jpeg;base64,([^\"]+)\" alt=\"{key}\">", text))
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB"), dtype=np.float32).mean((0, 1))


def test_the_curation_report_renders_in_headless_chromium(cur, tmp_path):
    result = clipx_in_process("report", cur, check=True)
    page = cur / "report.html"
    assert result.stdout.strip() == f"wrote {page}"
    dom = rendered_dom(page, tmp_path / "profile")
    # 5 histograms (the pool, each stage) + 15 thumbnails; placeholders: a broken image, a missing shard, a
    # shard no manifest lists, a row whose key the shard no longer holds at its index.
    assert 'data-images-rendered="true"' in dom.stdout, dom.stderr[-2000:]
    assert 'data-image-count="20"' in dom.stdout
    text = dom.stdout
    assert "data-pwned" not in text  # the caption's script did not run
    assert text.count("class=\"noimg\"") == 4
    for why in ("image does not decode", "shard missing or unreadable", "shard not in the curation's list",
                "the shard changed since curation"):
        assert why in text

    tables = Tables()
    tables.feed(text)
    summary = [[cells[1], *cells[3:]] for cells in tables.tables["summary"]]
    assert summary == [["stage", "before", "removed", "after"], ["pool", "", "", "12"],
                       *([n, str(b), str(r), str(k)] for n, _, b, r, k in STAGES), ["kept", "", "", "4"]]
    assert '"threshold": 0.2' in tables.tables["summary"][2][2]
    for number, (name, *_rest) in enumerate(STAGES, 1):
        assert f"<h2>Stage {number}: {name}</h2>" in text
    assert "12 samples; 1 without a score" in text
    concepts = next(rows for rows in tables.tables.values() if rows[0][:3] == ["entry", "before", "after"])
    assert concepts[1:] == [["square", "6", "4", "over t"], ["number", "2", "2", ""], ["gone", "1", "1", ""]]

    # Each thumbnail is its own sample's image: s007 and s008 sit at indices 2 and 3 of the second shard,
    # and v1 at index 1 of the evaluation set's pool-000000.tar, not the pool's.
    for i in (0, 7, 8):
        assert np.abs(thumbnail_colour(text, f"s{i:03d}") - colour(i)).max() < 12
    assert np.abs(thumbnail_colour(text, "v1") - EVAL_COLOUR).max() < 12


def test_a_caption_is_text_not_markup(cur, tmp_path):
    page = write_curation_report(cur, tmp_path / "escaped.html")
    text = page.read_text()
    assert text.count("&lt;script&gt;document.body.dataset.pwned = &quot;yes&quot;&lt;/script&gt; a square") == 1
    assert "<script>document" not in text


def test_report_on_a_folder_that_is_neither_a_run_nor_a_curation_is_one_line(tmp_path):
    result = clipx_in_process("report", tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "curation.json" in result.stderr and "metrics.jsonl" in result.stderr


def test_a_broken_manifest_or_a_run_option_is_one_line(tmp_path, cur):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "curation.json").write_text('{"version": 1, "stages": [')
    result = clipx_in_process("report", broken)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "curation.json" in result.stderr
    (broken / "curation.json").write_text(json.dumps({"version": 7, "shards": [], "stages": []}))
    result = clipx_in_process("report", broken)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "version-1" in result.stderr
    result = clipx_in_process("report", cur, "--data", "shards/val")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--data" in result.stderr
