"""Reinforced shards (MobileCLIP's dataset reinforcement): stored augmentations, replayed exactly.

`clipx prep reinforce` (data_prep/reinforce.py) draws K augmentations of every image once, writes
their parameters beside the image, and runs an ensemble of teachers on each augmented view and on
every caption the sample can contribute. Training (``data.reinforced``) then replays one stored view
per sample and epoch instead of drawing a new one, so the teachers' embeddings of that very view can
stand in for running them. Everything both sides need lives here, so the view the writer showed its
teachers and the view training replays come from one function:

- a view record: the crop box in source pixels, a horizontal flip, and four colour-jitter factors
  (brightness, contrast, saturation: multipliers, 1 = unchanged; hue: a shift in turns, 0 =
  unchanged), stored per sample as ``views.npy``, (K, 9) float32;
- ``render_view``: encoded image + record -> uint8 (3, S, S). Only operations whose result does not
  depend on the number of threads: the crop and antialiased resize (each output pixel computed on
  its own), elementwise colour arithmetic, and for contrast the image's mean grey level computed in
  integers. The writer (many threads) and a loader worker (one) get the same bytes;
- the per-teacher members ``teacher<t>.npy``: (K + C, Dt) float16, unit rows, the K views' image
  embeddings then the C captions' text embeddings; the captions are the .txt member's lines and then
  the synthetic ones in the .json field ``caption_key`` (``stored_captions``);
- ``reinforce.json`` beside the shards: the teachers (source, logit scale, width), K, the view size,
  the captions' field and the recipe the views were drawn with.
"""

from __future__ import annotations

import functools
import io
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from clipx.data.batch import ReplayedView
from clipx.data.captions import all_captions, json_object
from clipx.data.crops import JPEG_FORMATS, draft_for_box, resize_crop
from clipx.data.pipeline import sample_image_bytes
from clipx.data.remote import RemoteOptions
from clipx.data.shards import read_beside
from clipx.data.transforms import RandomResizedCrop, open_image
from clipx.errors import ClipxError

VIEWS_MEMBER = "views.npy"  # per sample: (K, 9) float32 view records
INFO_FILE = "reinforce.json"  # beside the shards
VIEW_FIELDS = ("left", "top", "right", "bottom", "flip", "brightness", "contrast", "saturation", "hue")
IDENTITY_JITTER = (1.0, 1.0, 1.0, 0.0)
STORED_DTYPE = np.float16  # the teachers' embeddings, as MobileCLIP stores them
STORED_TORCH_DTYPE = torch.float16


def teacher_member(index: int) -> str:
    """The member holding teacher ``index``'s embeddings of a sample's views and captions."""
    return f"teacher{index}.npy"


@dataclass(frozen=True)
class ViewRecipe:
    """How views are drawn: RandomResizedCrop's area range (aspect ratio 3/4..4/3), the flip
    probability, and colour jitter applied with ``jitter_prob``: brightness, contrast and saturation
    factors uniform in [1 - s, 1 + s] for s = 0.4 x ``jitter_strength`` (SimCLR's at half its
    strength), and a hue shift uniform in [-hue, hue] turns. The hue is off by default: the shift
    goes through HSV and back, the costliest part of replaying a view in the loader."""

    crop_scale_min: float = 0.35
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter_strength: float = 1.0
    hue: float = 0.0

    def check(self) -> None:
        if not 0 < self.crop_scale_min <= 1:
            raise ClipxError(f"--crop-scale-min must be in (0, 1], got {self.crop_scale_min}")
        for name, value in (("--flip-prob", self.flip_prob), ("--jitter-prob", self.jitter_prob)):
            if not 0 <= value <= 1:
                raise ClipxError(f"{name} must be in [0, 1], got {value}")
        if not 0 <= self.jitter_strength <= 2.5:
            raise ClipxError(f"--jitter-strength must be in [0, 2.5] (factors stay positive), got {self.jitter_strength}")
        if not 0 <= self.hue <= 0.5:
            raise ClipxError(f"--hue must be in [0, 0.5] (a shift in turns), got {self.hue}")

    def draw(self, width: int, height: int, count: int, generator: torch.Generator) -> np.ndarray:
        """``count`` records (count, 9) float32 for an image of ``width`` x ``height``, drawn from
        ``generator``; values are rounded to float32 before anyone renders them."""
        crop = RandomResizedCrop(1, scale=(self.crop_scale_min, 1.0))
        records = []
        for _ in range(count):
            box = crop.box(width, height, generator)
            flip, jitter_on, *u = torch.rand(6, generator=generator).tolist()
            s, h = 0.4 * self.jitter_strength, self.hue
            jitter = ((1 - s + 2 * s * u[0], 1 - s + 2 * s * u[1], 1 - s + 2 * s * u[2], -h + 2 * h * u[3])
                      if jitter_on < self.jitter_prob else IDENTITY_JITTER)
            records.append([*box, float(flip < self.flip_prob), *jitter])
        return np.asarray(records, dtype=np.float32)


