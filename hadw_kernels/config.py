"""`LossConfig`: every scalar hyperparameter of the HA-DW policy loss, validated once, in one frozen dataclass.

The presets follow the table in the spec (GRPO, DAPO, GSPO, Dr. GRPO); any field can be overridden:

    >>> cfg = LossConfig.dapo(lambda_scale=1.5, kl_coef=0.01)
    >>> cfg.clip_high
    0.28
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

RATIO_LEVELS = ("token", "sequence")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
ADV_NORMS = ("group_std", "batch_std", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"LossConfig.{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"LossConfig.{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"LossConfig.{name} must be {bound}, got {value!r}")


@dataclass(frozen=True)
class LossConfig:
    """Hyperparameters of the clipped surrogate with HA-DW reweighting (defaults: GRPO with HA-DW)."""

    clip_low: float = 0.2
    """epsilon_low: the ratio is clipped from below at 1 - clip_low (0 < clip_low < 1)."""
    clip_high: float = 0.2
    """epsilon_high: the ratio is clipped from above at 1 + clip_high (DAPO's clip-higher uses 0.28)."""
    clip_ratio_c: float | None = None
    """Dual-clip constant c (> 1, verl uses 3.0): for A < 0 the token loss is capped at -c*A. None = off."""
    ratio_level: str = "token"
    """'token': rho = exp(logp - old) per token; 'sequence': GSPO's length-normalised sequence ratio."""
    loss_agg: str = "seq-mean-token-mean"
    """Aggregation over tokens and rows, verl's names: token-mean | seq-mean-token-mean | seq-mean-token-sum |
    seq-mean-token-sum-norm."""
    adv_norm: str = "group_std"
    """'group_std': A = (r - mean) / (std + std_eps); 'batch_std': A = (r - mean) / (std of the whole batch's rewards
    + std_eps) (TRL's scale_rewards="batch"); 'none': A = r - mean (Dr. GRPO). HA-DW applies to all three."""
    std_unbiased: bool = True
    """Group std with Bessel's correction (n - 1), as torch.std and verl; False gives the population std."""
    std_eps: float = 1e-6
    """Added to the group std before dividing (verl's value)."""
    hadw: bool = True
    """Reweight advantages by Phi = lambda_scale * exp(D * M); False gives Phi = 1 (plain GRPO / DAPO / GSPO)."""
    lambda_scale: float = 1.3
    """lambda in Phi = lambda * exp(D * M); 1.3 was the paper's best (its Table 7)."""
    kl_coef: float = 0.0
    """beta: weight of the KL penalty to the reference policy (0 = off, as in the paper)."""
    kl_estimator: str = "k3"
    """KL estimator: 'k1' = logp - ref, 'k2' = (logp - ref)^2 / 2, 'k3' = exp(ref - logp) - (ref - logp) - 1."""
    kl_ratio_weighted: bool = False
    """Multiply the per-token KL by the (differentiable) importance ratio rho, which makes its gradient the unbiased
    reverse-KL gradient off-policy (TRL's default `use_bias_correction_kl=True`; verl does not weight)."""
    rollout_is_threshold: float | None = None
    """Truncate the `rollout_is_weights` handed to the policy loss from above at this value (verl's truncated IS,
    typically 2.0); None uses the weights as given."""
    log_ratio_clamp: float = 20.0
    """Log-ratios (policy/old and ref/policy) are clamped to +-this before exp, so no ratio overflows."""
    norm_len: int | None = None
    """Constant length for seq-mean-token-sum-norm (Dr. GRPO's generation budget); None uses the padded T."""

    def __post_init__(self) -> None:
        _check_positive("clip_low", self.clip_low)
        if self.clip_low >= 1:
            raise ValueError(f"LossConfig.clip_low must be < 1 (the lower bound 1 - clip_low must be > 0), "
                             f"got {self.clip_low!r}")
        _check_positive("clip_high", self.clip_high)
        if self.clip_ratio_c is not None:
            _check_positive("clip_ratio_c", self.clip_ratio_c)
            if self.clip_ratio_c <= 1:
                raise ValueError(f"LossConfig.clip_ratio_c (dual clip) must be > 1, got {self.clip_ratio_c!r}")
        _check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        _check_choice("loss_agg", self.loss_agg, LOSS_AGG_MODES)
        _check_choice("adv_norm", self.adv_norm, ADV_NORMS)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        for flag in ("std_unbiased", "hadw", "kl_ratio_weighted"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LossConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        _check_positive("std_eps", self.std_eps, allow_zero=True)
        _check_positive("lambda_scale", self.lambda_scale)
        _check_positive("kl_coef", self.kl_coef, allow_zero=True)
        _check_positive("log_ratio_clamp", self.log_ratio_clamp)
        if self.rollout_is_threshold is not None:
            _check_positive("rollout_is_threshold", self.rollout_is_threshold)
        if self.norm_len is not None and (
            isinstance(self.norm_len, bool) or not isinstance(self.norm_len, int) or self.norm_len <= 0
        ):
            raise ValueError(f"LossConfig.norm_len must be a positive int or None, got {self.norm_len!r}")

    # -- presets (spec table) -------------------------------------------------------------------------------
    @classmethod
    def grpo(cls, **overrides: Any) -> LossConfig:
        """GRPO: token ratio, clip 0.2 / 0.2, seq-mean-token-mean."""
        return cls(**{**dict(clip_low=0.2, clip_high=0.2, ratio_level="token", loss_agg="seq-mean-token-mean"),
                      **overrides})

    @classmethod
    def dapo(cls, **overrides: Any) -> LossConfig:
        """DAPO: token ratio, clip-higher 0.2 / 0.28, token-mean."""
        return cls(**{**dict(clip_low=0.2, clip_high=0.28, ratio_level="token", loss_agg="token-mean"),
                      **overrides})

    @classmethod
    def gspo(cls, **overrides: Any) -> LossConfig:
        """GSPO: sequence ratio, clip 3e-4 / 4e-4, seq-mean-token-mean."""
        return cls(**{**dict(clip_low=3e-4, clip_high=4e-4, ratio_level="sequence", loss_agg="seq-mean-token-mean"),
                      **overrides})

    @classmethod
    def dr_grpo(cls, **overrides: Any) -> LossConfig:
        """Dr. GRPO: token ratio, clip 0.2 / 0.2, seq-mean-token-sum-norm, no std normalisation."""
        return cls(**{**dict(clip_low=0.2, clip_high=0.2, ratio_level="token", loss_agg="seq-mean-token-sum-norm",
                             adv_norm="none"), **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LossConfig:
        """A preset by name: 'grpo' | 'dapo' | 'gspo' | 'dr_grpo'."""
        presets = {"grpo": cls.grpo, "dapo": cls.dapo, "gspo": cls.gspo, "dr_grpo": cls.dr_grpo}
        if name not in presets:
            raise ValueError(f"unknown loss preset {name!r}; choose one of {', '.join(map(repr, presets))}")
        return presets[name](**overrides)

    def replace(self, **changes: Any) -> LossConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
