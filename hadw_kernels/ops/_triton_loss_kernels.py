"""The @triton.jit code of the HA-DW policy loss. Private: `hadw_kernels.ops.triton_loss` owns allocation and launch.

One forward, one finalize and one backward kernel serve both public paths; the switch ADV_SOURCE says where each
row's advantage comes from:
- ADV_GROUPS, the fused whole-batch loss (`hadw_loss`): computed in the forward pass from the rewards of the row's
  contiguous group (the helpers of `_triton_advantage_kernels`, shared with the advantage kernel: NaN = unscorable,
  group / batch / no scaling, HA-DW), written out as `advantages` and `phi`, and summarised in the advantage metrics;
- ADV_ROW / ADV_TOKEN, the policy loss on precomputed advantages (`hadw_policy_loss`): read from an [N] or [N, T]
  tensor, any row order.
Both kernels use a 1-D grid over blocks of BLOCK_R rows (no grid-dimension limit on N) and loop over T in chunks of
BLOCK_T tokens. Every value is computed in fp32 whatever the input dtype (fp16 / bf16 / fp32), as the reference does.

Forward, per block of rows, in one pass over the tokens:
- per token: the ratio (token level), the clipped surrogate with optional dual clip, the rollout importance weight
  (truncated), the KL estimate (optionally times the ratio), approx_kl and the NaN/Inf counts, all masked and
  reduced to per-row sums. For GSPO the row sum of the log-ratio gives the sequence ratio after the loop; the
  surrogate is then evaluated once per row (per-row advantages: the importance weights enter as their row sum), or
  in a second pass over the row's tokens (per-token advantages);
- a grid-stride loop over row blocks (the grid is bounded to a few programs per SM) and, per program, one float64
  row of `partial`: the sums of every aggregation numerator and metric over its rows; a one-program finalize kernel
  reduces these [programs, NUM_SLOTS] partials to the loss and the metrics (one launch instead of the ~30 tiny torch
  ops the same reduction costs, which on a GPU would take longer than the loss itself).
It also writes, per row, what the backward needs besides the inputs (`rows` [3, N]): the aggregation weight w_i
(1 / |y_i| for seq-mean-token-mean, else 1); for GSPO the part of dL_i/dlogp[i, t] that is the same for every token
of the row (through the sequence ratio: the surrogate's, and the ratio-weighted KL's); and the sequence ratio s_i.

Backward, in one launch, recomputes the per-token derivative from logp / old (/ ref / advantages / weights) and
writes dL/dlogp; for GSPO without KL it reads only the mask. No N x T temporaries besides the gradient itself.
"""

import triton
import triton.language as tl

from hadw_kernels.ops._triton_advantage_kernels import (
    ADV_NORM_BATCH,
    _anchor_diff,
    _group_sq_dev,
    _group_stats,
    _group_sums,
    _scaled_advantage,
)
from hadw_kernels.reference import ADVANTAGE_METRICS, KL_METRICS, POLICY_METRICS

# Where each row's advantage comes from (module docstring).
ADV_ROW = tl.constexpr(0)
ADV_TOKEN = tl.constexpr(1)
ADV_GROUPS = tl.constexpr(2)

# Columns of the forward kernel's float64 `partial` output [programs, NUM_SLOTS]: sums over each program's rows.
S_LOSS = tl.constexpr(0)  # sum_i w_i * sum_t mask * (pg + kl_coef * kl)   (kl only when it is in the loss)
S_PG = tl.constexpr(1)  # sum_i w_i * sum_t mask * pg
S_KL_AGG = tl.constexpr(2)  # sum_i w_i * sum_t mask * kl
S_TOKENS = tl.constexpr(3)  # sum_i |y_i|
S_SEQS = tl.constexpr(4)  # rows with |y_i| > 0
S_LOW = tl.constexpr(5)  # valid tokens with A < 0 and rho < 1 - eps_low
S_HIGH = tl.constexpr(6)  # valid tokens with A > 0 and rho > 1 + eps_high
S_DUAL = tl.constexpr(7)  # valid tokens where the dual clip is active
S_APPROX_KL = tl.constexpr(8)  # sum of k3(old || new) over valid tokens
S_KL_TOK = tl.constexpr(9)  # sum of kl over valid tokens
S_PHI = tl.constexpr(10)  # sum of Phi_i                      (ADV_GROUPS only, as the next four)
S_PHI_MIN = tl.constexpr(11)  # min of Phi_i (a min, not a sum)
S_PHI_MAX = tl.constexpr(12)  # max of Phi_i
S_ADV_ABS = tl.constexpr(13)  # sum of |A_i|
S_DEGENERATE = tl.constexpr(14)  # rows in degenerate groups
S_BAD = tl.constexpr(15)  # 15 ... 19: NaN / Inf at valid positions of each of NONFINITE_INPUTS
NUM_SLOTS = 20
NONFINITE_INPUTS = ("logprobs", "old_logprobs", "ref_logprobs", "advantages", "rollout_is_weights")
"""The inputs whose NaN/Inf at valid positions the forward counts, in the order of its `nonfinite` output (that of
hadw_kernels.loss's suspects for the policy loss; the fused loss uses the first three)."""

