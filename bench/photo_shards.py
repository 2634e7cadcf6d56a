"""Shards that look like img2dataset's output for a GPU run: photographs as JPEGs of 256 to 640 px
on their short side, in the layout and sizes a 224 px training run reads.

    .venv/bin/python bench/photo_shards.py --out runs/bench/photos --samples 4096

The pixels come from the two photographs scikit-learn ships (``china.jpg``, ``flower.jpg``, 427 x
640 each): every sample is a random crop of one of them, scaled so that its short side is drawn
uniformly from 256 to 640 px, at an aspect ratio drawn from 1:1 to 16:9 (landscape or portrait),
re-encoded at JPEG quality 90 as img2dataset's ``--resize_mode keep_ratio`` leaves them. The images
then have a photograph's content and file sizes (tens of KB), not the flat colours of synthetic ones,
which decode several times faster than real data; but most are enlarged from the 427 x 640 sources,
so they hold less fine detail than camera photographs of their size (which favours a reduced JPEG
decode a little: tests/test_crops.py measures its effect on these). Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHORT_SIDES = (256, 640)
SHARD_SIZE = 256
CAPTIONS = ("a photo of a pagoda among trees", "a photo of a flower in bloom")


def source_photos():
    """The packaged photographs as RGB PIL images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(array) for array in load_sample_images().images]


def photo_jpeg(photo, rng: random.Random) -> bytes:
    """One sample: a random crop of ``photo`` resized to a random short side, JPEG quality 90."""
    from PIL import Image

    short = rng.randint(*SHORT_SIDES)
    aspect = rng.uniform(1.0, 16 / 9)
    long = round(short * aspect)
    width, height = (long, short) if rng.random() < 0.7 else (short, long)
    # A crop of the photo with the target's aspect ratio, at least half its shorter side.
    w_src, h_src = photo.size
    scale = rng.uniform(0.5, 1.0) * min(w_src / width, h_src / height)
    cw, ch = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = rng.randint(0, w_src - cw), rng.randint(0, h_src - ch)
    image = photo.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_photo_shards(out: Path, samples: int, seed: int = 0) -> Path:
    """``samples`` photo-caption pairs in shards of 256 with a sizes.json under ``out`` (reused when
    it is complete); returns ``out``."""
    from data_prep.writer import ShardWriter

    out = Path(out)
    if (out / "sizes.json").is_file() and sum(1 for _ in out.glob("shard-*.tar")) * SHARD_SIZE >= samples:
        return out
    rng = random.Random(seed)
    photos = source_photos()
    with ShardWriter(out, shard_size=SHARD_SIZE) as writer:
        for index in range(samples):
            which = rng.randrange(len(photos))
            writer.add(f"{index:09d}", photo_jpeg(photos[which], rng), CAPTIONS[which], {"source": which})
    return out


def shard_pattern(folder: Path) -> str:
    """The brace pattern naming every shard in ``folder``."""
    count = len(list(Path(folder).glob("shard-*.tar")))
    return str(Path(folder) / f"shard-{{000000..{count - 1:06d}}}.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = write_photo_shards(args.out, args.samples, args.seed)
    print(shard_pattern(folder))


if __name__ == "__main__":
    main()
