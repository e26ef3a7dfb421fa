"""Bad input gets a clear error naming the problem, never a silent NaN; LossConfig rejects invalid settings."""

from __future__ import annotations

import pytest
import torch
from helpers import make_batch

from hadw_kernels import DifficultyAnchor, HADWLoss, LossConfig, hadw_advantages, hadw_loss


def call(**changes):
    batch = make_batch(seed=0, dtype=torch.float32)
    kw = dict(logprobs=batch["logprobs"], old_logprobs=batch["old_logprobs"], rewards=batch["rewards"],
              mask=batch["mask"], group_size=4, anchor=0.5, config=LossConfig.grpo(), backend="torch")
    kw.update(changes)
    return hadw_loss(**kw)


N, T = 12, 7


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(old_logprobs=torch.zeros(N, T + 1)), r"old_logprobs has shape \(12, 8\) but logprobs has \(12, 7\)"),
        (dict(mask=torch.ones(N, 3)), r"mask has shape \(12, 3\)"),
        (dict(ref_logprobs=torch.zeros(N - 1, T)), r"ref_logprobs has shape \(11, 7\)"),
        (dict(rewards=torch.zeros(N - 4)), r"rewards has 8 entries but logprobs has 12 rows"),
        (dict(rewards=torch.zeros(N, 1)), r"rewards must be 1-D \[N\], got shape \(12, 1\)"),
        (dict(logprobs=torch.zeros(N)), r"logprobs must be 2-D \[N, T\]"),
        (dict(group_size=5), r"N = 12 rows is not divisible by group_size = 5"),
        (dict(group_size=1), r"group_size must be >= 2"),
        (dict(group_size=4.0), r"group_size must be an int"),
        (dict(logprobs=torch.zeros(0, T), old_logprobs=torch.zeros(0, T), mask=torch.ones(0, T),
              rewards=torch.zeros(0)), r"empty batch"),
        (dict(logprobs=torch.zeros(N, 0), old_logprobs=torch.zeros(N, 0), mask=torch.ones(N, 0)), r"empty batch"),
        (dict(rewards=torch.tensor([float("-inf")] * 2 + [0.0] * 10)), r"rewards has 2 infinite value\(s\)"),
        (dict(rewards=torch.tensor([float("inf")] + [0.0] * 11)), r"rewards has 1 infinite"),
        (dict(logprobs=torch.zeros(N, T, dtype=torch.int64)), r"logprobs must be a floating-point tensor"),
        (dict(mask=torch.ones(N, T, dtype=torch.complex64)), r"mask must be bool, integer or float"),
        (dict(anchor=float("nan")), r"anchor must be finite"),
        (dict(anchor=torch.ones(2)), r"anchor must be a scalar"),
        (dict(anchor=DifficultyAnchor()), r"has no prior yet; call anchor.step"),
        (dict(anchor="0.5"), r"anchor must be a float, a DifficultyAnchor or None"),
        (dict(normalizer=0), r"normalizer must be a finite number > 0, got 0"),
        (dict(normalizer=float("inf")), r"normalizer must be a finite number > 0"),
        (dict(backend="cuda"), r"backend='cuda' is not valid"),
        (dict(config=dict(clip_low=0.2)), r"config must be a LossConfig"),
        (dict(rewards=[0.0] * N), r"rewards must be a torch.Tensor"),
    ],
)
def test_bad_inputs(changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(**changes)


@pytest.mark.parametrize("name", ["logprobs", "old_logprobs", "ref_logprobs"])
def test_nonfinite_logprobs_at_valid_positions(name):
    batch = make_batch(seed=1, dtype=torch.float32, with_ref=True)
    t = batch[name].detach().clone()
    valid = batch["mask"].nonzero()
    t[tuple(valid[0])] = float("nan")
    t[tuple(valid[1])] = float("-inf")
    batch[name] = t.requires_grad_() if name == "logprobs" else t
    with pytest.raises(ValueError, match=rf"non-finite values at valid \(mask=1\) positions: {name}: 2 NaN/Inf"):
        hadw_loss(batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 4, anchor=0.5,
                  ref_logprobs=batch["ref_logprobs"], backend="torch")


def test_mixed_devices():
    if not torch.cuda.is_available():
        meta = torch.zeros(N, T, device="meta")
        with pytest.raises(ValueError, match=r"all tensors must be on one device.*old_logprobs on meta"):
            call(old_logprobs=meta)
    else:
        with pytest.raises(ValueError, match=r"all tensors must be on one device"):
            call(old_logprobs=torch.zeros(N, T, device="cuda"))


def test_hadw_advantages_validation():
    with pytest.raises(ValueError, match=r"not divisible by group_size = 3"):
        hadw_advantages(torch.zeros(8), 3)
    with pytest.raises(ValueError, match=r"rewards has 1 infinite"):
        hadw_advantages(torch.tensor([float("inf"), 0.0]), 2)
    with pytest.raises(ValueError, match=r"empty batch"):
        hadw_advantages(torch.zeros(0), 2)
    # integer and bool rewards are accepted as numbers
    assert hadw_advantages(torch.tensor([1, 0, 0, 1]), 2).raw.dtype == torch.float32
    assert hadw_advantages(torch.tensor([True, False]), 2).raw.tolist() == pytest.approx([0.7071, -0.7071], rel=1e-4)


def test_module_validation():
    with pytest.raises(ValueError, match=r"group_size must be >= 2"):
        HADWLoss(group_size=1)
    with pytest.raises(ValueError, match=r"backend='gpu'"):
        HADWLoss(backend="gpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(clip_low=0.0), r"clip_low must be > 0"),
        (dict(clip_low=-0.1), r"clip_low must be > 0"),
        (dict(clip_low=1.0), r"clip_low must be < 1"),
        (dict(clip_high=0), r"clip_high must be > 0"),
        (dict(clip_high=float("nan")), r"clip_high must be a finite number"),
        (dict(clip_ratio_c=1.0), r"clip_ratio_c \(dual clip\) must be > 1"),
        (dict(ratio_level="seq"), r"ratio_level='seq' is not valid; choose one of 'token', 'sequence'"),
        (dict(loss_agg="mean"), r"loss_agg='mean' is not valid"),
        (dict(adv_norm="batch"), r"adv_norm='batch' is not valid"),
        (dict(kl_estimator="k4"), r"kl_estimator='k4' is not valid"),
        (dict(std_unbiased=1), r"std_unbiased must be a bool"),
        (dict(std_eps=-1e-6), r"std_eps must be >= 0"),
        (dict(lambda_scale=0), r"lambda_scale must be > 0"),
        (dict(kl_coef=-0.1), r"kl_coef must be >= 0"),
        (dict(log_ratio_clamp=0), r"log_ratio_clamp must be > 0"),
        (dict(norm_len=0), r"norm_len must be a positive int"),
    ],
)
def test_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


