"""A noisy pool for the curation benchmark: clean shards with planted caption swaps and near-duplicates.

    .venv/bin/python -m bench.curation_noise --clean runs/digits --out runs/bench/noisy-digits

``plant_noise`` reads the train shards of a prepared folder (``clipx prep digits|photos``) and writes
a pool in which a known share of the samples is wrong in one of the two ways curation filters look for:

- swapped captions: ``swap_fraction`` of the original samples carry the caption (the ``.txt`` and the
  caption-derived fields of the ``.json``, such as digits' hard ``negative``) of another chosen sample of
  a different class. The chosen ones exchange captions by a seeded permutation without a fixed class,
  so every swapped caption names a wrong class. The ``.json`` keeps ``label`` = the image's class and
  records the caption's as ``caption_label``;
- near-duplicates: extra samples making up ``duplicate_fraction`` of the final pool, each a lightly
  edited copy of a random original (a crop of 80-95% of its area resized back, and/or a JPEG re-encode
  at quality 60-85, sometimes a slight brightness change) with that original's caption.

Keys are new and the pool shuffled (no duplicate directly beside its source), in shards of the input's
shard size; ``truth.json`` maps each key to ``{"swapped", "duplicate_of", "label", "caption_label"}``,
what the benchmark scores a curation method against. A duplicate of a swapped original is swapped too:
its caption is just as wrong. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipx.errors import ClipxError  # noqa: E402
from clipx.fileio import write_json_atomic  # noqa: E402
from data_prep.writer import SIZES_FILE, ShardWriter  # noqa: E402

TRUTH_FILE = "truth.json"
# .json fields that belong to the caption, not the image: they move with a swapped caption.
CAPTION_FIELDS = ("negative", "negatives", "captions")
# .json fields that name the source image (digits' index, a photo crop's box): dropped, since a
# near-duplicate would otherwise give its source away to any method reading the metadata.
PROVENANCE_FIELDS = ("source_index", "box")
CROP_AREA = (0.80, 0.95)  # a duplicate's crop, as a share of its source's area
JPEG_QUALITY = (60, 85)  # a re-encoded duplicate's JPEG quality
CLEAN_QUALITY = 95  # a duplicate that is only cropped: prep's own quality, data_prep/images.py
BRIGHTNESS = (0.9, 1.1)  # the slight brightness change some duplicates get
BRIGHTNESS_PROB = 0.3


def plant_noise(clean_dir, out_dir, swap_fraction: float = 0.4, duplicate_fraction: float = 0.2,
                seed: int = 0) -> dict:
    """Write the noisy pool and ``truth.json`` under ``out_dir``; return a summary (counts, fractions).

    ``clean_dir``: a prepared folder (its ``train/`` is read) or a folder of shards with sizes.json.
    """
    if not 0.0 <= swap_fraction <= 1.0 or not 0.0 <= duplicate_fraction < 1.0:
        raise ClipxError(f"swap fraction must be in [0, 1] and duplicate fraction in [0, 1), got {swap_fraction} "
                         f"and {duplicate_fraction}")
    shard_dir = _shard_dir(Path(clean_dir))
    if Path(out_dir).resolve() == shard_dir.resolve():
        raise ClipxError(f"--out {out_dir} is the clean shards' folder; writing there would replace them")
    originals, shard_size = read_samples(shard_dir)
    swapped = _swap_captions(originals, round(swap_fraction * len(originals)), np.random.default_rng([seed, 0]))
    # d duplicates make up duplicate_fraction of n + d samples.
    n_dup = round(duplicate_fraction * len(originals) / (1.0 - duplicate_fraction))
    dup_rng = np.random.default_rng([seed, 1])
    sources = [int(i) for i in dup_rng.integers(len(originals), size=n_dup)] if originals else []
    pool = [dict(sample, duplicate_of=None) for sample in swapped]
    pool += [dict(swapped[i], jpg=near_duplicate(swapped[i]["jpg"], dup_rng), duplicate_of=i) for i in sources]
    order = _order(pool, np.random.default_rng([seed, 2]))
    new_key = {old: f"{rank:09d}" for rank, old in enumerate(order)}
    truth = {}
    with ShardWriter(out_dir, shard_size=shard_size) as writer:
        for old in order:
            sample = pool[old]
            key = new_key[old]
            source = sample["duplicate_of"]
            writer.add(key, sample["jpg"], sample["txt"], sample["meta"])
            truth[key] = {"swapped": sample["meta"]["label"] != sample["meta"]["caption_label"],
                          "duplicate_of": None if source is None else new_key[source],
                          "label": sample["meta"]["label"], "caption_label": sample["meta"]["caption_label"]}
    write_json_atomic(Path(out_dir) / TRUTH_FILE, truth)
    n_swapped = sum(s["meta"]["label"] != s["meta"]["caption_label"] for s in swapped)
    return {"originals": len(originals), "swapped": n_swapped, "duplicates": n_dup, "pool": len(pool),
            "shards": len(writer.sizes), "swap_fraction": n_swapped / max(1, len(originals)),
            "duplicate_fraction": n_dup / max(1, len(pool)), "seed": seed, "out_dir": str(out_dir)}


def _shard_dir(clean_dir: Path) -> Path:
    for folder in (clean_dir / "train", clean_dir):
        if (folder / SIZES_FILE).is_file():
            return folder
    raise ClipxError(f"{clean_dir} holds no prepared shards ({clean_dir / 'train' / SIZES_FILE} or "
                     f"{clean_dir / SIZES_FILE}); run `clipx prep digits --out {clean_dir}` first")


def read_samples(shard_dir: Path) -> tuple[list[dict], int]:
    """The samples of the shards listed in ``shard_dir``'s sizes.json, in order, as
    {"jpg": bytes, "txt": str, "meta": dict}, and the shard size (the largest shard's count)."""
    sizes = json.loads((shard_dir / SIZES_FILE).read_text())
    samples: list[dict] = []
    for name in sorted(sizes):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard_dir / name) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member)
                if data is not None:
                    members.setdefault(key, {})[ext] = data.read()
        for key, files in members.items():
            if not {"jpg", "txt", "json"} <= set(files):
                raise ClipxError(f"{shard_dir / name}: sample {key} lacks a .jpg, .txt or .json member; "
                                 "plant noise in shards written by `clipx prep`")
            meta = json.loads(files["json"])
            if not isinstance(meta.get("label"), int):
                raise ClipxError(f"{shard_dir / name}: sample {key} has no integer 'label' in its .json; "
                                 "planting swaps needs each sample's class")
            samples.append({"jpg": files["jpg"], "txt": files["txt"].decode("utf-8"), "meta": meta})
    return samples, max(sizes.values(), default=1)


