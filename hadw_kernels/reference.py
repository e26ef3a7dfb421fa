"""The HA-DW policy loss in plain PyTorch: the specification in code, the CPU path and the benchmark baseline.

Every formula here is the one in the spec (docs/spec.md §2, §4, §5), in the same order, in two stages:

1. `compute_advantages` (once per rollout batch): group statistics of the rewards -> the group-relative advantage
   A_hat (§2); diff = group mean - anchor, D = -sgn(A_hat) sgn(diff), Phi = lambda exp(D |diff|), A = A_hat * Phi (§4).
   Groups are contiguous rows of equal size, or any rows sharing a group id; NaN rewards are unscorable.
2. `policy_loss_terms` (any micro-batch, rows in any order): per token the ratio rho (token, or GSPO's sequence
   ratio), l = -min(rho A, clip(rho) A), optional dual clip, rollout importance weights and KL penalty (§5), then
   aggregation in one of verl's four modes with an optional caller-given global denominator (§5).

`loss_terms` is the fused whole-batch loss: stage 1 then stage 2 on the same rows, so `hadw_loss` equals
`hadw_policy_loss(..., hadw_advantages(...).advantages)` exactly.

No input validation happens here (see `hadw_kernels.validation`): these functions are pure tensor math so that
`torch.compile` can trace them, and they run in float64 when given float64, which the tests use as ground truth.
Positions where `mask` is false are replaced by zeros before any arithmetic, so padding holding NaN or -inf never
reaches the loss or its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hadw_kernels.config import LossConfig

POLICY_METRICS = ("clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl", "pg_loss",
                  "response_len_mean", "num_tokens", "num_seqs")
"""Metrics of the policy loss, in this order (every backend returns them as a dict in this order)."""
KL_METRICS = ("kl", "kl_loss")
"""Appended to the policy metrics when reference log-probs are given."""
ADVANTAGE_METRICS = ("phi_mean", "phi_min", "phi_max", "adv_abs_mean", "degenerate_group_frac")
"""Metrics of the advantages, added by the fused whole-batch loss (between the policy and the KL metrics)."""


def metric_names(*, advantages: bool, kl: bool) -> tuple[str, ...]:
    """The metric keys, in order, of the fused loss (advantages=True) or of the policy loss (False)."""
    return POLICY_METRICS + (ADVANTAGE_METRICS if advantages else ()) + (KL_METRICS if kl else ())


def active_anchor(anchor, config: LossConfig):
    """The anchor Phi is computed from: None where HA-DW is off. The one place that decides whether HA-DW applies."""
    return anchor if config.hadw else None


@dataclass
class Advantages:
    """Group-relative advantages and their HA-DW weights. N rows, P groups."""

    advantages: torch.Tensor
    """[N] A = A_hat * Phi, the advantage the loss uses (0 for unscorable rows and in degenerate groups)."""
    raw: torch.Tensor
    """[N] A_hat, the group-relative advantage before reweighting."""
    phi: torch.Tensor
    """[N] Phi = lambda * exp(D * M) (1 where HA-DW is off or no anchor is given)."""
    group_mean: torch.Tensor
    """[P] p_hat, the mean scorable reward of each group (0 for a group with no scorable reward)."""
    group_std: torch.Tensor
    """[P] s, the std of each group's scorable rewards (n - 1 unless config.std_unbiased is False; 0 below two)."""
    diff: torch.Tensor
    """[P] p_hat - C_t^- (0 without an anchor, and for a group with no scorable reward)."""
    degenerate: torch.Tensor
    """[P] bool, True where the group has no learning signal: all scorable rewards equal, or fewer than two."""
    group_index: torch.Tensor
    """[N] int64, the group of each row: row // G for contiguous groups, else the position of its id among the
    sorted distinct group ids."""
    unscorable: torch.Tensor
    """[N] bool, True where the reward is NaN (unscorable: left out of its group's statistics, advantage 0)."""


@dataclass
class LossOutput:
    """What `hadw_loss` and `hadw_policy_loss` return."""

    loss: torch.Tensor
    """0-d, float32 (float64 for float64 inputs); differentiable w.r.t. logprobs."""
    advantages: torch.Tensor
    """The advantages the loss used (detached): [N] from `hadw_loss`; the input ([N] or [N, T]) for the policy loss."""
    phi: torch.Tensor | None
    """[N] the HA-DW weights (detached) from `hadw_loss`; None from `hadw_policy_loss` (see `hadw_advantages`)."""
    metrics: dict[str, torch.Tensor]
    """Detached 0-d tensors, keys in `metric_names` order: clipfrac, clipfrac_low, clipfrac_high, dual_clipfrac,
    approx_kl, pg_loss, response_len_mean, num_tokens, num_seqs; from `hadw_loss` also phi_mean, phi_min, phi_max,
    adv_abs_mean, degenerate_group_frac; with ref_logprobs kl and kl_loss. Token metrics are means over the valid
    tokens of this call."""


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: low-precision inputs are computed in fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


