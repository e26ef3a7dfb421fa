"""The advantage-estimator lab (`hadw-theory lab`): its loss is the library's (value and gradient), its seeds
reproduce bit for bit (alone, stacked, in worker processes), every arm runs, the rectification lemma's scale and the
statistics are right, and the CLI writes its outputs."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

from hadw_kernels import DifficultyAnchor, LossConfig, hadw_advantages, hadw_loss  # noqa: E402
from hadw_kernels.theory.binomial import expected_group_mean  # noqa: E402
from hadw_kernels.theory.cli import main  # noqa: E402
from hadw_kernels.theory.lab import Study, _Runner, choose_lr, run_study  # noqa: E402
from hadw_kernels.theory.lab_arms import (  # noqa: E402
    AdvantageEstimator,
    Arm,
    expected_step,
    rectified_scale,
    standard_arms,
)
from hadw_kernels.theory.lab_bandit import Task, make_instances, make_streams, sample_answers  # noqa: E402
from hadw_kernels.theory.lab_report import write_outputs  # noqa: E402
from hadw_kernels.theory.lab_run import Optimizer, RunCurves, Setting, arm_loss, run_arm  # noqa: E402
from hadw_kernels.theory.lab_stats import holm, paired_difference, run_metrics  # noqa: E402

TINY = Task(prompts=12, answers=5, features=4)
ARMS = {a.name: a for a in standard_arms()}


def _setting(**kw) -> Setting:
    return Setting(**{**dict(family="tabular", optimizer="sgd", group=4, batch=6, steps=6, task=TINY), **kw})


def _step_inputs(S=3, B=5, G=4, seed=0):
    """One step's sampled log-probs [S*B*G, 1] (leaf, float64), rewards [S, B*G] with every kind of group, true p."""
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(S * B * G, 1, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    rewards = (torch.rand(S, B * G, generator=g) < 0.4).to(torch.float64)
    rewards[0, :G] = 0.0  # an all-wrong group
    rewards[1, G:2 * G] = 1.0  # an all-right group
    rewards[2, 2 * G:3 * G] = torch.tensor([1.0, 0, 0, 0])  # one right out of G
    true_p = torch.rand(S, B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return logp, rewards, true_p


# -- the loss is the library's ------------------------------------------------------------------------------------
@pytest.mark.parametrize("adv_norm", ["group_std", "none"])
@pytest.mark.parametrize("arm", ["grpo", "hadw_window_l1.3", "hadw_ema_l1", "hadw_fixed_l1.5", "grpo_lr2"])
def test_lab_loss_equals_hadw_loss_value_and_gradient(arm, adv_norm):
    arm = ARMS[arm]
    S, B, G = 3, 5, 4
    logp, rewards, true_p = _step_inputs(S, B, G)
    est = AdvantageEstimator(arm, LossConfig.grpo(adv_norm=adv_norm), S, G)
    for step in range(3):  # the anchors move: steps 2 and 3 use a history
        r = rewards.roll(step, dims=1)
        loss, adv, priors = arm_loss(est, logp, r, true_p)
        (grad,) = torch.autograd.grad(loss, logp)
        ref_loss, ref_grad = torch.zeros((), dtype=torch.float64), []
        for s in range(S):
            rows = slice(s * B * G, (s + 1) * B * G)
            lp = logp.detach()[rows].clone().requires_grad_(True)
            anchor = None if arm.anchor is None else float(priors[s])
            out = hadw_loss(lp, lp.detach(), r[s], torch.ones_like(lp, dtype=torch.bool), G, anchor=anchor,
                            config=LossConfig.grpo(adv_norm=adv_norm, hadw=arm.anchor is not None,
                                                   lambda_scale=arm.lambda_scale), backend="torch")
            out.loss.backward()
            ref_loss = ref_loss + out.loss
            ref_grad.append(lp.grad)
            torch.testing.assert_close(adv[rows], out.advantages, rtol=0, atol=0)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(grad, torch.cat(ref_grad), rtol=0, atol=0)  # the same per-row arithmetic
    if arm.anchor is not None:  # and the priors are those of a DifficultyAnchor fed each seed's accuracy
        a = DifficultyAnchor(mode=arm.anchor)
        for step in range(3):
            prior = a.step(accuracy=float(rewards.roll(step, dims=1)[S - 1].mean()))
        assert prior == float(priors[S - 1])


@pytest.mark.parametrize("adv_norm", ["group_std", "none"])
def test_oracle_and_rectified_reduce_to_grpo_and_change_only_the_baseline(adv_norm):
    S, B, G = 3, 5, 4
    logp, rewards, true_p = _step_inputs(S, B, G)
    cfg = LossConfig.grpo(adv_norm=adv_norm)
    grpo = hadw_advantages(rewards.reshape(-1), G, config=cfg.replace(hadw=False))
    # the oracle handed the group means is GRPO
    oracle = AdvantageEstimator(ARMS["oracle"], cfg, S, G)
    adv, _ = oracle(rewards, grpo.group_mean.reshape(S, B))
    torch.testing.assert_close(adv, grpo.advantages, rtol=1e-15, atol=1e-15)
    # with the true p: (r - p) / (s + eps) on learnable groups, 0 on degenerate ones
    adv, _ = oracle(rewards, true_p)
    idx = grpo.group_index
    denom = grpo.group_std + cfg.std_eps if adv_norm == "group_std" else torch.ones_like(grpo.group_std)
    want = torch.where(grpo.degenerate[idx], 0.0, (rewards.reshape(-1) - true_p.reshape(-1)[idx]) / denom[idx])
    torch.testing.assert_close(adv, want, rtol=0, atol=0)
    assert bool((adv[grpo.degenerate[idx]] == 0).all()) and bool(grpo.degenerate.any())
    # the rectified baseline is c(p̂) p̂; at G = 4 the lemma's c is 1, so it is GRPO exactly
    rect, _ = AdvantageEstimator(ARMS["rectified"], cfg, S, G)(rewards, true_p)
    torch.testing.assert_close(rect, grpo.advantages, rtol=0, atol=0)


def test_rectified_at_g8_uses_the_lemma_scale():
    S, B, G = 2, 4, 8
    g = torch.Generator().manual_seed(3)
    rewards = (torch.rand(S, B * G, generator=g) < 0.3).to(torch.float64)
    cfg = LossConfig.grpo(adv_norm="none")
    adv, _ = AdvantageEstimator(ARMS["rectified"], cfg, S, G)(rewards, torch.full((S, B), 0.5, dtype=torch.float64))
    grpo = hadw_advantages(rewards.reshape(-1), G, config=cfg.replace(hadw=False))
    c = rectified_scale(G)[0]
    k = (grpo.group_mean * G).round().long().numpy()
    base = torch.tensor(c[k] * grpo.group_mean.numpy())
    want = torch.where(grpo.degenerate[grpo.group_index], 0.0, rewards.reshape(-1) - base[grpo.group_index])
    torch.testing.assert_close(adv, want, rtol=0, atol=1e-15)
    assert not torch.equal(adv, grpo.advantages)


def test_renormalised_hadw_keeps_the_total_and_the_direction():
    S, B, G = 3, 5, 4
    _, rewards, true_p = _step_inputs(S, B, G)
    cfg = LossConfig.grpo()
    renorm, _ = AdvantageEstimator(ARMS["hadw_renorm"], cfg, S, G)(rewards, true_p)
    hadw, _ = AdvantageEstimator(Arm("h", anchor="window", lambda_scale=1.3), cfg, S, G)(rewards, true_p)
    raw = hadw_advantages(rewards.reshape(-1), G, config=cfg.replace(hadw=False)).advantages
    for s in range(S):
        rows = slice(s * B * G, (s + 1) * B * G)
        torch.testing.assert_close(renorm[rows].abs().sum(), raw[rows].abs().sum(), rtol=1e-14, atol=0)
        ratio = renorm[rows][hadw[rows] != 0] / hadw[rows][hadw[rows] != 0]
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-13, atol=0)  # one factor per batch
    assert not torch.allclose(renorm, hadw)


def test_loo_is_grpo_times_g_over_g_minus_1():
    S, B, G = 3, 5, 4
    _, rewards, true_p = _step_inputs(S, B, G)
    for adv_norm in ("group_std", "none"):
        cfg = LossConfig.grpo(adv_norm=adv_norm)
        loo, _ = AdvantageEstimator(ARMS["loo"], cfg, S, G)(rewards, true_p)
        grpo = hadw_advantages(rewards.reshape(-1), G, config=cfg.replace(hadw=False)).advantages
        torch.testing.assert_close(loo, grpo * (G / (G - 1)), rtol=0, atol=0)
    # with adv_norm='none' it is r_i minus the mean of the other G - 1 rewards, literally
    r = rewards.reshape(-1, G)
    want = (r - (r.sum(1, keepdim=True) - r) / (G - 1)).reshape(-1)
    loo, _ = AdvantageEstimator(ARMS["loo"], LossConfig.grpo(adv_norm="none"), S, G)(rewards, true_p)
    torch.testing.assert_close(loo, want, rtol=0, atol=1e-15)


# -- what each arm does to one prompt in expectation ------------------------------------------------------------------
def test_expected_step_closed_forms():
    p = np.linspace(0.01, 0.99, 41)
    for G in (2, 4, 8, 16):
        # the group-mean baseline is unbiased up to (G - 1) / G; leave-one-out exactly; the truncated oracle loses
        # the degenerate groups' share: G (1 - p (1 - p)^(G-1) - (1 - p) p^(G-1))
        np.testing.assert_allclose(expected_step(ARMS["grpo"], p, G, adv_norm="none"), G - 1, rtol=1e-12)
        np.testing.assert_allclose(expected_step(ARMS["loo"], p, G, adv_norm="none"), G, rtol=1e-12)
        np.testing.assert_allclose(expected_step(ARMS["oracle"], p, G, adv_norm="none"),
                                   G * (1 - p * (1 - p) ** (G - 1) - (1 - p) * p ** (G - 1)), rtol=1e-12)
    np.testing.assert_allclose(expected_step(ARMS["grpo_lr2"], p, 8), 2 * expected_step(ARMS["grpo"], p, 8))
    with pytest.raises(ValueError, match="renormalised"):
        expected_step(ARMS["hadw_renorm"], p, 8)


@pytest.mark.parametrize("family", ["tabular", "shared"])
def test_expected_step_matches_the_lab_loss_gradient(family):
    """Monte Carlo: the mean gradient of the lab's loss on one prompt is -kappa(p) grad p / G (HA-DW, fixed C)."""
    G, n = 8, 40_000
    arm = Arm("h", anchor="fixed", lambda_scale=1.3)  # the library's fixed anchor: C = 0.5
    inst = make_instances(Task(prompts=3, answers=4, features=3), [7])
    from hadw_kernels.theory.lab_bandit import Policy

    policy = Policy(family, inst)
    j = 0  # the prompt
    probs = torch.softmax(policy.logits()[0, j], -1).detach()
    c = int(inst.correct[0, j])
    p = float(probs[c])
    (grad_p,) = torch.autograd.grad(torch.softmax(policy.logits()[0, j], -1)[c], policy.params)
    g = torch.Generator().manual_seed(0)
    answers = torch.multinomial(probs, n * G, replacement=True, generator=g)
    rewards = (answers == c).to(torch.float64).reshape(1, n * G)
    logp = torch.log_softmax(policy.logits()[0, j], -1)[answers].reshape(-1, 1)
    est = AdvantageEstimator(arm, LossConfig.grpo(), 1, G)
    loss, adv, _ = arm_loss(est, logp, rewards, torch.full((1, n), p, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, policy.params)  # loss = -sum_i A_i logp_i / (n G)
    kappa = float(expected_step(arm, p, G, anchor=0.5))
    torch.testing.assert_close(-grad * G, kappa * grad_p, rtol=0.03, atol=0.03 * float(grad_p.abs().max()) * kappa)


# -- the rectification lemma ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("G", [4, 8, 16])
def test_rectified_scale_is_the_lemma_minimax(G):
    c, eps, eps_delta = rectified_scale(G)
    floor = 0.01
    assert eps_delta == pytest.approx(math.sqrt(math.log(2 / (0.1 * (1 - 0.99**G - 0.01**G))) / (2 * G)), rel=1e-12)
    for k in range(1, G):
        p = np.linspace(max(floor, k / G - eps_delta), min(1 - floor, k / G + eps_delta), 4001)
        m = expected_group_mean(p, G)
        # at eps[k] the lemma's interval (sup (p - eps)/m, inf (p + eps)/m) holds c (sup / inf taken on a
        # 2001-point grid there, 4001 here: 1e-6 covers the difference) ...
        e = eps[k] + 1e-6
        assert np.max((p - e) / m) <= c[k] <= np.min((p + e) / m)
        # ... and a smaller eps leaves it empty: eps[k] is the smallest, c the only choice left
        e = eps[k] * 0.99
        assert np.max((p - e) / m) > np.min((p + e) / m)
    if G == 4:
        assert np.all(c == 1.0)  # the interval covers almost [0.01, 0.99]: no rescaling is better than c = 1
    else:
        assert c[1] < 1.0 < c[G - 1]  # hard groups' baselines lowered, easy groups' raised


# -- reproducibility and pairing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family,optimizer,arm", [("tabular", "sgd", "hadw_window_l1.3"), ("shared", "adam", "grpo"),
                                                  ("shared", "sgd", "oracle"), ("tabular", "adam", "rectified")])
