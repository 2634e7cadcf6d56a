"""`clipx encode`: embeddings of images (files or shards) and texts, to .npy or .parquet.

Output rows are the images (in file or shard order) then the texts (in file order):
- ``.parquet``: one row per input with ``kind`` ("image"|"text"), ``id`` (file path, shard key or the
  text itself) and ``embedding`` (float32 list);
- ``.npy``: the (N, D) float32 matrix, and beside it ``FILE.ids.json`` with the kinds and ids.
Embeddings are unit norm, as the model's encoders return them.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from clipx.errors import ClipxError

OUTPUT_FORMATS = (".npy", ".parquet")


class ImageFiles(Dataset):
    """Decoded, preprocessed image files; an unreadable file yields None (counted, not fatal)."""

    def __init__(self, paths: list[str], preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from clipx.data.transforms import decode_image

        try:
            with open(self.paths[index], "rb") as f:
                return self.paths[index], self.preprocess(decode_image(f.read()))
        except Exception:  # a broken file spoils only itself
            return self.paths[index], None


def _collate_files(items):
    good = [(path, image) for path, image in items if image is not None]
    return {"key": [p for p, _ in good], "image": torch.stack([i for _, i in good]) if good else None,
            "bad": len(items) - len(good)}


def is_shard_input(pattern: str) -> bool:
    return pattern.endswith(".tar") or (Path(pattern).is_dir() and any(Path(pattern).glob("*.tar")))


def image_batches(pattern: str, preprocess, batch_size: int, workers: int):
    """(batches {"key": ids, "image": (B, 3, H, W) or None, "bad": unreadable count}, the number of
    batches if known, the shards' SkipCounter or None)."""
    if is_shard_input(pattern):
        from clipx.data.eval_loader import build_eval_loader
        from clipx.data.skips import SkipCounter

        counter = SkipCounter()
        loader = build_eval_loader(pattern, preprocess, "label", batch_size, workers, counter, what="--images")
        return ({"key": b["key"], "image": b["image"], "bad": 0} for b in loader), None, counter
    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise ClipxError(f"--images {pattern!r} matched no files")
    loader = DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate_files)
    return iter(loader), len(loader), None


def read_texts(path: str) -> list[str]:
    try:
        texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ClipxError(f"--texts {path}: cannot read it ({error})") from None
    if not texts:
        raise ClipxError(f"--texts {path} holds no non-empty line")
    return texts


@torch.no_grad()
def encode(checkpoint: str, out: str, images: str | None = None, texts: str | None = None, batch_size: int = 256,
           workers: int = 2, device: str | None = None, precision: str = "fp32", weights: str = "auto") -> dict:
    """Embed ``images`` and/or the lines of ``texts`` with ``checkpoint``; write ``out``; return a summary.
    ``precision``: the towers' arithmetic, fp32 or bf16 (the written features are fp32 either way);
    ``weights``: the checkpoint's raw or EMA weights (auto: EMA when it has them)."""
    from clipx.api import choose_weights, load
    from clipx.models.inference import InferenceEncoder

    out_path = Path(out)
    if out_path.suffix not in OUTPUT_FORMATS:
        raise ClipxError(f"--out must end in {' or '.join(OUTPUT_FORMATS)}; got {out}")
    if not images and not texts:
        raise ClipxError("give --images, --texts or both")
    text_list = read_texts(texts) if texts else []
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = choose_weights(checkpoint, weights)
    model, preprocess, tokenizer = load(checkpoint, device, weights)
    if images and not hasattr(model, "encode_image"):
        raise ClipxError(f"{checkpoint} is a text-only model: it cannot embed --images")
    model = InferenceEncoder(model, device, precision)
    if text_list and tokenizer is None:
        raise ClipxError(f"{checkpoint} is an image-only model: it cannot embed --texts")
    kinds, ids, chunks, unreadable = [], [], [], 0
    if images:
        batches, total, counter = image_batches(images, preprocess, batch_size, workers)
        for batch in tqdm(batches, total=total, desc="images", unit="batch"):
            unreadable += batch["bad"]
            if batch["image"] is None:
                continue
            chunks.append(model.encode_image(batch["image"].to(device)).float().cpu())
            ids += batch["key"]
            kinds += ["image"] * len(batch["key"])
        if counter is not None:
            unreadable += counter.total()
    for start in tqdm(range(0, len(text_list), batch_size), desc="texts", unit="batch", disable=not text_list):
        chunk = text_list[start:start + batch_size]
        chunks.append(model.encode_text(tokenizer(chunk).to(device)).float().cpu())
        ids += chunk
        kinds += ["text"] * len(chunk)
    if not chunks:
        raise ClipxError(f"no input could be read ({unreadable} unreadable)")
    matrix = torch.cat(chunks).numpy().astype(np.float32)
    _write(out_path, matrix, kinds, ids)
    return {"out": str(out_path), "images": kinds.count("image"), "texts": kinds.count("text"),
            "dim": int(matrix.shape[1]), "unreadable_images": unreadable, "precision": precision,
            "weights": weights}


def _write(path: Path, matrix: np.ndarray, kinds: list[str], ids: list[str]) -> None:
    """Write to a temporary name and rename: a failure never leaves a half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, matrix)
        index = path.with_name(path.name + ".ids.json")
        index_tmp = index.with_name(f".{index.name}.tmp")
        index_tmp.write_text(json.dumps({"kind": kinds, "id": ids}))
        os.replace(index_tmp, index)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        embeddings = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
        pq.write_table(pa.table({"kind": kinds, "id": ids, "embedding": embeddings}), tmp)
    os.replace(tmp, path)
