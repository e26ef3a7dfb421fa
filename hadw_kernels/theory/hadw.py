"""Exact expectations of the HA-DW-weighted advantage (paper §3.2 and Theorem 3), by enumerating the group.

For one response i of a group of G with success probability p, a fixed anchor C and the weight
Φ_i = λ exp(D_i M), D_i = -sgn(Â_i) sgn(p̂ - C), M = |p̂ - C| (spec §4), this module enumerates the number R of
correct responses in the group (exchangeability: given R = k, response i is correct with probability k / G) and
returns, conditional on the non-degenerate event S,

- per outcome of response i (correct / wrong): E[Â | S, r_i], E[Â Φ | S, r_i] and the true advantage A = r_i - p;
- pooled over the outcome: E[Â | S] (0 by symmetry), E[Â Φ | S] and E[A | S] = E[p̂ | S] - p. Here
  E[A | S] - E[Â | S] is exactly Lemma 2's bias.

Φ is linear in λ, so the λ for which HA-DW moves the estimate closer to A form an interval, computed exactly
(`lambda_range`): this is Theorem 3's claim made measurable for a given (p, G, C).

    >>> res = hadw_expected_advantage(0.2, 8, anchor=0.2, lambda_scale=1.3)
    >>> res.correct.improves, res.wrong.improves
    (True, False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hadw_kernels.theory._util import check_group_size, check_unit_scalar, conditional_pmf

ADV_NORMS = ("none", "group_std")


@dataclass(frozen=True)
class OutcomeExpectation:
    """Expectations for one outcome of a response ('correct', 'wrong') or pooled over both ('pooled')."""

    outcome: str
    prob: float
    """P(outcome | S) (1 for 'pooled')."""
    true_advantage: float
    """E[A | S, outcome]: A = r - p ('none') or (r - p) / sqrt(p (1 - p)) ('group_std')."""
    plain: float
    """E[Â | S, outcome] (HA-DW off)."""
    hadw: float
    """E[Â Φ | S, outcome] at the requested λ."""
    unit: float
    """E[Â exp(D M) | S, outcome], i.e. `hadw` / λ."""

    @property
    def plain_error(self) -> float:
        """E[Â | ·] - A."""
        return self.plain - self.true_advantage

    @property
    def hadw_error(self) -> float:
        """E[Â Φ | ·] - A."""
        return self.hadw - self.true_advantage

    @property
    def improves(self) -> bool:
        """HA-DW is strictly closer to A than the plain advantage."""
        return abs(self.hadw_error) < abs(self.plain_error)

    @property
    def lambda_exact(self) -> float:
        """The λ > 0 for which E[Â Φ | ·] = A exactly (nan if none exists)."""
        if self.unit == 0.0 or self.true_advantage / self.unit <= 0.0:
            return math.nan
        return self.true_advantage / self.unit

    @property
    def lambda_range(self) -> tuple[float, float] | None:
        """The open interval of λ > 0 with |E[Â Φ | ·] - A| < |E[Â | ·] - A|, or None when no λ helps."""
        a, u, d = self.true_advantage, self.unit, abs(self.plain_error)
        if d <= 1e-12:  # the plain estimate is already exact (up to rounding): nothing to improve
            return None
            return None
        if u == 0.0:
            return (0.0, math.inf) if abs(a) < d else None
        lo, hi = sorted(((a - d) / u, (a + d) / u))
        lo = max(lo, 0.0) + 0.0  # + 0.0: no '-0.0' lower end
        # When |A| equals the plain error (the pooled rows, where E[Â | S] = 0) and λ·unit points away from A, the
        # true interval is empty but rounding leaves a sliver (0, 1e-16): treat slivers as empty.
        return (lo, hi) if hi - lo > 1e-12 * max(1.0, abs(hi)) else None


@dataclass(frozen=True)
class HadwExpectation:
    """`hadw_expected_advantage`'s result: one `OutcomeExpectation` per outcome and pooled."""

    p: float
    G: int
    anchor: float
    lambda_scale: float
    adv_norm: str
    correct: OutcomeExpectation
    wrong: OutcomeExpectation
    pooled: OutcomeExpectation

    def rows(self) -> list[OutcomeExpectation]:
        return [self.correct, self.wrong, self.pooled]


