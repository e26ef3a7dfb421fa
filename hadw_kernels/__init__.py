"""hadw_kernels: the HA-DW reweighted GRPO / DAPO / GSPO policy loss, its difficulty anchor and theory.

    >>> from hadw_kernels import hadw_loss, LossConfig, DifficultyAnchor
    >>> anchor = DifficultyAnchor()                 # evolving accuracy anchor, mode="window", h=10
    >>> prior = anchor.step(rewards)                # once per rollout batch (all-reduced over ranks)
    >>> out = hadw_loss(logp, old_logp, rewards, mask, group_size=8, anchor=prior, config=LossConfig.grpo())
    >>> out.loss.backward()

Importing this package needs torch only: triton, scipy and the trainer's dependencies load where used.
"""

from hadw_kernels.anchor import DifficultyAnchor
from hadw_kernels.config import LossConfig
from hadw_kernels.loss import HADWLoss, hadw_advantages, hadw_loss, loss_normalizer
from hadw_kernels.reference import Advantages, LossOutput, hadw_loss_reference

__all__ = [
    "Advantages",
    "DifficultyAnchor",
    "HADWLoss",
    "LossConfig",
    "LossOutput",
    "hadw_advantages",
    "hadw_loss",
    "hadw_loss_reference",
    "loss_normalizer",
]
__version__ = "0.1.0"
