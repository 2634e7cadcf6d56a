"""`clipx curate filter|dedup|balance|decontaminate|apply`: the stages, on a scored curation folder.

Each stage loads the pool (``curate_pool.load_pool``), takes the samples the stages before it kept,
decides with the in-memory algorithms of ``clipx.curation`` and records what it removed and why
(``curate_pool.record_stage``). ``apply`` turns the survivors into the loader's keep-list
(``keep.parquet``, ``data.keep``) and, if asked, into shards of their own.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from clipx.apps.curate import read_manifest, shard_name
from clipx.apps.curate_pool import Pool, StageResult, alive, load_pool, record_stage, stages_before, write_keep_list
from clipx.data.keep import KEEP_FILE
from clipx.errors import ClipxError
from clipx.fileio import write_json_atomic


def _seen(cur: Path, name: str, embeddings: bool = False) -> tuple[Pool, np.ndarray]:
    pool = load_pool(cur, embeddings)
    return pool, np.flatnonzero(alive(cur, pool, stages_before(read_manifest(cur), name)))


def run_filter(cur: str | Path, threshold: float | str | None = None, top_fraction: float | None = None,
               target: str | Path | None = None, clusters: int = 100, nearest: int = 1, seed: int = 0) -> dict:
    """DataComp's filters: keep samples whose score is at least ``threshold`` (a number, or "auto":
    Otsu's split of the scores) or the ``top_fraction`` best; with ``target`` (a curation folder of
    the target task's images, scored with --embeddings by the same scorer), also only samples whose
    image falls in a k-means cluster (of ``clusters``) that a target image is nearest to."""
    from clipx.curation.filtering import image_based_filter, keep_above, keep_top_fraction, otsu_threshold

    if threshold is not None and top_fraction is not None:
        raise ClipxError("filter: give --threshold or --top-fraction, not both")
    if threshold is None and top_fraction is None and target is None:
        raise ClipxError("filter: give --threshold (a number or auto) or --top-fraction, and/or --target")
    cur = Path(cur)
    pool, seen = _seen(cur, "filter", embeddings=target is not None)
    scores = pool.score[seen]
    keep = np.isfinite(scores)
    reason = np.where(keep, "low_score", "unusable").astype(object)
    extras: dict = {}
    if threshold == "auto":
        threshold = otsu_threshold(scores)
    if threshold is not None:
        keep &= keep_above(scores, float(threshold))
        extras["threshold"] = float(threshold)
    elif top_fraction is not None:
        keep &= keep_top_fraction(scores, top_fraction)
        extras["threshold"] = float(np.nanmin(scores[keep])) if keep.any() else None
    if target is not None:
        _, targets = _target_images(cur, Path(target), "filter --target")
        in_cluster = image_based_filter(pool.images("filter --target")[seen], targets, clusters, seed, nearest)
        reason[keep & ~in_cluster] = "image_cluster"
        keep &= in_cluster
    args = {"threshold": threshold, "top_fraction": top_fraction, "target": str(target) if target else None,
            "clusters": clusters if target else None, "nearest": nearest if target else None, "seed": seed}
    return record_stage(cur, pool, "filter", args, StageResult(seen, ~keep, list(reason), [""] * len(seen), extras))


def run_dedup(cur: str | Path, exact: bool = True, threshold: float | None = 0.95, clusters: int | None = None,
              seed: int = 0) -> dict:
    """Duplicates out: images with the same bytes (``exact``; the first one kept), then SemDeDup's
    near-duplicates (image embeddings within ``threshold`` cosine, found inside k-means clusters;
    ``clusters`` default: one per 1,000 samples)."""
    from clipx.curation.dedup import exact_duplicates, semantic_duplicates

    if not exact and threshold is None:
        raise ClipxError("dedup: nothing to do; leave --exact on or give --threshold")
    cur = Path(cur)
    pool, seen = _seen(cur, "dedup", embeddings=threshold is not None)
    removed = np.zeros(len(seen), dtype=bool)
    reason, detail = [""] * len(seen), [""] * len(seen)
    pairs: list = []
    if exact:
        keep, of = exact_duplicates([pool.sha1[i] for i in seen])
        gone = np.flatnonzero(~keep)
        _mark(pool, seen, removed, reason, detail, pairs, gone, of[gone], "exact_duplicate")
    if threshold is not None:
        rest = np.flatnonzero(~removed)
        k = clusters or max(1, len(rest) // 1000)
        keep, of = semantic_duplicates(pool.descriptors("dedup --threshold")[seen[rest]], threshold, k, seed)
        gone = np.flatnonzero(~keep)
        _mark(pool, seen, removed, reason, detail, pairs, rest[gone], rest[of[gone]], "near_duplicate")
    args = {"exact": exact, "threshold": threshold, "clusters": clusters, "seed": seed,
            "descriptor": "copy_embedding" if pool.copy is not None else "image_embedding"}
    return record_stage(cur, pool, "dedup", args, StageResult(seen, removed, reason, detail, {"pairs": pairs[:8]}))


def _mark(pool: Pool, seen, removed, reason, detail, pairs, which, originals, why: str) -> None:
    """Mark ``which`` (positions in ``seen``) removed as duplicates of ``originals`` (positions too,
    one each), the first pairs kept for the report."""
    for position, original in zip(which, originals):
        removed[position] = True
        reason[position] = why
        detail[position] = str(pool.key[seen[original]])
        if len(pairs) < 8:
            pairs.append([pool.row(int(seen[position]), why), pool.row(int(seen[original]))])


def run_balance(cur: str | Path, t: int, concepts: str = "digits,imagenet", seed: int = 0,
                unmatched: str = "drop") -> dict:
    """MetaCLIP's balancing: captions matched against concept entries (``concepts``: a text file, one
    entry per line, or shipped template sets' class names, comma-separated), each entry capped at
    ``t`` samples; a sample is kept with probability 1 - prod(1 - min(1, t / count_entry))."""
    from clipx.curation.balance import balance, default_entries, match_entries, read_entries

    if Path(concepts).is_file():
        entries = read_entries(Path(concepts).read_text(encoding="utf-8"))
    else:
        entries = default_entries(tuple(name.strip() for name in concepts.split(",") if name.strip()))
    cur = Path(cur)
    pool, seen = _seen(cur, "balance")
    matches = match_entries([pool.caption[i] for i in seen], entries)
    result = balance(matches, len(entries), t, seed, unmatched)
    top = np.argsort(-result.counts_before, kind="stable")[:30]
    extras = {"concepts": {"t": t, "entries": [entries[e] for e in top], "before": result.counts_before[top].tolist(),
                           "after": result.counts_after[top].tolist(), "matched_entries": int((result.counts_before > 0).sum()),
                           "capped_entries": int((result.counts_before > t).sum()), "total_entries": len(entries)}}
    reason = ["balance" if len(m) else "unmatched" for m in matches]
    args = {"t": t, "concepts": concepts, "seed": seed, "unmatched": unmatched}
    report = record_stage(cur, pool, "balance", args, StageResult(seen, ~result.keep, reason, [""] * len(seen), extras))
    _write_counts(cur / "stages" / "balance.counts.parquet", entries, result.counts_before, result.counts_after)
    return report


def _write_counts(path: Path, entries: list[str], before: np.ndarray, after: np.ndarray) -> None:
    """Every entry's sample count before and after balancing (the report shows the top ones)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table({"entry": entries, "before": pa.array(before, pa.int64()),
                             "after": pa.array(after, pa.int64())}), tmp)
    tmp.replace(path)