def hadw_expected_advantage(
    p: float,
    G: int,
    anchor: float,
    lambda_scale: float = 1.3,
    adv_norm: str = "none",
    std_eps: float = 1e-6,
) -> HadwExpectation:
    """Exact E[Â Φ | S] and E[Â | S] next to the true advantage, for binary rewards (binomial enumeration).

    Args:
        p: the prompt's success probability in [0, 1] ('group_std' needs 0 < p < 1: the true normalised
            advantage divides by sqrt(p (1 - p))). At p in {0, 1} the limits of the conditionals are used.
        G: group size, int >= 2.
        anchor: the difficulty anchor C in [0, 1] (the prior C_t^- of spec §3).
        lambda_scale: λ > 0 (1.3, the paper's best).
        adv_norm: 'none' (Â = r - p̂, the paper's theory) or 'group_std' (Â = (r - p̂) / (s + std_eps), s the
            sample std of the group, spec §2).
        std_eps: ε added to the group std ('group_std' only; verl's 1e-6).
    Returns: `HadwExpectation` with `.correct`, `.wrong`, `.pooled`.
    """
    where = "hadw_expected_advantage"
    p = check_unit_scalar("p", p, where)
    G = check_group_size(G, where)
    anchor = check_unit_scalar("anchor", anchor, where)
    if isinstance(lambda_scale, bool) or not isinstance(lambda_scale, (int, float)) or not (
        math.isfinite(lambda_scale) and lambda_scale > 0
    ):
        raise ValueError(f"{where}: lambda_scale must be a finite number > 0, got {lambda_scale!r}")
    if adv_norm not in ADV_NORMS:
        raise ValueError(f"{where}: adv_norm must be one of {ADV_NORMS}, got {adv_norm!r}")
    if adv_norm == "group_std" and p in (0.0, 1.0):
        raise ValueError(f"{where}: adv_norm='group_std' needs 0 < p < 1 (the true advantage divides by "
                         f"sqrt(p(1-p))), got p={p}")

    k = np.arange(G + 1, dtype=np.float64)
    cond = conditional_pmf(np.float64(p), G)  # P(R = k | S), [G + 1]
    mean = k / G
    if adv_norm == "none":
        denom = np.ones_like(k)
        scale_true = 1.0
    else:
        std = np.sqrt(k * (G - k) / (G * (G - 1)))  # sample std of k ones and G - k zeros
        denom = std + std_eps
        scale_true = math.sqrt(p * (1.0 - p))
    diff = mean - anchor
    out: dict[str, OutcomeExpectation] = {}
    pooled = np.zeros(4)  # prob-weighted sums: prob, true, plain, unit
    for name, r in (("correct", 1.0), ("wrong", 0.0)):
        weight = cond * (k / G if r == 1.0 else (G - k) / G)  # P(R = k, r_i = r | S)
        adv = (r - mean) / denom
        unit = adv * np.exp(-np.sign(adv) * np.sign(diff) * np.abs(diff))
        prob = float(weight.sum())
        true = (r - p) / scale_true
        if prob > 0.0:
            plain_e, unit_e = float(weight @ adv) / prob, float(weight @ unit) / prob
        else:  # this outcome never happens in a non-degenerate group (cannot occur for 0 <= p <= 1, G >= 2)
            plain_e = unit_e = math.nan
        out[name] = OutcomeExpectation(name, prob, true, plain_e, lambda_scale * unit_e, unit_e)
        pooled += prob * np.array([1.0, true, plain_e, unit_e])
    out["pooled"] = OutcomeExpectation("pooled", 1.0, float(pooled[1]), float(pooled[2]),
                                       lambda_scale * float(pooled[3]), float(pooled[3]))
    return HadwExpectation(p=p, G=G, anchor=anchor, lambda_scale=float(lambda_scale), adv_norm=adv_norm, **out)