def test_seeds_reproduce_bit_for_bit_alone_and_stacked(family, optimizer, arm):
    setting = _setting(family=family, optimizer=optimizer, group=8, steps=8)
    lr = 8.0 if optimizer == "sgd" else 0.1
    a = run_arm(setting, ARMS[arm], [0, 1, 2], lr)
    b = run_arm(setting, ARMS[arm], [0, 1, 2], lr)
    alone = run_arm(setting, ARMS[arm], [2], lr)
    for f in dataclasses.fields(RunCurves):
        np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name))
    for name in ("acc", "hard", "easy"):
        np.testing.assert_array_equal(getattr(a, name)[2], getattr(alone, name)[0])
    assert not np.array_equal(a.acc[0], a.acc[1])  # different seeds, different runs
    assert a.acc[:, -1].mean() > a.acc[:, 0].mean()  # and it learns


def test_every_arm_shares_the_prompts_schedule_and_uniforms():
    inst_a, inst_b = make_instances(TINY, [5, 6]), make_instances(TINY, [6])
    np.testing.assert_array_equal(inst_a.p0[1], inst_b.p0[0])
    np.testing.assert_array_equal(inst_a.features[1], inst_b.features[0])
    assert inst_a.hard.sum(1).tolist() == [4, 4] and not (inst_a.hard & inst_a.easy).any()
    assert np.all(inst_a.p0[inst_a.hard].reshape(2, -1).max(1) <= inst_a.p0[inst_a.easy].reshape(2, -1).min(1))
    s1, s2 = make_streams([5, 6], 12, 7, 6, 4), make_streams([6], 12, 7, 6, 4)
    np.testing.assert_array_equal(s1.uniforms[1], s2.uniforms[0])
    np.testing.assert_array_equal(s1.schedule[1], s2.schedule[0])
    assert sorted(s1.schedule[0, :2].reshape(-1).tolist()) == list(range(12))  # epochs: permutations
    # same seed, different arms: identical curves before the first update, different after
    setting = _setting(steps=4)
    runs = [run_arm(setting, ARMS[n], [0, 1], 8.0) for n in ("grpo", "hadw_fixed_l1.5", "oracle")]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.acc[:, 0], runs[0].acc[:, 0])
        assert not np.array_equal(r.acc[:, -1], runs[0].acc[:, -1])