def run_decontaminate(cur: str | Path, against: str | Path, threshold: float = 0.95) -> dict:
    """Drop every sample whose image is a near-duplicate (cosine >= ``threshold``) of an image of
    the evaluation shards scored into curation folder ``against`` (same scorer, --embeddings); the
    stage's table lists the removed keys with the evaluation sample each one matched."""
    from clipx.curation.decontaminate import near_duplicates_of

    cur, against = Path(cur), Path(against)
    pool, seen = _seen(cur, "decontaminate", embeddings=True)
    reference, images = _target_images(cur, against, "decontaminate --against", copies=True)
    hit, nearest, similarity = near_duplicates_of(pool.descriptors("decontaminate")[seen], images, threshold)
    has = np.flatnonzero(reference.has_image)
    detail = [f"{reference.shard[has[n]]}/{reference.key[has[n]]} ({s:.4f})" for n, s in zip(nearest, similarity)]
    pairs = [[pool.row(int(seen[i]), "contaminated"), reference.row(int(has[nearest[i]]))]
             for i in np.flatnonzero(hit)[:8]]
    args = {"against": str(against), "threshold": threshold}
    result = StageResult(seen, hit & pool.has_image[seen], ["contaminated"] * len(seen), detail, {"pairs": pairs})
    return record_stage(cur, pool, "decontaminate", args, result)


