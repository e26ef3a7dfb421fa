"""The theory module against the paper's tables, brute-force enumeration, exact rational integrals, Monte Carlo
(z-score bounds) and closed forms. Runs in a few seconds on one CPU core."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")
from scipy.integrate import quad  # noqa: E402

from hadw_kernels.theory import (  # noqa: E402
    PAPER_TABLES,
    advantage_bias,
    beta_rewards,
    bias_direction_probability,
    continuous_bias,
    expected_group_mean,
    hadw_expected_advantage,
    nondegenerate_prob,
    overestimate_prob,
    paper_tables,
    simulate_bernoulli_bias,
    simulate_continuous_bias,
    simulate_groups,
    simulate_hadw_advantage,
    truncated_normal_rewards,
    underestimate_prob,
    uniform_nonupdate_prob,
)
from hadw_kernels.theory.corollary import table_interval  # noqa: E402

Z = 5.0  # z-score bound for Monte Carlo checks: a false alarm once in ~1.7 million runs per check


# -- independent brute-force references --------------------------------------------------------------------------
def enumerate_groups(p: float, G: int):
    """Every reward vector of a group with its probability: [(rewards tuple, prob)], 2^G entries."""
    for bits in itertools.product((0, 1), repeat=G):
        k = sum(bits)
        yield bits, p**k * (1 - p) ** (G - k)


def brute_conditional_mean(p: float, G: int) -> float:
    num = den = 0.0
    for bits, w in enumerate_groups(p, G):
        if 0 < sum(bits) < G:
            num += w * sum(bits) / G
            den += w
    return num / den


def exact_poly_integral(G: int, k: int, a: Fraction, b: Fraction) -> Fraction:
    """∫_a^b C(G,k) p^k (1-p)^(G-k) dp in exact rationals (expand (1-p)^(G-k) binomially)."""
    total = Fraction(0)
    for j in range(G - k + 1):
        c = math.comb(G - k, j) * (-1) ** j
        e = k + j + 1
        total += Fraction(c, e) * (b**e - a**e)
    return math.comb(G, k) * total


def exact_conditional_reading(G: int, a: Fraction, b: Fraction, direction: str) -> Fraction:
    """The 'conditional' reading in exact rationals: pieces between breakpoints j/G, polynomial integrals."""
    edges = sorted({a, b} | {Fraction(j, G) for j in range(1, G) if a < Fraction(j, G) < b})
    num = den = Fraction(0)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mid = (lo + hi) / 2
        for k in range(1, G):
            piece = exact_poly_integral(G, k, lo, hi)
            den += piece
            if (direction == "under" and Fraction(k, G) > mid) or (direction == "over" and Fraction(k, G) < mid):
                num += piece
    return num / den


def quad_average_reading(G: int, a: float, b: float, direction: str) -> float:
    """The 'average' reading by scipy's adaptive quadrature on a math.comb-based integrand."""
    def f(p: float) -> float:
        pmf = [math.comb(G, k) * p**k * (1 - p) ** (G - k) for k in range(G + 1)]
        event = sum(pmf[k] for k in range(1, G) if (k / G > p if direction == "under" else k / G < p))
        return event / sum(pmf[1:G])

    pts = [j / G for j in range(1, G) if a < j / G < b]
    return quad(f, a, b, points=pts or None, epsabs=1e-14, epsrel=1e-13, limit=500)[0] / (b - a)


# -- Corollary 1 / Tables 4-6 ------------------------------------------------------------------------------------
TABLE_ENTRIES = [(t, G, v) for t, row in PAPER_TABLES.items() for G, v in row.items()]


@pytest.mark.parametrize(("table", "G", "paper"), TABLE_ENTRIES)
def test_paper_tables_average_reading(table, G, paper):
    lo, hi = table_interval(table, G)
    ours = bias_direction_probability(G, lo, hi, "under", "average")
    assert abs(ours - paper) < 2e-5, (table, G, ours, paper)


