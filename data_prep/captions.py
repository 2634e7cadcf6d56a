"""A folder of images plus a caption table (CSV, TSV, JSONL or Parquet) as shards."""

from __future__ import annotations

import csv
from pathlib import Path

from clipx.errors import ClipxError
from data_prep.pipeline import Sample, check_columns, is_missing, write_samples
from data_prep.writer import PrepSummary

FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def prep_folder(
    images_dir,
    captions_file,
    out_dir,
    image_column: str = "image",
    caption_column: str = "caption",
    image_size: int = 224,
    shard_size: int = 10_000,
    workers: int = 2,
    group_by_image: bool = False,
) -> PrepSummary:
    """Write shards from `captions_file` rows whose `image_column` names a file in `images_dir`.

    Image paths are relative to `images_dir` (absolute paths also work). Rows with a missing
    image file or an empty caption are skipped and counted; every other column, the image
    path included, goes into the sample's JSON. With `group_by_image`, rows naming the same image
    (Flickr30k/COCO tables: five captions per image) become one sample whose .txt holds one
    caption per line, the layout `clipx eval retrieval` scores with the standard protocol.
    """
    images_dir, captions_file = Path(images_dir), Path(captions_file)
    if not images_dir.is_dir():
        raise ClipxError(f"images directory {images_dir} not found; pass the folder holding the images")
    table = read_table(captions_file)
    check_columns(
        table.columns,
        {"--image-column": image_column, "--caption-column": caption_column},
        f"captions file {captions_file}",
    )
    if group_by_image:
        table = group_captions(table, image_column, caption_column)
    return write_samples(
        _samples(table, images_dir, image_column, caption_column),
        out_dir, image_size=image_size, shard_size=shard_size, workers=workers,
        total=len(table), desc="folder",
    )


def read_table(path: Path):
    """Load a caption table as a pandas DataFrame, choosing the reader by file extension."""
    if not path.is_file():
        raise ClipxError(f"captions file {path} not found")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ClipxError(
            f"captions file {path} has unsupported extension '{suffix}'; use one of {', '.join(FORMATS)}"
        )
    import pandas as pd  # heavy import, only needed here

    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".json"):
            # dtype=False: keep JSON's own types; inference would turn "0001" into 1.
            return pd.read_json(path, lines=_is_json_lines(path), dtype=False)
        # CSV has no types: read text as text (file names like "0001" stay intact); only an
        # empty cell counts as missing, so a caption reading "NA" survives.
        return pd.read_csv(
            path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
            na_values=[""], quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
        )
    except (ValueError, OSError) as error:  # pandas/pyarrow parse errors subclass ValueError
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ClipxError(f"could not read captions file {path}: {message}") from error


def group_captions(table, image_column: str, caption_column: str):
    """One row per image, in first-seen order; its non-empty captions joined by newlines."""

    def join(captions) -> str:
        return "\n".join(" ".join(str(c).split()) for c in captions if not is_missing(c) and str(c).strip())

    captions = table.groupby(image_column, sort=False)[caption_column].agg(join)
    grouped = table.drop_duplicates(image_column).set_index(image_column)
    grouped[caption_column] = captions
    return grouped.reset_index()


def _is_json_lines(path: Path) -> bool:
    """A .json file may be one JSON array or JSON Lines; the first character tells."""
    with open(path, "rb") as f:
        return not f.read(4096).lstrip().startswith(b"[")


def _samples(table, images_dir: Path, image_column: str, caption_column: str):
    columns = [str(c) for c in table.columns]
    for row in table.itertuples(index=False, name=None):
        record = dict(zip(columns, row))
        image = record[image_column]
        source = None if is_missing(image) else str(images_dir / str(image))
        meta = {k: v for k, v in record.items() if k != caption_column}
        yield Sample(source=source, caption=record[caption_column], meta=meta)
