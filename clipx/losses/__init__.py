"""Contrastive losses: functions of features and a few scalars, never of models."""

from clipx.losses.clip import GATHER_MODES, ClipLoss

__all__ = ["ClipLoss", "GATHER_MODES"]