def _target_images(cur: Path, other: Path, what: str, copies: bool = False) -> tuple[Pool, torch.Tensor]:
    """(another curation folder's pool, the image embeddings of its samples that have an image, in
    order; ``copies``: the descriptors near-duplicates are found with), checked to come from the same
    models as ``cur``'s."""
    mine, theirs = read_manifest(cur), read_manifest(other)
    names = ("scorer", "copy_descriptor") if copies else ("scorer",)
    if any(mine.get(name) != theirs.get(name) for name in names):
        raise ClipxError(f"{what} {other} was scored by {theirs['scorer']} (copy descriptor "
                         f"{theirs.get('copy_descriptor')}), {cur} by {mine['scorer']} (copy descriptor "
                         f"{mine.get('copy_descriptor')}); their embeddings are not comparable: score both with the "
                         "same --model and --copy-descriptor")
    pool = load_pool(other, embeddings=True)
    matrix = pool.descriptors(f"{what} {other}") if copies else pool.images(f"{what} {other}")
    return pool, matrix[np.flatnonzero(pool.has_image)]


def apply(cur: str | Path, rewrite: str | Path | None = None) -> dict:
    """Write ``keep.parquet`` (the loader's ``data.keep``) from what every stage kept and, with
    ``rewrite``, the kept samples as shards of the same names there, with sizes.json."""
    cur = Path(cur)
    manifest = read_manifest(cur)
    pool = load_pool(cur)
    keep = alive(cur, pool, manifest["stages"])
    write_keep_list(cur, pool, keep, cur / KEEP_FILE)
    summary = {"kept": int(keep.sum()), "total": len(pool), "stages": [s["name"] for s in manifest["stages"]]}
    write_json_atomic(cur / "keep.json", summary)
    if rewrite is not None:
        summary["rewritten"] = rewrite_shards(manifest["shards"], pool, keep, Path(rewrite))
    return summary


def rewrite_shards(urls: list[str], pool: Pool, keep: np.ndarray, out: Path) -> str:
    """The kept samples copied member by member into ``out/<shard name>``, plus sizes.json."""
    from clipx.data.opener import ShardOpener, read_shard
    from clipx.data.position import Piece
    from clipx.data.skips import SkipCounter
    from data_prep.writer import SIZES_FILE, add_member, make_dir

    if any("://" not in url and Path(url).parent.resolve() == out.resolve() for url in urls):
        raise ClipxError(f"--rewrite {out} holds the input shards; write the curated copy to another folder")
    make_dir(out)
    kept: dict[str, list[int]] = {}
    for shard, index in zip(pool.shard[keep], pool.index[keep]):
        kept.setdefault(shard, []).append(int(index))
    opener, sizes = ShardOpener(), {}
    for url in urls:
        name = shard_name(url)
        wanted = tuple(sorted(kept.get(name, [])))
        tmp = out / f".{name}.tmp"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            if wanted:
                for _, sample in read_shard(opener, Piece(url, wanted=wanted), SkipCounter()):
                    for suffix, data in sample.items():
                        if suffix != "__key__":
                            add_member(tar, f"{sample['__key__']}.{suffix}", data)
        os.replace(tmp, out / name)
        sizes[name] = len(wanted)
    write_json_atomic(out / SIZES_FILE, sizes)
    return str(out)
