"""data_prep: shard layout, sizes.json, skips, determinism, and every input format."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipx.errors import ClipxError
from clipx.templates import load_templates
from data_prep import prep_digits, prep_folder, prep_hf
from data_prep.images import encode_image
from data_prep.writer import PrepSummary, ShardWriter


def read_shards(split_dir: Path) -> dict[str, dict[str, bytes]]:
    """All samples in a shard directory, checking sizes.json against the tars on the way."""
    sizes = json.loads((split_dir / "sizes.json").read_text())
    assert sorted(sizes) == sorted(p.name for p in split_dir.glob("*.tar"))
    samples: dict[str, dict[str, bytes]] = {}
    for name, count in sizes.items():
        with tarfile.open(split_dir / name) as tar:
            members = tar.getmembers()
            keys = {m.name.split(".", 1)[0] for m in members}
            assert len(keys) == count
            for m in members:
                key, ext = m.name.split(".", 1)
                assert ext in ("jpg", "txt", "json") and key.isdigit()
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert all(set(s) == {"jpg", "txt", "json"} for s in samples.values())
    return samples


def decode(jpg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpg))
    image.load()
    return image


def test_digits_summaries(tmp_path):
    summaries = prep_digits(tmp_path, image_size=16, shard_size=256, workers=0)
    assert summaries["train"].written == 1437 and summaries["test"].written == 360
    assert summaries["train"].skipped == {} and summaries["train"].shards == 6


def test_digits_split_layout_and_captions(digits_dir):
    classnames, _ = load_templates("digits")
    splits = {s: read_shards(digits_dir / s) for s in ("train", "test")}
    assert len(splits["train"]) == 1437 and len(splits["test"]) == 360
    sources = []
    for samples in splits.values():
        for sample in samples.values():
            meta = json.loads(sample["json"])
            assert set(meta) == {"label", "classname", "source_index", "negative"}
            assert meta["classname"] == classnames[meta["label"]]
            caption = sample["txt"].decode("utf-8")
            assert meta["classname"] in caption
            # The hard negative: the caption's template filled with another digit's name.
            other = [name for name in classnames if caption.replace(meta["classname"], name) == meta["negative"]]
            assert len(other) == 1 and other[0] != meta["classname"], (caption, meta["negative"])
            image = decode(sample["jpg"])
            assert image.size == (32, 32) and image.mode == "RGB"
            sources.append(meta["source_index"])
    assert sorted(sources) == list(range(1797))  # every scan exactly once, no overlap
    test_labels = Counter(json.loads(s["json"])["label"] for s in splits["test"].values())
    assert set(test_labels) == set(range(10)) and max(test_labels.values()) - min(test_labels.values()) <= 2


def test_digits_deterministic_across_runs_and_workers(digits_dir, tmp_path):
    prep_digits(tmp_path, image_size=32, shard_size=256, workers=2)
    for split in ("train", "test"):
        ours = sorted((digits_dir / split).iterdir())
        theirs = sorted((tmp_path / split).iterdir())
        assert [p.name for p in ours] == [p.name for p in theirs]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ours, theirs))


def test_digits_shards_read_with_webdataset(digits_dir):
    wds = pytest.importorskip("webdataset")
    urls = [str(p) for p in sorted((digits_dir / "test").glob("shard-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json"))
    assert len(samples) == 360
    image, text, meta = samples[0]
    assert image.size == (32, 32) and meta["classname"] in text


def _png(size, mode="RGB", color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path) -> tuple[Path, list[dict]]:
    """Four good images, garbage bytes, an HTML page named .jpg, a missing file, an empty caption."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "red.png").write_bytes(_png((40, 20)))
    (images / "sub" / "alpha.png").write_bytes(_png((10, 10), "RGBA", (0, 0, 255, 0)))
    Image.new("L", (300, 500), 90).save(images / "gray.jpg")
    (images / "0001.jpg").write_bytes(_png((64, 64)))
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (images / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    (images / "nocap.png").write_bytes(_png((16, 16)))
    rows = [
        {"image": "red.png", "caption": "a red, wide box", "width": "40"},
        {"image": "sub/alpha.png", "caption": "transparent — ünïcode", "width": "10"},
        {"image": "corrupt.jpg", "caption": "garbage bytes", "width": "0"},
        {"image": "gray.jpg", "caption": "a gray tall image", "width": "300"},
        {"image": "page.jpg", "caption": "an html error page", "width": "0"},
        {"image": "missing.jpg", "caption": "no such file", "width": "0"},
        {"image": "nocap.png", "caption": "", "width": "16"},
        {"image": "0001.jpg", "caption": "NA", "width": "64"},
    ]
    return images, rows


def _write_table(rows: list[dict], path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":  # plain TSV as scraped data sets ship it: no quoting at all
        lines = ["\t".join(frame.columns)] + ["\t".join(r) for r in frame.itertuples(index=False)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame["caption"] = frame["caption"].replace("", None)  # parquet spells "empty" as null
        frame.to_parquet(path)


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_folder_prep_skips_bad_rows(image_folder, tmp_path, ext):
    images, rows = image_folder
    captions = tmp_path / f"captions{ext}"
    _write_table(rows, captions)
    summary = prep_folder(images, captions, tmp_path / "out", image_size=24, shard_size=3, workers=0)
    assert summary.written == 4 and summary.shards == 2
    assert summary.skipped == {"missing_caption": 1, "missing_image": 1, "undecodable_image": 2}
    assert "undecodable_image: 2" in summary.format()
    samples = read_shards(tmp_path / "out")
    assert sorted(samples) == ["000000000", "000000001", "000000003", "000000007"]
    for key, sample in samples.items():
        row = rows[int(key)]
        assert sample["txt"].decode("utf-8") == row["caption"]
        assert json.loads(sample["json"]) == {"image": row["image"], "width": row["width"]}
        assert decode(sample["jpg"]).size == (24, 24)
    assert decode(samples["000000001"]["jpg"]).getpixel((12, 12)) > (240, 240, 240)  # alpha on white


def test_folder_prep_with_workers_matches_in_process(image_folder, tmp_path):
    images, rows = image_folder
    _write_table(rows, tmp_path / "c.csv")
    for workers in (0, 2):
        prep_folder(images, tmp_path / "c.csv", tmp_path / f"w{workers}", image_size=24, workers=workers)
    assert (tmp_path / "w0/shard-000000.tar").read_bytes() == (tmp_path / "w2/shard-000000.tar").read_bytes()


def test_folder_missing_column_and_bad_format(image_folder, tmp_path):
    images, rows = image_folder
    _write_table(rows, tmp_path / "c.csv")
    with pytest.raises(ClipxError, match=r"no column 'text' \(columns: image, caption, width\); pass --caption-column"):
        prep_folder(images, tmp_path / "c.csv", tmp_path / "out", caption_column="text")
    (tmp_path / "c.txt").write_text("image caption\n")
    with pytest.raises(ClipxError, match="unsupported extension '.txt'"):
        prep_folder(images, tmp_path / "c.txt", tmp_path / "out")


def _hf_dataset(n: int = 6):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.Value("int64")})
    data = {
        "image": [Image.new("RGB", (20 + i, 30), (10 * i, 50, 90)) for i in range(n)],
        "text": [f"caption number {i} ✓" for i in range(n)],
        "label": list(range(n)),
    }
    return datasets, datasets.Dataset.from_dict(data, features=features)


def test_hf_prep_round_trip(tmp_path):
    _, dataset = _hf_dataset()
    dataset.save_to_disk(str(tmp_path / "ds"))
    summary = prep_hf(tmp_path / "ds", tmp_path / "out", image_size=16, shard_size=4, workers=0)
    assert summary.written == 6 and summary.shards == 2 and summary.skipped == {}
    samples = read_shards(tmp_path / "out")
    for i, key in enumerate(sorted(samples)):
        assert samples[key]["txt"].decode("utf-8") == dataset[i]["text"]
        assert json.loads(samples[key]["json"]) == {"label": i}
        assert decode(samples[key]["jpg"]).size == (16, 16)


def test_hf_prep_dataset_dict_split_and_errors(tmp_path):
    datasets, dataset = _hf_dataset(3)
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "dd"))
    summary = prep_hf(tmp_path / "dd", tmp_path / "out", split="validation", image_size=8, workers=0)
    assert summary.written == 3
    with pytest.raises(ClipxError, match=r"no split 'train' \(splits: validation\)"):
        prep_hf(tmp_path / "dd", tmp_path / "out")
    with pytest.raises(ClipxError, match=r"no column 'caption' \(columns: image, text, label\)"):
        prep_hf(tmp_path / "dd", tmp_path / "out", split="validation", caption_column="caption")