class _Groups:
    """Per-group reductions of [N] row values: views of [P, G] for contiguous groups of equal size (what
    torch.compile fuses; Inductor 2.13's CPU codegen fails on the scatter stores below, with 2 threads), scatters
    over `index` for groups given by id."""

    def __init__(self, index: torch.Tensor, n_groups: int, group_size: int | None) -> None:
        self.index, self.n_groups, self.group_size = index, n_groups, group_size

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None:
            return values.view(self.n_groups, self.group_size).sum(dim=1)
        return torch.zeros(self.n_groups, dtype=values.dtype, device=values.device).index_add_(0, self.index, values)

    def extreme(self, values: torch.Tensor, reduce: str) -> torch.Tensor:
        """"amax" or "amin" over each group's rows."""
        if self.group_size is not None:
            grouped = values.view(self.n_groups, self.group_size)
            return grouped.amax(dim=1) if reduce == "amax" else grouped.amin(dim=1)
        start = -float("inf") if reduce == "amax" else float("inf")
        return torch.full((self.n_groups,), start, dtype=values.dtype, device=values.device).scatter_reduce(
            0, self.index, values, reduce=reduce)

    def rows(self, per_group: torch.Tensor) -> torch.Tensor:
        """[P] -> [N]: each row's group value."""
        if self.group_size is not None:
            return per_group[:, None].expand(self.n_groups, self.group_size).reshape(-1)
        return per_group[self.index]


def compute_advantages(
    rewards: torch.Tensor,
    group_size: int | None,
    anchor: torch.Tensor | float | None,
    config: LossConfig,
    dtype: torch.dtype | None = None,
    group_ids: torch.Tensor | None = None,
) -> Advantages:
    """Group-relative advantages reweighted by HA-DW (spec §2 and §4), for a whole rollout batch.

    Args:
        rewards: [N] scalar rewards; NaN marks an unscorable response (TRL's convention).
        group_size: G for contiguous groups of equal size (rows g*G ... g*G+G-1 form group g); or None with
            `group_ids`.
        anchor: the prior C_t^- (float or 0-d tensor), or None for Phi = 1 (see `active_anchor`).
        dtype: computation dtype (default float32, or float64 for float64 rewards).
        group_ids: [N] integer group id of each row, any order, groups of any size (instead of `group_size`).
    """
    dtype = dtype or (torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    r = rewards.detach().to(dtype)
    n_rows, device = r.shape[0], r.device
    if group_ids is None:
        n_groups = n_rows // group_size
        index = torch.arange(n_rows, device=device) // group_size
    else:
        distinct, index = torch.unique(group_ids, return_inverse=True)
        n_groups = distinct.numel()
    anchor = active_anchor(anchor, config)
    zero = torch.zeros((), dtype=dtype, device=device)

    unscorable = torch.isnan(r)
    scorable = ~unscorable
    r0 = torch.where(scorable, r, zero)
    groups = _Groups(index, n_groups, group_size if group_ids is None else None)
    count = groups.sum(scorable.to(dtype))  # [P] scorable responses per group
    mean = groups.sum(r0) / count.clamp(min=1)
    centred = torch.where(scorable, r0 - groups.rows(mean), zero)
    correction = 1 if config.std_unbiased else 0
    std = (groups.sum(centred * centred) / (count - correction).clamp(min=1)).sqrt()
    std = torch.where(count > correction, std, torch.zeros_like(std))
    # "All rewards equal" is decided exactly, not through std == 0: the mean of equal floats can differ from them
    # in the last bit, which would otherwise turn 0 into +-1/eps noise.
    inf = torch.full((), float("inf"), dtype=dtype, device=device)
    high = groups.extreme(torch.where(scorable, r0, -inf), "amax")
    low = groups.extreme(torch.where(scorable, r0, inf), "amin")
    degenerate = (count < 2) | (high == low)

    if config.adv_norm == "group_std":
        denom = std + config.std_eps
    elif config.adv_norm == "batch_std":
        n_scorable = scorable.to(dtype).sum()
        batch_centred = torch.where(scorable, r0 - r0.sum() / n_scorable.clamp(min=1), zero)
        batch_var = (batch_centred * batch_centred).sum() / (n_scorable - correction).clamp(min=1)
        denom = (batch_var.sqrt() + config.std_eps).expand(n_groups)
    else:
        denom = torch.ones_like(std)
    row_degenerate = groups.rows(degenerate) | unscorable
    safe_denom = torch.where(degenerate, torch.ones_like(denom), denom)
    raw = torch.where(row_degenerate, zero, centred / groups.rows(safe_denom))

    if anchor is None:
        diff = torch.zeros_like(mean)
        phi = torch.ones_like(raw)
    else:
        diff = torch.where(count > 0, mean - torch.as_tensor(anchor, dtype=dtype, device=device), zero)
        d = -torch.sign(raw) * groups.rows(torch.sign(diff))  # D_i = -sgn(A_hat_i) sgn(diff_g)
        phi = config.lambda_scale * torch.exp(d * groups.rows(diff.abs()))  # Phi_i = lambda exp(D_i M_g)
    return Advantages(advantages=raw * phi, raw=raw, phi=phi, group_mean=mean, group_std=std, diff=diff,
                      degenerate=degenerate, group_index=index, unscorable=unscorable)


def advantage_metrics(adv: Advantages) -> dict[str, torch.Tensor]:
    """The `ADVANTAGE_METRICS` of a batch's advantages, over all its rows and groups."""
    with torch.no_grad():
        return {
            "phi_mean": adv.phi.mean(),
            "phi_min": adv.phi.min(),
            "phi_max": adv.phi.max(),
            "adv_abs_mean": adv.advantages.abs().mean(),
            "degenerate_group_frac": adv.degenerate.to(adv.phi.dtype).sum() / adv.degenerate.numel(),
        }


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


def truncated_is_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    threshold: float | None = 2.0,
    level: str = "token",
    clamp: float = 20.0,
) -> torch.Tensor:
    """[N, T] importance weights pi_old / pi_rollout correcting a rollout engine's sampling log-probs (e.g. vLLM's)
    to the trainer's, truncated from above at `threshold` (verl's truncated IS): token level exp(old - rollout), or
    sequence level exp(sum of the row's log-ratios) on every token of the row; log-ratios clamped to +-clamp; 0 at
    padding. Detached."""
    m = mask if mask.dtype == torch.bool else mask != 0
    dtype = compute_dtype(old_logprobs, rollout_logprobs)
    zero = torch.zeros((), dtype=dtype, device=old_logprobs.device)
    log_ratio = torch.where(m, old_logprobs.detach().to(dtype) - rollout_logprobs.detach().to(dtype), zero)
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)
    weights = torch.where(m, torch.exp(log_ratio.clamp(-clamp, clamp)), zero)
    return weights if threshold is None else weights.clamp(max=threshold)