def test_paper_tables_are_not_the_conditional_reading():
    rows = paper_tables()
    assert max(abs(r.error) for r in rows) < 1e-5  # measured 5.0e-6 (Table 5, G = 2)
    # Where the two readings differ, the paper's values are far from the literal conditional probability.
    far = [r for r in rows if abs(r.average - r.conditional) > 1e-3]
    assert len(far) >= 9
    assert all(abs(r.conditional - r.paper) > 0.05 for r in far)


def test_table6_is_the_mean_over_zero_to_two_over_G():
    # (G/2) ∫_0^{2/G} f: G = 2 and G = 3 have simple exact values.
    assert bias_direction_probability(2, 0.0, 1.0) == pytest.approx(0.5, abs=1e-13)
    assert bias_direction_probability(3, 0.0, 2 / 3) == pytest.approx(0.75, abs=1e-13)


@pytest.mark.parametrize(("G", "a", "b"), [(3, Fraction(0), Fraction(2, 3)), (4, Fraction(0), Fraction(1, 2)),
                                           (6, Fraction(0), Fraction(1, 4)), (7, Fraction(1, 10), Fraction(9, 10)),
                                           (10, Fraction(3, 7), Fraction(1))])
@pytest.mark.parametrize("direction", ["under", "over"])
def test_conditional_reading_exact_rationals(G, a, b, direction):
    exact = exact_conditional_reading(G, a, b, direction)
    ours = bias_direction_probability(G, float(a), float(b), direction, "conditional")
    assert abs(ours - float(exact)) < 1e-12


def test_conditional_reading_known_fractions():
    assert bias_direction_probability(3, 0, 2 / 3, weighting="conditional") == pytest.approx(27 / 40, abs=1e-14)
    assert bias_direction_probability(4, 0, 0.5, weighting="conditional") == pytest.approx(45 / 64, abs=1e-14)


@pytest.mark.parametrize(("G", "a", "b"), [(5, 0.0, 0.4), (8, 0.0, 0.5), (8, 0.13, 0.77), (16, 0.0, 1.0),
                                           (33, 0.2, 0.3)])
@pytest.mark.parametrize("direction", ["under", "over"])
def test_average_reading_against_adaptive_quadrature(G, a, b, direction):
    assert abs(bias_direction_probability(G, a, b, direction) - quad_average_reading(G, a, b, direction)) < 1e-9


@pytest.mark.parametrize("weighting", ["average", "conditional"])
def test_direction_probability_mirror_symmetry(weighting):
    for G, a, b in [(4, 0.0, 0.25), (8, 0.1, 0.6), (9, 0.3, 1.0)]:
        under = bias_direction_probability(G, a, b, "under", weighting)
        over = bias_direction_probability(G, 1 - b, 1 - a, "over", weighting)
        assert under == pytest.approx(over, abs=1e-12)


def test_direction_probabilities_complement_over_full_interval():
    # Ties p̂ = p have measure zero in p, so 'under' + 'over' = 1; over [0, 1] each is 1/2 by symmetry.
    for G in (2, 5, 8, 64):
        u = bias_direction_probability(G, 0.1, 0.85, "under")
        o = bias_direction_probability(G, 0.1, 0.85, "over")
        assert u + o == pytest.approx(1.0, abs=1e-12)
        assert bias_direction_probability(G) == pytest.approx(0.5, abs=1e-12)


def test_large_group_runs_and_stays_a_probability():
    v = bias_direction_probability(400, 0.0, 0.25, "under", "conditional")
    assert 0.0 < v < 1.0


# -- Lemma 2 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("G", [2, 3, 5, 8])
def test_expected_group_mean_against_enumeration(G):
    for p in (0.03, 0.2, 0.37, 0.5, 0.81, 0.999):
        assert expected_group_mean(p, G) == pytest.approx(brute_conditional_mean(p, G), abs=1e-12)
        assert advantage_bias(p, G) == pytest.approx(brute_conditional_mean(p, G) - p, abs=1e-12)