def _swap_captions(originals: list[dict], n_swap: int, rng: np.random.Generator) -> list[dict]:
    """The originals with ``n_swap`` of them (drawn with ``rng``) holding another class's caption.

    The chosen samples, grouped by class in a random order (groups and members both shuffled), hand
    their captions on by a cyclic shift at least as long as the largest group: a sample and the one
    whose caption it takes are then never of one class, and every chosen caption is used once.
    """
    chosen = [int(i) for i in rng.choice(len(originals), size=n_swap, replace=False)]
    labels = {i: originals[i]["meta"]["label"] for i in chosen}
    class_order = {c: r for r, c in enumerate(rng.permutation(sorted(set(labels.values()))).tolist())}
    rng.shuffle(chosen)
    chosen.sort(key=lambda i: class_order[labels[i]])  # stable: members stay shuffled within a group
    largest = max(np.bincount(list(class_order[c] for c in labels.values())), default=0)
    if n_swap and 2 * largest > n_swap:
        raise ClipxError(f"cannot swap {n_swap} captions so that each names another class: one class holds "
                         f"{largest} of them; lower --swap-fraction or use data with more classes")
    shift = int(rng.integers(largest, n_swap - largest + 1)) if n_swap else 0
    out = [_with_caption(sample, sample) for sample in originals]
    for position, index in enumerate(chosen):
        out[index] = _with_caption(originals[index], originals[chosen[(position + shift) % n_swap]])
    return out


def _with_caption(image: dict, caption: dict) -> dict:
    """``image``'s pixels and image fields with ``caption``'s text, caption fields and class."""
    meta = {k: v for k, v in image["meta"].items() if k not in CAPTION_FIELDS and k not in PROVENANCE_FIELDS}
    meta.update({k: v for k, v in caption["meta"].items() if k in CAPTION_FIELDS})
    meta["caption_label"] = caption["meta"]["label"]
    return {"jpg": image["jpg"], "txt": caption["txt"], "meta": meta}


def near_duplicate(jpg: bytes, rng: np.random.Generator) -> bytes:
    """A near-duplicate of the JPEG ``jpg`` at its size: a crop of CROP_AREA of its area resized back,
    a re-encode at a JPEG_QUALITY, or both; with probability BRIGHTNESS_PROB a brightness change too."""
    from PIL import Image, ImageEnhance

    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    edit = rng.choice(("crop", "reencode", "both"))
    if edit != "reencode":
        scale = float(np.sqrt(rng.uniform(*CROP_AREA)))  # the same share of each side keeps the aspect
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        left, top = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
        image = image.crop((left, top, left + w, top + h)).resize(image.size, Image.Resampling.BICUBIC)
    if rng.random() < BRIGHTNESS_PROB:
        image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(*BRIGHTNESS)))
    quality = CLEAN_QUALITY if edit == "crop" else int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _order(pool: list[dict], rng: np.random.Generator, tries: int = 100) -> list[int]:
    """A shuffled order of the pool in which no duplicate sits directly beside its source (the last
    of ``tries`` shuffles if none manages that, as in a pool too small for it)."""
    order: list[int] = []
    for _ in range(tries):
        order = [int(i) for i in rng.permutation(len(pool))]
        place = {index: rank for rank, index in enumerate(order)}
        if all(abs(place[i] - place[s["duplicate_of"]]) > 1 for i, s in enumerate(pool)
               if s["duplicate_of"] is not None):
            break
    return order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", required=True, help="a prepared folder (its train/ is read) or a shard folder")
    parser.add_argument("--out", required=True, help="folder for the noisy pool's shards, sizes.json and truth.json")
    parser.add_argument("--swap-fraction", type=float, default=0.4, help="share of the originals with a wrong caption")
    parser.add_argument("--duplicate-fraction", type=float, default=0.2,
                        help="share of the final pool that are near-duplicates of originals")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        summary = plant_noise(args.clean, args.out, args.swap_fraction, args.duplicate_fraction, args.seed)
    except ClipxError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
