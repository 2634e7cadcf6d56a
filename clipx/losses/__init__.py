"""Contrastive losses: functions of features and a few scalars, never of models."""

from clipx.losses.clip import GATHER_MODES, ClipLoss
from clipx.losses.ntxent import NTXentLoss
from clipx.losses.siglip import SigLipLoss
from clipx.losses.supcon import SupConLoss

__all__ = ["ClipLoss", "NTXentLoss", "SigLipLoss", "SupConLoss", "GATHER_MODES"]
