"""clipx: CLIP-style image-text contrastive training on webdataset shards with HF Accelerate."""

import os

# No clipx code path may download weights or datasets: Hugging Face libraries must only ever read
# local files. Set before transformers/datasets are imported anywhere in the process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"


def load(path, device="cpu"):
    """(model, preprocess, tokenizer) of a clipx checkpoint or run directory: see clipx.api.load."""
    from clipx.api import load as _load  # torch and open_clip are imported on first use, not by `import clipx`

    return _load(path, device)
