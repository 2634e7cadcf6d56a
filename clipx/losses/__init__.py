"""Contrastive losses: functions of features and a few scalars, never of models."""

from clipx.losses.clip import GATHER_MODES, ClipLoss
from clipx.losses.ntxent import NTXentLoss
from clipx.losses.siglip import SigLipLoss

__all__ = ["ClipLoss", "NTXentLoss", "SigLipLoss", "GATHER_MODES"]