def policy_loss_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    ref_logprobs: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy loss on precomputed advantages: (loss, metrics in `metric_names(advantages=False)` order).

    Args:
        logprobs, old_logprobs, mask: [N, T]; advantages: [N] (one per row) or [N, T] (one per token), detached.
        ref_logprobs: [N, T] for the KL metric and, with config.kl_coef > 0, the KL penalty.
        rollout_is_weights: [N, T] detached importance weights multiplying each token's surrogate (not the KL),
            truncated at config.rollout_is_threshold.
        normalizer: replaces the aggregation's denominator (see `hadw_loss_reference`).
    """
    dtype = compute_dtype(logprobs, old_logprobs, ref_logprobs)
    m = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    # Masked positions are zeroed before any arithmetic: padding may hold NaN or -inf and must not leak.
    logp = torch.where(m, logprobs.to(dtype), zero)
    old = torch.where(m, old_logprobs.detach().to(dtype), zero)
    a = advantages.detach().to(dtype)
    a = a[:, None] if a.dim() == 1 else torch.where(m, a, zero)  # [N, 1] broadcasts a per-row advantage

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
    if rollout_is_weights is not None:
        w = torch.where(m, rollout_is_weights.detach().to(dtype), zero)
        if config.rollout_is_threshold is not None:
            w = w.clamp(max=config.rollout_is_threshold)
        pg = pg * w

    token_loss = pg
    kl = None
    if ref_logprobs is not None:
        ref = torch.where(m, ref_logprobs.detach().to(dtype), zero)
        kl = kl_penalty(logp, ref, config.kl_estimator, clamp)
        if config.kl_ratio_weighted:
            kl = kl * ratio
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
            "response_len_mean": lengths.mean(),
            "num_tokens": n_tokens,
            "num_seqs": n_seqs,
        }
        if kl is not None:
            kl_rows = row_sum(kl)
            metrics["kl"] = kl_rows.sum() / per_token
            metrics["kl_loss"] = aggregate(kl_rows)
    return loss, metrics


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
    """The fused whole-batch loss as plain tensors: (loss, advantages [N], phi [N], metrics in
    `metric_names(advantages=True)` order). Stage 1 then stage 2 of the module docstring on the same rows."""
    adv = compute_advantages(rewards, group_size, anchor, config, compute_dtype(logprobs, old_logprobs, ref_logprobs))
    loss, policy = policy_loss_terms(logprobs, old_logprobs, adv.advantages, mask, config, ref_logprobs, None,
                                     normalizer)
    extra = advantage_metrics(adv)
    metrics = {k: {**policy, **extra}[k] for k in metric_names(advantages=True, kl=ref_logprobs is not None)}
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
        rewards: [N] scalar rewards, rows of one group contiguous (N = P * group_size); NaN = unscorable.
        mask: [N, T] nonzero on response tokens.
        anchor: prior C_t^- (float / 0-d tensor) or None for Phi = 1.
        ref_logprobs: [N, T] reference-policy log-probs for the KL penalty (None = no KL term).
        normalizer: replaces the aggregation's denominator (global token count for token-mean, global count of
            non-empty rows for seq-mean-*), so micro-batch losses sum to the whole-batch loss.
    """
    loss, advantages, phi, metrics = loss_terms(logprobs, old_logprobs, rewards, mask, group_size, anchor, config,
                                                ref_logprobs, normalizer)
    return LossOutput(loss=loss, advantages=advantages, phi=phi, metrics=metrics)