# Positions in the finalize kernel's metrics vector: the reference's order (`hadw_kernels.reference.metric_names`),
# POLICY_METRICS, then ADVANTAGE_METRICS (fused loss only), then KL_METRICS at the launcher's KL_AT.
M_CLIPFRAC = tl.constexpr(POLICY_METRICS.index("clipfrac"))
M_CLIPFRAC_LOW = tl.constexpr(POLICY_METRICS.index("clipfrac_low"))
M_CLIPFRAC_HIGH = tl.constexpr(POLICY_METRICS.index("clipfrac_high"))
M_DUAL_CLIPFRAC = tl.constexpr(POLICY_METRICS.index("dual_clipfrac"))
M_APPROX_KL = tl.constexpr(POLICY_METRICS.index("approx_kl"))
M_PG_LOSS = tl.constexpr(POLICY_METRICS.index("pg_loss"))
M_RESPONSE_LEN_MEAN = tl.constexpr(POLICY_METRICS.index("response_len_mean"))
M_NUM_TOKENS = tl.constexpr(POLICY_METRICS.index("num_tokens"))
M_NUM_SEQS = tl.constexpr(POLICY_METRICS.index("num_seqs"))
M_PHI_MEAN = tl.constexpr(len(POLICY_METRICS) + ADVANTAGE_METRICS.index("phi_mean"))
M_PHI_MIN = tl.constexpr(len(POLICY_METRICS) + ADVANTAGE_METRICS.index("phi_min"))
M_PHI_MAX = tl.constexpr(len(POLICY_METRICS) + ADVANTAGE_METRICS.index("phi_max"))
M_ADV_ABS_MEAN = tl.constexpr(len(POLICY_METRICS) + ADVANTAGE_METRICS.index("adv_abs_mean"))
M_DEGENERATE_FRAC = tl.constexpr(len(POLICY_METRICS) + ADVANTAGE_METRICS.index("degenerate_group_frac"))
M_KL = tl.constexpr(KL_METRICS.index("kl"))  # offsets from KL_AT
M_KL_LOSS = tl.constexpr(KL_METRICS.index("kl_loss"))
assert len(POLICY_METRICS) == 9 and len(ADVANTAGE_METRICS) == 5 and len(KL_METRICS) == 2, "finalize writes each"


@triton.jit
def _clamp(x, c):
    return tl.minimum(tl.maximum(x, -c), c)


@triton.jit
def _nonfinite(x):
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _count(flags):
    """Per row of a [BLOCK_R, BLOCK_T] boolean tile: how many are true (fp32)."""
    return tl.sum(tl.where(flags, 1.0, 0.0), axis=1)


@triton.jit
def _bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest even by integer arithmetic. The Triton interpreter's plain cast truncates
    (a 1-ulp error against torch); the compiled cast rounds correctly, and this costs a few integer ops per element
    in a memory-bound kernel, so both paths use it and compute the same bits. Inputs here are finite."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _surrogate(ratio, a, ratio_lo, ratio_hi, clip_c, DUAL_CLIP: tl.constexpr):
    """pg = -min(rho A, clip(rho) A) (+ dual clip), d pg / d log rho (without the log-ratio clamp's gate), and the
    dual-clip flag as 0/1. The derivative follows torch's autograd of the reference, ties included: where both arms
    are equal (rho inside the clip range) the gradient is the unclipped arm's; a dual-clip tie gets half."""
    pg_unclipped = -a * ratio
    pg_clipped = -a * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
    pg = tl.maximum(pg_unclipped, pg_clipped)
    unclipped_active = tl.where(a >= 0, ratio <= ratio_hi, ratio >= ratio_lo)
    dpg = tl.where(unclipped_active, pg_unclipped, 0.0)
    dual = tl.zeros_like(pg)
    if DUAL_CLIP:
        pg_dual = -a * clip_c
        neg = a < 0
        dual = tl.where(neg & (pg > pg_dual), 1.0, 0.0)
        dpg = tl.where(neg, tl.where(pg < pg_dual, dpg, tl.where(pg == pg_dual, 0.5 * dpg, 0.0)), dpg)
        pg = tl.where(neg, tl.minimum(pg, pg_dual), pg)
    return pg, dpg, dual


