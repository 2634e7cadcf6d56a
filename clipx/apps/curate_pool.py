"""A curation folder's pool in memory, and the bookkeeping every stage shares.

The pool is every scored sample, in the manifest's shard order and each shard's sample order
(``load_pool``). Stages run in sequence, each on what the stages before it kept (``alive``): a stage
records the rows it removed in ``stages/<name>.parquet`` and its report in ``stages/<name>.json``
(``record_stage``), and the manifest lists the stages in the order they ran. Running a stage again
replaces its record and forgets the stages that ran after it, whose inputs it changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clipx.apps.curate import STAGES, read_manifest, scores_path, write_manifest
from clipx.errors import ClipxError
from clipx.fileio import write_json_atomic

EXAMPLES = 8  # rows of each kind a stage's report shows
BINS = 40


@dataclass
class Pool:
    """Every scored sample of a curation folder; per-sample columns are aligned arrays of length N."""

    shard: np.ndarray  # (N,) str: the shard's basename
    index: np.ndarray  # (N,) int64: the sample's index in its shard
    key: np.ndarray  # (N,) str
    caption: list  # N captions (str or None)
    sha1: list  # N hex digests of the image bytes (str or None)
    has_image: np.ndarray  # (N,) bool
    score: np.ndarray  # (N,) float32, NaN where the image or the caption is missing
    image: torch.Tensor | None  # (N, D) float16 unit image embeddings, or None when not scored with them
    text: torch.Tensor | None  # (N, D) float16
    copy: torch.Tensor | None = None  # (N, D') float16 copy descriptors (--copy-descriptor), or None

    def __len__(self) -> int:
        return len(self.key)

    def row(self, i: int, detail: str = "") -> dict:
        """One sample as a report shows it."""
        score = float(self.score[i])
        return {"shard": str(self.shard[i]), "index": int(self.index[i]), "key": str(self.key[i]),
                "caption": self.caption[i], "score": None if np.isnan(score) else round(score, 5), "detail": detail}

    def images(self, what: str) -> torch.Tensor:
        if self.image is None:
            raise ClipxError(f"{what} needs image embeddings; score the shards again with --embeddings")
        return self.image

    def descriptors(self, what: str) -> torch.Tensor:
        """What near-duplicates are found with: the copy descriptors when scored with
        --copy-descriptor, else the scorer's image embeddings."""
        return self.copy if self.copy is not None else self.images(what)


def load_pool(cur: str | Path, embeddings: bool = False) -> Pool:
    """The pool of curation folder ``cur``; ``embeddings``: also read the embeddings (float16)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cur = Path(cur)
    manifest = read_manifest(cur)
    missing = [url for url in manifest["shards"] if not scores_path(cur, url).is_file()]
    if missing:
        raise ClipxError(f"{cur}: {len(missing)} of {len(manifest['shards'])} shards are not scored yet (first "
                         f"{missing[0]}); run `clipx curate score` again with the same options to finish")
    wanted = ["shard", "index", "key", "caption", "sha1", "has_image", "score"]
    if embeddings and manifest["embeddings"]:
        wanted += ["image_embedding", "text_embedding"]
    if embeddings and manifest.get("copy_descriptor"):
        wanted.append("copy_embedding")
    table = pa.concat_tables([pq.read_table(scores_path(cur, url), columns=wanted) for url in manifest["shards"]])
    columns = {name: table.column(name) for name in wanted}
    return Pool(shard=np.asarray(columns["shard"].to_pylist(), dtype=object),
                index=columns["index"].to_numpy().astype(np.int64),
                key=np.asarray(columns["key"].to_pylist(), dtype=object),
                caption=columns["caption"].to_pylist(), sha1=columns["sha1"].to_pylist(),
                has_image=columns["has_image"].to_numpy(zero_copy_only=False).astype(bool),
                score=columns["score"].to_numpy(zero_copy_only=False).astype(np.float32),
                image=_matrix(columns.get("image_embedding")), text=_matrix(columns.get("text_embedding")),
                copy=_matrix(columns.get("copy_embedding")))


def _matrix(column) -> torch.Tensor | None:
    if column is None:
        return None
    chunks = [chunk for chunk in column.chunks]
    width = column.type.list_size
    values = np.concatenate([c.values.to_numpy(zero_copy_only=False) for c in chunks]) if chunks \
        else np.zeros(0, np.float16)
    return torch.from_numpy(values.astype(np.float16).reshape(-1, width))


def stages_before(manifest: dict, name: str) -> list[dict]:
    """The stages that ran before ``name`` (all of them when ``name`` has not run)."""
    names = [stage["name"] for stage in manifest["stages"]]
    return manifest["stages"][:names.index(name)] if name in names else list(manifest["stages"])


def alive(cur: str | Path, pool: Pool, stages: Sequence[dict]) -> np.ndarray:
    """(N,) bool: the samples none of ``stages`` removed."""
    import pyarrow.parquet as pq

    keep = np.ones(len(pool), dtype=bool)
    position = {(s, int(i)): n for n, (s, i) in enumerate(zip(pool.shard, pool.index))}
    for stage in stages:
        removed = pq.read_table(Path(cur) / STAGES / f"{stage['name']}.parquet", columns=["shard", "index"])
        for shard, index in zip(removed.column("shard").to_pylist(), removed.column("index").to_pylist()):
            keep[position[(shard, index)]] = False
    return keep


@dataclass
class StageResult:
    """What a stage decided about the samples it saw (``seen``: their pool rows)."""

    seen: np.ndarray  # (S,) int64 pool rows
    removed: np.ndarray  # (S,) bool
    reason: list  # S reasons (str, used where removed)
    detail: list  # S details (str)
    extras: dict


def record_stage(cur: str | Path, pool: Pool, name: str, args: dict, result: StageResult) -> dict:
    """Write the stage's removed rows and report, and list it in the manifest after the stages it
    followed (forgetting any that ran after it before). Returns the report."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cur = Path(cur)
    manifest = read_manifest(cur)
    before = stages_before(manifest, name)
    for stale in manifest["stages"][len(before):]:
        for suffix in (".parquet", ".json", ".counts.parquet"):
            (cur / STAGES / f"{stale['name']}{suffix}").unlink(missing_ok=True)
    rows = result.seen[result.removed]
    reasons = [r for r, gone in zip(result.reason, result.removed) if gone]
    details = [d for d, gone in zip(result.detail, result.removed) if gone]
    table = pa.table({"shard": pa.array(pool.shard[rows].tolist(), pa.string()),
                      "index": pa.array(pool.index[rows], pa.int32()),
                      "key": pa.array(pool.key[rows].tolist(), pa.string()),
                      "reason": pa.array(reasons, pa.string()), "score": pa.array(pool.score[rows], pa.float32()),
                      "detail": pa.array(details, pa.string())})
    (cur / STAGES).mkdir(parents=True, exist_ok=True)
    tmp = cur / STAGES / f".{name}.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(cur / STAGES / f"{name}.parquet")
    report = stage_report(pool, name, args, result)
    write_json_atomic(cur / STAGES / f"{name}.json", report)
    entry = {key: report[key] for key in ("name", "args", "before", "removed", "after")}
    write_manifest(cur, {**manifest, "stages": [*before, entry]})
    return report


