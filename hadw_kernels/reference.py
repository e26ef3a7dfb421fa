"""The HA-DW policy loss in plain PyTorch: the specification in code, the CPU path and the benchmark baseline.

Every formula here is the one in the spec (docs/spec.md §2, §4, §5), in the same order:

1. group statistics of the rewards -> the group-relative advantage A_hat (§2);
2. diff = group mean - anchor, D = -sgn(A_hat) sgn(diff), Phi = lambda exp(D |diff|), A = A_hat * Phi (§4);
3. per token: ratio rho (token, or GSPO's sequence ratio), l = -min(rho A, clip(rho) A), optional dual clip and
   KL penalty (§5);
4. aggregation in one of verl's four modes, with an optional caller-given global denominator (§5).

No input validation happens here (see `hadw_kernels.loss`): these functions are pure tensor math so that
`torch.compile` can trace them, and they run in float64 when given float64, which the tests use as ground truth.
Positions where `mask` is false are replaced by zeros before any arithmetic, so padding holding NaN or -inf never
reaches the loss or its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hadw_kernels.config import LossConfig


@dataclass
class Advantages:
    """Group-relative advantages and their HA-DW weights. Shapes: N = P * G rows, P groups."""

    advantages: torch.Tensor
    """[N] A = A_hat * Phi, the advantage the loss uses."""
    raw: torch.Tensor
    """[N] A_hat, the group-relative advantage before reweighting (0 in groups with equal rewards)."""
    phi: torch.Tensor
    """[N] Phi = lambda * exp(D * M) (1 where HA-DW is off or no anchor is given)."""
    group_mean: torch.Tensor
    """[P] p_hat, the mean reward of each group."""
    group_std: torch.Tensor
    """[P] s, the reward std of each group (n - 1 unless config.std_unbiased is False)."""
    diff: torch.Tensor
    """[P] p_hat - C_t^- (0 without an anchor)."""
    degenerate: torch.Tensor
    """[P] bool, True where all rewards of the group are equal (no learning signal)."""


@dataclass
class LossOutput:
    """What `hadw_loss` returns."""

    loss: torch.Tensor
    """0-d, float32 (float64 for float64 inputs); differentiable w.r.t. logprobs."""
    advantages: torch.Tensor
    """[N] A = A_hat * Phi (detached)."""
    phi: torch.Tensor
    """[N] the HA-DW weights (detached)."""
    metrics: dict[str, torch.Tensor]
    """Detached 0-d tensors: clipfrac, clipfrac_low, clipfrac_high, dual_clipfrac, approx_kl, kl (with ref),
    pg_loss, kl_loss (with ref), phi_mean, phi_min, phi_max, adv_abs_mean, degenerate_group_frac,
    response_len_mean, num_tokens, num_seqs. Token metrics are means over the valid tokens of this call."""


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: low-precision inputs are computed in fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def compute_advantages(
    rewards: torch.Tensor,
    group_size: int,
    anchor: torch.Tensor | float | None,
    config: LossConfig,
    dtype: torch.dtype | None = None,
) -> Advantages:
    """Group-relative advantages reweighted by HA-DW (spec §2 and §4).

    Args:
        rewards: [N] with N = P * group_size, the rows of one group contiguous.
        anchor: the prior C_t^- (float or 0-d tensor), or None for Phi = 1.
        dtype: computation dtype (default float32, or float64 for float64 rewards).
    """
    dtype = dtype or (torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    r = rewards.detach().to(dtype).reshape(-1, group_size)  # [P, G]
    mean = r.mean(dim=1)
    std = r.std(dim=1, correction=1 if config.std_unbiased else 0)
    # "All rewards equal" is decided exactly, not through std == 0: the mean of equal floats can differ from them
    # in the last bit, which would otherwise turn 0 into +-1/eps noise.
    degenerate = r.amax(dim=1) == r.amin(dim=1)
    centred = r - mean[:, None]
    if config.adv_norm == "group_std":
        denom = torch.where(degenerate, torch.ones_like(std), std + config.std_eps)
        raw = centred / denom[:, None]
    else:
        raw = centred
    raw = torch.where(degenerate[:, None], torch.zeros_like(raw), raw)

    if anchor is None:
        diff = torch.zeros_like(mean)
    else:
        diff = mean - torch.as_tensor(anchor, dtype=dtype, device=r.device)
    if config.hadw and anchor is not None:
        d = -torch.sign(raw) * torch.sign(diff)[:, None]  # D_i = -sgn(A_hat_i) sgn(diff_g)
        phi = config.lambda_scale * torch.exp(d * diff.abs()[:, None])  # Phi_i = lambda exp(D_i M_g)
    else:
        phi = torch.ones_like(raw)
    return Advantages(advantages=(raw * phi).reshape(-1), raw=raw.reshape(-1), phi=phi.reshape(-1),
                      group_mean=mean, group_std=std, diff=diff, degenerate=degenerate)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, clamp: float) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref): k1 = logp - ref, k2 = (logp - ref)^2 / 2,
    k3 = exp(ref - logp) - (ref - logp) - 1 (with ref - logp clamped to +-clamp so exp cannot overflow)."""
    delta = ref_logprobs - logprobs
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta * delta
    delta = delta.clamp(-clamp, clamp)
    return torch.exp(delta) - delta - 1.0