@triton.jit
def _kl(lp, ref, log_ratio_clamp, KL_EST: tl.constexpr):
    """KL(policy || ref) estimate per token and its derivative w.r.t. logp. KL_EST: 1 = k1, 2 = k2, 3 = k3."""
    delta = ref - lp
    if KL_EST == 1:
        kl = -delta
        dkl = tl.zeros_like(lp) + 1.0
    elif KL_EST == 2:
        kl = 0.5 * delta * delta
        dkl = -delta
    else:
        dc = _clamp(delta, log_ratio_clamp)
        e = tl.exp(dc)
        kl = e - dc - 1.0
        dkl = tl.where(tl.abs(delta) <= log_ratio_clamp, 1.0 - e, 0.0)
    return kl, dkl


@triton.jit
def _tile(ptr, rows64, cols, stride_n, stride_t, inb):
    """The [BLOCK_R, BLOCK_T] tile of an [N, T] tensor, as fp32 (0 outside the bounds)."""
    return tl.load(ptr + rows64[:, None] * stride_n + cols[None, :] * stride_t, mask=inb, other=0).to(tl.float32)


@triton.jit
def _is_weight(w_in, m, is_threshold, IS_TRUNC: tl.constexpr):
    """The rollout importance weight of each valid token (0 at padding), truncated from above (verl's TIS)."""
    w = tl.where(m, w_in, 0.0)
    if IS_TRUNC:
        w = tl.minimum(w, is_threshold)
    return w


