"""Theorem 4: the group-mean bias when rewards are continuous on [0, 1] (scipy distributions).

With continuous rewards no group is exactly degenerate, so the paper conditions on the update event
S_σ = {max r - min r > σ}: a group whose rewards span at most σ carries (almost) no learning signal. With f, F
the reward density and cdf, q(u) = F(min(1, u + σ)) - F(u) and m(u) = E[r | u <= r <= min(1, u + σ)]:

    P(S_σᶜ) = G ∫₀¹ f(u) q(u)^(G-1) du                 (the group minimum is u, the others lie in [u, u + σ])
    E[p̂ | S_σ] = (p - ∫₀¹ (u + (G-1) m(u)) f(u) q(u)^(G-1) du) / (1 - P(S_σᶜ))

Both integrals are computed with scipy's adaptive quadrature (QUADPACK, error requested below 1e-12), split at the
kinks u = 1 - σ and the support's ends; (G-1) m(u) q^(G-1) is evaluated as (G-1) (K(u⁺) - K(u)) q^(G-2) with
K(x) = ∫₀ˣ r f(r) dr, in closed form for the Beta, uniform and truncated normal families, by quadrature otherwise.

    >>> res = continuous_bias(beta_rewards(2.0, 5.0), G=8, sigma=0.1)
    >>> round(res.bias, 6) == round(res.p - res.expected_group_mean, 6)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hadw_kernels.theory._util import check_group_size, check_unit_scalar, require_scipy


@dataclass(frozen=True)
class ContinuousBias:
    """Theorem 4's quantities for one reward distribution, G and σ.

    Note the sign: `bias` = p - E[p̂ | S_σ] (the paper's Theorem 4 convention), the opposite of `advantage_bias`
    (E[p̂ | S] - p) for binary rewards.
    """

    p: float
    """E[r], the mean reward."""
    p_nonupdate: float
    """P(S_σᶜ): the chance that a group's rewards span at most σ (no update)."""
    expected_group_mean: float
    """E[p̂ | S_σ]."""
    bias: float
    """p - E[p̂ | S_σ]."""
    G: int
    sigma: float


def beta_rewards(alpha: float, beta: float) -> Any:
    """Rewards ~ Beta(alpha, beta) on [0, 1], as a frozen scipy distribution (alpha, beta > 0)."""
    scipy = require_scipy()
    for name, v in (("alpha", alpha), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"beta_rewards: {name} must be a finite number > 0, got {v!r}")
    return scipy.stats.beta(float(alpha), float(beta))


def truncated_normal_rewards(mu: float, xi: float) -> Any:
    """Rewards ~ Normal(mu, xi²) truncated to [0, 1], as a frozen scipy distribution.

    The paper's truncated-normal corollary calls the normal's scale σ; it is a different quantity from the
    update threshold σ of Theorem 4, so it is named ξ here.
    """
    scipy = require_scipy()
    for name, v in (("mu", mu), ("xi", xi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"truncated_normal_rewards: {name} must be a finite number, got {v!r}")
    if xi <= 0:
        raise ValueError(f"truncated_normal_rewards: the scale xi must be > 0, got {xi!r}")
    return scipy.stats.truncnorm((0.0 - mu) / xi, (1.0 - mu) / xi, loc=float(mu), scale=float(xi))


def _parameters(dist: Any) -> dict[str, float]:
    """A frozen scipy distribution's shape, loc and scale parameters by name (public attributes only)."""
    names = [s.strip() for s in (dist.dist.shapes or "").split(",") if s.strip()] + ["loc", "scale"]
    values: dict[str, float] = {"loc": 0.0, "scale": 1.0}
    values.update(zip(names, dist.args, strict=False))  # args may omit loc and scale
    values.update(dist.kwds)
    return {k: float(v) for k, v in values.items()}


def _partial_mean(dist: Any) -> Callable[[float], float]:
    """K(x) = ∫₀ˣ r f(r) dr for x in [0, 1]."""
    scipy = require_scipy()
    name = getattr(dist.dist, "name", "")
    par = _parameters(dist)
    if name == "beta" and par["loc"] == 0.0 and par["scale"] == 1.0:
        a, b = par["a"], par["b"]
        mean = a / (a + b)
        return lambda x: mean * float(scipy.special.betainc(a + 1.0, b, x))  # r·Beta(a,b) pdf = mean·Beta(a+1,b)
    if name == "uniform":
        lo, width = par["loc"], par["scale"]
        return lambda x: (min(max(x, lo), lo + width) ** 2 - lo**2) / (2.0 * width)
    if name == "truncnorm":
        a, b, mu, xi = par["a"], par["b"], par["loc"], par["scale"]
        norm = scipy.stats.norm
        z_mass = norm.cdf(b) - norm.cdf(a)

        def k_truncnorm(x: float) -> float:
            z = min(max((x - mu) / xi, a), b)
            return (mu * (norm.cdf(z) - norm.cdf(a)) - xi * (norm.pdf(z) - norm.pdf(a))) / z_mass

        return k_truncnorm
    lo = max(float(dist.support()[0]), 0.0)

    def k_generic(x: float) -> float:
        if x <= lo:
            return 0.0
        return scipy.integrate.quad(lambda r: r * dist.pdf(r), lo, x, epsabs=1e-14, epsrel=1e-12, limit=200)[0]

    return k_generic


def continuous_bias(dist: Any, G: int, sigma: float) -> ContinuousBias:
    """Theorem 4 for rewards drawn i.i.d. from `dist` (a frozen scipy continuous distribution on [0, 1]).

    Args:
        dist: e.g. `beta_rewards(2, 5)`, `truncated_normal_rewards(0.3, 0.2)`, `scipy.stats.uniform()`.
        G: group size, int >= 2.
        sigma: the update threshold σ in [0, 1): a group updates when max r - min r > σ.
    Returns: `ContinuousBias` (p, p_nonupdate, expected_group_mean, bias = p - E[p̂ | S_σ]), accurate to 1e-6
        (quadrature error requested below 1e-12).
    """
    where = "continuous_bias"
    scipy = require_scipy()
    G = check_group_size(G, where)
    sigma = check_unit_scalar("sigma", sigma, where)
    if sigma >= 1.0:
        raise ValueError(f"{where}: sigma must be < 1 (no group of rewards in [0, 1] spans more than 1), got {sigma}")
    if not all(hasattr(dist, a) for a in ("pdf", "cdf", "mean", "support", "dist")):
        raise ValueError(f"{where}: dist must be a frozen scipy.stats continuous distribution, got {dist!r}")
    lo, hi = (float(v) for v in dist.support())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{where}: dist must live on [0, 1]; its support is [{lo}, {hi}]")

    p = float(dist.mean())
    K = _partial_mean(dist)

    def q(u: float) -> float:
        return float(dist.cdf(min(1.0, u + sigma)) - dist.cdf(u))

    def nonupdate(u: float) -> float:
        return G * float(dist.pdf(u)) * q(u) ** (G - 1)

    def mean_part(u: float) -> float:
        qu = q(u)
        upper = min(1.0, u + sigma)
        # (G-1) m(u) q^(G-1) = (G-1) (K(u⁺) - K(u)) q^(G-2): no division by q, which vanishes at the top end.
        return float(dist.pdf(u)) * (u * qu ** (G - 1) + (G - 1) * (K(upper) - K(u)) * qu ** (G - 2))

    kinks = sorted({x for x in (1.0 - sigma, lo, hi, lo - sigma, hi - sigma) if 0.0 < x < 1.0})
    opts = dict(points=kinks or None, epsabs=1e-13, epsrel=1e-12, limit=500)
    p_non = min(max(scipy.integrate.quad(nonupdate, 0.0, 1.0, **opts)[0], 0.0), 1.0)
    part = scipy.integrate.quad(mean_part, 0.0, 1.0, **opts)[0]
    p_update = 1.0 - p_non
    if p_update <= 1e-12:
        raise ValueError(f"{where}: the update event S_sigma has probability {p_update:.3g}; E[p̂ | S_sigma] is "
                         "undefined (choose a smaller sigma)")
    mean = (p - part) / p_update
    return ContinuousBias(p=p, p_nonupdate=p_non, expected_group_mean=mean, bias=p - mean, G=G, sigma=sigma)


def uniform_nonupdate_prob(G: int, sigma: float) -> float:
    """Closed form of P(S_σᶜ) for uniform rewards: G σ^(G-1) - (G-1) σ^G (and E[p̂ | S_σ] = 1/2 by symmetry)."""
    G = check_group_size(G, "uniform_nonupdate_prob")
    sigma = check_unit_scalar("sigma", sigma, "uniform_nonupdate_prob")
    return G * sigma ** (G - 1) - (G - 1) * sigma**G


__all__ = [
    "ContinuousBias",
    "beta_rewards",
    "continuous_bias",
    "truncated_normal_rewards",
    "uniform_nonupdate_prob",
]
