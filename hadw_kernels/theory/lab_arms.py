"""The lab's arms: which advantage each one hands to the library's policy loss, and at which learning rate.

Every arm ends in `hadw_kernels.hadw_policy_loss`; the advantages come from `hadw_kernels.hadw_advantages` (with a
`hadw_kernels.DifficultyAnchor` per seed for the HA-DW arms). Three arms change the baseline or the scale of the
library's advantages, and those changes are the object of the experiment, written out here (four, with `loo`):

- `oracle`: the true success probability p of the prompt under the current policy replaces the group mean p̂:
  A = (r - p) / (s + eps) ('group_std') or r - p ('none'), with the group's own std s. Degenerate groups keep
  A = 0, as in GRPO, so this arm removes exactly the bias of Lemma 2 (E[p̂ | S] != p) and nothing else.
- `loo`: the leave-one-out baseline (RLOO): r_i - mean of the other G - 1 rewards = G / (G - 1) (r_i - p̂), so
  GRPO's advantages times G / (G - 1) (same std). It is unbiased for the policy gradient, and it is the step-size
  reference for the oracle: the group mean includes the response's own reward, which shrinks every advantage by
  (G - 1) / G, and the true p does not (`expected_step`).
- `rectified`: the paper's baseline rectification (the lemma behind Theorem 3): the baseline c * p̂ with
  c in (c_low, c_high), where c_low = sup (p - eps) / E[p̂ | S, p] and c_high = inf (p + eps) / E[p̂ | S, p] over
  the confidence interval I = [p̂ - eps_delta, p̂ + eps_delta] ∩ [floor, 1 - floor],
  eps_delta = sqrt(log(2 / (delta * P_floor(S))) / (2 G)), P_floor(S) = 1 - (1 - floor)^G - floor^G. The lemma
  leaves eps and the choice inside the interval open; `rectified_scale` takes the smallest eps for which the
  interval is not empty, which leaves one c: the minimax c = argmin_c max_{p in I} |c E[p̂ | S, p] - p|.
- `renorm`: HA-DW advantages rescaled per batch (per seed) so that sum |A Φ| equals sum |A| of the batch: the
  weights only move credit between responses, the total step is GRPO's (λ cancels).

The learning-rate arms (`lr_mult`) are plain GRPO at a multiple of the tuned rate: under SGD, λ multiplies every
advantage and therefore the step, so HA-DW at λ is compared with GRPO at lr x λ as well as with GRPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from hadw_kernels import DifficultyAnchor, LossConfig, hadw_advantages
from hadw_kernels.theory.binomial import expected_group_mean, nondegenerate_prob

BASELINES = ("group", "loo", "oracle", "rectified")
ANCHOR_MODES = ("window", "ema", "fixed")
RECTIFY_DELTA = 0.1
"""delta of the rectification lemma: the confidence interval I holds p with probability >= 1 - delta."""
RECTIFY_FLOOR = 0.01
"""The lemma's Delta: p is assumed in [Delta, 1 - Delta] (the lab's initial p starts at 0.01)."""


@dataclass(frozen=True)
class Arm:
    """One way of computing the advantages (and the step size) that a comparison runs on every seed."""

    name: str
    """Short id, used in the JSON, the table and the plots."""
    lr_mult: float = 1.0
    """The learning rate is the setting's tuned GRPO rate times this."""
    baseline: str = "group"
    """'group' (p̂, GRPO), 'loo' (leave-one-out mean), 'oracle' (the true p) or 'rectified' (c * p̂, the
    rectification lemma)."""
    anchor: str | None = None
    """None: Φ = 1. 'window' | 'ema' | 'fixed': HA-DW with a `DifficultyAnchor` of that mode (library defaults)."""
    lambda_scale: float = 1.0
    """λ of Φ = λ exp(D M) (HA-DW arms only)."""
    renormalize: bool = False
    """HA-DW only: rescale the batch's advantages so that sum |A Φ| = sum |A| (reallocation, no step change)."""

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"Arm {self.name!r}: baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.anchor is not None and self.anchor not in ANCHOR_MODES:
            raise ValueError(f"Arm {self.name!r}: anchor must be None or one of {ANCHOR_MODES}, got {self.anchor!r}")
        if self.anchor is not None and self.baseline != "group":
            raise ValueError(f"Arm {self.name!r}: HA-DW reweights the group-mean advantage; baseline must be 'group'")
        if self.renormalize and self.anchor is None:
            raise ValueError(f"Arm {self.name!r}: renormalize applies to HA-DW arms (anchor set)")
        if not (math.isfinite(self.lr_mult) and self.lr_mult > 0 and math.isfinite(self.lambda_scale)
                and self.lambda_scale > 0):
            raise ValueError(f"Arm {self.name!r}: lr_mult and lambda_scale must be finite and > 0")