@triton.jit
def _contiguous_group_advantage(rewards_ptr, anchor_ptr, batch_denom_ptr, rows64, row_ok, G, std_eps, lambda_scale,
                                ADV_NORM: tl.constexpr, STD_UNBIASED: tl.constexpr, HADW: tl.constexpr,
                                BLOCK_G: tl.constexpr):
    """(A, Phi, degenerate) of each row [BLOCK_R] from its contiguous group's G rewards (read whole: no dependency
    between programs), with the advantage kernel's helpers."""
    g_offs = tl.arange(0, BLOCK_G)
    g_ok = row_ok[:, None] & (g_offs[None, :] < G)
    r_grp = tl.load(rewards_ptr + (rows64 // G)[:, None] * G + g_offs[None, :], mask=g_ok, other=0).to(tl.float32)
    count, total, high, low = _group_sums(r_grp, g_ok)
    mean = total / tl.maximum(count, 1.0)
    mean, std, degenerate = _group_stats(count, total, _group_sq_dev(r_grp, g_ok, mean), high, low, STD_UNBIASED)
    batch_denom = 1.0
    if ADV_NORM == ADV_NORM_BATCH:
        batch_denom = tl.load(batch_denom_ptr)
    anchor = 0.0
    if HADW:
        anchor = tl.load(anchor_ptr).to(tl.float32)
    diff = _anchor_diff(count, mean, anchor, HADW)
    r_own = tl.load(rewards_ptr + rows64, mask=row_ok, other=0).to(tl.float32)
    raw, phi = _scaled_advantage(r_own, mean, std, degenerate, diff, batch_denom, std_eps, lambda_scale, ADV_NORM,
                                 HADW)
    return raw * phi, phi, degenerate


@triton.jit
def _loss_fwd_kernel(
    # data ptrs
    logp_ptr, old_ptr, ref_ptr, mask_ptr, adv_in_ptr, isw_ptr, rewards_ptr, anchor_ptr, batch_denom_ptr,
    adv_ptr, phi_ptr, rows_ptr, partial_ptr,
    # shapes
    N, T, G,
    # strides
    stride_lp_n, stride_lp_t, stride_old_n, stride_old_t, stride_ref_n, stride_ref_t, stride_m_n, stride_m_t,
    stride_a_n, stride_a_t, stride_w_n, stride_w_t,
    # fp32 scalars
    ratio_lo, ratio_hi, clip_c, std_eps, lambda_scale, kl_coef, log_ratio_clamp, is_threshold,
    # switches
    ADV_SOURCE: tl.constexpr, SEQ_RATIO: tl.constexpr, ROW_MEAN: tl.constexpr, ADV_NORM: tl.constexpr,
    STD_UNBIASED: tl.constexpr, HADW: tl.constexpr, DUAL_CLIP: tl.constexpr, HAS_REF: tl.constexpr,
    KL_IN_LOSS: tl.constexpr, KL_EST: tl.constexpr, KL_RATIO: tl.constexpr, HAS_IS: tl.constexpr,
    IS_TRUNC: tl.constexpr,
    # blocks
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
):
    pid = tl.program_id(0)
    slots = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_S], dtype=tl.float64)
    phi_lo = tl.full([], float("inf"), dtype=tl.float32)
    phi_hi = tl.full([], -float("inf"), dtype=tl.float32)
    # Grid-stride loop over row blocks: the launcher bounds the grid (a few programs per SM), so the partials the
    # finalize kernel reads stay small whatever N is.
    for block in range(pid, tl.cdiv(N, BLOCK_R), tl.num_programs(0)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)

        # -- the row's advantage (per-token advantages are read in the token loop) ----------------------------------
        a = tl.zeros([BLOCK_R], dtype=tl.float32)
        if ADV_SOURCE == ADV_GROUPS:
            a, phi, degenerate = _contiguous_group_advantage(
                rewards_ptr, anchor_ptr, batch_denom_ptr, rows64, row_ok, G, std_eps, lambda_scale, ADV_NORM,
                STD_UNBIASED, HADW, BLOCK_G)
            tl.store(adv_ptr + rows64, a, mask=row_ok)
            tl.store(phi_ptr + rows64, phi, mask=row_ok)
        elif ADV_SOURCE == ADV_ROW:
            a = tl.load(adv_in_ptr + rows64 * stride_a_n, mask=row_ok, other=0).to(tl.float32)
        a_col = a[:, None]

        # -- tokens: one pass, reduced to per-row sums --------------------------------------------------------------
        n_tok = tl.zeros([BLOCK_R], dtype=tl.float32)
        pg_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        kl_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        lr_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        w_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        akl_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        n_low = tl.zeros([BLOCK_R], dtype=tl.float32)
        n_high = tl.zeros([BLOCK_R], dtype=tl.float32)
        n_dual = tl.zeros([BLOCK_R], dtype=tl.float32)
        bad_lp = tl.zeros([BLOCK_R], dtype=tl.float32)
        bad_old = tl.zeros([BLOCK_R], dtype=tl.float32)
        bad_ref = tl.zeros([BLOCK_R], dtype=tl.float32)
        bad_adv = tl.zeros([BLOCK_R], dtype=tl.float32)
        bad_w = tl.zeros([BLOCK_R], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            cols = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            inb = row_ok[:, None] & (cols < T)[None, :]
            mv = tl.load(mask_ptr + rows64[:, None] * stride_m_n + cols[None, :] * stride_m_t, mask=inb, other=0)
            m = (mv != 0) & inb
            lp_in = _tile(logp_ptr, rows64, cols, stride_lp_n, stride_lp_t, inb)
            old_in = _tile(old_ptr, rows64, cols, stride_old_n, stride_old_t, inb)
            bad_lp += _count(m & _nonfinite(lp_in))
            bad_old += _count(m & _nonfinite(old_in))
            # padding may hold NaN / -inf: zero it before any arithmetic
            lp = tl.where(m, lp_in, 0.0)
            lr = lp - tl.where(m, old_in, 0.0)
            n_tok += _count(m)
            nlr = _clamp(-lr, log_ratio_clamp)
            akl_sum += tl.sum(tl.where(m, tl.exp(nlr) - nlr - 1.0, 0.0), axis=1)
            if ADV_SOURCE == ADV_TOKEN:
                a_in = _tile(adv_in_ptr, rows64, cols, stride_a_n, stride_a_t, inb)
                bad_adv += _count(m & _nonfinite(a_in))
                a_tok = tl.where(m, a_in, 0.0)
            else:
                a_tok = a_col
            w = tl.zeros_like(lp) + 1.0
            if HAS_IS:
                w_in = _tile(isw_ptr, rows64, cols, stride_w_n, stride_w_t, inb)
                bad_w += _count(m & _nonfinite(w_in))
                w = _is_weight(w_in, m, is_threshold, IS_TRUNC)
            kl = tl.zeros_like(lp)
            if HAS_REF:
                ref_in = _tile(ref_ptr, rows64, cols, stride_ref_n, stride_ref_t, inb)
                bad_ref += _count(m & _nonfinite(ref_in))
                kl, _ = _kl(lp, tl.where(m, ref_in, 0.0), log_ratio_clamp, KL_EST)
            if SEQ_RATIO:
                lr_sum += tl.sum(lr, axis=1)
                if HAS_IS:
                    w_sum += tl.sum(w, axis=1)
                # ratio-weighted KL: times the sequence ratio once it is known
                kl_sum += tl.sum(tl.where(m, kl, 0.0), axis=1)
            else:
                ratio = tl.exp(_clamp(lr, log_ratio_clamp))
                pg, _, dual = _surrogate(ratio, a_tok, ratio_lo, ratio_hi, clip_c, DUAL_CLIP)
                pg_sum += tl.sum(tl.where(m, pg * w, 0.0), axis=1)
                n_low += _count(m & (a_tok < 0) & (ratio < ratio_lo))
                n_high += _count(m & (a_tok > 0) & (ratio > ratio_hi))
                n_dual += tl.sum(tl.where(m, dual, 0.0), axis=1)
                if KL_RATIO:
                    kl = kl * ratio
                kl_sum += tl.sum(tl.where(m, kl, 0.0), axis=1)

        n_tok_c = tl.maximum(n_tok, 1.0)
        g_uniform = tl.zeros_like(n_tok)
        seq_ratio = tl.zeros_like(n_tok)
        if SEQ_RATIO:
            # GSPO: s_i = exp(mean_t log-ratio), one value per row
            seq_lr = lr_sum / n_tok_c
            s = tl.exp(_clamp(seq_lr, log_ratio_clamp))
            gate = tl.abs(seq_lr) <= log_ratio_clamp
            if ADV_SOURCE == ADV_TOKEN:
                # per-token advantages: the surrogate of each token under the row's ratio, a second pass
                dpg_sum = tl.zeros_like(n_tok)
                s_col = s[:, None]
                for t0 in range(0, T, BLOCK_T):
                    cols = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
                    inb = row_ok[:, None] & (cols < T)[None, :]
                    mv = tl.load(mask_ptr + rows64[:, None] * stride_m_n + cols[None, :] * stride_m_t, mask=inb,
                                 other=0)
                    m = (mv != 0) & inb
                    a_tok = tl.where(m, _tile(adv_in_ptr, rows64, cols, stride_a_n, stride_a_t, inb), 0.0)
                    pg, dpg, dual = _surrogate(s_col, a_tok, ratio_lo, ratio_hi, clip_c, DUAL_CLIP)
                    if HAS_IS:
                        w = _is_weight(_tile(isw_ptr, rows64, cols, stride_w_n, stride_w_t, inb), m, is_threshold,
                                       IS_TRUNC)
                        pg = pg * w
                        dpg = dpg * w
                    pg_sum += tl.sum(tl.where(m, pg, 0.0), axis=1)
                    dpg_sum += tl.sum(tl.where(m, dpg, 0.0), axis=1)
                    n_low += _count(m & (a_tok < 0) & (s_col < ratio_lo))
                    n_high += _count(m & (a_tok > 0) & (s_col > ratio_hi))
                    n_dual += tl.sum(tl.where(m, dual, 0.0), axis=1)
            else:
                # per-row advantages: the same surrogate on every token, evaluated once (times the weights' sum)
                pg, dpg, dual = _surrogate(s, a, ratio_lo, ratio_hi, clip_c, DUAL_CLIP)
                weight = n_tok
                if HAS_IS:
                    weight = w_sum
                pg_sum = tl.where(n_tok > 0, weight * pg, 0.0)  # a fully masked row's advantage may be anything
                dpg_sum = tl.where(n_tok > 0, weight * dpg, 0.0)
                n_low = tl.where((a < 0) & (s < ratio_lo), n_tok, 0.0)
                n_high = tl.where((a > 0) & (s > ratio_hi), n_tok, 0.0)
                n_dual = n_tok * dual
            # d(sum_t c_t pg(s_i, A_t))/dlogp[i, t] = sum_t c_t pg'(log s_i) / |y_i|: the same for every token
            g_uniform = tl.where(gate, dpg_sum / n_tok_c, 0.0)
            if KL_RATIO:
                kl_sum = s * kl_sum
                if KL_IN_LOSS:
                    g_uniform += tl.where(gate, kl_coef * kl_sum / n_tok_c, 0.0)
                seq_ratio = s
        tl.store(rows_ptr + N + rows64, g_uniform, mask=row_ok)
        tl.store(rows_ptr + 2 * N + rows64, seq_ratio, mask=row_ok)
        loss_row = pg_sum
        if KL_IN_LOSS:
            loss_row = pg_sum + kl_coef * kl_sum
        pg_row = pg_sum
        kl_row = kl_sum
        if ROW_MEAN:
            # seq-mean-token-mean: each row's token sum divided by its length
            loss_row = loss_row / n_tok_c
            pg_row = pg_row / n_tok_c
            kl_row = kl_row / n_tok_c
            tl.store(rows_ptr + rows64, 1.0 / n_tok_c, mask=row_ok)
        else:
            tl.store(rows_ptr + rows64, tl.zeros_like(n_tok) + 1.0, mask=row_ok)
        if ADV_SOURCE == ADV_ROW:
            bad_adv = tl.where((n_tok > 0) & _nonfinite(a), 1.0, 0.0)

        # -- this row block's contribution to the program's sums (rows past N hold no valid token) ----------
        acc = _put(acc, slots, S_LOSS, loss_row)
        acc = _put(acc, slots, S_PG, pg_row)
        acc = _put(acc, slots, S_KL_AGG, kl_row)
        acc = _put(acc, slots, S_TOKENS, n_tok)
        acc = _put(acc, slots, S_SEQS, tl.where(n_tok > 0, 1.0, 0.0))
        acc = _put(acc, slots, S_LOW, n_low)
        acc = _put(acc, slots, S_HIGH, n_high)
        acc = _put(acc, slots, S_DUAL, n_dual)
        acc = _put(acc, slots, S_APPROX_KL, akl_sum)
        acc = _put(acc, slots, S_KL_TOK, kl_sum)
        acc = _put(acc, slots, S_BAD, bad_lp)
        acc = _put(acc, slots, S_BAD + 1, bad_old)
        acc = _put(acc, slots, S_BAD + 2, bad_ref)
        acc = _put(acc, slots, S_BAD + 3, bad_adv)
        acc = _put(acc, slots, S_BAD + 4, bad_w)
        if ADV_SOURCE == ADV_GROUPS:
            acc = _put(acc, slots, S_PHI, tl.where(row_ok, phi, 0.0))
            acc = _put(acc, slots, S_ADV_ABS, tl.where(row_ok, tl.abs(a), 0.0))
            acc = _put(acc, slots, S_DEGENERATE, tl.where(row_ok & degenerate, 1.0, 0.0))
            phi_lo = tl.minimum(phi_lo, tl.min(tl.where(row_ok, phi, float("inf")), axis=0))
            phi_hi = tl.maximum(phi_hi, tl.max(tl.where(row_ok, phi, -float("inf")), axis=0))

    acc = tl.where(slots == S_PHI_MIN, phi_lo.to(tl.float64), tl.where(slots == S_PHI_MAX, phi_hi.to(tl.float64), acc))
    tl.store(partial_ptr + pid.to(tl.int64) * NUM_SLOTS + slots, acc, mask=slots < NUM_SLOTS)


@triton.jit
def _put(acc, slots, k, row_values):
    """acc[k] += sum(row_values), in float64."""
    return acc + tl.where(slots == k, tl.sum(row_values, axis=0).to(tl.float64), 0.0)


@triton.jit
def _pick(sums, slots, k):
    return tl.sum(tl.where(slots == k, sums, 0.0), axis=0)


@triton.jit
def _loss_finalize_kernel(
    # data ptrs
    partial_ptr, normalizer_ptr, loss_ptr, metrics_ptr, nonfinite_ptr, denom_ptr,
    # shapes
    n_prog, N,
    # fp32 scalars
    norm_len,
    # switches
    TOKEN_MEAN: tl.constexpr, SUM_NORM: tl.constexpr, HAS_NORMALIZER: tl.constexpr, HAS_REF: tl.constexpr,
    ADV_METRICS: tl.constexpr, KL_AT: tl.constexpr,
    # blocks
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, NUM_SLOTS: tl.constexpr, NUM_NONFINITE: tl.constexpr,
):
    """One program: the forward's [n_prog, NUM_SLOTS] float64 partials -> loss, metrics (the advantage metrics with
    ADV_METRICS; the KL metrics at KL_AT), NaN/Inf counts, denominator. Sums run in float64 (counts stay exact past
    2^24 tokens); each result is rounded once to fp32, in the same order of operations as the reference
    (count.clamp(min=1) -> fp32, total / denom)."""
    slots = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_P, BLOCK_S], dtype=tl.float64)
    phi_min = tl.full([BLOCK_P], float("inf"), dtype=tl.float64)
    phi_max = tl.full([BLOCK_P], -float("inf"), dtype=tl.float64)
    for p0 in range(0, n_prog, BLOCK_P):
        progs = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        ok = progs < n_prog
        tile = tl.load(partial_ptr + progs[:, None] * NUM_SLOTS + slots[None, :],
                       mask=ok[:, None] & (slots < NUM_SLOTS)[None, :], other=0.0)
        acc += tile
        phi_min = tl.minimum(phi_min, tl.load(partial_ptr + progs * NUM_SLOTS + S_PHI_MIN, mask=ok,
                                              other=float("inf")))
        phi_max = tl.maximum(phi_max, tl.load(partial_ptr + progs * NUM_SLOTS + S_PHI_MAX, mask=ok,
                                              other=-float("inf")))
    sums = tl.sum(acc, axis=0)
    n_tokens = _pick(sums, slots, S_TOKENS)
    n_seqs = _pick(sums, slots, S_SEQS)
    if HAS_NORMALIZER:
        denom = tl.load(normalizer_ptr).to(tl.float32)
    elif TOKEN_MEAN:
        denom = tl.maximum(n_tokens, 1.0).to(tl.float32)
    else:
        denom = tl.maximum(n_seqs, 1.0).to(tl.float32)
    if SUM_NORM:
        denom = denom * norm_len
    loss = _pick(sums, slots, S_LOSS).to(tl.float32) / denom
    per_token = tl.maximum(n_tokens, 1.0).to(tl.float32)
    low = _pick(sums, slots, S_LOW)
    high = _pick(sums, slots, S_HIGH)
    tl.store(loss_ptr, loss)
    tl.store(denom_ptr, denom)
    tl.store(metrics_ptr + M_CLIPFRAC, (low + high).to(tl.float32) / per_token)
    tl.store(metrics_ptr + M_CLIPFRAC_LOW, low.to(tl.float32) / per_token)
    tl.store(metrics_ptr + M_CLIPFRAC_HIGH, high.to(tl.float32) / per_token)
    tl.store(metrics_ptr + M_DUAL_CLIPFRAC, _pick(sums, slots, S_DUAL).to(tl.float32) / per_token)
    tl.store(metrics_ptr + M_APPROX_KL, _pick(sums, slots, S_APPROX_KL).to(tl.float32) / per_token)
    if HAS_REF:
        tl.store(metrics_ptr + M_PG_LOSS, _pick(sums, slots, S_PG).to(tl.float32) / denom)
    else:
        tl.store(metrics_ptr + M_PG_LOSS, loss)
    tl.store(metrics_ptr + M_RESPONSE_LEN_MEAN, n_tokens.to(tl.float32) / N)
    tl.store(metrics_ptr + M_NUM_TOKENS, n_tokens.to(tl.float32))
    tl.store(metrics_ptr + M_NUM_SEQS, n_seqs.to(tl.float32))
    if ADV_METRICS:
        tl.store(metrics_ptr + M_PHI_MEAN, _pick(sums, slots, S_PHI).to(tl.float32) / N)
        tl.store(metrics_ptr + M_PHI_MIN, tl.min(phi_min, axis=0).to(tl.float32))
        tl.store(metrics_ptr + M_PHI_MAX, tl.max(phi_max, axis=0).to(tl.float32))
        tl.store(metrics_ptr + M_ADV_ABS_MEAN, _pick(sums, slots, S_ADV_ABS).to(tl.float32) / N)
        # degenerate rows / N = degenerate groups / groups: every (contiguous) group has G rows
        tl.store(metrics_ptr + M_DEGENERATE_FRAC, _pick(sums, slots, S_DEGENERATE).to(tl.float32) / N)
    tl.store(metrics_ptr + KL_AT + M_KL, _pick(sums, slots, S_KL_TOK).to(tl.float32) / per_token)
    tl.store(metrics_ptr + KL_AT + M_KL_LOSS, _pick(sums, slots, S_KL_AGG).to(tl.float32) / denom)
    for j in tl.static_range(NUM_NONFINITE):
        tl.store(nonfinite_ptr + j, _pick(sums, slots, S_BAD + j).to(tl.int64))


