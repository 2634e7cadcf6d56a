"""The keys of a training batch, defined once; every pipeline and objective uses these names."""

IMAGE = "image"  # (B, 3, H, W) float, normalised
TEXT = "text"  # (B, L) int64 token ids
VIEWS = "views"  # list of (B, 3, H, W) augmented views of the same images (self-supervised modes)
KEY = "key"  # list of B sample keys, for de-duplication and debugging
