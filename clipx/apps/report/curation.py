"""`clipx report CUR`: one self-contained HTML page about a data-curation folder, the output of `clipx curate`.

The folder (CUR/curation.json, scores/*.parquet, stages/<stage>.json, keep.json) is read as its writer
documents it. The page holds a summary table (the pool, each stage with its args and counts, the kept
total), the score histogram of the whole pool, and per stage: its removals by reason, the histogram of the
scores it saw, kept against removed (the filter's threshold drawn), example pairs it kept and dropped with
their images as thumbnails read from the shards, the duplicate pairs of dedup and decontaminate side by
side, and balance's top concepts before and after its cap t. Captions are user data: every text is escaped.
A shard that cannot be read, or an image that does not decode, shows a placeholder instead of a thumbnail;
``pipe:`` shards are never run (a report only reads).
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from clipx.apps.curate import MANIFEST, read_manifest
from clipx.apps.report.page import data_uri, section, write_page
from clipx.apps.report.plots import histogram_png
from clipx.data.pipeline import IMAGE_EXTENSIONS
from clipx.errors import ClipxError

THUMBNAIL_PIXELS = 192  # the longest side; shown at 96 CSS pixels, so it stays sharp on dense screens
POOL_BINS = 40


class Thumbnail(NamedTuple):
    """What the report found for one (shard, index): the sample's key, its thumbnail, or why there is none."""

    key: str | None  # the key read from the shard; None when the sample was not read
    uri: str | None  # a data: URI; None when there is no readable image
    why: str  # the placeholder's text when ``uri`` is None


ThumbnailMap = dict[tuple[str, int], Thumbnail]  # keyed by (shard URL, index)
URL = "_url"  # the key under which a shown row carries the URL of the shard its image is read from


def is_curation_dir(path: str | Path) -> bool:
    """Whether ``path`` is a curation folder (it holds curation.json)."""
    return (Path(path) / MANIFEST).is_file()


def write_curation_report(cur_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render the curation folder's report to ``out`` (default CUR/report.html); returns the path."""
    cur = Path(cur_dir)
    manifest = read_manifest(cur)
    entries = manifest["stages"]
    pool_urls = _shard_urls(manifest["shards"])
    reports = [_stage_report(cur, entry["name"], pool_urls) for entry in entries]
    thumbnails = _thumbnails([row for report in reports if report is not None for row in _shown_rows(report)])
    scores = _pool_scores(cur)
    pool = len(scores) if scores is not None else (entries[0].get("before") if entries else None)
    sections = _summary(manifest, pool, _read_json(cur / "keep.json")) + _pool_section(scores)
    sections += "".join(_stage_section(number, entry, report, thumbnails)
                        for number, (entry, report) in enumerate(zip(entries, reports), 1))
    return write_page(Path(out) if out else cur / "report.html", f"curation {cur.resolve().name}", sections)


# ---- reading the folder -----------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    """A JSON object from ``path``; None when it is missing or unreadable (the page says so where it matters)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _stage_report(cur: Path, name: str, pool_urls: dict[str, str]) -> dict | None:
    """stages/NAME.json, each row it shows given the URL of its shard (None if unknown) under URL."""
    # A name that is not a plain file name would read outside stages/: treat it as having no report.
    if Path(name).name != name or name in ("", ".", ".."):
        return None
    report = _read_json(cur / "stages" / f"{name}.json")
    if report is None:
        return None
    for row in _shown_rows(report):
        row[URL] = pool_urls.get(str(row.get("shard")))
    if name == "decontaminate":
        # The sample a removed one matched is an evaluation sample, named by its shard's basename in the
        # curation folder of the evaluation set (args.against), a name the pool's shards may share.
        against = _read_json(Path(str(_dict(report.get("args")).get("against"))) / MANIFEST) or {}
        eval_urls = _shard_urls(_list(against.get("shards")))
        for _, matched in _pairs_of(report):
            matched[URL] = eval_urls.get(str(matched.get("shard")))
    return report


def _pool_scores(cur: Path) -> np.ndarray | None:
    """Every sample's score from CUR/scores/*.parquet, NaN where it has none  # (N,); None without scores/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((cur / "scores").glob("*.parquet"))
    if not files:
        return None
    parts = []
    for path in files:
        try:
            column = pq.read_table(path, columns=["score"]).column("score")
        except (OSError, ValueError, KeyError, pa.ArrowException) as error:
            raise ClipxError(f"{path} cannot be read as a scores table ({str(error).splitlines()[0]}): "
                             "score that shard again with `clipx curate`") from None
        parts.append(column.to_numpy(zero_copy_only=False).astype(np.float64))
    return np.concatenate(parts)


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _rows(value: Any) -> list[dict]:
    return [row for row in _list(value) if isinstance(row, dict)]


def _pairs_of(report: dict) -> list[tuple[dict, dict]]:
    return [(pair[0], pair[1]) for pair in _list(report.get("pairs"))
            if isinstance(pair, list) and len(pair) == 2 and all(isinstance(row, dict) for row in pair)]


def _shown_rows(report: dict) -> list[dict]:
    """The rows whose images a stage's section shows: its examples and both sides of its pairs."""
    examples = _dict(report.get("examples"))
    return (_rows(examples.get("kept")) + _rows(examples.get("removed"))
            + [row for pair in _pairs_of(report) for row in pair])


def _index(row: dict) -> int | None:
    index = row.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) and index >= 0 else None


