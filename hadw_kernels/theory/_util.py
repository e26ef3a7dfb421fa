"""Argument checks, the lazy scipy import and the binomial pmf shared by the theory modules."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def require_scipy() -> Any:
    """Import scipy on first use: `import hadw_kernels` must not pay for it (or need it)."""
    try:
        import scipy  # noqa: F401
        import scipy.integrate
        import scipy.special
        import scipy.stats
    except ImportError as err:  # pragma: no cover - scipy is in the dev environment
        raise ImportError(
            "hadw_kernels.theory needs scipy for this function; install the extra: pip install 'hadw-kernels[theory]'"
        ) from err
    return scipy


def check_group_size(G: Any, where: str) -> int:
    """G must be an int >= 2: a group-relative baseline needs at least two responses."""
    if isinstance(G, bool) or not isinstance(G, (int, np.integer)):
        raise ValueError(f"{where}: G must be an int >= 2, got {G!r}")
    if G < 2:
        raise ValueError(f"{where}: G must be >= 2 (a group-relative advantage needs two responses), got {G}")
    return int(G)


def check_unit_scalar(name: str, value: Any, where: str) -> float:
    """A finite real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: {name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{where}: {name} must be in [0, 1], got {value!r}")
    return value


def check_probabilities(p: Any, where: str) -> np.ndarray:
    """p as a float64 array (any shape), every entry finite and in [0, 1]."""
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: p must be a number or an array of numbers in [0, 1], got {p!r}") from err
    bad = ~((arr >= 0.0) & (arr <= 1.0))  # NaN fails both comparisons
    if bad.any():
        first = arr[bad].flat[0]
        raise ValueError(f"{where}: p must lie in [0, 1]; {int(bad.sum())} value(s) do not (e.g. {first!r})")
    return arr


def check_nonnegative(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return value


def log_binom_coeffs(G: int) -> np.ndarray:
    """log C(G, k) for k = 0..G, [G + 1] (lgamma keeps large G finite)."""
    lg = math.lgamma
    return np.array([lg(G + 1) - lg(k + 1) - lg(G - k + 1) for k in range(G + 1)])


def binom_pmf(p: np.ndarray, G: int) -> np.ndarray:
    """P(R = k) for R ~ Binomial(G, p): [*p.shape, G + 1], float64.

    Computed in log space so that G in the thousands neither overflows C(G, k) nor underflows p^k too early;
    p = 0 and p = 1 give the exact point masses.
    """
    p = np.asarray(p, dtype=np.float64)
    k = np.arange(G + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(p)[..., None]
        logq = np.log1p(-p)[..., None]
        # 0 * log(0) must count as 0 (p^0 = 1 at p = 0); where() keeps the -inf of the other terms.
        term_k = np.where(k == 0, 0.0, k * logp)
        term_gk = np.where(k == G, 0.0, (G - k) * logq)
        return np.exp(log_binom_coeffs(G) + term_k + term_gk)


def conditional_pmf(p: np.ndarray, G: int) -> np.ndarray:
    """P(R = k | S) for k = 0..G, S = {1 <= R <= G-1}: [*p.shape, G + 1] (zero at k = 0 and k = G).

    At p = 0 and p = 1, where P(S) = 0, the limit is used: as p -> 0 a non-degenerate group has exactly one
    correct response (R = 1), as p -> 1 exactly one wrong one (R = G - 1).
    """
    p = np.asarray(p, dtype=np.float64)
    pmf = binom_pmf(p, G)
    pmf[..., 0] = 0.0
    pmf[..., G] = 0.0
    total = pmf.sum(axis=-1, keepdims=True)  # = P(S), a sum of positive terms: no cancellation near 0 or 1
    with np.errstate(invalid="ignore", divide="ignore"):
        cond = pmf / total
    limit0 = np.zeros(G + 1)
    limit0[1] = 1.0
    limit1 = np.zeros(G + 1)
    limit1[G - 1] = 1.0
    # total == 0 covers p in {0, 1} and a p so close to them that every term underflowed.
    degenerate = (total[..., 0] == 0.0)[..., None]
    limit = np.where((p < 0.5)[..., None], limit0, limit1)
    return np.where(degenerate, limit, cond)
