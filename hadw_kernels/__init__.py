"""hadw_kernels: the HA-DW reweighted GRPO / DAPO / GSPO policy loss, its difficulty anchor and theory."""

from hadw_kernels.anchor import DifficultyAnchor
from hadw_kernels.config import LossConfig

__all__ = ["DifficultyAnchor", "LossConfig"]
__version__ = "0.1.0"