def standard_arms() -> tuple[Arm, ...]:
    """The study's arms, GRPO first (every paired difference is taken against it)."""
    arms = [Arm("grpo")]
    arms += [Arm(f"grpo_lr{m:g}", lr_mult=m) for m in (0.75, 1.3, 1.5, 2.0)]
    for mode in ANCHOR_MODES:
        arms += [Arm(f"hadw_{mode}_l{lam:g}", anchor=mode, lambda_scale=lam) for lam in (1.0, 1.3, 1.5)]
    arms += [Arm("hadw_renorm", anchor="window", lambda_scale=1.3, renormalize=True),
             Arm("loo", baseline="loo"),
             Arm("oracle", baseline="oracle"),
             Arm("rectified", baseline="rectified")]
    return tuple(arms)


# -- the rectification lemma ------------------------------------------------------------------------------------------
@cache
def rectified_scale(G: int, delta: float = RECTIFY_DELTA, floor: float = RECTIFY_FLOOR,
                    grid: int = 2001) -> tuple[np.ndarray, np.ndarray, float]:
    """The rectification lemma's scale c for every group mean p̂ = k / G.

    Returns (c [G + 1], eps [G + 1], eps_delta): c[k] is the minimax c for p̂ = k / G (1 for the degenerate k = 0
    and k = G, which carry no advantage), eps[k] = max over I of |c E[p̂ | S, p] - p| (the lemma's eps, the smallest
    that makes (c_low, c_high) non-empty), eps_delta the half-width of the confidence interval I. The sup and inf
    over I are taken on `grid` evenly spaced points (2001: within ~1e-7 of a 4001-point grid).
    """
    eps_delta = math.sqrt(math.log(2.0 / (delta * nondegenerate_prob(floor, G))) / (2.0 * G))
    c = np.ones(G + 1)
    eps = np.zeros(G + 1)
    for k in range(1, G):
        lo, hi = max(floor, k / G - eps_delta), min(1.0 - floor, k / G + eps_delta)
        p = np.linspace(lo, hi, grid)
        m = np.asarray(expected_group_mean(p, G))
        # max_p (c m - p) rises with c and max_p (p - c m) falls: the minimax c is where they meet (bisection).
        a, b = 0.0, float(np.max(p / m)) * 2.0
        for _ in range(200):
            mid = 0.5 * (a + b)
            if np.max(mid * m - p) > np.max(p - mid * m):
                b = mid
            else:
                a = mid
        c[k] = 0.5 * (a + b)
        eps[k] = float(np.max(np.abs(c[k] * m - p)))
    c.flags.writeable = eps.flags.writeable = False  # cached: shared by every caller
    return c, eps, eps_delta