def test_lemma2_closed_form_and_sign():
    p = np.linspace(0.001, 0.999, 999)
    for G in (2, 4, 8, 16, 128):
        closed = p * (1 - p ** (G - 1)) / (1 - (1 - p) ** G - p**G)
        np.testing.assert_allclose(expected_group_mean(p, G), closed, rtol=1e-10, atol=1e-13)
        b = advantage_bias(p, G)
        if G <= 16:
            assert np.all(b[p < 0.5] > 0) and np.all(b[p > 0.5] < 0)
        else:  # mid-range the bias is below 1e-16 (it decays like p^(G-1)) and rounds to 0, never to the wrong sign
            assert np.all(b[p < 0.5] >= 0) and np.all(b[p > 0.5] <= 0)


@pytest.mark.parametrize(("p", "G"), [(0.1, 8), (0.3, 4), (0.5, 8), (0.85, 6), (0.05, 2)])
def test_lemma2_against_monte_carlo(p, G):
    est = simulate_bernoulli_bias(p, G, n_groups=60_000, seed=123)
    assert abs(est.bias - advantage_bias(p, G)) <= Z * est.bias_stderr + 1e-12  # G = 2: p̂ = 1/2 always, stderr 0
    sd = math.sqrt(nondegenerate_prob(p, G) * (1 - nondegenerate_prob(p, G)) / 60_000)
    assert abs(est.p_nondegenerate - nondegenerate_prob(p, G)) < Z * sd + 1e-12


def test_lemma2_is_the_pooled_gap_of_hadw_expectation():
    # Pooled over the response's own outcome, E[A | S] - E[Â | S] = E[p̂ | S] - p exactly.
    for p, G in [(0.1, 8), (0.42, 5), (0.9, 16)]:
        pooled = hadw_expected_advantage(p, G, anchor=0.5).pooled
        assert pooled.plain == pytest.approx(0.0, abs=1e-14)
        assert pooled.true_advantage - pooled.plain == pytest.approx(advantage_bias(p, G), abs=1e-14)


def test_nondegenerate_prob_is_accurate_near_the_ends():
    # Computed with expm1/log1p: P(S) ~ G p for tiny p, where 1 - (1-p)^G would lose every digit.
    assert nondegenerate_prob(1e-12, 8) == pytest.approx(8e-12, rel=1e-9)
    assert nondegenerate_prob(1 - 2**-40, 8) == pytest.approx(8 * 2**-40, rel=1e-9)


# -- Theorem 2 -----------------------------------------------------------------------------------------------------
def brute_tail(p: float, G: int, eps: float, side: str) -> float:
    num = den = 0.0
    for bits, w in enumerate_groups(p, G):
        k = sum(bits)
        if 0 < k < G:
            den += w
            gap = k / G - p if side == "under" else p - k / G
            num += w * (gap > eps)
    return num / den


def theorem2_formula(p: float, G: int, eps: float, side: str) -> float:
    """The index ranges as Theorem 2 writes them."""
    pmf = [math.comb(G, k) * p**k * (1 - p) ** (G - k) for k in range(G + 1)]
    ks = range(math.floor(G * (p + eps)) + 1, G) if side == "under" else range(1, math.ceil(G * (p - eps)))
    return sum(pmf[k] for k in ks) / sum(pmf[1:G])


@pytest.mark.parametrize("G", [2, 3, 6, 8])
def test_theorem2_against_enumeration_and_index_formula(G):
    rng = np.random.default_rng(7)
    for p, eps in zip(rng.uniform(0.01, 0.99, 12), rng.uniform(0.0, 0.3, 12), strict=True):
        for side, fn in (("under", underestimate_prob), ("over", overestimate_prob)):
            ours = fn(p, G, eps)
            assert ours == pytest.approx(brute_tail(p, G, eps, side), abs=1e-12)
            assert ours == pytest.approx(theorem2_formula(p, G, eps, side), abs=1e-12)


