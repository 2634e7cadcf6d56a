"""Training on a keep-list (data.keep, clipx.data.keep): the loader reads exactly the kept samples,
each shard's kept samples renumbered as a view, and every resume path stays exact: the shard
reader's skip counts at any view position, the O(1) resume from saved positions (the unbroken run's
batches and counts), and an epoch finished on another number of processes (every kept sample once).
The resume helpers are tests/test_resume_position.py's; the elastic check follows
tests/test_elastic_resume.py at the stream level."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from bench.hostile_corpus import members_of, write_tar
from bench.resume_time import write_shards
from clipx.config import DataConfig
from clipx.data.batch import ImageTextBatch
from clipx.data.keep import KeepList, shard_name
from clipx.data.opener import ShardOpener, read_shard
from clipx.data.position import Piece
from clipx.data.skips import SkipCounter
from clipx.errors import ClipxError
from clipx.train.stream import TrainStream
from tests.test_resume_position import CountingTransform, same, take

BATCH = 8


def write_keep(path: Path, rows: list[tuple[str, int, str]], **replace) -> Path:
    """A keep.parquet of ``rows`` (shard, index, key) as `clipx curate apply` writes it; ``replace``
    swaps a column for another array, or drops it (None)."""
    columns = {"shard": pa.array([r[0] for r in rows], pa.string()),
               "index": pa.array([r[1] for r in rows], pa.int32()),
               "key": pa.array([r[2] for r in rows], pa.string()), **replace}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({name: column for name, column in columns.items() if column is not None}), path)
    return path


def stream(data: DataConfig, rank: int = 0, world: int = 1, transform=None) -> TrainStream:
    return TrainStream(data, transform or CountingTransform(), BATCH, 5, ImageTextBatch(lambda texts: texts),
                       rank, world)


# ---- KeepList ---------------------------------------------------------------------------------------------

ROWS = [("a.tar", 0, "a0"), ("a.tar", 4, "a4"), ("a.tar", 9, "a9"), ("b.tar", 2, "b2")]


def test_a_keep_list_reads_as_views_of_its_shards(tmp_path):
    keep = KeepList.read(str(write_keep(tmp_path / "cur" / "keep.parquet", ROWS).parent))  # the folder
    view = keep.of("/data/x/a.tar")
    assert view is not None and view.indices.tolist() == [0, 4, 9] and [view.key(v) for v in range(3)] == ["a0", "a4", "a9"]
    assert keep.sizes(["s3://bucket/a.tar", "b.tar", "c.tar"]) == {"s3://bucket/a.tar": 3, "b.tar": 1, "c.tar": 0}
    assert keep.of("c.tar") is None and keep.total(["a.tar", "b.tar"]) == 4
    assert keep.shards(["c.tar", "b.tar", "a.tar"]) == ["b.tar", "a.tar"]  # the shards training deals
    assert shard_name("pipe:aws s3 cp s3://bucket/b.tar -") == "b.tar"
    with pytest.raises(ClipxError, match="keeps no sample of data.train's 1 shards"):
        keep.shards(["c.tar"])


def test_a_remote_keep_list_is_read_through_fsspec(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("memory://curation/keep.parquet", write_keep(tmp_path / "keep.parquet", ROWS).read_bytes())
    try:
        assert KeepList.read("memory://curation").sizes(["a.tar", "b.tar"]) == {"a.tar": 3, "b.tar": 1}
        with pytest.raises(ClipxError, match="^data.keep: cannot read memory://nowhere/keep.parquet"):
            KeepList.read("memory://nowhere/")
    finally:
        fs.rm("memory://curation", recursive=True)


@pytest.mark.parametrize("rows,replace,message", [
    (ROWS, {"key": None}, "has no column.s. key"),
    ([("a.tar", 4, "a4"), ("a.tar", 0, "a0")], {}, "row 1: index 0 of a.tar follows 4 .unsorted or repeated"),
    ([("a.tar", 4, "a4"), ("a.tar", 4, "a4")], {}, "row 1: index 4 of a.tar follows 4"),
    ([("a.tar", 0, "a0"), ("b.tar", 0, "b0"), ("a.tar", 5, "a5")], {}, "lists shard a.tar in two places"),
    (ROWS, {"index": pa.array([0.0, 1.0, 2.0, 3.0])}, "column index is double, not an integer"),
])
def test_a_malformed_keep_list_is_one_line_naming_data_keep(tmp_path, rows, replace, message):
    path = write_keep(tmp_path / "keep.parquet", rows, **replace)
    with pytest.raises(ClipxError, match=f"^data.keep: .*{message}") as error:
        KeepList.read(str(path))
    assert "\n" not in str(error.value)


def test_a_missing_keep_list_is_one_line(tmp_path):
    with pytest.raises(ClipxError, match="^data.keep: folder .* holds no keep.parquet; run `clipx curate apply`"):
        KeepList.read(str(tmp_path))
    with pytest.raises(ClipxError, match="^data.keep: .*nothing.parquet does not exist"):
        KeepList.read(str(tmp_path / "nothing.parquet"))
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ClipxError, match="^data.keep: .*garbage.parquet is not a readable parquet file"):
        KeepList.read(str(tmp_path / "garbage.parquet"))


# ---- the shard reader on a view ------------------------------------------------------------------------

def jpeg(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 255 - shade, shade // 2)).save(out, format="JPEG")
    return out.getvalue()


def sample(key: str, shade: int = 0, image: bool = True) -> dict[str, bytes]:
    return {**({"jpg": jpeg(shade)} if image else {}), "txt": f"a photo of {key}".encode()}


@pytest.fixture()
def damaged_shard(tmp_path) -> tuple[str, KeepList]:
    """s0..s7 with damage around and between the kept samples 0, 2, 3 and 5: s3's caption twice
    (counted: s3 is kept), then a repeat of s1's key (counted; between kept s3 and s5, past s3's end,
    before the dropped s4), s4's image twice (not counted: s4 is not kept), and the shard cut
    inside s7's header (one corrupt_tar, after the last kept sample)."""
    members = []
    for i in range(8):
        members += members_of(f"s{i}", sample(f"s{i}", i))
        if i in (3, 4):
            members.append(members[-1 if i == 3 else -2])
        if i == 3:
            members += members_of("s1", sample("s1"))
    path = tmp_path / "damaged.tar"
    offsets = write_tar(path, members)
    path.write_bytes(path.read_bytes()[:offsets[-2] + 200])
    keep = KeepList.from_table(pa.table({"shard": ["damaged.tar"] * 4, "index": [0, 2, 3, 5],
                                         "key": ["s0", "s2", "s3", "s5"]}))
    return str(path), keep


