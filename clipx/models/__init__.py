"""Towers, the DualEncoder and create_model; the TextEncoder and create_text_encoder."""

from clipx.models.dual_encoder import DualEncoder
from clipx.models.factory import create_model, create_text_encoder, image_size
from clipx.models.text_encoder import TextEncoder

__all__ = ["DualEncoder", "TextEncoder", "create_model", "create_text_encoder", "image_size"]