def render_view(data: bytes, record: Sequence[float], size: int) -> torch.Tensor:
    """The view ``record`` describes of the encoded image ``data``: uint8 (3, size, size)."""
    image = open_image(data)
    left, top, right, bottom, flip, brightness, contrast, saturation, hue = (float(v) for v in record)
    box = (int(left), int(top), int(right), int(bottom))
    if not (0 <= box[0] < box[2] <= image.size[0] and 0 <= box[1] < box[3] <= image.size[1]):
        raise ValueError(f"view box {box} lies outside the {image.size[0]}x{image.size[1]} image")
    if image.format in JPEG_FORMATS:
        box = draft_for_box(image, box, size)
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    view = resize_crop(pixels[None, :, box[1]:box[3], box[0]:box[2]], size)[0]
    if flip:
        view = view.flip(-1)
    return jitter(view, brightness, contrast, saturation, hue)


def jitter(view: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float) -> torch.Tensor:
    """Colour jitter of a uint8 (3, H, W) view in a fixed order, each step back to uint8 (truncated,
    as torchvision's ColorJitter on uint8 images does); factors of 1 and a hue of 0 change nothing."""
    if brightness != 1.0:
        view = TF.adjust_brightness(view, brightness)
    if contrast != 1.0:
        view = _adjust_contrast(view, contrast)
    if saturation != 1.0:
        view = TF.adjust_saturation(view, saturation)
    if hue != 0.0:
        view = TF.adjust_hue(view, hue)
    return view


