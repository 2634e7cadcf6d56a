"""Self-supervised image encoders: view augmentations and the encoder + projection head."""
