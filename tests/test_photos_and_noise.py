"""`clipx prep photos` (data_prep/photos.py) and the curation benchmark's planted noise (bench/curation_noise.py)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.curation_noise import main as noise_main
from bench.curation_noise import plant_noise
from clipx.errors import ClipxError
from clipx.templates import load_templates
from data_prep import prep_digits
from data_prep.photos import PHOTOS, crop_boxes, crop_image, prep_photos, split_regions
from tests.conftest import clipx_in_process


def read_pool(folder: Path) -> list[tuple[str, dict]]:
    """Every sample of a shard folder in shard order as (key, {"jpg", "txt", "json"}), checking sizes.json."""
    sizes = json.loads((folder / "sizes.json").read_text())
    assert sorted(sizes) == sorted(p.name for p in folder.glob("*.tar"))
    samples = []
    for name in sorted(sizes):
        members: dict[str, dict] = {}
        with tarfile.open(folder / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        assert len(members) == sizes[name]
        for key, files in members.items():
            assert set(files) == {"jpg", "txt", "json"}
            samples.append((key, {"jpg": files["jpg"], "txt": files["txt"].decode(), "json": json.loads(files["json"])}))
    return samples


def small_grey(jpg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("L").resize((8, 8), Image.Resampling.BILINEAR), dtype=float)


# --- photos ---------------------------------------------------------------------------------------


def test_split_regions_cut_one_side():
    assert split_regions(100, 50, "right") == ((0, 0, 70, 50), (70, 0, 100, 50))
    assert split_regions(451, 300, "right") == ((0, 0, 316, 300), (316, 0, 451, 300))
    assert split_regions(512, 512, "bottom") == ((0, 0, 512, 358), (0, 358, 512, 512))
    with pytest.raises(ValueError):
        split_regions(10, 10, "left")


def test_crops_hold_only_their_regions_pixels():
    # Black where the train part is, white in the test strip: a crop that reached across the cut, or
    # a resize whose filter read past the crop's edge, would hold a grey value.
    photo = np.zeros((120, 200, 3), np.uint8)
    photo[:, 140:] = 255
    image = Image.fromarray(photo)
    train, test = split_regions(200, 120, "right")
    rng = np.random.default_rng(0)
    for region, colour in ((train, 0), (test, 255)):
        boxes = crop_boxes(region, 120, 300, rng)
        for box in boxes:
            crop = crop_image(image, box, 16)
            assert crop.shape == (16, 16, 3) and set(np.unique(crop).tolist()) == {colour}, box
        sides = [np.sqrt((r - x) * (b - y)) for x, y, r, b in boxes]
        aspects = [(r - x) / (b - y) for x, y, r, b in boxes]
        # 20%..60% of the short side (120 px): 24..72 px, less where the 60 px strip caps it.
        assert 23 <= min(sides) and max(sides) <= 72.5 and max(sides) > (55 if colour == 255 else 60)
        assert 0.72 <= min(aspects) and max(aspects) <= 1.38


def test_photo_templates_name_each_photo():
    classnames, templates = load_templates("photos")
    assert len(classnames) == len(PHOTOS) == 23 and len(templates) >= 8
    named = dict(zip((name for name, _ in PHOTOS), classnames))
    assert named["chelsea"] == "cat" and named["camera"] == "cameraman" and named["brick"] == "brick wall"
    assert named["china"] == "pagoda" and named["flower"] == "flower" and named["astronaut"] == "astronaut"
    assert "a photo of a {}." in templates and "a close-up of the {}." in templates


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    result = clipx_in_process("prep", "photos", "--out", out, "--image-size", 16, "--train-per-class", 3,
                              "--test-per-class", 2, "--workers", 0, "--shard-size", 20, check=True)
    assert "train: Wrote 69 samples to 4 shard(s)" in result.stdout and "test: Wrote 46 samples" in result.stdout
    return out


def test_prep_photos_writes_every_class_with_template_captions(photos_dir):
    classnames, templates = load_templates("photos")
    for split, per_class in (("train", 3), ("test", 2)):
        samples = read_pool(photos_dir / split)
        labels = Counter(s["json"]["label"] for _, s in samples)
        assert labels == {label: per_class for label in range(23)}
        for _, sample in samples:
            meta = sample["json"]
            assert meta["classname"] == classnames[meta["label"]] and meta["source"] == PHOTOS[meta["label"]][0]
            assert sample["txt"] in {t.format(meta["classname"]) for t in templates}
            assert Image.open(io.BytesIO(sample["jpg"])).size == (16, 16)
        # Shuffled: a shard holds several classes, not one photo's crops after another.
        assert len({s["json"]["label"] for _, s in samples[:20]}) > 5


def test_prep_photos_train_and_test_crops_never_overlap(photos_dir):
    boxes: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    for split in boxes:
        for _, sample in read_pool(photos_dir / split):
            boxes[split].setdefault(sample["json"]["source"], []).append(sample["json"]["box"])
    for source, test_boxes in boxes["test"].items():
        for left, top, right, bottom in test_boxes:
            for x0, y0, x1, y1 in boxes["train"][source]:
                assert right <= x0 or x1 <= left or bottom <= y0 or y1 <= top, source
    # The cuts themselves (the cat is 451 x 300, its strip on the right; the astronaut 512 square, at the bottom).
    assert all(box[0] >= 316 for box in boxes["test"]["chelsea"]) and all(b[2] <= 316 for b in boxes["train"]["chelsea"])
    assert all(box[1] >= 358 for box in boxes["test"]["astronaut"])
    assert all(b[3] <= 358 for b in boxes["train"]["astronaut"])


def test_prep_photos_same_seed_same_shards(photos_dir, tmp_path):
    prep_photos(tmp_path, image_size=16, train_per_class=3, test_per_class=2, workers=0, shard_size=20)
    for split in ("train", "test"):
        for shard in (photos_dir / split).glob("*.tar"):
            assert (tmp_path / split / shard.name).read_bytes() == shard.read_bytes()


def test_prep_photos_without_scikit_image_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage.data` raise ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    result = clipx_in_process("prep", "photos", "--out", tmp_path, "--workers", 0)
    assert result.returncode == 2 and "pip install scikit-image" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(ClipxError, match="train_per_class"):
        prep_photos(tmp_path, train_per_class=0)


# --- planted noise --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> dict:
    """Digits 0-4 (721 train samples, 16 px, shards of 100), their noisy pool at seed 0, and the originals."""
    root = tmp_path_factory.mktemp("noise")
    prep_digits(root / "clean", image_size=16, shard_size=100, workers=0, classes=range(5))
    summary = plant_noise(root / "clean", root / "pool", swap_fraction=0.4, duplicate_fraction=0.2, seed=0)
    return {"root": root, "summary": summary, "originals": read_pool(root / "clean" / "train"),
            "pool": read_pool(root / "pool"), "truth": json.loads((root / "pool" / "truth.json").read_text())}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_swapped_captions_are_exactly_the_fraction_and_name_another_class(noisy):
    classnames, _ = load_templates("digits")
    originals = {digest(s["jpg"]): s for _, s in noisy["originals"]}
    assert len(originals) == len(noisy["originals"]) == 721  # hand-checked count; no two images alike
    kept = [(key, s) for key, s in noisy["pool"] if digest(s["jpg"]) in originals]
    assert len(kept) == 721  # every original once, its image bytes untouched
    swapped = 0
    for key, sample in kept:
        original = originals[digest(sample["jpg"])]
        label = original["json"]["label"]
        assert sample["json"]["label"] == label and noisy["truth"][key]["label"] == label
        named = [i for i, name in enumerate(classnames) if re.search(rf"\b{name}\b", sample["txt"])]
        assert named == [noisy["truth"][key]["caption_label"]] == [sample["json"]["caption_label"]]
        if sample["txt"] != original["txt"]:
            swapped += 1
            assert named[0] != label and noisy["truth"][key]["swapped"]
        else:
            assert named[0] == label and not noisy["truth"][key]["swapped"]
        assert "source_index" not in sample["json"]
    assert swapped == round(0.4 * 721) == 288 == noisy["summary"]["swapped"]
    # A permutation: the originals' captions are all there, each as often as before.
    assert Counter(s["txt"] for _, s in kept) == Counter(s["txt"] for _, s in noisy["originals"])


def test_duplicates_are_the_fraction_and_close_to_their_source_only(noisy):
    by_key = dict(noisy["pool"])
    duplicates = {k: t["duplicate_of"] for k, t in noisy["truth"].items() if t["duplicate_of"] is not None}
    assert len(duplicates) == round(0.2 * 721 / 0.8) == 180 and len(by_key) == 721 + 180
    original_bytes = {digest(s["jpg"]) for _, s in noisy["originals"]}
    originals = [k for k in by_key if k not in duplicates]
    pixels = np.stack([small_grey(by_key[k]["jpg"]) for k in originals]).reshape(len(originals), -1)
    typical = np.median(np.abs(pixels[:200, None] - pixels[None, :200]).mean(axis=-1))  # about 49 grey levels
    distances, closer = [], []
    for key, source in duplicates.items():
        dup, src = by_key[key], by_key[source]
        assert noisy["truth"][source]["duplicate_of"] is None and digest(dup["jpg"]) not in original_bytes
        assert dup["txt"] == src["txt"] and dup["json"]["label"] == src["json"]["label"]
        assert noisy["truth"][key]["swapped"] == noisy["truth"][source]["swapped"]
        distances.append(np.abs(small_grey(dup["jpg"]) - small_grey(src["jpg"])).mean())
        others = np.abs(pixels - small_grey(dup["jpg"]).reshape(1, -1)).mean(axis=1)
        closer.append((others < distances[-1]).mean())
    # On 8 x 8 digits a crop of 80% of the area moves strokes by most of a pixel, so a duplicate is not
    # always its source's nearest neighbour; but every one is nearer its source than 80% of the
    # originals, nine in ten nearer than 98%, and the typical one sits at a third of the usual distance.
    assert max(closer) < 0.2 and np.percentile(closer, 90) < 0.02
    assert np.median(distances) < typical / 3 and max(distances) < typical


def test_pool_is_shuffled_complete_and_sized(noisy):
    keys = [key for key, _ in noisy["pool"]]
    assert len(set(keys)) == len(keys) == len(noisy["truth"]) and set(keys) == set(noisy["truth"])
    assert all(set(t) == {"swapped", "duplicate_of", "label", "caption_label"} for t in noisy["truth"].values())
    assert all(t["swapped"] == (t["label"] != t["caption_label"]) for t in noisy["truth"].values())
    position = {key: i for i, key in enumerate(keys)}
    assert all(abs(position[k] - position[t["duplicate_of"]]) > 1
               for k, t in noisy["truth"].items() if t["duplicate_of"] is not None)
    clean_order = [digest(s["jpg"]) for _, s in noisy["originals"]]
    pool_order = [d for d in (digest(s["jpg"]) for _, s in noisy["pool"]) if d in set(clean_order)]
    assert sorted(pool_order) == sorted(clean_order) and pool_order[:50] != clean_order[:50]
    sizes = json.loads((noisy["root"] / "pool" / "sizes.json").read_text())
    assert list(sizes.values()) == [100] * 9 + [1]  # the input's shard size; read_pool counted each shard


def test_same_seed_same_pool_and_another_seed_another(noisy):
    root = noisy["root"]
    assert noise_main(["--clean", str(root / "clean"), "--out", str(root / "again"), "--seed", "0"]) == 0
    for path in (root / "pool").iterdir():
        assert (root / "again" / path.name).read_bytes() == path.read_bytes(), path.name
    plant_noise(root / "clean", root / "other", seed=1)
    assert (root / "other" / "truth.json").read_bytes() != (root / "pool" / "truth.json").read_bytes()


def test_swaps_need_two_classes(tmp_path):
    prep_digits(tmp_path / "clean", image_size=8, workers=0, classes=[3])
    with pytest.raises(ClipxError, match="another class"):
        plant_noise(tmp_path / "clean", tmp_path / "pool", swap_fraction=0.4)
    with pytest.raises(ClipxError, match="replace them"):
        plant_noise(tmp_path / "clean", tmp_path / "clean" / "train")