def test_inverse_cdf_sampling_follows_the_probabilities():
    probs = torch.tensor([[[0.1, 0.2, 0.7], [1.0, 0.0, 0.0]]], dtype=torch.float64)  # [1, 2, 3]
    u = torch.tensor([[[0.0, 0.0999, 0.1, 0.2999, 0.3001, 0.9999999]] * 2], dtype=torch.float64)
    assert sample_answers(probs, u).tolist() == [[[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0]]]
    u = torch.rand(1, 2, 200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.bincount(sample_answers(probs, u)[0, 0], minlength=3).to(torch.float64) / 200_000
    torch.testing.assert_close(freq, probs[0, 0], atol=5e-3, rtol=0)
    almost_one = torch.tensor([[[0.3, 0.3, 0.4 - 1e-12]]], dtype=torch.float64)  # last partial sum just below 1
    assert sample_answers(almost_one, torch.tensor([[[1.0 - 1e-13]]], dtype=torch.float64)).item() == 2


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_optimizer_is_torch_optim_bit_for_bit(name):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    mine = Optimizer(name, [a], 0.3)
    ref = torch.optim.SGD([b], lr=0.3) if name == "sgd" else torch.optim.Adam([b], lr=0.3, foreach=False)
    for _ in range(12):
        grad = torch.randn(4, 6, generator=g, dtype=torch.float64)
        a.grad, b.grad = grad.clone(), grad.clone()
        mine.step()
        ref.step()
    assert torch.equal(a, b)


def test_every_arm_runs():
    combos = [(f, o) for f in ("tabular", "shared") for o in ("sgd", "adam")]
    for i, arm in enumerate(standard_arms()):  # each arm in one family / optimizer, every combination used
        family, optimizer = combos[i % 4]
        r = run_arm(_setting(family=family, optimizer=optimizer, steps=3), arm, [0, 1],
                    4.0 if optimizer == "sgd" else 0.05)
        assert r.acc.shape == (2, 4) and np.isfinite(r.acc).all() and ((r.acc > 0) & (r.acc < 1)).all()
        assert np.isnan(r.anchor).all() == (arm.anchor is None)
        assert (r.adv_abs >= 0).all() and ((r.degenerate >= 0) & (r.degenerate <= 1)).all()


def test_bad_arms_and_settings_raise():
    with pytest.raises(ValueError, match="baseline"):
        Arm("x", baseline="median")
    with pytest.raises(ValueError, match="renormalize"):
        Arm("x", renormalize=True)
    with pytest.raises(ValueError, match="group-mean"):
        Arm("x", baseline="oracle", anchor="window")
    with pytest.raises(ValueError, match="family"):
        Setting(family="mlp")
    with pytest.raises(ValueError, match="batch"):
        Setting(batch=200)
    with pytest.raises(ValueError, match="p_low"):
        Task(p_low=0.5, p_high=0.2)
    with pytest.raises(ValueError, match="first arm"):
        Study(arms=(ARMS["oracle"], ARMS["grpo"]))
    with pytest.raises(ValueError, match="adv_norm"):
        AdvantageEstimator(ARMS["grpo"], LossConfig.grpo(adv_norm="batch_std"), 2, 4)


# -- statistics --------------------------------------------------------------------------------------------------------
def test_paired_difference_matches_the_textbook_formulas():
    stats = pytest.importorskip("scipy.stats")
    base = np.array([0.50, 0.52, 0.47, 0.55, 0.49, 0.51])
    arm = base + np.array([0.010, 0.030, -0.005, 0.020, 0.015, 0.000])
    p = paired_difference(arm, base)
    d = arm - base
    half = 2.5705818356363146 * d.std(ddof=1) / math.sqrt(6)  # t_{0.975, 5}
    assert p.mean == pytest.approx(d.mean(), abs=1e-15) and p.ci_low == pytest.approx(d.mean() - half, rel=1e-9)
    assert p.ci_high == pytest.approx(d.mean() + half, rel=1e-9)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(6))
    assert p.p_t == pytest.approx(2 * stats.t.sf(t, 5), rel=1e-9)
    assert p.p_wilcoxon == pytest.approx(stats.wilcoxon(d[d != 0]).pvalue) and (p.wins, p.losses) == (4, 1)
    same = paired_difference(base, base)
    assert (same.mean, same.ci_low, same.ci_high, same.p_t, same.p_wilcoxon) == (0, 0, 0, 1.0, 1.0)