def read(url: str, keep: KeepList, piece: Piece | None = None, first: int = 0) -> tuple[list, dict[str, int]]:
    counter = SkipCounter()
    out = [(v, s["__key__"]) for v, s in read_shard(ShardOpener(), piece or Piece(url), counter, first, keep)]
    return out, {k: v for k, v in counter.snapshot().items() if v}


def test_a_view_yields_the_kept_samples_and_a_resume_at_any_view_index_counts_as_the_unbroken_read(damaged_shard):
    url, keep = damaged_shard
    counter, unbroken, after = SkipCounter(), [], []
    for v, s in read_shard(ShardOpener(), Piece(url), counter, 0, keep):
        unbroken.append((v, s["__key__"]))
        after.append(counter.snapshot())  # what a position saved right after this sample holds
    assert unbroken == [(0, "s0"), (1, "s2"), (2, "s3"), (3, "s5")]
    total = {k: v for k, v in counter.snapshot().items() if v}
    assert total == {"duplicate_key": 2, "corrupt_tar": 1}
    for f in range(len(unbroken) + 1):
        rest, counts = read(url, keep, first=f)
        assert rest == unbroken[f:], f"resumed at view index {f}"
        before = after[f - 1] if f else {}
        assert {k: before.get(k, 0) + counts.get(k, 0) for k in total} == total, f"resumed at view index {f}"
    # Elastic pieces and a restored shuffle buffer's samples are view numbers too.
    assert read(url, keep, Piece(url, start=1, stop=3))[0] == [(1, "s2"), (2, "s3")]
    assert read(url, keep, Piece(url, wanted=(1, 3))) == ([(1, "s2"), (3, "s5")], {})
    assert read(url, KeepList({}), Piece(url)) == ([], {})  # a shard the list keeps nothing of


def test_a_keep_list_for_other_shards_is_one_line(damaged_shard):
    url, _ = damaged_shard
    other = KeepList.from_table(pa.table({"shard": ["damaged.tar"] * 2, "index": [0, 2], "key": ["s0", "t2"]}))
    message = ("data.keep was written for other shards: {} sample 2 is 's2', the keep-list says 't2'; curate "
               "these shards again").format(url)
    with pytest.raises(ClipxError) as error:
        read(url, other)
    assert str(error.value) == message


# ---- the training stream with data.keep ----------------------------------------------------------------