# ---- thumbnails from the shards ---------------------------------------------------------------------

def _shard_urls(shards: list) -> dict[str, str]:
    """{basename: URL} of a manifest's shards: rows name their shard by basename."""
    return {str(url).rstrip("/").rsplit("/", 1)[-1]: str(url) for url in shards}


def _thumbnails(rows: list[dict]) -> ThumbnailMap:
    """A thumbnail (or the reason for its placeholder) for each located row's (URL, index), each shard
    read once."""
    from clipx.data.opener import ShardOpener
    from clipx.data.skips import SkipCounter

    wanted: dict[str, set[int]] = {}
    for row in rows:
        index = _index(row)
        if index is not None and row.get(URL) is not None:
            wanted.setdefault(row[URL], set()).add(index)
    opener, counter = ShardOpener(), SkipCounter()  # remote shards too, through each store's own environment
    found: ThumbnailMap = {}
    for url, indices in wanted.items():
        read, why = _read_shard(opener, counter, url, indices)
        found.update({(url, index): read.get(index, Thumbnail(None, None, why)) for index in indices})
    return found


def _read_shard(opener, counter, url: str, indices: set[int]) -> tuple[dict[int, Thumbnail], str]:
    """Thumbnails of the samples ``indices`` of one shard, and what to say for any it did not hold."""
    from clipx.data.shards import PIPE_PREFIX
    from clipx.data.tar_reader import shard_samples

    if url.startswith(PIPE_PREFIX):
        return {}, "pipe: shards are not run by a report"
    try:
        stream = opener.open(url)
    except OSError:  # missing, refused, or a network failure that outlived its retries
        return {}, "shard missing or unreadable"
    found = {}
    try:
        for index, sample in shard_samples(stream, counter, wanted=indices):
            found[index] = Thumbnail(sample["__key__"], *_thumbnail(sample))
    finally:
        with contextlib.suppress(OSError):
            stream.close()
    return found, "sample not in the shard"


def _thumbnail(sample: dict) -> tuple[str | None, str]:
    """(data: URI of a small JPEG of the sample's image, "") or (None, why there is none)."""
    from PIL import Image

    suffix = next((s for s in IMAGE_EXTENSIONS if s in sample), None)
    if suffix is None:
        return None, "no image in the sample"
    buffer = io.BytesIO()
    try:
        with Image.open(io.BytesIO(sample[suffix])) as image:
            image.draft("RGB", (THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))  # a JPEG decodes at 1/2..1/8 scale
            image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            image.convert("RGB").save(buffer, "JPEG", quality=90)
    except Exception:  # Pillow raises many types on damaged or hostile files; each one means no thumbnail
        return None, "image does not decode"
    return data_uri(buffer.getvalue(), "image/jpeg"), ""


# ---- rendering ---------------------------------------------------------------------------------------