@triton.jit
def _loss_bwd_kernel(
    # data ptrs
    grad_ptr, logp_ptr, old_ptr, ref_ptr, mask_ptr, adv_ptr, isw_ptr, rows_ptr, grad_loss_ptr, denom_ptr,
    # shapes
    N, T,
    # strides
    stride_g_n, stride_g_t, stride_lp_n, stride_lp_t, stride_old_n, stride_old_t, stride_ref_n, stride_ref_t,
    stride_m_n, stride_m_t, stride_a_n, stride_a_t, stride_w_n, stride_w_t,
    # fp32 scalars
    ratio_lo, ratio_hi, clip_c, kl_coef, log_ratio_clamp, is_threshold,
    # switches
    SEQ_RATIO: tl.constexpr, ROW_MEAN: tl.constexpr, ADV_TOKEN: tl.constexpr, DUAL_CLIP: tl.constexpr,
    KL_IN_LOSS: tl.constexpr, KL_EST: tl.constexpr, KL_RATIO: tl.constexpr, HAS_IS: tl.constexpr,
    IS_TRUNC: tl.constexpr, GRAD_BF16: tl.constexpr,
    # blocks
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    # dL/dtotal (upstream gradient / denominator) times the row's aggregation weight
    scale = tl.load(grad_loss_ptr).to(tl.float32) / tl.load(denom_ptr)
    w_row = tl.zeros([BLOCK_R], dtype=tl.float32) + scale
    if ROW_MEAN:
        w_row = w_row * tl.load(rows_ptr + rows64, mask=row_ok, other=0.0)
    if SEQ_RATIO:
        g_row = tl.load(rows_ptr + N + rows64, mask=row_ok, other=0.0)
        if KL_RATIO:
            s_col = tl.load(rows_ptr + 2 * N + rows64, mask=row_ok, other=0.0)[:, None]
    elif not ADV_TOKEN:
        a_col = tl.load(adv_ptr + rows64 * stride_a_n, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    for t0 in range(0, T, BLOCK_T):
        cols = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        inb = row_ok[:, None] & (cols < T)[None, :]
        mv = tl.load(mask_ptr + rows64[:, None] * stride_m_n + cols[None, :] * stride_m_t, mask=inb, other=0)
        m = (mv != 0) & inb
        if SEQ_RATIO:
            # what the sequence ratio contributes is the same for every token of the row (forward's rows[1])
            g = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32) + g_row[:, None]
        if KL_IN_LOSS or not SEQ_RATIO:
            lp = tl.where(m, _tile(logp_ptr, rows64, cols, stride_lp_n, stride_lp_t, inb), 0.0)
        if not SEQ_RATIO:
            lr = lp - tl.where(m, _tile(old_ptr, rows64, cols, stride_old_n, stride_old_t, inb), 0.0)
            ratio = tl.exp(_clamp(lr, log_ratio_clamp))
            gate = tl.abs(lr) <= log_ratio_clamp
            if ADV_TOKEN:
                a_tok = tl.where(m, _tile(adv_ptr, rows64, cols, stride_a_n, stride_a_t, inb), 0.0)
            else:
                a_tok = a_col
            _, dpg, _ = _surrogate(ratio, a_tok, ratio_lo, ratio_hi, clip_c, DUAL_CLIP)
            if HAS_IS:
                dpg = dpg * _is_weight(_tile(isw_ptr, rows64, cols, stride_w_n, stride_w_t, inb), m, is_threshold,
                                       IS_TRUNC)
            g = tl.where(gate, dpg, 0.0)
        if KL_IN_LOSS:
            ref = tl.where(m, _tile(ref_ptr, rows64, cols, stride_ref_n, stride_ref_t, inb), 0.0)
            kl, dkl = _kl(lp, ref, log_ratio_clamp, KL_EST)
            if KL_RATIO:
                if SEQ_RATIO:
                    dkl = s_col * dkl  # the ratio's own derivative is in rows[1]
                else:
                    dkl = ratio * dkl + tl.where(gate, kl * ratio, 0.0)
            g = g + kl_coef * dkl
        g = tl.where(m, g * w_row[:, None], 0.0)
        if GRAD_BF16:
            g = _bf16_rtne(g)
        tl.store(grad_ptr + rows64[:, None] * stride_g_n + cols[None, :] * stride_g_t,
                 g.to(grad_ptr.dtype.element_ty), mask=inb)
