"""clipx: CLIP-style image-text contrastive training on webdataset shards with HF Accelerate."""

__version__ = "0.1.0"
