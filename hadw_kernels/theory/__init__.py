"""`hadw_kernels.theory`: the paper's bias results (§2, §4, App. D; spec §7) as exact, tested functions.

- Bernoulli groups (binary rewards): `nondegenerate_prob`, `expected_group_mean`, `advantage_bias` (Lemma 2),
  `underestimate_prob` / `overestimate_prob` (Theorem 2).
- p uniform on an interval: `bias_direction_probability` (Corollary 1, the paper's Tables 4-6; `paper_tables`).
- Continuous rewards: `continuous_bias` (Theorem 4) with `beta_rewards`, `truncated_normal_rewards`.
- HA-DW: `hadw_expected_advantage` (exact E[Â Φ | S] vs E[Â | S] vs A, and the λ interval of Theorem 3).
- Monte Carlo: `simulate_groups`, `simulate_bernoulli_bias`, `simulate_continuous_bias`,
  `simulate_hadw_advantage`, `simulate_anchor` (the real `DifficultyAnchor` on a `drifting_accuracy`).

Only numpy is imported here; scipy is imported by the functions that need it (install `hadw-kernels[theory]`),
matplotlib only by the `hadw-theory` CLI's plotting paths.

    >>> from hadw_kernels.theory import advantage_bias
    >>> advantage_bias(0.5, 8)
    0.0
"""

from hadw_kernels.theory.binomial import (
    advantage_bias,
    expected_group_mean,
    nondegenerate_prob,
    overestimate_prob,
    underestimate_prob,
)
from hadw_kernels.theory.continuous import (
    ContinuousBias,
    beta_rewards,
    continuous_bias,
    truncated_normal_rewards,
    uniform_nonupdate_prob,
)
from hadw_kernels.theory.corollary import PAPER_TABLES, TableRow, bias_direction_probability, paper_tables
from hadw_kernels.theory.hadw import HadwExpectation, OutcomeExpectation, hadw_expected_advantage
from hadw_kernels.theory.simulate import (
    AnchorTrace,
    drifting_accuracy,
    simulate_anchor,
    simulate_bernoulli_bias,
    simulate_continuous_bias,
    simulate_groups,
    simulate_hadw_advantage,
)

__all__ = [
    "PAPER_TABLES",
    "AnchorTrace",
    "ContinuousBias",
    "HadwExpectation",
    "OutcomeExpectation",
    "TableRow",
    "advantage_bias",
    "beta_rewards",
    "bias_direction_probability",
    "continuous_bias",
    "drifting_accuracy",
    "expected_group_mean",
    "hadw_expected_advantage",
    "nondegenerate_prob",
    "overestimate_prob",
    "paper_tables",
    "simulate_anchor",
    "simulate_bernoulli_bias",
    "simulate_continuous_bias",
    "simulate_groups",
    "simulate_hadw_advantage",
    "truncated_normal_rewards",
    "underestimate_prob",
    "uniform_nonupdate_prob",
]
