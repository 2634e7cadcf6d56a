"""Towers, the DualEncoder and create_model."""

from clipx.models.dual_encoder import DualEncoder
from clipx.models.factory import create_model, image_size

__all__ = ["DualEncoder", "create_model", "image_size"]