@pytest.fixture(scope="module")
def kept(tmp_path_factory) -> tuple[str, str, Counter]:
    """9 shards of 96 noise images; the keep-list keeps 64 of each of the first 8 (not every third
    sample) and none of the ninth: (shards, keep.parquet, the kept keys)."""
    folder = tmp_path_factory.mktemp("keep")
    pattern = write_shards(folder / "shards", 864, 96, 16)
    rows = [(f"shard-{s:06d}.tar", i, f"{s:06d}{i:05d}") for s in range(8) for i in range(96) if i % 3 != 1]
    path = write_keep(folder / "cur" / "keep.parquet", rows)
    return pattern, str(path), Counter(key for _, _, key in rows)


def keys_until_next_epoch(new: TrainStream, first_epoch: int, keys: Counter) -> int:
    """Add ``new``'s batches of ``first_epoch`` to ``keys``; returns how many there were."""
    taken = 0
    for epoch, batch in new.batches():
        if epoch != first_epoch:
            break
        keys.update(batch["key"])
        taken += 1
    return taken


def test_an_epoch_reads_exactly_the_kept_samples_once(kept):
    shards, keep, expected = kept
    data = DataConfig(train=shards, keep=keep, workers=2, shuffle_buffer=40)
    run = stream(data, transform=lambda image: torch.zeros(1))
    assert run.num_samples == 512 and run.batches_per_epoch == 64  # 8 x 64 kept, not 9 x 96
    keys: Counter = Counter()
    assert keys_until_next_epoch(run, 0, keys) == 64
    assert keys == expected
    # data.train_num_samples still sets the epoch's length.
    assert stream(DataConfig(train=shards, keep=keep, workers=2, train_num_samples=256)).batches_per_epoch == 32


def test_a_resume_gives_the_unbroken_batches_and_decodes_nothing_before_its_position(kept):
    shards, keep, _ = kept
    data = DataConfig(train=shards, keep=keep, workers=2, shuffle_buffer=40)
    unbroken = stream(data)
    reference = take(unbroken, unbroken.batches(), 64 + 3)
    for cut in (5, 37, 65):
        first = stream(data)
        take(first, first.batches(), cut)
        resumed = stream(data)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert same(take(resumed, resumed.batches(cut), len(reference) - cut), reference[cut:]), f"cut {cut}"
    in_process = DataConfig(train=shards, keep=keep, workers=0, shuffle_buffer=40)
    first = stream(in_process)
    take(first, first.batches(), 62)
    transform = CountingTransform()
    resumed = stream(in_process, transform=transform)
    resumed.load_state_dict(first.state_dict())
    take(resumed, resumed.batches(62), 2)  # the epoch's last two: nothing fetched beyond them
    assert transform.calls == 2 * BATCH


def test_positions_counted_in_one_keep_list_are_refused_under_another(kept, tmp_path):
    shards, keep, expected = kept
    data = DataConfig(train=shards, keep=keep, workers=0, shuffle_buffer=40)
    first = stream(data)
    take(first, first.batches(), 5)
    state = json.loads(json.dumps(first.state_dict()))
    rows = [(f"shard-{s:06d}.tar", i, f"{s:06d}{i:05d}") for s in range(8) for i in range(96) if i % 3 != 2]
    other = DataConfig(train=shards, keep=str(write_keep(tmp_path / "other.parquet", rows)), workers=0,
                       shuffle_buffer=40)
    for load in (lambda run: run.load_state_dict(state), lambda run: run.load_elastic([state])):
        with pytest.raises(ClipxError, match="another keep-list than data.keep=.*other.parquet"):
            load(stream(other))
    with pytest.raises(ClipxError, match="another keep-list"):  # positions over whole shards, then a keep-list
        whole = stream(DataConfig(train=shards, workers=0, shuffle_buffer=40))
        take(whole, whole.batches(), 2)
        stream(data).load_state_dict(whole.state_dict())
    stream(data).load_state_dict(state)  # the same list, read again: accepted


@pytest.mark.parametrize("old_world,new_world,consumed", [(2, 4, 12), (2, 1, 7)])
def test_an_epoch_finished_on_another_world_size_reads_each_kept_sample_once(kept, old_world, new_world, consumed):
    shards, keep, expected = kept
    data = DataConfig(train=shards, keep=keep, workers=2, shuffle_buffer=40)
    keys: Counter = Counter()
    old_states = []
    for rank in range(old_world):
        old = stream(data, rank, old_world, lambda image: torch.zeros(1))
        for _, batch in take_batches(old, consumed):
            keys.update(batch["key"])
        old_states.append(old.state_dict())
    lengths = []
    for rank in range(new_world):
        new = stream(data, rank, new_world, lambda image: torch.zeros(1))
        new.load_elastic(old_states)
        lengths.append(keys_until_next_epoch(new, 0, keys))
    assert keys == expected, "the split epoch lost or repeated kept samples, or read others"
    assert len(set(lengths)) == 1 and lengths[0] > 0


