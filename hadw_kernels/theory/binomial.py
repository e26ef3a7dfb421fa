"""The Bernoulli group model (paper §2, Lemma 2, Theorem 2): exact formulas, vectorised over p.

A prompt with success probability p gets a group of G responses with binary rewards, R = number correct
~ Binomial(G, p), group mean p̂ = R / G. GRPO learns only from a non-degenerate group, the event
S = {1 <= R <= G - 1}, so every expectation below is conditional on S.

    >>> round(advantage_bias(0.1, 8), 6)     # a hard prompt: the baseline is too high, Â under-credits
    0.075583
    >>> advantage_bias([0.5], 8)
    array([0.])

At p in {0, 1} P(S) = 0 and the conditionals are given by their limits (a group that is non-degenerate
"by a hair" has one correct, or one wrong, response): E[p̂ | S] = 1/G at p = 0 and 1 - 1/G at p = 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hadw_kernels.theory._util import (
    check_group_size,
    check_nonnegative,
    check_probabilities,
    conditional_pmf,
)


def _as_output(arr: np.ndarray, like: np.ndarray) -> Any:
    """A Python float for scalar input, else the array (same shape as p)."""
    return float(arr) if like.ndim == 0 else arr


def nondegenerate_prob(p: Any, G: int) -> Any:
    """P(S) = 1 - (1-p)^G - p^G: the chance that a group has both a correct and a wrong response.

    Args:
        p: success probability, a float or an array [*] in [0, 1].
        G: group size, int >= 2.
    Returns: float, or an array [*] like p.
    """
    p = check_probabilities(p, "nondegenerate_prob")
    G = check_group_size(G, "nondegenerate_prob")
    with np.errstate(divide="ignore"):
        # expm1/log1p on the side of 1/2 where each power is close to 1: P(S) ~ G p near p = 0 would otherwise
        # be a difference of two numbers close to 1 and lose ~log10(1/p) digits.
        low = -np.expm1(G * np.log1p(-p)) - p**G
        high = -np.expm1(G * np.log(p)) - (1.0 - p) ** G
    out = np.where(p <= 0.5, low, high)
    return _as_output(np.clip(out, 0.0, 1.0) + 0.0, p)  # + 0.0 turns -0.0 into 0.0


def expected_group_mean(p: Any, G: int) -> Any:
    """E[p̂ | S] = p (1 - p^(G-1)) / P(S) (Lemma 2), with the limits 1/G at p = 0 and 1 - 1/G at p = 1.

    Args:
        p: success probability, a float or an array [*] in [0, 1].
        G: group size, int >= 2.
    Returns: float, or an array [*] like p.
    """
    p = check_probabilities(p, "expected_group_mean")
    G = check_group_size(G, "expected_group_mean")
    ps = np.asarray(nondegenerate_prob(p, G))
    with np.errstate(divide="ignore", invalid="ignore"):
        num = p * -np.expm1((G - 1) * np.log(p))  # p (1 - p^(G-1)), accurate as p -> 1
        mean = num / ps
    # Where P(S) is 0 (p in {0, 1}) or so small that the ratio is noise, fall back to the exact sum over k.
    tiny = ps < 1e-200
    if tiny.any():
        k = np.arange(G + 1) / G
        mean = np.where(tiny, (conditional_pmf(p, G) * k).sum(axis=-1), mean)
    return _as_output(mean, p)


def advantage_bias(p: Any, G: int) -> Any:
    """E[p̂ | S] - p = A - E[Â | S] for the un-normalised advantage Â = r - p̂ (Lemma 2).

    Positive for p < 1/2 (hard prompts: the baseline is too high, correct answers are under-credited),
    negative for p > 1/2, zero at 1/2; antisymmetric: bias(1 - p) = -bias(p).
    Args:
        p: success probability, a float or an array [*] in [0, 1].
        G: group size, int >= 2.
    Returns: float, or an array [*] like p.
    """
    p = check_probabilities(p, "advantage_bias")
    mean = np.asarray(expected_group_mean(p, G))
    return _as_output(mean - p, p)


def _tail(p: Any, G: int, eps: Any, side: str, where: str) -> Any:
    p = check_probabilities(p, where)
    G = check_group_size(G, where)
    eps = check_nonnegative("eps", eps, where)
    k = np.arange(G + 1) / G
    gap = (k - p[..., None]) if side == "under" else (p[..., None] - k)
    # The event as Theorem 2 states it (k = floor(G(p+eps))+1 .. G-1, resp. 1 .. ceil(G(p-eps))-1), written as the
    # comparison itself so that a p on a breakpoint j/G is decided the way p̂ - p > eps reads.
    mask = gap > eps
    # Rounding can push a sum that is exactly 1 (all of S) one ulp above it.
    return _as_output(np.clip((conditional_pmf(p, G) * mask).sum(axis=-1), 0.0, 1.0), p)


def underestimate_prob(p: Any, G: int, eps: float = 0.0) -> Any:
    """P(p̂ - p > eps | S): the chance the baseline overshoots p by more than eps, i.e. Â < A - eps (Theorem 2).

    The exact binomial tail sum over k = floor(G(p + eps)) + 1 .. G - 1, divided by P(S). Large for hard
    prompts (p < 1/2): their correct answers are under-credited.
    Args:
        p: success probability, a float or an array [*] in [0, 1].
        G: group size, int >= 2.
        eps: margin >= 0 (default 0: the probability that the advantage is underestimated at all).
    Returns: float, or an array [*] like p.
    """
    return _tail(p, G, eps, "under", "underestimate_prob")


def overestimate_prob(p: Any, G: int, eps: float = 0.0) -> Any:
    """P(p - p̂ > eps | S): the chance the baseline undershoots p by more than eps, i.e. Â > A + eps (Theorem 2).

    The exact binomial sum over k = 1 .. ceil(G(p - eps)) - 1, divided by P(S). Large for easy prompts (p > 1/2).
    Args:
        p: success probability, a float or an array [*] in [0, 1].
        G: group size, int >= 2.
        eps: margin >= 0 (default 0).
    Returns: float, or an array [*] like p.
    """
    return _tail(p, G, eps, "over", "overestimate_prob")