# -- what each arm does to one prompt, in expectation -------------------------------------------------------------
def expected_step(arm: Arm, p: float | np.ndarray, G: int, anchor: float = 0.5,
                  adv_norm: str = "group_std") -> np.ndarray:
    """kappa(p): the expected update an arm gives one prompt is kappa(p) * grad p (times lr * lr_mult / N).

    Given the group's rewards, a correct response's score is grad log pi(c) = grad p / p and a wrong one's is, on
    average over which wrong answer, -grad p / (1 - p); the advantages depend on the rewards only. So for any policy
    family the expected update is sum_i A_i (r_i / p - (1 - r_i) / (1 - p)) grad p, averaged over R ~ Bin(G, p):
    kappa(p) = sum_R P(R) [R A+(R) / p - (G - R) A-(R) / (1 - p)], with A+(R) / A-(R) the advantage of a correct /
    wrong response in a group with R correct, taken from `hadw_advantages` (anchor fixed at `anchor`). Plain GRPO
    with adv_norm='none' has kappa = G - 1 for every p (unbiased up to scale); the arms differ in how kappa(p) moves
    with p, i.e. how they share the step between hard and easy prompts. The renormalised arm is batch-level and
    not defined for one prompt (ValueError).

    Args:
        p: success probabilities in (0, 1), float or array [*].
    Returns: kappa, an array like p (times arm.lr_mult).
    """
    if arm.renormalize:
        raise ValueError("expected_step: the renormalised arm rescales a whole batch; it has no per-prompt kappa")
    p = np.asarray(p, dtype=np.float64)
    if not np.all((p > 0) & (p < 1)):
        raise ValueError("expected_step: p must lie in (0, 1)")
    cfg = LossConfig.grpo(adv_norm=adv_norm, hadw=arm.anchor is not None, lambda_scale=arm.lambda_scale)
    c = rectified_scale(G)[0]
    kappa = np.zeros_like(p)
    for R in range(1, G):  # degenerate groups (R = 0, G) carry no advantage in any arm
        r = torch.tensor([1.0] * R + [0.0] * (G - R), dtype=torch.float64)
        adv = hadw_advantages(r, G, anchor=anchor if arm.anchor else None, config=cfg, backend="torch")
        scale = float(adv.group_std[0]) + cfg.std_eps if adv_norm == "group_std" else 1.0
        if arm.baseline in ("group", "loo"):
            loo = G / (G - 1) if arm.baseline == "loo" else 1.0
            a_pos, a_neg = loo * float(adv.advantages[0]), loo * float(adv.advantages[-1])
        else:
            base = p if arm.baseline == "oracle" else c[R] * R / G
            a_pos, a_neg = (1.0 - base) / scale, -base / scale
        prob = math.comb(G, R) * p**R * (1.0 - p) ** (G - R)
        kappa += prob * (R * a_pos / p - (G - R) * a_neg / (1.0 - p))
    return kappa * arm.lr_mult


# -- advantages -------------------------------------------------------------------------------------------------------
class AdvantageEstimator:
    """The advantages of one arm for S seeds' batches; holds the seeds' anchors (state across steps).

    Call with rewards [S, B * G] (each prompt's G responses contiguous) and the true success probability of each
    batch prompt [S, B]; returns the advantages [S * B * G] for `hadw_policy_loss` and the anchors' priors [S] (NaN
    without an anchor).
    """

    def __init__(self, arm: Arm, config: LossConfig, n_seeds: int, group: int) -> None:
        if config.adv_norm not in ("group_std", "none"):
            # batch_std would mix the stacked seeds' rewards in one statistic
            raise ValueError(f"the lab supports adv_norm 'group_std' and 'none', got {config.adv_norm!r}")
        self.arm = arm
        self.group = group
        self.config = config.replace(hadw=arm.anchor is not None, lambda_scale=arm.lambda_scale)
        self.anchors = [DifficultyAnchor(mode=arm.anchor) for _ in range(n_seeds)] if arm.anchor else None
        if arm.baseline == "rectified":
            self.scale = torch.tensor(rectified_scale(group)[0])

    def __call__(self, rewards: torch.Tensor, true_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = rewards.shape[0]
        if self.anchors is not None:
            return self._hadw(rewards)
        adv = hadw_advantages(rewards.reshape(-1), self.group, config=self.config, backend="torch")
        priors = torch.full((S,), float("nan"), dtype=torch.float64)
        if self.arm.baseline == "group":
            return adv.advantages, priors
        if self.arm.baseline == "loo":  # r - (sum of the others) / (G - 1) = G / (G - 1) (r - p̂)
            return adv.advantages * (self.group / (self.group - 1)), priors
        if self.arm.baseline == "oracle":
            baseline = true_p.reshape(-1)
        else:
            k = torch.round(adv.group_mean * self.group).long()
            baseline = self.scale[k] * adv.group_mean
        idx = adv.group_index
        centred = rewards.reshape(-1) - baseline[idx]
        if self.config.adv_norm == "group_std":  # the library's normaliser: the group's own std + std_eps
            centred = centred / (adv.group_std + self.config.std_eps)[idx]
        return torch.where(adv.degenerate[idx], 0.0, centred), priors

    def _hadw(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, priors = [], []
        for s, anchor in enumerate(self.anchors):
            # one anchor per seed, fed that seed's batch accuracy y_t (the mean of its B * G rewards)
            prior = anchor.step(accuracy=float(rewards[s].mean()))
            adv = hadw_advantages(rewards[s], self.group, anchor=prior, config=self.config, backend="torch")
            a = adv.advantages
            if self.arm.renormalize:
                total = a.abs().sum()
                if total > 0:
                    a = a * (adv.raw.abs().sum() / total)
            out.append(a)
            priors.append(prior)
        return torch.cat(out), torch.tensor(priors, dtype=torch.float64)