def test_presets_match_the_spec_table():
    g, d, s, r = LossConfig.grpo(), LossConfig.dapo(), LossConfig.gspo(), LossConfig.dr_grpo()
    assert (g.clip_low, g.clip_high, g.ratio_level, g.loss_agg) == (0.2, 0.2, "token", "seq-mean-token-mean")
    assert (d.clip_low, d.clip_high, d.ratio_level, d.loss_agg) == (0.2, 0.28, "token", "token-mean")
    assert (s.clip_low, s.clip_high, s.ratio_level, s.loss_agg) == (3e-4, 4e-4, "sequence", "seq-mean-token-mean")
    assert (r.clip_low, r.clip_high, r.ratio_level, r.loss_agg, r.adv_norm) == (
        0.2, 0.2, "token", "seq-mean-token-sum-norm", "none")
    for c in (g, d, s, r):
        assert (c.hadw, c.lambda_scale, c.std_eps, c.std_unbiased, c.kl_coef, c.clip_ratio_c, c.log_ratio_clamp) == (
            True, 1.3, 1e-6, True, 0.0, None, 20.0)
    assert LossConfig.dapo(lambda_scale=1.5, kl_coef=0.01).lambda_scale == 1.5
    assert LossConfig() == g
    with pytest.raises(ValueError, match=r"unknown loss preset 'ppo'"):
        LossConfig.preset("ppo")
    with pytest.raises(ValueError, match=r"clip_high must be > 0"):
        g.replace(clip_high=-1)
    with pytest.raises(Exception, match="cannot assign"):
        g.clip_low = 0.3