def test_holm_adjustment():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.2]), [0.04, 0.09, 0.09, 0.2])
    np.testing.assert_allclose(holm([0.5]), [0.5])


def test_run_metrics_and_steps_to_target():
    acc = np.array([[0.2, 0.4, 0.61, 0.7], [0.2, 0.3, 0.35, 0.4]])
    curves = RunCurves(acc=acc, hard=acc * 0.5, easy=acc * 1.2, adv_abs=np.zeros(3), anchor=np.zeros(3),
                       degenerate=np.zeros(3))
    m = run_metrics(curves, target=0.5)  # goal 0.2 + 0.5 * 0.8 = 0.6
    assert m["steps_to_target"].tolist() == [2.0, 4.0] and m["reached"].tolist() == [True, False]
    np.testing.assert_allclose(m["auc"], acc.mean(1))
    np.testing.assert_allclose(m["final_hard"], [0.35, 0.2])


def test_choose_lr_rule():
    assert choose_lr((1, 2, 4, 8), [0.3, 0.6, 0.5, 0.4], a0=0.2) == (2, "best AUC")
    lr, rule = choose_lr((1, 2, 4, 8), [0.3, 0.5, 0.7, 0.9], a0=0.2)  # still rising: mid-way (0.6) rate
    assert lr in (2, 4) and "mid-way" in rule
    assert choose_lr((1, 2, 4, 8), [0.3, 0.6, 0.5, 0.4], a0=0.2, rule="midway") == (2, "mid-way rate")
    with pytest.raises(ValueError, match="rule"):
        choose_lr((1, 2), [0.3, 0.6], a0=0.2, rule="fastest")


