"""`clipx curate`: scoring shards into a curation folder (resumable, any number of processes, remote
shards), the stages' bookkeeping on a hand-made pool, applying the result, and decontamination on a
case built for it. The algorithms themselves are tested on hand-made arrays in test_curation_stages.py;
the scorer is loaded as distillation's teacher is, whose three layouts test_distill.py checks."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipx.apps.curate import MANIFEST, SCORES, score_shards
from clipx.apps.curate_stages import apply, run_balance, run_decontaminate, run_dedup, run_filter
from clipx.data.remote import RemoteOptions
from clipx.errors import ClipxError
from tests.conftest import clipx_in_process

SHARDS = "shard-{000000..000002}.tar"  # three of the digits' six training shards: 768 samples


def shards(digits_dir: Path) -> str:
    return str(digits_dir / "train" / SHARDS)


@pytest.fixture(scope="module")
def scored(digits_dir, tmp_path_factory) -> Path:
    """Three digits training shards scored by the seeded tiny teacher, with embeddings, in one process."""
    cur = tmp_path_factory.mktemp("curate") / "cur"
    score_shards(shards(digits_dir), str(digits_dir / "teacher"), cur, embeddings=True, batch_size=100)
    return cur


def tables(cur: Path) -> dict[str, pa.Table]:
    return {path.name: pq.read_table(path) for path in sorted((cur / SCORES).glob("*.parquet"))}


def test_two_processes_score_what_one_does_and_a_rerun_resumes(scored, digits_dir, tmp_path):
    two = tmp_path / "two"
    clipx_in_process("curate", "score", "--shards", shards(digits_dir), "--model", digits_dir / "teacher", "--out",
                     two, "--embeddings", "--batch-size", 100, "--processes", 2, check=True)
    one = tables(scored)
    assert len(one) == 3 and tables(two).keys() == one.keys()
    for name, table in tables(two).items():
        assert table.equals(one[name]), name  # scores and embeddings bitwise
    first = one["shard-000000.tar.parquet"]
    assert first.column("index").to_pylist() == list(range(first.num_rows))
    assert np.isfinite(first.column("score").to_numpy()).all()

    (two / SCORES / "shard-000001.tar.parquet").unlink()  # an interrupted run: one table never written
    summary = score_shards(shards(digits_dir), str(digits_dir / "teacher"), two, embeddings=True, batch_size=100)
    assert (summary["already_scored"], summary["scored_now"]) == (2, 1)
    assert tables(two)["shard-000001.tar.parquet"].equals(one["shard-000001.tar.parquet"])
    refused = clipx_in_process("curate", "score", "--shards", shards(digits_dir), "--model", digits_dir / "teacher",
                               "--out", two)  # without --embeddings: not how the folder was scored
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "resume with the same" in refused.stderr


def test_ranks_a_launcher_started_score_their_share_of_the_shards(scored, digits_dir, tmp_path, monkeypatch):
    cur = tmp_path / "ranks"
    for rank in (1, 0):  # srun's variables, as each of two tasks sees them
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        monkeypatch.setenv("SLURM_LOCALID", str(rank))
        monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
        score_shards(shards(digits_dir), str(digits_dir / "teacher"), cur, embeddings=True, batch_size=100)
        if rank == 1:  # the second task alone: every other shard, from the second on
            assert sorted(tables(cur)) == ["shard-000001.tar.parquet"]
    assert all(table.equals(tables(scored)[name]) for name, table in tables(cur).items()) and len(tables(cur)) == 3


def test_remote_shards_score_as_the_local_ones(scored, digits_dir, tmp_path, monkeypatch):
    from tests.netservers import apply_s3_env, s3_server, upload_folder

    apply_s3_env(monkeypatch)
    with s3_server() as endpoint:
        upload_folder(endpoint, "digits", digits_dir / "train", prefix="train")
        score_shards(f"s3://digits/train/{SHARDS}", str(digits_dir / "teacher"), tmp_path / "s3",
                     embeddings=True, batch_size=100, options=RemoteOptions(endpoint_url=endpoint))
    assert tables(tmp_path / "s3").keys() == tables(scored).keys()
    for name, table in tables(tmp_path / "s3").items():
        assert table.equals(tables(scored)[name]), name


# ---- the stages' bookkeeping on a hand-made pool --------------------------------------------------------------

def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_pool(cur: Path, scorer: str, shards: dict[str, dict]) -> None:
    """A curation folder by hand: ``shards`` maps a shard name to its columns (score, caption, sha1, image)."""
    (cur / SCORES).mkdir(parents=True)
    for name, columns in shards.items():
        n = len(columns["score"])
        image = unit(columns["image"]).astype(np.float16)
        text = np.zeros_like(image)
        pq.write_table(pa.table({
            "shard": [name] * n, "index": pa.array(range(n), pa.int32()), "key": [f"{name}-{i}" for i in range(n)],
            "caption": columns["caption"], "sha1": columns["sha1"], "has_image": [True] * n,
            "score": pa.array(columns["score"], pa.float32()),
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1)), image.shape[1]),
            "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(text.reshape(-1)), image.shape[1])}),
            cur / SCORES / f"{name}.parquet")
    (cur / MANIFEST).write_text(json.dumps({"version": 1, "scorer": scorer, "shards": [f"/data/{n}" for n in shards],
                                            "embeddings": True, "stages": []}))


def hand_pool(tmp_path: Path) -> Path:
    """Two shards, 12 samples. Directions: e0..e5 distinct; a.tar-3 is a.tar-1's exact copy (same sha1),
    b.tar-2 a near copy of a.tar-2 (cosine ~0.999); a.tar-5 scores lowest and b.tar-5 NaN (no caption)."""
    eye = np.eye(8)
    image_a = [eye[0], eye[1], eye[2], eye[1], eye[3], eye[4]]
    image_b = [eye[5], eye[6], eye[2] + 0.03 * eye[7], eye[7], eye[0] + eye[7], eye[6] + eye[5]]
    captions = ["a photo of a cat", "a dog", "a cat on a mat", "a dog", "a cat", "a bird"]
    write_pool(tmp_path / "cur", "scorer-x", {
        "a.tar": {"score": [0.9, 0.8, 0.7, 0.8, 0.6, 0.1], "caption": captions,
                  "sha1": ["h0", "h1", "h2", "h1", "h4", "h5"], "image": image_a},
        "b.tar": {"score": [0.9, 0.85, 0.75, 0.65, 0.55, float("nan")], "caption": [*captions[:5], None],
                  "sha1": ["g0", "g1", "g2", "g3", "g4", "g5"], "image": image_b}})
    return tmp_path / "cur"


def removed_keys(cur: Path, stage: str) -> list[str]:
    return sorted(pq.read_table(cur / "stages" / f"{stage}.parquet").column("key").to_pylist())


def test_stages_run_in_order_each_on_what_the_stages_before_it_kept(tmp_path):
    cur = hand_pool(tmp_path)
    report = run_filter(cur, threshold=0.58)
    assert removed_keys(cur, "filter") == ["a.tar-5", "b.tar-4", "b.tar-5"]
    assert report["removed_by_reason"] == {"low_score": 2, "unusable": 1} and report["after"] == 9

    report = run_dedup(cur, exact=True, threshold=0.99, clusters=2)
    removed = removed_keys(cur, "dedup")
    near = [key for key in removed if key != "a.tar-3"]
    assert "a.tar-3" in removed and near in (["a.tar-2"], ["b.tar-2"])  # one of the near pair stays
    assert report["removed_by_reason"] == {"exact_duplicate": 1, "near_duplicate": 1}
    table = pq.read_table(cur / "stages" / "dedup.parquet")
    details = dict(zip(table.column("key").to_pylist(), table.column("detail").to_pylist()))
    assert details["a.tar-3"] == "a.tar-1"
    assert details[near[0]] == ({"a.tar-2", "b.tar-2"} - set(near)).pop()

    report = run_balance(cur, t=2, concepts=str(concepts_file(tmp_path, ["cat", "dog"])), seed=3)
    concepts = dict(zip(report["concepts"]["entries"], report["concepts"]["after"]))
    assert concepts == {"cat": 2, "dog": 2}  # 4 cats and 3 dogs were left, every caption names one
    assert report["removed_by_reason"] == {"balance": 3} and report["concepts"]["before"] == [4, 3]
    counts = pq.read_table(cur / "stages" / "balance.counts.parquet").to_pylist()
    assert counts == [{"entry": "cat", "before": 4, "after": 2}, {"entry": "dog", "before": 3, "after": 2}]

    manifest = json.loads((cur / MANIFEST).read_text())
    assert [s["name"] for s in manifest["stages"]] == ["filter", "dedup", "balance"]
    summary = apply(cur)
    kept = pq.read_table(cur / "keep.parquet").to_pylist()
    gone = set(removed_keys(cur, "filter") + removed_keys(cur, "dedup") + removed_keys(cur, "balance"))
    assert [row["key"] for row in kept] == [f"{s}-{i}" for s in ("a.tar", "b.tar") for i in range(6)
                                            if f"{s}-{i}" not in gone]
    assert summary["kept"] == len(kept) == 12 - len(gone)

    run_filter(cur, top_fraction=0.545)  # 6 of the 11 scores; a stage run again forgets the stages after it
    manifest = json.loads((cur / MANIFEST).read_text())
    assert [s["name"] for s in manifest["stages"]] == ["filter"]
    assert not (cur / "stages" / "dedup.parquet").exists()
    assert removed_keys(cur, "filter") == ["a.tar-2", "a.tar-4", "a.tar-5", "b.tar-3", "b.tar-4", "b.tar-5"]


def concepts_file(tmp_path: Path, entries: list[str]) -> Path:
    path = tmp_path / "concepts.txt"
    path.write_text("\n".join(entries) + "\n")
    return path


def test_decontamination_needs_the_same_scorer(tmp_path):
    cur = hand_pool(tmp_path)
    write_pool(tmp_path / "eval", "scorer-y", {"e.tar": {"score": [0.5], "caption": ["x"], "sha1": ["z"],
                                                         "image": [np.eye(8)[3]]}})
    with pytest.raises(ClipxError, match="not comparable"):
        run_decontaminate(cur, tmp_path / "eval")


# ---- decontamination on a case built for it ---------------------------------------------------------------------

def planted_copies(test_shard: Path, out: Path) -> list[str]:
    """A shard of altered copies of ten test images (a re-encode at JPEG quality 60, a brightened
    re-encode, the same bytes), captioned; returns their keys."""
    import tarfile

    from clipx.data.opener import ShardOpener
    from clipx.data.skips import SkipCounter
    from clipx.data.tar_reader import shard_samples

    with ShardOpener().open(str(test_shard)) as stream:
        originals = [sample for _, sample in shard_samples(stream, SkipCounter())][:30:3]
    keys = []
    with tarfile.open(out, "w") as tar:
        for n, sample in enumerate(originals):
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            if n % 3 == 1:
                image = image.point(lambda v: min(255, v + 12))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=60)
            data = sample["jpg"] if n % 3 == 2 else buffer.getvalue()
            key = f"planted-{n:03d}"
            for suffix, body in (("jpg", data), ("txt", sample["txt"])):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
            keys.append(key)
    return keys


def test_decontamination_removes_every_planted_copy_of_a_test_image_and_nothing_else(digits_dir, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(digits_dir / "train", pool)
    planted = planted_copies(digits_dir / "test" / "shard-000000.tar", pool / "shard-000006.tar")
    teacher = str(digits_dir / "teacher")
    for shards, cur in ((pool, "cur"), (digits_dir / "test", "eval")):
        score_shards(str(shards), teacher, tmp_path / cur, embeddings=True, batch_size=200, copy_descriptor="thumbnail")
    report = run_decontaminate(tmp_path / "cur", tmp_path / "eval", threshold=0.997)
    assert removed_keys(tmp_path / "cur", "decontaminate") == planted
    assert report["removed"] == len(planted) == 10 and len(report["pairs"]) == 8


def test_apply_rewrites_exactly_the_kept_samples_member_for_member(scored, digits_dir, tmp_path):
    from clipx.data.opener import ShardOpener
    from clipx.data.skips import SkipCounter
    from clipx.data.tar_reader import shard_samples

    cur = tmp_path / "cur"
    shutil.copytree(scored, cur)
    run_filter(cur, top_fraction=0.5)
    summary = apply(cur, rewrite=tmp_path / "curated")
    kept = pq.read_table(cur / "keep.parquet").to_pylist()
    assert summary["kept"] == len(kept) == 384  # half of the 768 scores
    sizes = json.loads((tmp_path / "curated" / "sizes.json").read_text())
    for name in sorted(sizes):
        with ShardOpener().open(str(digits_dir / "train" / name)) as stream:
            originals = dict(shard_samples(stream, SkipCounter()))
        with ShardOpener().open(str(tmp_path / "curated" / name)) as stream:
            rewritten = [sample for _, sample in shard_samples(stream, SkipCounter())]
        wanted = [row["index"] for row in kept if row["shard"] == name]
        assert sizes[name] == len(rewritten) == len(wanted)
        assert rewritten == [originals[index] for index in wanted], name  # every member, byte for byte, in order
