"""hadw_kernels: the HA-DW reweighted GRPO / DAPO / GSPO policy loss, its difficulty anchor and theory.

    >>> from hadw_kernels import hadw_loss, LossConfig, DifficultyAnchor
    >>> anchor = DifficultyAnchor()                 # evolving accuracy anchor, mode="window", h=10
    >>> prior = anchor.step(rewards)                # once per rollout batch, on the whole batch's rewards
    >>> out = hadw_loss(logp, old_logp, rewards, mask, group_size=8, anchor=prior, config=LossConfig.grpo())
    >>> out.loss.backward()

Two stages, for frameworks that reorder rows into micro-batches (verl, TRL):

    >>> adv = hadw_advantages(rewards, group_ids=uid, anchor=prior)          # once per rollout batch
    >>> out = hadw_policy_loss(logp, old_logp, adv.advantages[rows], mask, normalizer=total)   # any micro-batch

Importing this package needs torch only: triton, scipy and the trainer's dependencies load where used.
"""

from hadw_kernels.anchor import DifficultyAnchor
from hadw_kernels.config import LossConfig
from hadw_kernels.from_hidden import HiddenLossOutput, hadw_policy_loss_from_hidden
from hadw_kernels.linear_logprobs import LinearLogprobs, fused_linear_logprobs
from hadw_kernels.loss import (
    HADWLoss,
    hadw_advantages,
    hadw_loss,
    hadw_policy_loss,
    loss_normalizer,
    truncated_is_weights,
)
from hadw_kernels.reference import (
    ADVANTAGE_METRICS,
    KL_METRICS,
    POLICY_METRICS,
    Advantages,
    LossOutput,
    hadw_loss_reference,
)

__all__ = [
    "ADVANTAGE_METRICS",
    "KL_METRICS",
    "POLICY_METRICS",
    "Advantages",
    "DifficultyAnchor",
    "HADWLoss",
    "HiddenLossOutput",
    "LinearLogprobs",
    "LossConfig",
    "LossOutput",
    "fused_linear_logprobs",
    "hadw_advantages",
    "hadw_loss",
    "hadw_loss_reference",
    "hadw_policy_loss",
    "hadw_policy_loss_from_hidden",
    "loss_normalizer",
    "truncated_is_weights",
]
__version__ = "0.1.0"
