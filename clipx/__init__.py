"""clipx: CLIP-style image-text contrastive training on webdataset shards with HF Accelerate."""

# Importing clipx changes nothing in the process: no environment variables, no allocator settings.
# Library code reads local files only by its own arguments (local_files_only, packaged builders);
# the command line also sets the Hugging Face libraries offline for the whole run (clipx.cli.main).

__version__ = "0.1.0"


def load(path, device="cpu"):
    """(model, preprocess, tokenizer) of a clipx checkpoint or run directory: see clipx.api.load."""
    from clipx.api import load as _load  # torch and open_clip are imported on first use, not by `import clipx`

    return _load(path, device)
