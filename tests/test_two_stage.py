"""The two-stage API: `hadw_advantages` once per rollout batch (groups by id, any row order, NaN = unscorable,
group / batch / no scaling) and `hadw_policy_loss` on any micro-batch (precomputed [N] or [N, T] advantages,
rollout importance weights, ratio-weighted KL). Checked against the fused `hadw_loss`, a float64 scalar loop
(tests/scalar_spec.py) and autograd's gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import as_lists, assert_close, make_batch
from scalar_spec import scalar_advantages, scalar_policy_loss

from hadw_kernels import (
    POLICY_METRICS,
    DifficultyAnchor,
    LossConfig,
    hadw_advantages,
    hadw_loss,
    hadw_policy_loss,
    loss_normalizer,
    truncated_is_weights,
)

PRESETS = ["grpo", "dapo", "gspo", "dr_grpo"]


def policy(batch, adv, cfg, **kw):
    return hadw_policy_loss(batch["logprobs"], batch["old_logprobs"], adv, batch["mask"], config=cfg,
                            ref_logprobs=batch["ref_logprobs"], **{"backend": "torch", **kw})


# -- the fused path is the two stages, exactly ----------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("with_ref", [False, True])
def test_hadw_loss_equals_the_two_stages_exactly(preset, with_ref):
    cfg = LossConfig.preset(preset, kl_coef=0.05 if with_ref else 0.0, clip_ratio_c=3.0)
    batch = make_batch(n_groups=4, group_size=4, T=9, seed=1, masked_rows=(5,), equal_groups=(2,), with_ref=with_ref,
                       spread=0.3 if preset != "gspo" else 0.002)
    lp = batch["logprobs"]
    fused = hadw_loss(lp, batch["old_logprobs"], batch["rewards"], batch["mask"], 4, anchor=0.4, config=cfg,
                      ref_logprobs=batch["ref_logprobs"], normalizer=13.0, backend="torch")
    (g_fused,) = torch.autograd.grad(fused.loss, lp)
    adv = hadw_advantages(batch["rewards"], 4, anchor=0.4, config=cfg)
    two = policy(batch, adv.advantages, cfg, normalizer=13.0)
    (g_two,) = torch.autograd.grad(two.loss, lp)
    assert two.loss.item() == fused.loss.item()
    assert torch.equal(g_two, g_fused)
    assert torch.equal(adv.advantages, fused.advantages) and torch.equal(adv.phi, fused.phi)
    assert tuple(two.metrics)[: len(POLICY_METRICS)] == POLICY_METRICS and two.phi is None
    for k, v in two.metrics.items():
        assert v.item() == fused.metrics[k].item(), k


# -- stage 1: group ids, any order ---------------------------------------------------------------------------------
@pytest.mark.parametrize("adv_norm", ["group_std", "batch_std", "none"])
def test_group_ids_in_any_order_equal_the_contiguous_path(adv_norm):
    cfg = LossConfig.grpo(adv_norm=adv_norm)
    g = torch.Generator().manual_seed(2)
    rewards = torch.randint(0, 2, (24,), generator=g).double()
    rewards[8:12] = 1.0  # one degenerate group
    contiguous = hadw_advantages(rewards, 4, anchor=0.55, config=cfg)
    perm = torch.randperm(24, generator=g)
    ids = (torch.arange(24) // 4 * 10 + 3)[perm]  # arbitrary, non-consecutive ids, shuffled rows
    shuffled = hadw_advantages(rewards[perm], anchor=0.55, config=cfg, group_ids=ids)
    assert_close(shuffled.advantages, contiguous.advantages[perm], rtol=1e-14, atol=1e-15)
    assert_close(shuffled.phi, contiguous.phi[perm], rtol=1e-14)
    assert torch.equal(shuffled.degenerate, contiguous.degenerate)  # ids 3, 13, 23, ... sort like the groups
    assert_close(shuffled.group_mean, contiguous.group_mean, rtol=1e-14)
    assert torch.equal(shuffled.group_index, (perm // 4))


@pytest.mark.parametrize("adv_norm", ["group_std", "batch_std", "none"])
@pytest.mark.parametrize("std_unbiased", [True, False])
def test_group_ids_unequal_groups_and_nan_rewards_match_a_float64_loop(adv_norm, std_unbiased):
    cfg = LossConfig.grpo(adv_norm=adv_norm, std_unbiased=std_unbiased, std_eps=1e-4)
    nan = float("nan")
    rewards = [1.0, 0.0, nan, 0.5, 1.0, 0.2, nan, nan, 0.7, 0.0, 1.0, 1.0, nan, 0.3]
    ids = [5, 5, 5, 2, 2, 9, 9, 7, 7, 7, 11, 11, 4, 3]
    # group 9: one scorable reward -> degenerate; group 7: 0.7, 0.0 plus an unscorable; group 4: nothing scorable;
    # group 3: a single response
    adv = hadw_advantages(torch.tensor(rewards, dtype=torch.float64), anchor=0.45, config=cfg,
                          group_ids=torch.tensor(ids))
    exp_adv, exp_raw, exp_phi, exp_degenerate = scalar_advantages(rewards, ids, cfg, anchor=0.45)
    assert_close(adv.advantages, exp_adv, rtol=1e-13, atol=1e-15)
    assert_close(adv.raw, exp_raw, rtol=1e-13, atol=1e-15)
    assert_close(adv.phi, exp_phi, rtol=1e-13)
    assert adv.degenerate.tolist() == [exp_degenerate[g] for g in sorted(set(ids))]
    assert adv.unscorable.tolist() == [r != r for r in rewards]
    assert adv.advantages[adv.unscorable].eq(0).all()
    assert torch.isfinite(adv.group_mean).all() and torch.isfinite(adv.group_std).all()


def test_trl_advantage_formula():
    """TRL's advantages (nanmean / nanstd with Bessel's correction, std + 1e-4, NaN -> 0) for scale_rewards group,
    batch and none, restated here in torch: HA-DW off, the same numbers to rounding."""
    nan = float("nan")
    rewards = torch.tensor([1.0, 0.0, 0.0, nan, 0.5, 0.5, 0.5, 1.0, 0.2, 0.9, nan, 0.0])
    grouped = rewards.view(-1, 4)
    mean = grouped.nanmean(dim=1, keepdim=True)

    def nanstd(x, dim=None):
        m = x.nanmean(dim=dim, keepdim=dim is not None)
        n = (~x.isnan()).sum(dim=dim, keepdim=dim is not None)
        return ((x - m) ** 2).nansum(dim=dim, keepdim=dim is not None).div(n - 1).sqrt()

    for scale, adv_norm in (("group", "group_std"), ("batch", "batch_std"), ("none", "none")):
        std = nanstd(grouped, dim=1) if scale == "group" else nanstd(rewards)
        trl = grouped - mean
        if scale != "none":
            trl = trl / (std + 1e-4)
        trl = torch.nan_to_num(trl.reshape(-1), nan=0.0)
        ours = hadw_advantages(rewards, 4, config=LossConfig.grpo(adv_norm=adv_norm, std_eps=1e-4, hadw=False))
        assert_close(ours.advantages, trl, rtol=1e-6, atol=1e-7, name=scale)


def test_single_response_group_and_anchor_object():
    anchor = DifficultyAnchor()
    rewards = torch.tensor([1.0, 0.0, 1.0])
    anchor.step(rewards)
    adv = hadw_advantages(rewards, anchor=anchor, group_ids=torch.tensor([0, 0, 1]))
    assert adv.advantages[2].item() == 0.0 and adv.degenerate.tolist() == [False, True]
    with pytest.raises(ValueError, match=r"has no prior yet"):
        hadw_advantages(rewards, anchor=DifficultyAnchor(), group_ids=torch.tensor([0, 0, 1]))


# -- stage 2: any micro-batch ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_shuffled_micro_batches_sum_to_the_whole_batch(agg, ratio_level):
    cfg = LossConfig.grpo(loss_agg=agg, ratio_level=ratio_level, kl_coef=0.05, clip_ratio_c=3.0)
    batch = make_batch(n_groups=5, group_size=4, T=8, seed=3, masked_rows=(4, 13), with_ref=True,
                       spread=0.3 if ratio_level == "token" else 0.02)
    lp = batch["logprobs"]
    whole = hadw_loss(lp, batch["old_logprobs"], batch["rewards"], batch["mask"], 4, anchor=0.5, config=cfg,
                      ref_logprobs=batch["ref_logprobs"], backend="torch")
    (g_whole,) = torch.autograd.grad(whole.loss, lp)
    adv = hadw_advantages(batch["rewards"], 4, anchor=0.5, config=cfg).advantages
    rows = torch.randperm(20, generator=torch.Generator().manual_seed(4))
    chunks = [rows[:3], rows[3:11], rows[11:]]  # rows of many groups, uneven sizes
    norm = sum(loss_normalizer(batch["mask"][c], cfg) for c in chunks)
    total = 0.0
    for c in chunks:
        out = hadw_policy_loss(lp[c], batch["old_logprobs"][c], adv[c], batch["mask"][c], config=cfg,
                               ref_logprobs=batch["ref_logprobs"][c], normalizer=norm, backend="torch")
        out.loss.backward()
        total += out.loss.item()
    assert total == pytest.approx(whole.loss.item(), rel=1e-12, abs=1e-15)
    assert_close(lp.grad, g_whole, rtol=1e-12, atol=1e-16)


def test_token_advantages_equal_row_advantages_broadcast():
    cfg = LossConfig.dapo(clip_ratio_c=3.0)
    batch = make_batch(seed=5, masked_rows=(2,), with_ref=True)
    adv = hadw_advantages(batch["rewards"], 4, anchor=0.3, config=cfg).advantages
    per_token = adv[:, None].expand_as(batch["logprobs"]).clone()
    per_token[~batch["mask"]] = float("nan")  # padding may hold anything
    a, b = policy(batch, adv, cfg), policy(batch, per_token, cfg)
    assert a.loss.item() == b.loss.item()
    (ga,) = torch.autograd.grad(a.loss, batch["logprobs"])
    (gb,) = torch.autograd.grad(b.loss, batch["logprobs"])
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("options", [
    dict(),
    dict(kl_coef=0.1, kl_ratio_weighted=True),
    dict(kl_coef=0.1, kl_estimator="k2", clip_ratio_c=3.0, rollout_is_threshold=1.5),
    dict(kl_coef=0.1, kl_estimator="k1", kl_ratio_weighted=True, rollout_is_threshold=None),
])
@pytest.mark.parametrize("token_adv", [False, True])
def test_policy_loss_matches_scalar_loop(preset, options, token_adv):
    cfg = LossConfig.preset(preset, **options)
    batch = make_batch(n_groups=3, group_size=4, T=6, seed=6, masked_rows=(7,), with_ref=True,
                       spread=0.3 if preset != "gspo" else 0.001)
    g = torch.Generator().manual_seed(7)
    N, T = batch["logprobs"].shape
    adv = torch.randn(N, T, generator=g, dtype=torch.float64) if token_adv else torch.randn(N, generator=g,
                                                                                             dtype=torch.float64)
    weights = torch.rand(N, T, generator=g, dtype=torch.float64) * 2.5
    out = policy(batch, adv, cfg, rollout_is_weights=weights, normalizer=9.0)
    lists = as_lists(batch)
    loss, metrics = scalar_policy_loss(lists["logprobs"], lists["old_logprobs"], adv.tolist(), lists["mask"], cfg,
                                       lists["ref_logprobs"], weights.tolist(), normalizer=9.0)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12, abs=1e-15)
    assert set(out.metrics) == set(metrics)
    for k, v in metrics.items():
        assert out.metrics[k].item() == pytest.approx(v, rel=1e-12, abs=1e-15), k


@pytest.mark.parametrize("preset", PRESETS)
def test_policy_loss_gradcheck_float64(preset):
    cfg = LossConfig.preset(preset, kl_coef=0.2, kl_ratio_weighted=True, clip_ratio_c=2.0, rollout_is_threshold=1.7)
    batch = make_batch(n_groups=2, group_size=3, T=5, seed=8, masked_rows=(4,), with_ref=True,
                       spread=0.4 if preset != "gspo" else 0.01)
    g = torch.Generator().manual_seed(9)
    adv = torch.randn(6, 5, generator=g, dtype=torch.float64)
    weights = torch.rand(6, 5, generator=g, dtype=torch.float64) * 2.0

    def f(lp):
        return hadw_policy_loss(lp, batch["old_logprobs"], adv, batch["mask"], config=cfg,
                                ref_logprobs=batch["ref_logprobs"], rollout_is_weights=weights, backend="torch").loss

    assert torch.autograd.gradcheck(f, (batch["logprobs"],), eps=1e-6, atol=1e-7)


def test_rollout_is_weights_scale_the_surrogate_not_the_kl():
    """Hand-computed: one token, rho = 1 (logp = old), A = 2, weight 3 truncated at 2.5, k1 KL with coef 0.5."""
    lp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    ref = torch.full((1, 1), -0.4, dtype=torch.float64)
    cfg = LossConfig.grpo(kl_coef=0.5, kl_estimator="k1", rollout_is_threshold=2.5)
    out = hadw_policy_loss(lp, lp.detach(), torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 1), config=cfg,
                           ref_logprobs=ref, rollout_is_weights=torch.full((1, 1), 3.0, dtype=torch.float64))
    # pg = -A * rho * min(w, 2.5) = -5; kl = logp - ref = 0.4; loss = -5 + 0.5 * 0.4
    assert out.loss.item() == pytest.approx(-5.0 + 0.2, rel=1e-14)
    assert out.metrics["pg_loss"].item() == pytest.approx(-5.0, rel=1e-14)
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert grad.item() == pytest.approx(-5.0 + 0.5, rel=1e-14)  # d(-A rho w)/dlogp = -5; d(0.5 k1)/dlogp = 0.5


def test_ratio_weighted_kl_gradient_is_the_unbiased_reverse_kl_gradient():
    """TRL's bias-corrected KL: d/dlogp [rho * k3] with rho = exp(logp - old) = exp(logp - old) * (1 - exp(ref -
    logp)) + ... evaluated by hand at one token."""
    logp, old, ref = -1.0, -1.3, -0.8
    lp = torch.tensor([[logp]], dtype=torch.float64, requires_grad=True)
    cfg = LossConfig.grpo(kl_coef=1.0, kl_ratio_weighted=True)
    out = hadw_policy_loss(lp, torch.tensor([[old]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                           torch.ones(1, 1), config=cfg, ref_logprobs=torch.tensor([[ref]], dtype=torch.float64))
    rho = math.exp(logp - old)
    k3 = math.exp(ref - logp) - (ref - logp) - 1
    assert out.loss.item() == pytest.approx(rho * k3, rel=1e-14)
    (grad,) = torch.autograd.grad(out.loss, lp)
    dk3 = -math.exp(ref - logp) + 1  # d k3 / d logp
    assert grad.item() == pytest.approx(rho * k3 + rho * dk3, rel=1e-13)


def test_truncated_is_weights():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5], [-1.2, -1.1, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    tok = truncated_is_weights(old, rollout, mask, threshold=1.5)
    assert_close(tok, [[min(math.exp(0.5), 1.5), math.exp(-1.0), 1.0], [math.exp(0.2), math.exp(0.1), 0.0]],
                 rtol=1e-6)
    seq = truncated_is_weights(old, rollout, mask, threshold=None, level="sequence")
    assert_close(seq, [[math.exp(-0.5)] * 3, [math.exp(0.3), math.exp(0.3), 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"level='row' is not valid"):
        truncated_is_weights(old, rollout, mask, level="row")
    with pytest.raises(ValueError, match=r"rollout_logprobs has shape \(2, 2\)"):
        truncated_is_weights(old, rollout[:, :2], mask)
    bad = rollout.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rollout_logprobs: 1 NaN/Inf"):
        truncated_is_weights(old, bad, mask)


def test_fully_masked_micro_batch_gives_zero_loss_and_zero_gradient():
    batch = make_batch(seed=10, masked_rows=tuple(range(12)))
    adv = torch.randn(12, dtype=torch.float64)
    out = policy(batch, adv, LossConfig.dapo(), normalizer=50.0)
    (grad,) = torch.autograd.grad(out.loss, batch["logprobs"])
    assert out.loss.item() == 0.0 and grad.abs().sum().item() == 0.0


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_advantage_inputs():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    cases = [
        (dict(group_ids=torch.tensor([0, 0, 1])), r"group_ids has shape \(3,\) but rewards has \(4,\)"),
        (dict(group_ids=torch.tensor([0.0, 0.0, 1.0, 1.0])), r"group_ids must be an integer tensor, got dtype"),
        (dict(group_ids=torch.tensor([True, True, False, False])), r"group_ids must be an integer tensor"),
        (dict(group_ids=[0, 0, 1, 1]), r"group_ids must be a torch.Tensor"),
        (dict(group_ids=torch.zeros(4, dtype=torch.long, device="meta")), r"group_ids is on meta but rewards is on"),
        (dict(group_size=2, group_ids=torch.tensor([0, 0, 1, 1])), r"give exactly one of group_size"),
        (dict(), r"give exactly one of group_size"),
        (dict(group_size=2, backend="cuda"), r"backend='cuda' is not valid"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            hadw_advantages(r, **kwargs)


def test_bad_policy_inputs():
    batch = make_batch(seed=11, dtype=torch.float32, with_ref=True)
    N, T = batch["logprobs"].shape
    adv = torch.randn(N)

    def call(**changes):
        kw = dict(advantages=adv, rollout_is_weights=None)
        kw.update(changes)
        return policy(batch, kw.pop("advantages"), LossConfig.grpo(), **kw)

    with pytest.raises(ValueError, match=r"advantages has shape \(11,\) but logprobs has \(12, 7\); expected \[N\]"):
        call(advantages=adv[:-1])
    with pytest.raises(ValueError, match=r"advantages has shape \(12, 6\).*expected \[N\] \(one per row\) or \[N, T\]"):
        call(advantages=torch.zeros(N, T - 1))
    with pytest.raises(ValueError, match=r"advantages must be a floating-point tensor"):
        call(advantages=torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rollout_is_weights has shape \(12, 3\)"):
        call(rollout_is_weights=torch.ones(N, 3))
    bad = adv.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values at valid \(mask=1\) positions: advantages: 1 NaN/Inf"):
        call(advantages=bad)
    weights = torch.ones(N, T)
    valid = batch["mask"].nonzero()
    weights[tuple(valid[3])] = float("inf")
    weights[~batch["mask"]] = float("nan")  # padding: ignored
    with pytest.raises(ValueError, match=r"rollout_is_weights: 1 NaN/Inf"):
        call(rollout_is_weights=weights)
    # NaN only where nothing is valid is fine: a fully masked row, and padding of the per-token advantages
    batch["mask"][2] = False
    ok_adv = adv.clone()
    ok_adv[2] = float("nan")
    out = call(advantages=ok_adv)
    (grad,) = torch.autograd.grad(out.loss, batch["logprobs"])
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


# -- compiled -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_policy_loss_compiled_matches_eager_and_caller_compiles_fullgraph():
    cfg = LossConfig.grpo(kl_coef=0.05, kl_ratio_weighted=True, clip_ratio_c=3.0, rollout_is_threshold=2.0)
    batch = make_batch(seed=12, dtype=torch.float32, with_ref=True, masked_rows=(1,))
    N, T = batch["logprobs"].shape
    g = torch.Generator().manual_seed(13)
    adv, weights = torch.randn(N, generator=g), torch.rand(N, T, generator=g) * 3
    norm = torch.tensor(40.0)
    eager = policy(batch, adv, cfg, rollout_is_weights=weights, normalizer=norm)
    (g_eager,) = torch.autograd.grad(eager.loss, batch["logprobs"])
    compiled = policy(batch, adv, cfg, rollout_is_weights=weights, normalizer=norm, backend="compiled")
    (g_comp,) = torch.autograd.grad(compiled.loss, batch["logprobs"])
    assert compiled.loss.item() == pytest.approx(eager.loss.item(), rel=1e-5)
    assert_close(g_comp, g_eager, rtol=1e-4, atol=1e-9)
    for k, v in eager.metrics.items():
        assert compiled.metrics[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-7), k

    def step(lp):
        out = hadw_policy_loss(lp, batch["old_logprobs"], adv, batch["mask"], config=cfg,
                               ref_logprobs=batch["ref_logprobs"], rollout_is_weights=weights, normalizer=norm)
        return out.loss * 2.0

    traced = torch.compile(step, fullgraph=True)(batch["logprobs"])
    (g_traced,) = torch.autograd.grad(traced, batch["logprobs"])
    assert traced.item() == pytest.approx(2.0 * eager.loss.item(), rel=1e-5)
    assert_close(g_traced, 2.0 * g_eager, rtol=1e-4, atol=1e-9)