def _count(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "—" if value is None else html.escape(str(value))


def _score(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.3f}"
    return "—"


def _args(args: Any) -> str:
    return f"<code>{html.escape(json.dumps(args, sort_keys=True, ensure_ascii=False))}</code>" if args else ""


def _plot(png: bytes, alt: str) -> str:
    return f"<img class='plot' src='{data_uri(png)}' alt='{html.escape(alt)}'>"


def _summary(manifest: dict, pool: int | None, keep: dict | None) -> str:
    """The manifest's scorer and shards, and the table: the pool, each stage in order, the kept total."""
    stages = manifest["stages"]
    info = (f"<p>Scored by <code>{html.escape(str(manifest.get('scorer')))}</code> "
            f"({html.escape(str(manifest.get('scorer_source')))}) over {len(manifest['shards']):,} shards"
            f"{', embeddings stored' if manifest.get('embeddings') else ''}. Each stage acts on what the stages "
            "before it kept.</p>")
    rows = [f"<tr><td></td><td>pool</td><td></td><td></td><td></td><td class='num'>{_count(pool)}</td></tr>"]
    rows += [f"<tr><td class='num'>{number}</td><td>{html.escape(stage['name'])}</td><td>{_args(stage.get('args'))}"
             f"</td>" + "".join(f"<td class='num'>{_count(stage.get(k))}</td>" for k in ("before", "removed", "after"))
             + "</tr>" for number, stage in enumerate(stages, 1)]
    kept = stages[-1].get("after") if stages else pool
    rows.append(f"<tr class='total'><td></td><td>kept</td><td></td><td></td><td></td><td class='num'>{_count(kept)}"
                "</td></tr>")
    head = "<tr><th>#</th><th>stage</th><th>args</th><th>before</th><th>removed</th><th>after</th></tr>"
    applied = (f"<p>Applied: keep.parquet lists {_count(keep.get('kept'))} of {_count(keep.get('total'))} samples."
               "</p>" if keep else "<p>Not applied yet (no keep.json): `clipx curate apply` writes keep.parquet.</p>")
    return section("Summary", info + f"<table id='summary'>{head}{''.join(rows)}</table>" + applied)


def _pool_section(scores: np.ndarray | None) -> str:
    title = "Scores of the pool"
    if scores is None:
        return section(title, "<p>No scores/*.parquet in this folder.</p>")
    finite = scores[np.isfinite(scores)]
    text = (f"<p>{len(scores):,} samples; {len(scores) - len(finite):,} without a score (image or caption "
            "missing or undecodable).</p>")
    if not len(finite):
        return section(title, text)
    counts, edges = np.histogram(finite, bins=POOL_BINS)
    png = histogram_png(edges.tolist(), {"pool": counts.tolist()}, "scores of the whole pool")
    return section(title, text + _plot(png, "score histogram of the pool"))


def _stage_section(number: int, entry: dict, report: dict | None, thumbnails: ThumbnailMap) -> str:
    """One stage: counts, removals by reason, its histogram, concepts (balance), pairs, examples."""
    name = entry["name"]
    counts = (f"<p>{_count(entry.get('before'))} before, {_count(entry.get('removed'))} removed, "
              f"{_count(entry.get('after'))} after. {_args(entry.get('args'))}</p>")
    if report is None:
        return section(f"Stage {number}: {name}", counts + f"<p>No readable stages/{html.escape(name)}.json "
                       "in this folder: its details are missing.</p>")
    pairs_heading = ("the evaluation sample it matches" if name == "decontaminate" else "the kept sample it duplicates")
    body = (counts + _reasons(report.get("removed_by_reason")) + _histogram(report, name)
            + _concepts(report.get("concepts")) + _pairs(_pairs_of(report), pairs_heading, thumbnails))
    examples = _dict(report.get("examples"))
    for kind, heading in (("removed", "Dropped"), ("kept", "Kept")):
        rows = _rows(examples.get(kind))
        if rows:
            body += (f"<h3>{heading}: examples</h3><div class='cards'>"
                     + "".join(_card(row, kind, thumbnails) for row in rows) + "</div>")
    return section(f"Stage {number}: {name}", body)


def _reasons(by_reason: Any) -> str:
    if not isinstance(by_reason, dict) or not by_reason:
        return ""
    rows = "".join(f"<tr><td>{html.escape(str(reason))}</td><td class='num'>{_count(n)}</td></tr>"
                   for reason, n in by_reason.items())
    return f"<h3>Removed by reason</h3><table class='reasons'><tr><th>reason</th><th>removed</th></tr>{rows}</table>"


def _histogram(report: dict, name: str) -> str:
    histogram = _dict(report.get("histogram"))
    try:
        edges, kept, removed = ([float(v) for v in histogram[k]] for k in ("edges", "kept", "removed"))
    except (TypeError, KeyError, ValueError):
        return "<p>No score histogram in this stage's report.</p>"
    if len(edges) < 2 or not len(kept) == len(removed) == len(edges) - 1:
        return "<p>This stage's score histogram is malformed (edges and counts do not match).</p>"
    threshold = report.get("threshold")
    line = float(threshold) if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) else None
    png = histogram_png(edges, {"kept": kept, "removed": removed}, f"scores the {name} stage saw", line)
    return "<h3>Scores it saw</h3>" + _plot(png, f"score histogram of the {name} stage")