def test_theorem2_vectorised_matches_scalar():
    p = np.array([[0.05, 0.3], [0.6, 0.95]])
    out = underestimate_prob(p, 8, 0.05)
    assert out.shape == (2, 2)
    for idx in np.ndindex(p.shape):
        assert out[idx] == underestimate_prob(float(p[idx]), 8, 0.05)


# -- symmetry and edge cases ---------------------------------------------------------------------------------------
def test_symmetry_p_to_one_minus_p():
    p = np.random.default_rng(3).uniform(0, 1, 200)
    for G in (2, 3, 8, 31):
        np.testing.assert_allclose(advantage_bias(1 - p, G), -advantage_bias(p, G), atol=1e-12)
        np.testing.assert_allclose(nondegenerate_prob(1 - p, G), nondegenerate_prob(p, G), atol=1e-14)
        np.testing.assert_allclose(overestimate_prob(1 - p, G, 0.03), underestimate_prob(p, G, 0.03), atol=1e-12)


@pytest.mark.parametrize("G", [2, 3, 8, 100])
def test_edges_p_zero_and_one_are_limits(G):
    assert nondegenerate_prob(0.0, G) == 0.0 and nondegenerate_prob(1.0, G) == 0.0
    assert expected_group_mean(0.0, G) == pytest.approx(1 / G)
    assert expected_group_mean(1.0, G) == pytest.approx(1 - 1 / G)
    assert advantage_bias(0.0, G) == pytest.approx(1 / G)
    assert advantage_bias(1.0, G) == pytest.approx(-1 / G)
    # The limits are continuous: compare with p just inside the interval.
    assert advantage_bias(1e-9, G) == pytest.approx(1 / G, abs=1e-6)
    assert underestimate_prob(0.0, G) == 1.0 and overestimate_prob(0.0, G) == 0.0
    assert underestimate_prob(1.0, G) == 0.0 and overestimate_prob(1.0, G) == 1.0
    assert not np.isnan(advantage_bias(np.array([0.0, 1.0]), G)).any()


def test_group_of_two():
    p = np.linspace(0, 1, 101)
    # A non-degenerate pair has exactly one correct answer: p̂ = 1/2 whatever p is.
    np.testing.assert_allclose(expected_group_mean(p, 2), 0.5, atol=1e-12)
    np.testing.assert_allclose(advantage_bias(p, 2), 0.5 - p, atol=1e-12)
    np.testing.assert_array_equal(underestimate_prob(p, 2), (p < 0.5).astype(float))
    assert bias_direction_probability(2, 0.0, 0.5) == pytest.approx(1.0, abs=1e-14)


def test_large_group_is_finite():
    p = np.linspace(0, 1, 11)
    b = advantage_bias(p, 5000)
    assert np.all(np.isfinite(b)) and abs(b[5]) < 1e-12 and b[0] == pytest.approx(1 / 5000)


def test_scalar_in_float_out_array_in_array_out():
    assert isinstance(advantage_bias(0.3, 8), float)
    assert isinstance(underestimate_prob(0.3, 8), float)
    assert advantage_bias([0.3, 0.4], 8).shape == (2,)


# -- bad arguments -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [nondegenerate_prob, expected_group_mean, advantage_bias, underestimate_prob,
                                overestimate_prob])
def test_bad_arguments_raise(fn):
    for G in (1, 0, -3, 2.0, True, "8"):
        with pytest.raises(ValueError, match="G must be"):
            fn(0.3, G)
    for p in (-0.1, 1.5, float("nan"), [0.2, 2.0], "x"):
        with pytest.raises(ValueError, match="p must"):
            fn(p, 8)