def stage_report(pool: Pool, name: str, args: dict, result: StageResult) -> dict:
    reasons: dict[str, int] = {}
    for reason, gone in zip(result.reason, result.removed):
        if gone:
            reasons[reason] = reasons.get(reason, 0) + 1
    removed = int(result.removed.sum())
    return {"name": name, "args": args, "before": len(result.seen), "removed": removed,
            "after": len(result.seen) - removed, "removed_by_reason": reasons,
            "histogram": histogram(pool.score[result.seen], result.removed),
            "examples": {"kept": examples(pool, result, kept=True), "removed": examples(pool, result, kept=False)},
            **result.extras}


def histogram(scores: np.ndarray, removed: np.ndarray) -> dict:
    """Score counts in BINS bins over the scores' range, kept and removed apart (NaN left out)."""
    finite = np.isfinite(scores)
    if not finite.any():
        return {"edges": [], "kept": [], "removed": []}
    lo, hi = float(scores[finite].min()), float(scores[finite].max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, BINS + 1)
    kept = np.histogram(scores[finite & ~removed], edges)[0]
    gone = np.histogram(scores[finite & removed], edges)[0]
    return {"edges": [round(float(e), 5) for e in edges], "kept": kept.tolist(), "removed": gone.tolist()}


def examples(pool: Pool, result: StageResult, kept: bool) -> list[dict]:
    """Up to EXAMPLES rows of one side, spread evenly over that side's score order (lowest first)."""
    side = np.flatnonzero(~result.removed if kept else result.removed)
    if not len(side):
        return []
    order = side[np.argsort(np.nan_to_num(pool.score[result.seen[side]], nan=-2.0), kind="stable")]
    picks = order[np.unique(np.linspace(0, len(order) - 1, min(EXAMPLES, len(order))).round().astype(int))]
    return [pool.row(int(result.seen[i]), result.detail[i]) for i in picks]


def write_keep_list(cur: str | Path, pool: Pool, keep: np.ndarray, path: Path) -> None:
    """``path``: the kept samples' shard, index and key, sorted by shard then index (the loader's data.keep)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = np.flatnonzero(keep)
    order = sorted(rows.tolist(), key=lambda n: (pool.shard[n], pool.index[n]))
    table = pa.table({"shard": pa.array(pool.shard[order].tolist(), pa.string()),
                      "index": pa.array(pool.index[order], pa.int32()),
                      "key": pa.array(pool.key[order].tolist(), pa.string())})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


