"""A Hugging Face `datasets` dataset (saved to disk, or built from local files) as shards."""

from __future__ import annotations

from pathlib import Path

from clipx.errors import ClipxError
from data_prep.pipeline import Sample, check_columns, write_samples
from data_prep.writer import PrepSummary

# Columns whose values are media, not metadata: they never go into the JSON record.
_MEDIA_FEATURES = ("Image", "Audio", "Video", "Pdf")


def prep_hf(
    source,
    out_dir,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    builder: str | None = None,
    image_size: int = 224,
    shard_size: int = 10_000,
    workers: int = 2,
    cache_dir=None,
) -> PrepSummary:
    """Write shards from a `datasets` dataset; never touches the network.

    Without `builder`, `source` is a directory from `Dataset.save_to_disk` or
    `DatasetDict.save_to_disk` (`split` picks from a DatasetDict). With `builder` ("csv",
    "json", "parquet", "imagefolder", ...), `source` is local data files or a data directory.
    Image values may be PIL images, {"bytes", "path"} dicts, bytes or path strings.
    """
    datasets = _import_datasets()
    if builder is None:
        dataset = _load_saved(datasets, source, split)
    else:
        dataset = _load_built(datasets, source, builder, split, cache_dir)
    check_columns(
        dataset.column_names,
        {"--image-column": image_column, "--caption-column": caption_column},
        f"dataset {source}",
    )
    if isinstance(dataset.features.get(image_column), datasets.Image):
        # Hand undecoded bytes to the workers: decoding here would serialise the slow part.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return write_samples(
        _samples(dataset, image_column, caption_column),
        out_dir, image_size=image_size, shard_size=shard_size, workers=workers,
        total=len(dataset), desc="hf",
    )


def _import_datasets():
    # datasets and huggingface_hub read these once, at import time; a user's own setting wins.
    import datasets

    return datasets


def _load_saved(datasets, source, split: str):
    if not Path(source).is_dir():
        raise ClipxError(
            f"dataset {source} is not a directory saved with save_to_disk; pass --builder to read raw files"
        )
    try:
        loaded = datasets.load_from_disk(str(source))
    except FileNotFoundError as error:
        raise ClipxError(
            f"{source} is not a dataset saved with save_to_disk; pass --builder (csv, json, parquet, imagefolder)"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ClipxError(f"dataset {source} has no split '{split}' (splits: {', '.join(loaded)}); pass --split")
        return loaded[split]
    return loaded


def _load_built(datasets, source, builder: str, split: str, cache_dir):
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    # Only the builders that ship inside `datasets` read local files without the hub; any other
    # name would be looked up (and its script downloaded) there, which clipx never does.
    if builder not in _PACKAGED_DATASETS_MODULES:
        raise ClipxError(f"--builder {builder} is not one of the builders that ship with datasets "
                         f"({', '.join(sorted(_PACKAGED_DATASETS_MODULES))}); clipx reads local files only")
    # A directory is a data_dir (imagefolder-style builders); anything else is data files.
    where = {"data_dir": str(source)} if Path(source).is_dir() else {"data_files": str(source)}
    try:
        return datasets.load_dataset(builder, split=split, cache_dir=cache_dir, **where)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetsError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ClipxError(f"could not load {source} with builder '{builder}': {message}") from error


def _samples(dataset, image_column: str, caption_column: str):
    meta_columns = [
        name for name, feature in dataset.features.items()
        if name not in (image_column, caption_column) and type(feature).__name__ not in _MEDIA_FEATURES
    ]
    dataset = dataset.select_columns([image_column, caption_column, *meta_columns])
    # Batched reads are far faster than row-by-row access on Arrow tables.
    for batch in dataset.iter(batch_size=256):
        for i in range(len(batch[caption_column])):
            yield Sample(
                source=_image_source(batch[image_column][i]),
                caption=batch[caption_column][i],
                meta={name: batch[name][i] for name in meta_columns},
            )


def _image_source(value):
    """Reduce a datasets image value to what `encode_image` takes (bytes, path, PIL, array)."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path") or None
    return value