def test_bad_arguments_raise_elsewhere():
    with pytest.raises(ValueError, match="eps"):
        underestimate_prob(0.3, 8, -0.1)
    with pytest.raises(ValueError, match="p_lo < p_hi"):
        bias_direction_probability(8, 0.5, 0.5)
    with pytest.raises(ValueError, match="p_lo < p_hi"):
        bias_direction_probability(8, 0.6, 0.2)
    with pytest.raises(ValueError, match="p_hi"):
        bias_direction_probability(8, 0.0, 1.2)
    with pytest.raises(ValueError, match="G must be"):
        bias_direction_probability(1, 0.0, 0.5)
    with pytest.raises(ValueError, match="direction"):
        bias_direction_probability(8, direction="up")
    with pytest.raises(ValueError, match="weighting"):
        bias_direction_probability(8, weighting="mean")
    with pytest.raises(ValueError, match="sigma"):
        continuous_bias(beta_rewards(2, 2), 8, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        continuous_bias(beta_rewards(2, 2), 8, -0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        continuous_bias(scipy_stats.norm(), 8, 0.1)
    with pytest.raises(ValueError, match="G must be"):
        continuous_bias(beta_rewards(2, 2), 1, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        beta_rewards(0, 1)
    with pytest.raises(ValueError, match="xi"):
        truncated_normal_rewards(0.5, 0.0)
    with pytest.raises(ValueError, match="lambda_scale"):
        hadw_expected_advantage(0.3, 8, 0.5, lambda_scale=0.0)
    with pytest.raises(ValueError, match="anchor"):
        hadw_expected_advantage(0.3, 8, 1.5)
    with pytest.raises(ValueError, match="adv_norm"):
        hadw_expected_advantage(0.3, 8, 0.5, adv_norm="std")
    with pytest.raises(ValueError, match="0 < p < 1"):
        hadw_expected_advantage(0.0, 8, 0.5, adv_norm="group_std")
    with pytest.raises(ValueError, match="p must"):
        simulate_groups(1.2, 8, 10)
    with pytest.raises(ValueError, match="n_groups"):
        simulate_groups(0.2, 8, 0)


# -- Theorem 4 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("G", "sigma"), [(2, 0.0), (2, 0.3), (4, 0.5), (8, 0.1), (8, 0.6), (16, 0.9)])
def test_theorem4_uniform_closed_form(G, sigma):
    res = continuous_bias(scipy_stats.uniform(), G, sigma)
    assert res.p_nonupdate == pytest.approx(uniform_nonupdate_prob(G, sigma), abs=1e-9)
    assert res.expected_group_mean == pytest.approx(0.5, abs=1e-9)  # range event is symmetric under r -> 1 - r
    assert res.bias == pytest.approx(0.0, abs=1e-9)
    # The same distribution through the Beta fast path.
    assert continuous_bias(beta_rewards(1, 1), G, sigma).p_nonupdate == pytest.approx(res.p_nonupdate, abs=1e-9)


class _Beta25(scipy_stats.rv_continuous):
    """Beta(2, 5) written out by hand, so that continuous_bias takes its generic (quadrature) path."""

    def _pdf(self, x):
        return 30.0 * x * (1 - x) ** 4

    def _cdf(self, x):
        return 1 - (1 - x) ** 5 * (1 + 5 * x)


def test_theorem4_generic_path_matches_closed_form_path():
    generic = continuous_bias(_Beta25(a=0.0, b=1.0, name="beta25")(), 8, 0.2)
    fast = continuous_bias(beta_rewards(2, 5), 8, 0.2)
    assert generic.p_nonupdate == pytest.approx(fast.p_nonupdate, abs=1e-9)
    assert generic.bias == pytest.approx(fast.bias, abs=1e-9)


@pytest.mark.parametrize(("dist", "G", "sigma"), [
    (beta_rewards(2, 5), 8, 0.2),
    (beta_rewards(0.5, 0.5), 4, 0.5),
    (truncated_normal_rewards(0.3, 0.2), 8, 0.15),
    (truncated_normal_rewards(0.8, 0.5), 3, 0.3),
    (scipy_stats.uniform(0.1, 0.5), 6, 0.35),
])
def test_theorem4_against_monte_carlo(dist, G, sigma):
    res = continuous_bias(dist, G, sigma)
    est = simulate_continuous_bias(dist, G, sigma, n_groups=80_000, seed=11)
    assert abs(res.p_nonupdate - est.p_nonupdate) < Z * est.p_nonupdate_stderr + 1e-6
    assert abs(res.bias - est.bias) < Z * est.bias_stderr
    assert res.bias == pytest.approx(res.p - res.expected_group_mean, abs=1e-15)


def test_theorem4_mirror_and_sigma_zero():
    a, b = continuous_bias(beta_rewards(2, 5), 8, 0.3), continuous_bias(beta_rewards(5, 2), 8, 0.3)
    assert a.bias == pytest.approx(-b.bias, abs=1e-9)
    assert a.p_nonupdate == pytest.approx(b.p_nonupdate, abs=1e-9)
    zero = continuous_bias(truncated_normal_rewards(0.3, 0.2), 8, 0.0)
    assert zero.p_nonupdate == 0.0 and zero.bias == pytest.approx(0.0, abs=1e-12)


# -- HA-DW expectations (Theorem 3) --------------------------------------------------------------------------------
def brute_hadw(p, G, anchor, lam, adv_norm, eps=1e-6):
    """Response 0 of every group, spec §2 and §4 applied literally."""
    acc = {r: np.zeros(3) for r in (0, 1)}  # weight, Â, ÂΦ
    for bits, w in enumerate_groups(p, G):
        k = sum(bits)
        if not 0 < k < G:
            continue
        r = np.array(bits, dtype=float)
        mean = r.mean()
        adv = r - mean
        if adv_norm == "group_std":
            adv = adv / (r.std(ddof=1) + eps)
        diff = mean - anchor
        phi = lam * np.exp(-np.sign(adv) * np.sign(diff) * abs(diff))
        acc[bits[0]] += w * np.array([1.0, adv[0], adv[0] * phi[0]])
    total = acc[0][0] + acc[1][0]
    return {name: (v[0] / total, v[1] / v[0], v[2] / v[0]) for name, v in (("correct", acc[1]), ("wrong", acc[0]))}


@pytest.mark.parametrize("adv_norm", ["none", "group_std"])
@pytest.mark.parametrize(("p", "G", "anchor", "lam"), [(0.1, 8, 0.5, 1.3), (0.3, 5, 0.3, 1.0), (0.75, 6, 0.4, 2.0),
                                                       (0.5, 2, 0.5, 1.3), (0.5, 4, 0.5, 0.7)])
def test_hadw_expectation_against_enumeration(adv_norm, p, G, anchor, lam):
    res = hadw_expected_advantage(p, G, anchor, lam, adv_norm)
    brute = brute_hadw(p, G, anchor, lam, adv_norm)
    for row in (res.correct, res.wrong):
        prob, plain, weighted = brute[row.outcome]
        assert row.prob == pytest.approx(prob, abs=1e-12)
        assert row.plain == pytest.approx(plain, abs=1e-10)
        assert row.hadw == pytest.approx(weighted, abs=1e-10)
    pooled = sum(brute[o][0] * brute[o][2] for o in ("correct", "wrong"))
    assert res.pooled.hadw == pytest.approx(pooled, abs=1e-10)


def test_hadw_expectation_against_monte_carlo():
    res = hadw_expected_advantage(0.25, 8, 0.4, 1.3, "group_std")
    est = simulate_hadw_advantage(0.25, 8, 0.4, 1.3, "group_std", n_groups=80_000, seed=5)
    for row in res.rows():
        e = est[row.outcome]
        assert abs(e.plain - row.plain) < Z * e.plain_stderr
        assert abs(e.hadw - row.hadw) < Z * e.hadw_stderr


def test_lambda_range_and_exact_lambda():
    for p, G, anchor in [(0.1, 8, 0.1), (0.3, 8, 0.5), (0.8, 4, 0.5), (0.6, 16, 0.45)]:
        base = hadw_expected_advantage(p, G, anchor, 1.0)
        for row in base.rows():
            rng = row.lambda_range
            for lam in np.linspace(0.05, 3.0, 60):
                helps = hadw_expected_advantage(p, G, anchor, float(lam))
                inside = rng is not None and rng[0] < lam < rng[1]
                assert getattr(helps, row.outcome).improves == inside, (p, G, anchor, row.outcome, lam, rng)
            if not math.isnan(row.lambda_exact):
                exact = hadw_expected_advantage(p, G, anchor, row.lambda_exact)
                assert getattr(exact, row.outcome).hadw_error == pytest.approx(0.0, abs=1e-12)


def test_hadw_anchor_at_p_over_corrects_at_paper_lambda():
    # Spec §7: with the anchor at the prompt's accuracy, λ = 1.3 lies above the λ* that makes E[ÂΦ | S, correct]
    # exact for most p (measured: all 19 p in 0.05..0.95 for G = 8).
    ps = np.round(np.arange(0.05, 0.951, 0.05), 2)
    over = sum(hadw_expected_advantage(float(p), 8, float(p), 1.3).correct.lambda_exact < 1.3 for p in ps)
    assert over >= 15


@pytest.mark.parametrize("adv_norm", ["none", "group_std"])
def test_hadw_expectation_matches_the_loss_reference(adv_norm):
    # The theory's Φ must be the loss's Φ: enumerate every group of G = 6 through the package's own
    # compute_advantages (float64) and weight by the binomial probabilities.
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("hadw_kernels.reference")
    from hadw_kernels.config import LossConfig

    G, p, anchor, lam = 6, 0.3, 0.45, 1.3
    groups = [bits for bits in itertools.product((0.0, 1.0), repeat=G) if 0 < sum(bits) < G]
    rewards = torch.tensor(groups, dtype=torch.float64).reshape(-1)
    adv = reference.compute_advantages(rewards, G, anchor, LossConfig(adv_norm=adv_norm, lambda_scale=lam))
    raw = adv.raw.reshape(-1, G)[:, 0].numpy()
    weighted = adv.advantages.reshape(-1, G)[:, 0].numpy()
    first = np.array([g[0] for g in groups])
    w = np.array([p ** sum(g) * (1 - p) ** (G - sum(g)) for g in groups])
    res = hadw_expected_advantage(p, G, anchor, lam, adv_norm)
    for row, sel in ((res.correct, first == 1.0), (res.wrong, first == 0.0)):
        assert row.plain == pytest.approx(np.sum(w[sel] * raw[sel]) / np.sum(w[sel]), abs=1e-10)
        assert row.hadw == pytest.approx(np.sum(w[sel] * weighted[sel]) / np.sum(w[sel]), abs=1e-10)


@pytest.mark.parametrize(("a", "b", "G", "sigma"), [(0.5, 0.5, 4, 0.5), (0.3, 2.0, 8, 0.3)])
def test_theorem4_singular_density_against_quantile_substitution(a, b, G, sigma):
    # An independent route for densities that blow up at 0 or 1: substitute t = F(u), so du f(u) = dt and the
    # integrands are bounded; integrate each against scipy's quad.
    from scipy.special import betainc

    d = scipy_stats.beta(a, b)
    mean = a / (a + b)

    def q(u):
        return d.cdf(min(1.0, u + sigma)) - d.cdf(u)

    def mean_part(t):
        u = d.ppf(t)
        qu, up = q(u), min(1.0, u + sigma)
        return u * qu ** (G - 1) + (G - 1) * mean * (betainc(a + 1, b, up) - betainc(a + 1, b, u)) * qu ** (G - 2)

    opts = dict(points=[d.cdf(1 - sigma)], epsabs=1e-14, epsrel=1e-13, limit=1000)
    p_non = quad(lambda t: G * q(d.ppf(t)) ** (G - 1), 0, 1, **opts)[0]
    expected = (mean - quad(mean_part, 0, 1, **opts)[0]) / (1 - p_non)
    res = continuous_bias(beta_rewards(a, b), G, sigma)
    assert res.p_nonupdate == pytest.approx(p_non, abs=1e-10)
    assert res.expected_group_mean == pytest.approx(expected, abs=1e-10)
