"""Seeded, vectorised Monte Carlo simulators: the Bernoulli group model, continuous rewards, HA-DW's weighted
advantage, and the difficulty anchor tracking a drifting accuracy (the real `DifficultyAnchor`).

They exist to check the exact formulas of this package from the other side (every estimate carries its standard
error, so tests can bound a z-score) and to show what no closed form does: how the anchor modes follow a model
whose accuracy changes during training.

    >>> est = simulate_bernoulli_bias(0.2, 8, n_groups=20_000, seed=0)
    >>> abs(est.bias - 0.040316) < 5 * est.bias_stderr   # advantage_bias(0.2, 8) = 0.040316
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hadw_kernels.theory._util import check_group_size, check_probabilities, check_unit_scalar


def _check_count(name: str, n: Any, where: str, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {n!r}")
    return int(n)


def simulate_groups(p: Any, G: int, n_groups: int, seed: int | None = 0) -> np.ndarray:
    """Binary rewards of n_groups groups of G responses: [n_groups, G] float64 in {0, 1}.

    Args:
        p: success probability, a float or an array [n_groups] (one per group/prompt), in [0, 1].
        G: group size, int >= 2.
        n_groups: number of groups.
        seed: numpy Generator seed (None: fresh entropy).
    """
    where = "simulate_groups"
    G = check_group_size(G, where)
    n_groups = _check_count("n_groups", n_groups, where)
    p = check_probabilities(p, where)
    if p.ndim not in (0, 1) or (p.ndim == 1 and p.shape[0] != n_groups):
        raise ValueError(f"{where}: p must be a float or an array [n_groups={n_groups}], got shape {p.shape}")
    rng = np.random.default_rng(seed)
    prob = p if p.ndim == 0 else p[:, None]
    return (rng.random((n_groups, G)) < prob).astype(np.float64)


@dataclass(frozen=True)
class BernoulliEstimate:
    """Monte Carlo estimates for the Bernoulli group model."""

    p_nondegenerate: float
    """Fraction of groups in S (estimates P(S))."""
    expected_group_mean: float
    """Mean of p̂ over the groups in S (estimates E[p̂ | S])."""
    bias: float
    """expected_group_mean - p (estimates `advantage_bias`)."""
    bias_stderr: float
    """Standard error of `bias` (and of `expected_group_mean`)."""
    n_used: int
    """Number of groups in S."""


def simulate_bernoulli_bias(p: float, G: int, n_groups: int = 100_000, seed: int | None = 0) -> BernoulliEstimate:
    """Estimate P(S), E[p̂ | S] and the bias E[p̂ | S] - p by sampling n_groups groups (Lemma 2, other side)."""
    where = "simulate_bernoulli_bias"
    p = check_unit_scalar("p", p, where)
    r = simulate_groups(p, G, n_groups, seed)
    k = r.sum(axis=1)
    keep = (k >= 1) & (k <= G - 1)
    n = int(keep.sum())
    if n < 2:
        raise ValueError(f"{where}: only {n} non-degenerate group(s) in {n_groups}; raise n_groups or move p "
                         "away from 0 and 1")
    mean = k[keep] / G
    m = float(mean.mean())
    return BernoulliEstimate(n / n_groups, m, m - p, float(mean.std(ddof=1) / math.sqrt(n)), n)


@dataclass(frozen=True)
class ContinuousEstimate:
    """Monte Carlo estimates for Theorem 4 (the sign convention of `ContinuousBias`: bias = p - E[p̂ | S_σ])."""

    p_nonupdate: float
    p_nonupdate_stderr: float
    expected_group_mean: float
    bias: float
    """dist.mean() - mean of p̂ over updating groups."""
    bias_stderr: float
    n_used: int


def simulate_continuous_bias(dist: Any, G: int, sigma: float, n_groups: int = 100_000,
                             seed: int | None = 0) -> ContinuousEstimate:
    """Sample n_groups groups of G rewards from a frozen scipy distribution and estimate Theorem 4's quantities."""
    where = "simulate_continuous_bias"
    G = check_group_size(G, where)
    sigma = check_unit_scalar("sigma", sigma, where)
    n_groups = _check_count("n_groups", n_groups, where, minimum=2)
    r = np.asarray(dist.rvs(size=(n_groups, G), random_state=np.random.default_rng(seed)), dtype=np.float64)
    update = (r.max(axis=1) - r.min(axis=1)) > sigma
    n = int(update.sum())
    if n < 2:
        raise ValueError(f"{where}: only {n} updating group(s) in {n_groups}; lower sigma or raise n_groups")
    q = 1.0 - n / n_groups
    mean = r[update].mean(axis=1)
    m = float(mean.mean())
    return ContinuousEstimate(q, math.sqrt(q * (1 - q) / n_groups), m, float(dist.mean()) - m,
                              float(mean.std(ddof=1) / math.sqrt(n)), n)


@dataclass(frozen=True)
class HadwEstimate:
    """Monte Carlo counterpart of one `OutcomeExpectation` (response 0 of each non-degenerate group)."""

    outcome: str
    prob: float
    plain: float
    plain_stderr: float
    hadw: float
    hadw_stderr: float
    n_used: int


