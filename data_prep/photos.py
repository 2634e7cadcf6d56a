"""The photographs that ship inside scikit-image and scikit-learn as a second offline data set.

Each photograph is one class (names and prompt templates in clipx/templates/photos.yaml, in the
order of PHOTOS). A sample is a random crop of its photo resized to a square: train crops come from
one part of the photo and test crops from a disjoint strip along one side (the last 30% of its width
or height), so zero-shot and probe accuracy on test/ measure how a model generalises to unseen parts
of a scene, not whether it remembers pixels it trained on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from clipx.errors import ClipxError
from clipx.templates import load_templates
from data_prep.pipeline import Sample, write_samples
from data_prep.writer import PrepSummary

# (photo, side of its test strip). The side keeps the subject in both parts: the astronaut's suit,
# the cameraman's tripod and grass, the cell, the pagoda's base, the motorcycle's wheels. skimage's
# clock is left out: it sits mid-frame on plain grey, so no strip of it is recognisable. The names
# are skimage.data loaders, except "motorcycle" (the left view of skimage's stereo pair) and "china"
# and "flower" (scikit-learn's load_sample_images).
PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut", "bottom"), ("brick", "right"), ("camera", "bottom"), ("cell", "bottom"), ("chelsea", "right"),
    ("checkerboard", "right"), ("coffee", "right"), ("coins", "right"), ("colorwheel", "right"),
    ("grass", "right"), ("gravel", "right"), ("horse", "right"), ("hubble_deep_field", "right"),
    ("immunohistochemistry", "right"), ("logo", "right"), ("moon", "right"), ("page", "right"),
    ("retina", "right"), ("rocket", "right"), ("text", "right"), ("motorcycle", "bottom"),
    ("china", "bottom"), ("flower", "right"),
)
TEST_STRIP = 0.3  # the test strip's share of the photo's width (side "right") or height ("bottom")
CROP_SIDE = (0.2, 0.6)  # a crop's side (square root of its area) as a share of the photo's short side
CROP_ASPECT = (3 / 4, 4 / 3)  # a crop's width / height
SPLITS = ("train", "test")

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right and bottom exclusive


def prep_photos(
    out_dir,
    image_size: int = 32,
    train_per_class: int = 87,
    test_per_class: int = 22,
    seed: int = 0,
    workers: int = 2,
    templates_file=None,
    shard_size: int = 256,
) -> dict[str, PrepSummary]:
    """Write `out_dir/train` and `out_dir/test` shards of photo crops; return both summaries.

    `train_per_class` and `test_per_class` crops per photo (defaults: 23 photos x 87 = 2,001 train,
    x 22 = 506 test), each `image_size` px square, in an order shuffled by `seed`. The caption is
    one prompt template (drawn with `seed`) filled with the photo's class name, both read from
    `templates_file` (a path or a shipped name; default: photos). Meta: label, classname, source
    (the photo), box (the crop's left, top, right, bottom in the photo). Needs scikit-image.
    """
    for name, count in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if count < 1:
            raise ClipxError(f"prep photos: {name} must be at least 1, got {count}; ask for one crop per photo or more")
    classnames, templates = load_templates(templates_file or "photos")
    if len(classnames) < len(PHOTOS):
        raise ClipxError(f"templates file {templates_file} lists {len(classnames)} class names; the photos need "
                         f"{len(PHOTOS)}, one per photo in the order of data_prep/photos.py's PHOTOS")
    photos = load_photos()
    summaries = {}
    for split_index, count in enumerate((train_per_class, test_per_class)):
        split = SPLITS[split_index]
        plan = _plan(photos, split_index, count, len(templates), seed)
        samples = _samples(plan, photos, classnames, templates, image_size)
        summaries[split] = write_samples(
            samples, Path(out_dir) / split, image_size=image_size, shard_size=shard_size,
            workers=workers, total=len(plan), desc=f"photos {split}",
        )
    return summaries


def load_photos() -> list[Image.Image]:
    """The photographs of PHOTOS, in order, as RGB images (grey ones repeated over three channels,
    transparency flattened onto white). A one-line ClipxError if scikit-image is missing."""
    try:
        import skimage.data  # heavy import, only needed here
    except ImportError:
        raise ClipxError("clipx prep photos takes its photographs from scikit-image, which is not installed: "
                         "pip install scikit-image") from None
    from sklearn.datasets import load_sample_images

    sample_images = dict(zip(("china", "flower"), load_sample_images().images))
    photos = []
    for name, _ in PHOTOS:
        try:
            if name in sample_images:
                array = sample_images[name]
            elif name == "motorcycle":
                array = skimage.data.stereo_motorcycle()[0]
            else:
                array = getattr(skimage.data, name)()
        except (ImportError, OSError, ValueError, AttributeError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            version = getattr(skimage, "__version__", "?")
            raise ClipxError(f"photo {name!r} did not load from scikit-image {version} ({first}); "
                             "install scikit-image>=0.22 with its bundled data") from None
        photos.append(to_rgb(np.asarray(array)))
    return photos


def to_rgb(array: np.ndarray) -> Image.Image:
    """An RGB image of a (H, W) grey, bool or (H, W, 3|4) array; transparency flattened onto white."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(np.ascontiguousarray(array))
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def split_regions(width: int, height: int, side: str, fraction: float = TEST_STRIP) -> tuple[Box, Box]:
    """(train box, test box) of a `width` x `height` photo: the test box is the last `fraction` of
    its width (`side` "right") or height ("bottom"), the train box the rest; they share no pixel."""
    if side == "right":
        cut = round(width * (1.0 - fraction))
        return (0, 0, cut, height), (cut, 0, width, height)
    if side == "bottom":
        cut = round(height * (1.0 - fraction))
        return (0, 0, width, cut), (0, cut, width, height)
    raise ValueError(f"test strip side must be 'right' or 'bottom', got {side!r}")


def crop_boxes(region: Box, short_side: int, count: int, rng: np.random.Generator) -> list[Box]:
    """`count` random crop boxes inside `region` (none reaches outside it).

    A crop's aspect is drawn log-uniformly from CROP_ASPECT, then its side (square root of its
    area) uniformly from CROP_SIDE x `short_side`, capped so that the crop fits the region: a
    narrow test strip gets the smaller crops of that range rather than crops reaching past it.
    """
    left, top, right, bottom = region
    region_w, region_h = right - left, bottom - top
    boxes = []
    for _ in range(count):
        aspect = math.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
        largest = min(CROP_SIDE[1] * short_side, region_w / math.sqrt(aspect), region_h * math.sqrt(aspect))
        side = rng.uniform(min(CROP_SIDE[0] * short_side, largest), largest)
        w = min(region_w, max(1, round(side * math.sqrt(aspect))))
        h = min(region_h, max(1, round(side / math.sqrt(aspect))))
        x = left + int(rng.integers(0, region_w - w + 1))
        y = top + int(rng.integers(0, region_h - h + 1))
        boxes.append((x, y, x + w, y + h))
    return boxes


def crop_image(photo: Image.Image, box: Box, image_size: int) -> np.ndarray:
    """The pixels of `box` resized to an `image_size` square  # (S, S, 3) uint8.

    Cropped before resizing: a resize with a box would let the filter read pixels just outside
    it, from the other split's part of the photo.
    """
    crop = photo.crop(box).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(crop)


def _plan(photos: Sequence[Image.Image], split_index: int, count: int, n_templates: int,
          seed: int) -> list[tuple[int, Box, int]]:
    """(label, box, template id) of every sample of one split, shuffled so shards mix the classes."""
    plan: list[tuple[int, Box, int]] = []
    for label, (photo, (_, side)) in enumerate(zip(photos, PHOTOS)):
        # One stream per photo and split: changing one split's count leaves the other's crops alone.
        rng = np.random.default_rng([seed, split_index, label])
        region = split_regions(photo.width, photo.height, side)[split_index]
        boxes = crop_boxes(region, min(photo.size), count, rng)
        template_ids = rng.integers(n_templates, size=count)
        plan.extend((label, box, int(t)) for box, t in zip(boxes, template_ids))
    order = np.random.default_rng([seed, split_index]).permutation(len(plan))
    return [plan[i] for i in order]


def _samples(plan: list[tuple[int, Box, int]], photos: Sequence[Image.Image], classnames: list[str],
             templates: list[str], image_size: int) -> Iterator[Sample]:
    for label, box, template_id in plan:
        name = classnames[label]
        yield Sample(
            source=crop_image(photos[label], box, image_size),
            caption=templates[template_id].format(name),
            meta={"label": label, "classname": name, "source": PHOTOS[label][0], "box": list(box)},
        )