def take_batches(run: TrainStream, n: int) -> list[tuple[int, dict]]:
    batches = run.batches()
    return [next(batches) for _ in range(n)]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[str, str]:
    """4 shards (30, 30, 30 and 32 samples; every fourth not kept): a kept sample without an image and
    a dropped one (shard 0); a repeated key between kept 10 and dropped 11, and a kept and a dropped
    sample with a member twice (shard 1); a cut inside sample 25's header (shard 2). 93 kept, 4 of
    them lost to the cut, 1 without an image: 88 usable, 11 batches."""
    folder = tmp_path_factory.mktemp("hostile-keep")
    rows = []
    for s, count in enumerate((30, 30, 30, 32)):
        members = []
        for i in range(count):
            key = f"h{s}-{i:03d}"
            members += members_of(key, sample(key, 8 * i, image=not (s == 0 and i in (5, 7))))
            if s == 1 and i == 10:  # between kept 10 and 12, before the dropped 11
                members += members_of("h1-002", sample("h1-002"))
            if s == 1 and i in (12, 15):
                members.append(members[-2])  # its image again
            if i % 4 != 3:
                rows.append((f"shard-{s}.tar", i, key))
        path = folder / f"shard-{s}.tar"
        offsets = write_tar(path, members)
        if s == 2:
            path.write_bytes(path.read_bytes()[:offsets[2 * 25] + 200])
    return str(folder), str(write_keep(folder / "keep.parquet", rows))


def test_a_resume_anywhere_in_damaged_kept_data_keeps_the_epoch_counts_exact(hostile):
    shards, keep = hostile
    data = DataConfig(train=shards, keep=keep, train_num_samples=88, workers=0, shuffle_buffer=16)
    unbroken = stream(data)
    per_epoch = unbroken.batches_per_epoch
    reference = take(unbroken, unbroken.batches(), per_epoch + 1)
    counts = unbroken.take_finished()
    assert per_epoch == 11 and sorted(k for _, keys, _ in reference[:per_epoch] for k in keys) == sorted(
        f"h{s}-{i:03d}" for s, n in enumerate((30, 30, 25, 32)) for i in range(n)
        if i % 4 != 3 and (s, i) != (0, 5))
    # Only kept samples count: h0-007 has no image and h1-015 a member twice, but neither is kept.
    assert {k: v for k, v in counts[0][1].items() if v} == {"missing_image": 1, "duplicate_key": 2,
                                                            "corrupt_tar": 1, "used": 88}
    for cut in range(1, per_epoch):
        first = stream(data)
        take(first, first.batches(), cut)
        resumed = stream(data)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert same(take(resumed, resumed.batches(cut), per_epoch + 1 - cut), reference[cut:]), f"cut {cut}"
        assert resumed.take_finished() == counts, f"cut {cut}"


def test_training_on_a_keep_list_for_other_shards_stops_with_one_line(hostile, tmp_path):
    shards, _ = hostile
    other = write_keep(tmp_path / "keep.parquet", [("shard-3.tar", 0, "h3-000"), ("shard-3.tar", 1, "x3-001")])
    run = stream(DataConfig(train=shards, keep=str(other), workers=0, shuffle_buffer=1, train_num_samples=8),
                 transform=lambda image: torch.zeros(1))
    with pytest.raises(ClipxError, match=r"^data.keep was written for other shards: .*shard-3.tar sample 1 is "
                                         r"'h3-001', the keep-list says 'x3-001'; curate these shards again$"):
        next(run.batches())
    none = write_keep(tmp_path / "none.parquet", [("shard-9.tar", 0, "h9-000")])
    with pytest.raises(ClipxError, match="^data.keep .* keeps no sample of data.train's 4 shards"):
        stream(DataConfig(train=shards, keep=str(none), workers=0))


def test_a_bad_keep_list_is_refused_before_launch(kept, tmp_path):
    from clipx.config import load_config
    from clipx.train.build import check_inputs

    shards, keep, _ = kept
    check_inputs(load_config(None, [f"data.train={shards}", f"data.keep={keep}"]))  # a good one passes
    with pytest.raises(ClipxError, match="data.keep: .*missing.parquet does not exist"):
        check_inputs(load_config(None, [f"data.train={shards}", f"data.keep={tmp_path / 'missing.parquet'}"]))
    other = write_keep(tmp_path / "other.parquet", [("elsewhere-000000.tar", 0, "x")])
    with pytest.raises(ClipxError, match="keeps no sample of data.train"):
        check_inputs(load_config(None, [f"data.train={shards}", f"data.keep={other}"]))