def simulate_hadw_advantage(p: float, G: int, anchor: float, lambda_scale: float = 1.3, adv_norm: str = "none",
                            n_groups: int = 100_000, seed: int | None = 0,
                            std_eps: float = 1e-6) -> dict[str, HadwEstimate]:
    """Sample groups and average Â and Â Φ (spec §2 and §4) of the first response of each non-degenerate group.

    Returns: {'correct', 'wrong', 'pooled'} -> `HadwEstimate`; compare with `hadw_expected_advantage`.
    Only the first response is used so that the samples are independent and the standard errors honest.
    """
    where = "simulate_hadw_advantage"
    if adv_norm not in ("none", "group_std"):
        raise ValueError(f"{where}: adv_norm must be 'none' or 'group_std', got {adv_norm!r}")
    anchor = check_unit_scalar("anchor", anchor, where)
    r = simulate_groups(check_unit_scalar("p", p, where), G, n_groups, seed)
    k = r.sum(axis=1)
    keep = (k >= 1) & (k <= G - 1)
    r, mean = r[keep], k[keep] / G
    adv = r[:, 0] - mean
    if adv_norm == "group_std":
        adv = adv / (r.std(axis=1, ddof=1) + std_eps)
    diff = mean - anchor
    weighted = adv * lambda_scale * np.exp(-np.sign(adv) * np.sign(diff) * np.abs(diff))
    out = {}
    for name, sel in (("correct", r[:, 0] == 1.0), ("wrong", r[:, 0] == 0.0), ("pooled", np.ones(len(adv), bool))):
        n = int(sel.sum())
        if n < 2:
            raise ValueError(f"{where}: only {n} sample(s) for outcome {name!r}; raise n_groups")
        a, w = adv[sel], weighted[sel]
        out[name] = HadwEstimate(name, n / len(adv), float(a.mean()), float(a.std(ddof=1) / math.sqrt(n)),
                                 float(w.mean()), float(w.std(ddof=1) / math.sqrt(n)), n)
    return out


# -- the anchor tracking a drifting accuracy ---------------------------------------------------------------------
def drifting_accuracy(steps: int = 300, start: float = 0.2, end: float = 0.7, shape: str = "sigmoid") -> np.ndarray:
    """A model's accuracy over training steps: [steps] in [0, 1].

    shape: 'linear' ramp, 'sigmoid' (slow start, fast middle, plateau; the usual RL reward curve) or 'step'
    (a jump from start to end half-way, e.g. a curriculum switch).
    """
    where = "drifting_accuracy"
    steps = _check_count("steps", steps, where, minimum=2)
    start, end = check_unit_scalar("start", start, where), check_unit_scalar("end", end, where)
    t = np.linspace(0.0, 1.0, steps)
    if shape == "linear":
        frac = t
    elif shape == "sigmoid":
        frac = 1.0 / (1.0 + np.exp(-12.0 * (t - 0.4)))
    elif shape == "step":
        frac = (t >= 0.5).astype(np.float64)
    else:
        raise ValueError(f"{where}: shape must be 'linear', 'sigmoid' or 'step', got {shape!r}")
    return start + (end - start) * frac


@dataclass(frozen=True)
class AnchorTrace:
    """One anchor's history over a simulated run, all [steps]."""

    prior: np.ndarray
    """C_t^-, the value batch t was weighted against."""
    eta_t: np.ndarray
    """The rate used at step t ('ema' mode; nan otherwise)."""

    def tracking_error(self, accuracy: np.ndarray) -> float:
        """Root mean square of C_t^- minus the true accuracy."""
        return float(np.sqrt(np.mean((self.prior - np.asarray(accuracy)) ** 2)))


DEFAULT_ANCHORS: dict[str, dict[str, Any]] = {
    "window (h=10)": dict(mode="window", window=10),
    "ema (eta=0.1)": dict(mode="ema", eta=0.1),
    "ema (eta=10)": dict(mode="ema", eta=10.0),
    "fixed (0.5)": dict(mode="fixed", fixed_value=0.5),
}


def simulate_anchor(
    accuracy: Sequence[float] | np.ndarray,
    anchors: Mapping[str, Mapping[str, Any]] | None = None,
    G: int = 8,
    prompts: int = 256,
    seed: int | None = 0,
) -> tuple[np.ndarray, dict[str, AnchorTrace]]:
    """Feed every anchor the same simulated batches (prompts x G binary rewards at the step's true accuracy).

    Args:
        accuracy: the true accuracy per step, [steps] in [0, 1] (e.g. `drifting_accuracy()`).
        anchors: name -> keyword arguments of `DifficultyAnchor` (default `DEFAULT_ANCHORS`: window, ema with a
            small and a large eta, fixed 0.5).
        G, prompts: batch shape (the paper's 8 and 256).
        seed: seed of the shared rewards (common random numbers: every anchor sees identical batches).
    Returns: (y [steps], the observed batch accuracies; {name: AnchorTrace}).
    """
    import torch

    from hadw_kernels.anchor import DifficultyAnchor

    where = "simulate_anchor"
    acc = check_probabilities(accuracy, where)
    if acc.ndim != 1 or acc.size < 1:
        raise ValueError(f"{where}: accuracy must be a 1-D sequence of at least one step, got shape {acc.shape}")
    G = check_group_size(G, where)
    prompts = _check_count("prompts", prompts, where)
    rng = np.random.default_rng(seed)
    rewards = (rng.random((acc.size, prompts * G)) < acc[:, None]).astype(np.float32)  # all batches at once
    y = rewards.mean(axis=1, dtype=np.float64)
    traces = {}
    for name, kwargs in (DEFAULT_ANCHORS if anchors is None else anchors).items():
        anchor = DifficultyAnchor(**kwargs)
        prior = np.empty(acc.size)
        eta = np.full(acc.size, np.nan)
        for t in range(acc.size):  # the anchor is a recurrence: one step per batch, in order
            prior[t] = anchor.step(torch.from_numpy(rewards[t]))
            if anchor.eta_t is not None:
                eta[t] = anchor.eta_t
        traces[name] = AnchorTrace(prior=prior, eta_t=eta)
    return y, traces