def test_hf_prep_from_local_files_with_builder(image_folder, tmp_path):
    images, rows = image_folder
    good = [r for r in rows if r["image"] in ("red.png", "gray.jpg")]
    table = tmp_path / "hf.jsonl"
    table.write_text("".join(json.dumps({"image": str(images / r["image"]), "text": r["caption"]}) + "\n"
                             for r in good))
    summary = prep_hf(table, tmp_path / "out", builder="json", image_size=8, workers=0,
                      cache_dir=tmp_path / "cache")
    assert summary.written == 2
    assert sorted(s["txt"].decode() for s in read_shards(tmp_path / "out").values()) == sorted(
        r["caption"] for r in good)


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims another size: only the header is needed to refuse it."""
    data = bytearray(_png((1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_encode_image_inputs_and_refusals(tmp_path):
    jpg = encode_image(_png((7, 3)), 12)  # small images are upscaled
    assert decode(jpg).size == (12, 12)
    (tmp_path / "x.png").write_bytes(_png((50, 80)))
    array = np.zeros((5, 9), dtype=np.uint8)
    for source in (tmp_path / "x.png", str(tmp_path / "x.png"), Image.new("P", (4, 4)), array):
        assert decode(encode_image(source, 10)).size == (10, 10)
    assert encode_image(jpg[: len(jpg) // 2], 12) is None  # truncated
    assert encode_image(b"not an image", 12) is None
    assert encode_image(_png_claiming(100_000, 100_000), 12) is None  # bomb header
    assert encode_image(12345, 12) is None


def test_writer_keys_and_stale_shards(tmp_path):
    (tmp_path / "shard-000007.tar").write_bytes(b"old run")
    (tmp_path / "keep.tar").write_bytes(b"not ours")
    with ShardWriter(tmp_path, shard_size=1) as writer:
        writer.add("000000000", b"jpg", "a", {"x": float("nan")})
        with pytest.raises(ValueError, match="without '.'"):
            writer.add("a.b", b"jpg", "a", {})
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"shard-000000.tar": 1}
    assert not (tmp_path / "shard-000007.tar").exists() and (tmp_path / "keep.tar").exists()
    text = PrepSummary(written=5, skipped={"missing_image": 2}, shards=1, seconds=1.0, out_dir="o").format()
    assert "5 samples" in text and "missing_image: 2" in text


def test_folder_prep_groups_several_captions_per_image(image_folder, tmp_path):
    """Flickr/COCO tables repeat the image once per caption; grouped, each image is one sample."""
    images, _ = image_folder
    rows = [{"image": "red.png", "caption": "a red box"}, {"image": "gray.jpg", "caption": "a gray image"},
            {"image": "red.png", "caption": "something  red"}, {"image": "red.png", "caption": ""}]
    _write_table(rows, tmp_path / "c.csv")
    summary = prep_folder(images, tmp_path / "c.csv", tmp_path / "out", image_size=16, workers=0,
                          group_by_image=True)
    assert summary.written == 2
    captions = sorted(s["txt"].decode() for s in read_shards(tmp_path / "out").values())
    assert captions == ["a gray image", "a red box\nsomething red"]


def test_a_script_without_a_main_guard_gets_an_error_not_a_hang(tmp_path):
    """Spawned prep workers re-run the calling script; without `if __name__ == "__main__":` they die
    at start. A multiprocessing.Pool respawned them forever; the executor reports it."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    script = tmp_path / "prep_script.py"
    script.write_text("from data_prep import prep_digits\n"
                      f"prep_digits({str(tmp_path / 'out')!r}, image_size=16, shard_size=256, workers=2)\n")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0
    assert "a prep worker process died" in result.stderr