def _concepts(concepts: Any) -> str:
    """Balance's top entries: counts before and after, the entries over the cap t marked."""
    if not isinstance(concepts, dict):
        return ""
    entries, before, after = (_list(concepts.get(k)) for k in ("entries", "before", "after"))
    t = concepts.get("t")
    if not entries or not len(entries) == len(before) == len(after):
        return "<p>This stage's concept counts are missing or malformed.</p>"
    capped = [isinstance(t, (int, float)) and isinstance(b, (int, float)) and b > t for b in before]
    rows = "".join(f"<tr class='{'capped' if over else ''}'><td>{html.escape(str(e))}</td><td class='num'>{_count(b)}"
                   f"</td><td class='num'>{_count(a)}</td><td>{'over t' if over else ''}</td></tr>"
                   for e, b, a, over in zip(entries, before, after, capped))
    return (f"<h3>Top concepts, t = {_count(t)}</h3><p>An entry matched by more than t samples keeps t of "
            "them (marked), more only through samples that another entry kept; the others keep all theirs.</p><table class='concepts'><tr><th>entry</th><th>before"
            f"</th><th>after</th><th>capped</th></tr>{rows}</table>")


def _pairs(pairs: list[tuple[dict, dict]], kept_side: str, thumbnails: ThumbnailMap) -> str:
    if not pairs:
        return ""
    blocks = "".join(f"<div class='pair'>{_card(removed, 'removed', thumbnails)}<span class='arrow'>⟷</span>"
                     f"{_card(kept, 'kept', thumbnails)}</div>" for removed, kept in pairs)
    return f"<h3>Pairs: the removed sample, and {kept_side}</h3>{blocks}"


def _card(row: dict, kind: str, thumbnails: ThumbnailMap) -> str:
    """A sample: its thumbnail (or a placeholder saying why not), key, caption, score and detail."""
    shard, index, key, url = str(row.get("shard")), _index(row), str(row.get("key")), row.get(URL)
    found = thumbnails.get((url, index)) if url is not None and index is not None else None
    if found is not None and found.uri is not None and found.key == key:
        image = f"<img src='{found.uri}' alt='{html.escape(key)}'>"
    else:
        why = ("shard not in the curation's list" if url is None else "no index" if found is None
               else found.why if found.key in (None, key) else "the shard changed since curation")
        image = f"<div class='noimg'>{html.escape(why)}</div>"
    caption = row.get("caption")
    detail = row.get("detail")
    return (f"<div class='card {kind}'>{image}<div class='key'>{html.escape(key)} · {html.escape(shard)} "
            f"#{_count(index)}</div><div class='caption'>"
            f"{html.escape(str(caption)) if caption is not None else '<i>no caption</i>'}</div>"
            f"<div class='meta'>score {_score(row.get('score'))}"
            f"{' · ' + html.escape(str(detail)) if detail else ''}</div></div>")