def loss_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    anchor: torch.Tensor | float | None,
    config: LossConfig,
    ref_logprobs: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The whole loss as plain tensors: (loss, advantages [N], phi [N], metrics). See `hadw_loss_reference`."""
    dtype = compute_dtype(logprobs, old_logprobs, ref_logprobs)
    m = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    # Masked positions are zeroed before any arithmetic: padding may hold NaN or -inf and must not leak.
    logp = torch.where(m, logprobs.to(dtype), zero)
    old = torch.where(m, old_logprobs.detach().to(dtype), zero)

    adv = compute_advantages(rewards, group_size, anchor, config, dtype)
    a = adv.advantages[:, None]  # [N, 1]: Phi is a per-response constant, broadcast to its tokens

    # Counts are kept in the compute dtype (exact below 2^24 tokens a row): int64 accumulators halve the vector
    # width of the fused CPU loop.
    lengths = m.to(dtype).sum(dim=1)  # [N] |y_i|
    n_tokens = lengths.sum()
    n_seqs = (lengths > 0).to(dtype).sum()
    clamp = config.log_ratio_clamp

    log_ratio = logp - old
    if config.ratio_level == "sequence":
        # GSPO: s_i = exp(mean_t log_ratio); the same value for every token of row i.
        seq_log_ratio = log_ratio.sum(dim=1) / lengths.clamp(min=1)
        ratio = torch.exp(seq_log_ratio.clamp(-clamp, clamp))[:, None].expand_as(logp)
    else:
        ratio = torch.exp(log_ratio.clamp(-clamp, clamp))

    pg_unclipped = -a * ratio
    pg_clipped = -a * ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)  # -min(rho A, clip(rho) A)
    if config.clip_ratio_c is not None:
        pg_dual = -a * config.clip_ratio_c
        dual_active = (a < 0) & (pg > pg_dual)
        pg = torch.where(a < 0, torch.minimum(pg, pg_dual), pg)
    else:
        dual_active = None

    token_loss = pg
    kl = None
    if ref_logprobs is not None:
        ref = torch.where(m, ref_logprobs.detach().to(dtype), zero)
        kl = kl_penalty(logp, ref, config.kl_estimator, clamp)
        if config.kl_coef != 0.0:
            token_loss = pg + config.kl_coef * kl

    # Every token quantity is reduced over its row first, and every scalar below comes from these [N] row sums:
    # one pass over the [N, T] data (torch.compile fuses the row sums into one loop; full [N, T] -> scalar
    # reductions beside them made it recompute the ratio once per reduction, 3x slower on CPU).
    def row_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(m, x, zero).sum(dim=1)

    def aggregate(rows: torch.Tensor) -> torch.Tensor:
        if config.loss_agg == "token-mean":
            total, count = rows.sum(), n_tokens
        elif config.loss_agg == "seq-mean-token-mean":
            total, count = (rows / lengths.clamp(min=1)).sum(), n_seqs
        else:  # seq-mean-token-sum and seq-mean-token-sum-norm
            total, count = rows.sum(), n_seqs
        denom = count.clamp(min=1) if normalizer is None else torch.as_tensor(normalizer, dtype=dtype)
        if config.loss_agg == "seq-mean-token-sum-norm":
            denom = denom * (config.norm_len if config.norm_len is not None else logp.shape[1])
        return total / denom

    loss = aggregate(row_sum(token_loss))

    with torch.no_grad():
        low = (a < 0) & (ratio < 1.0 - config.clip_low)  # the clipped arm is the active one
        high = (a > 0) & (ratio > 1.0 + config.clip_high)
        neg_log_ratio = (old - logp).clamp(-clamp, clamp)
        approx_kl = torch.exp(neg_log_ratio) - neg_log_ratio - 1.0  # k3 of old vs new
        n_groups = adv.degenerate.numel()
        per_token = n_tokens.clamp(min=1)
        clipfrac_low = row_sum(low.to(dtype)).sum() / per_token
        clipfrac_high = row_sum(high.to(dtype)).sum() / per_token  # disjoint from low: A > 0 there, A < 0 here
        metrics = {
            "clipfrac": clipfrac_low + clipfrac_high,
            "clipfrac_low": clipfrac_low,
            "clipfrac_high": clipfrac_high,
            "dual_clipfrac": zero if dual_active is None else row_sum(dual_active.to(dtype)).sum() / per_token,
            "approx_kl": row_sum(approx_kl).sum() / per_token,
            "pg_loss": aggregate(row_sum(pg)) if kl is not None else loss.detach(),
            "phi_mean": adv.phi.mean(),
            "phi_min": adv.phi.min(),
            "phi_max": adv.phi.max(),
            "adv_abs_mean": adv.advantages.abs().mean(),
            "degenerate_group_frac": adv.degenerate.to(dtype).sum() / n_groups,
            "response_len_mean": lengths.mean(),
            "num_tokens": n_tokens,
            "num_seqs": n_seqs,
        }
        if kl is not None:
            kl_rows = row_sum(kl)
            metrics["kl"] = kl_rows.sum() / per_token
            metrics["kl_loss"] = aggregate(kl_rows)
    return loss, adv.advantages.detach(), adv.phi.detach(), metrics


def hadw_loss_reference(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    anchor: torch.Tensor | float | None,
    config: LossConfig,
    ref_logprobs: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> LossOutput:
    """Reference HA-DW loss, same signature as `hadw_kernels.hadw_loss` minus validation and dispatch.

    Args:
        logprobs: [N, T] log-probs of the response tokens under the policy being trained.
        old_logprobs: [N, T] log-probs under the policy that sampled (no gradient).
        rewards: [N] scalar rewards, rows of one group contiguous (N = P * group_size).
        mask: [N, T] nonzero on response tokens.
        anchor: prior C_t^- (float / 0-d tensor) or None for Phi = 1.
        ref_logprobs: [N, T] reference-policy log-probs for the KL penalty (None = no KL term).
        normalizer: replaces the aggregation's denominator (global token count for token-mean, global count of
            non-empty rows for seq-mean-*), so micro-batch losses sum to the whole-batch loss.
    """
    loss, advantages, phi, metrics = loss_terms(logprobs, old_logprobs, rewards, mask, group_size, anchor, config,
                                                ref_logprobs, normalizer)
    return LossOutput(loss=loss, advantages=advantages, phi=phi, metrics=metrics)