# -- the whole study, the worker processes and the CLI ----------------------------------------------------------------
def _tiny_study(**kw) -> Study:
    return Study(**{**dict(groups=(4,), families=("tabular", "shared"), optimizers=("sgd",), seeds=3, pilot_seeds=2,
                           steps=5, batch=6, task=TINY, arms=(ARMS["grpo"], ARMS["grpo_lr1.3"],
                                                               ARMS["hadw_window_l1.3"], ARMS["oracle"]),
                           lr_grids={"sgd": (2.0, 8.0), "adam": (0.05, 0.2)}), **kw})


def test_run_study_and_outputs(tmp_path):
    result = run_study(_tiny_study(), jobs=1, log=lambda *a: None)
    s = result["settings"]["tabular/sgd/G4"]
    assert set(s["arms"]) == {"grpo", "grpo_lr1.3", "hadw_window_l1.3", "oracle"}
    assert s["arms"]["grpo_lr1.3"]["lr"] == pytest.approx(1.3 * result["pilot"]["tabular/sgd/G4"]["lr"])
    p = s["arms"]["hadw_window_l1.3"]["paired"]["auc"]
    want = np.array(s["arms"]["hadw_window_l1.3"]["per_seed"]["auc"]) - np.array(s["arms"]["grpo"]["per_seed"]["auc"])
    assert p["mean"] == pytest.approx(want.mean()) and "p_wilcoxon_holm" in p
    assert "hadw_window_l1.3 - grpo_lr1.3" in s["contrasts"]
    paths = write_outputs(result, str(tmp_path))
    assert {p.rsplit("/", 1)[1] for p in paths} == {"lab_results.json", "lab_table.md", "lab_curves.png",
                                                   "lab_curves_hard.png", "lab_forest.png", "lab_forest_hard.png",
                                                   "lab_step_multiplier.png"}
    data = json.loads((tmp_path / "lab_results.json").read_text())
    assert data["settings"]["shared/sgd/G4"]["arms"]["oracle"]["paired"]["final"]["n"] == 3
    table = (tmp_path / "lab_table.md").read_text()
    assert "| hadw_window_l1.3 |" in table and "kappa(p) / kappa_GRPO(p), G = 4" in table
    for name in ("lab_curves.png", "lab_forest.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_processes_reproduce_the_in_process_runs():
    setting = _setting(steps=4)
    tasks = [("k", setting, ARMS[n], (0, 1), 4.0) for n in ("grpo", "hadw_ema_l1.3")]
    with _Runner(1) as here:
        local = {r[1]: r[3] for r in here.map(tasks, lambda *a: None)}
    with _Runner(2) as pool:  # spawned processes, one torch thread each
        remote = {r[1]: r[3] for r in pool.map(tasks, lambda *a: None)}
    for name in local:
        for key in ("acc", "hard", "easy", "anchor"):
            np.testing.assert_array_equal(np.asarray(local[name][key]), np.asarray(remote[name][key]))


def test_cli_lab_prints_the_tables(capsys, monkeypatch, tmp_path):
    import hadw_kernels.theory.lab as lab

    monkeypatch.setattr(lab, "QUICK", _tiny_study())  # --quick's study, made tiny; the options still apply
    monkeypatch.chdir(tmp_path)
    assert main(["lab", "--quick", "--seeds", "2", "--steps", "3", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 settings x 4 arms x 2 seeds, 3 steps" in out and "**shared / sgd** — auc_hard vs GRPO" in out
    assert "hadw_window_l1.3 - grpo_lr1.3" in out
    assert list(tmp_path.iterdir()) == []  # no --out: nothing written
    assert main(["lab", "--seeds", "1"]) == 2  # a bad value: the study says why, no run starts
    assert "seeds >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["lab", "--jobs", "0"])