def _adjust_contrast(view: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend towards the mean grey level, the mean taken in integers (ITU-R 601 weights in
    thousandths): a float mean's rounding would depend on how many threads summed it."""
    grey_sum = int((view.to(torch.int64) * torch.tensor([299, 587, 114]).view(3, 1, 1)).sum())
    mean = grey_sum / (1000 * view.shape[-1] * view.shape[-2])
    out = view.to(torch.float32) * factor + (1.0 - factor) * mean
    return out.clamp_(0, 255).to(torch.uint8)


def read_npy(data: bytes) -> np.ndarray:
    """A .npy member's array, read-only, without a copy. Every sample of a set of shards carries
    arrays of the same few headers, so a header is parsed once (np.load parses it each time, a
    large part of reading a small array in the loader)."""
    if data[6] == 1:
        offset = 10 + int.from_bytes(data[8:10], "little")
    else:
        offset = 12 + int.from_bytes(data[8:12], "little")
    dtype, shape = _npy_header(bytes(data[:offset]))
    return np.frombuffer(data, dtype, count=math.prod(shape), offset=offset).reshape(shape)


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    fields = np.lib.format.read_array_header_1_0(io.BytesIO(header[8:])) if header[6] == 1 else \
        np.lib.format.read_array_header_2_0(io.BytesIO(header[8:]))
    shape, fortran_order, dtype = fields
    if fortran_order or dtype.hasobject:
        raise ValueError("a .npy member in Fortran order or of Python objects; write it with numpy.save")
    return dtype, tuple(shape)


def load_records(sample: dict) -> np.ndarray:
    """A sample's (K, 9) view records; ValueError when the member is malformed."""
    records = read_npy(sample[VIEWS_MEMBER])
    if records.ndim != 2 or records.shape[1] != len(VIEW_FIELDS) or not len(records):
        raise ValueError(f"{VIEWS_MEMBER} holds an array of shape {records.shape}, not (K, {len(VIEW_FIELDS)})")
    return records


def stored_captions(sample: dict, caption_key: str) -> list[str]:
    """The captions whose teacher embeddings a reinforced sample stores, in their rows' order: the
    .txt member's lines, then the synthetic captions of .json field ``caption_key``."""
    meta = json_object(sample) or {}
    synthetic = meta.get(caption_key, [])
    synthetic = synthetic if isinstance(synthetic, list) else [synthetic]
    return all_captions(sample) + [c.strip() for c in synthetic if isinstance(c, str) and c.strip()]


@dataclass(frozen=True)
class ReinforceInfo:
    """What reinforce.json records about a set of reinforced shards."""

    teachers: list  # [{"source", "logit_scale", "dim"}], in member order
    augmentations: int
    image_size: int
    caption_key: str
    captions: int  # synthetic captions per sample (the .txt lines come on top)
    recipe: dict  # ViewRecipe's fields
    settings: dict = field(default_factory=dict)  # what else made the bytes: seed, captioner, its decoding

    @classmethod
    def read(cls, shards: str, options: RemoteOptions | None = None) -> "ReinforceInfo":
        raw = read_beside(shards, INFO_FILE, options)
        if raw is None:
            raise ClipxError(f"data.reinforced: no {INFO_FILE} beside {shards}; write the shards with "
                             "clipx prep reinforce")
        try:
            return cls(**json.loads(raw))
        except (TypeError, ValueError) as error:
            raise ClipxError(f"{INFO_FILE} beside {shards} cannot be read ({error}); write the shards again "
                             "with clipx prep reinforce") from None


class ReplayedViews:
    """A reinforced sample -> ``ReplayedView``: one of its stored views, chosen uniformly with torch's
    generator (seeded by the sample's place in the stream: clipx.data.pipeline.sample_rng, so a resumed
    run replays the same views), rendered at ``size``; ``teacher_transforms`` (online teachers) each
    get that view as a PIL image through their own preprocessing."""

    takes_sample = True  # clipx.data.pipeline hands it the whole sample: the image and its records

    def __init__(self, size: int, teacher_transforms: Sequence[Callable] = ()):
        self.size, self.teacher_transforms = size, tuple(teacher_transforms)

    def __call__(self, sample: dict) -> ReplayedView:
        data = sample_image_bytes(sample)
        if data is None:
            raise ValueError("no image")
        records = load_records(sample)
        index = int(torch.randint(len(records), (1,)))
        pixels = render_view(data, records[index], self.size)
        teacher_inputs = tuple(t(to_pil(pixels)) for t in self.teacher_transforms)
        return ReplayedView(pixels, index, teacher_inputs)


def to_pil(view: torch.Tensor) -> Image.Image:
    """uint8 (3, H, W) -> an RGB PIL image (what a teacher's own preprocessing takes)."""
    return Image.fromarray(view.permute(1, 2, 0).numpy())


def check_view_size(info: ReinforceInfo, size: int) -> None:
    if info.image_size != size:
        raise ClipxError(f"data.reinforced: the shards' views are {info.image_size} px (reinforce.json), the model "
                         f"takes {size} px; reinforce them again with --image-size {size}")
