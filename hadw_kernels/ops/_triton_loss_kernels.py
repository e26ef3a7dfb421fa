"""The @triton.jit code of the fused HA-DW loss. Private: `hadw_kernels.ops.triton_loss` owns allocation and launch.

Both kernels use a 1-D grid over blocks of BLOCK_R rows (no grid-dimension limit on N) and loop over T in chunks of
BLOCK_T tokens. Every value is computed in fp32 whatever the input dtype (fp16 / bf16 / fp32), as the reference does.

Forward, per block of rows, in one pass over the tokens:
- each row loads the G rewards of its own group (from cache; no cross-program dependency) and computes the group mean,
  std and degenerate flag, A_hat, diff = mean - C, Phi and A = A_hat * Phi (spec §2, §4);
- per token: the ratio (token level), the clipped surrogate with optional dual clip, the KL estimate, approx_kl and
  the NaN/Inf counts, all masked and reduced to per-row sums; for GSPO the row sum of the log-ratio gives the
  sequence ratio after the loop, and the surrogate, being the same for every token of the row, is evaluated once;
- a grid-stride loop over row blocks (the grid is bounded to a few programs per SM) and, per program, one float64
  row of `partial`: the sums of every aggregation numerator and metric over its rows; a one-program
  finalize kernel reduces these [programs, NUM_SLOTS] partials to the loss and the metrics (one launch instead of
  the ~30 tiny torch ops the same reduction costs, which on a GPU would take longer than the loss itself).
It also writes, per row, what the backward needs besides the inputs: the aggregation weight w_i (1 / |y_i| for
seq-mean-token-mean, else 1) and, for GSPO, d pg_i / d log s_i.

Backward, in one launch, recomputes the per-token derivative from logp / old (/ ref) and writes dL/dlogp; for GSPO
without KL it reads only the mask. No N x T temporaries besides the gradient itself.
"""

import triton
import triton.language as tl

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
S_PHI = tl.constexpr(10)  # sum of Phi_i
S_PHI_MIN = tl.constexpr(11)  # min of Phi_i (a min, not a sum)
S_PHI_MAX = tl.constexpr(12)  # max of Phi_i
S_ADV_ABS = tl.constexpr(13)  # sum of |A_i|
S_DEGENERATE = tl.constexpr(14)  # rows in groups whose rewards are all equal
S_BAD = tl.constexpr(15)  # 15, 16, 17: NaN / Inf at valid positions of logp, old, ref
NUM_SLOTS = 18

METRIC_NAMES = ("clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl", "pg_loss", "phi_mean",
                "phi_min", "phi_max", "adv_abs_mean", "degenerate_group_frac", "response_len_mean", "num_tokens",
                "num_seqs", "kl", "kl_loss")
"""The finalize kernel's metrics vector, in the reference's key order; the last two exist only with ref_logprobs."""


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _clamp(x, c):
    return tl.minimum(tl.maximum(x, -c), c)


@triton.jit
def _nonfinite(x):
    return (x != x) | (tl.abs(x) == float("inf"))


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
def _hadw_fwd_kernel(
    # data ptrs
    logp_ptr, old_ptr, ref_ptr, mask_ptr, rewards_ptr, anchor_ptr,
    adv_ptr, phi_ptr, row_w_ptr, row_dpg_ptr, partial_ptr,
    # shapes
    N, T, G,
    # strides
    stride_lp_n, stride_lp_t, stride_old_n, stride_old_t, stride_ref_n, stride_ref_t, stride_m_n, stride_m_t,
    # fp32 scalars
    ratio_lo, ratio_hi, clip_c, std_eps, lambda_scale, kl_coef, log_ratio_clamp,
    # switches
    SEQ_RATIO: tl.constexpr, ROW_MEAN: tl.constexpr, ADV_STD: tl.constexpr, STD_UNBIASED: tl.constexpr,
    HADW: tl.constexpr, DUAL_CLIP: tl.constexpr, HAS_REF: tl.constexpr, KL_IN_LOSS: tl.constexpr,
    KL_EST: tl.constexpr,
    # blocks
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
):
    pid = tl.program_id(0)
    # Grid-stride loop over row blocks: the launcher bounds the grid (a few programs per SM), so the partials the
    # finalize kernel reads stay small whatever N is.
    slots = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_S], dtype=tl.float64)
    phi_lo = tl.full([], float("inf"), dtype=tl.float32)
    phi_hi = tl.full([], -float("inf"), dtype=tl.float32)
    for block in range(pid, tl.cdiv(N, BLOCK_R), tl.num_programs(0)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)

        # -- advantages (spec §2, §4): every row reads its own group's G rewards --------------------------------------
        g_offs = tl.arange(0, BLOCK_G)
        g_ok = row_ok[:, None] & (g_offs[None, :] < G)
        g_idx = (rows64 // G)[:, None] * G + g_offs[None, :]
        r_grp = tl.load(rewards_ptr + g_idx, mask=g_ok, other=0).to(tl.float32)  # [BLOCK_R, BLOCK_G]
        mean = tl.sum(r_grp, axis=1) / G
        centred_grp = tl.where(g_ok, r_grp - mean[:, None], 0.0)
        if STD_UNBIASED:
            var = tl.sum(centred_grp * centred_grp, axis=1) / (G - 1)
        else:
            var = tl.sum(centred_grp * centred_grp, axis=1) / G
        std = tl.sqrt(var)
        # "all rewards equal" decided exactly (max == min), as in the reference
        degenerate = tl.max(tl.where(g_ok, r_grp, -float("inf")), axis=1) == tl.min(
            tl.where(g_ok, r_grp, float("inf")), axis=1)
        r_own = tl.load(rewards_ptr + rows64, mask=row_ok, other=0).to(tl.float32)
        raw = r_own - mean
        if ADV_STD:
            raw = raw / (std + std_eps)
        raw = tl.where(degenerate, 0.0, raw)
        if HADW:
            diff = mean - tl.load(anchor_ptr).to(tl.float32)
            phi = lambda_scale * tl.exp(-_sign(raw) * _sign(diff) * tl.abs(diff))
        else:
            phi = tl.zeros_like(raw) + 1.0
        a = raw * phi
        tl.store(adv_ptr + rows64, a, mask=row_ok)
        tl.store(phi_ptr + rows64, phi, mask=row_ok)

        # -- tokens: one pass, reduced to per-row sums --------------------------------------------------------------
        n_tok = tl.zeros([BLOCK_R], dtype=tl.float32)
        pg_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        kl_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        lr_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        akl_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        n_low = tl.zeros([BLOCK_R], dtype=tl.float32)
        n_high = tl.zeros([BLOCK_R], dtype=tl.float32)
        n_dual = tl.zeros([BLOCK_R], dtype=tl.float32)
        bad_lp = tl.zeros([BLOCK_R], dtype=tl.float32)
        bad_old = tl.zeros([BLOCK_R], dtype=tl.float32)
        bad_ref = tl.zeros([BLOCK_R], dtype=tl.float32)
        a_col = a[:, None]
        for t0 in range(0, T, BLOCK_T):
            cols = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            inb = row_ok[:, None] & (cols < T)[None, :]
            mv = tl.load(mask_ptr + rows64[:, None] * stride_m_n + cols[None, :] * stride_m_t, mask=inb, other=0)
            m = (mv != 0) & inb
            lp_in = tl.load(logp_ptr + rows64[:, None] * stride_lp_n + cols[None, :] * stride_lp_t, mask=inb,
                            other=0).to(tl.float32)
            old_in = tl.load(old_ptr + rows64[:, None] * stride_old_n + cols[None, :] * stride_old_t, mask=inb,
                             other=0).to(tl.float32)
            bad_lp += tl.sum(tl.where(m & _nonfinite(lp_in), 1.0, 0.0), axis=1)
            bad_old += tl.sum(tl.where(m & _nonfinite(old_in), 1.0, 0.0), axis=1)
            # padding may hold NaN / -inf: zero it before any arithmetic
            lp = tl.where(m, lp_in, 0.0)
            lr = lp - tl.where(m, old_in, 0.0)
            n_tok += tl.sum(tl.where(m, 1.0, 0.0), axis=1)
            nlr = _clamp(-lr, log_ratio_clamp)
            akl_sum += tl.sum(tl.where(m, tl.exp(nlr) - nlr - 1.0, 0.0), axis=1)
            if HAS_REF:
                ref_in = tl.load(ref_ptr + rows64[:, None] * stride_ref_n + cols[None, :] * stride_ref_t, mask=inb,
                                 other=0).to(tl.float32)
                bad_ref += tl.sum(tl.where(m & _nonfinite(ref_in), 1.0, 0.0), axis=1)
                kl, _ = _kl(lp, tl.where(m, ref_in, 0.0), log_ratio_clamp, KL_EST)
                kl_sum += tl.sum(tl.where(m, kl, 0.0), axis=1)
            if SEQ_RATIO:
                lr_sum += tl.sum(lr, axis=1)
            else:
                ratio = tl.exp(_clamp(lr, log_ratio_clamp))
                pg, _, dual = _surrogate(ratio, a_col, ratio_lo, ratio_hi, clip_c, DUAL_CLIP)
                pg_sum += tl.sum(tl.where(m, pg, 0.0), axis=1)
                n_low += tl.sum(tl.where(m & (a_col < 0) & (ratio < ratio_lo), 1.0, 0.0), axis=1)
                n_high += tl.sum(tl.where(m & (a_col > 0) & (ratio > ratio_hi), 1.0, 0.0), axis=1)
                n_dual += tl.sum(tl.where(m, dual, 0.0), axis=1)

        n_tok_c = tl.maximum(n_tok, 1.0)
        if SEQ_RATIO:
            # GSPO: s_i = exp(mean_t log-ratio), one value per row, so the token surrogate is evaluated once per row
            seq_lr = lr_sum / n_tok_c
            ratio = tl.exp(_clamp(seq_lr, log_ratio_clamp))
            pg, dpg, dual = _surrogate(ratio, a, ratio_lo, ratio_hi, clip_c, DUAL_CLIP)
            pg_sum = n_tok * pg
            n_low = tl.where((a < 0) & (ratio < ratio_lo), n_tok, 0.0)
            n_high = tl.where((a > 0) & (ratio > ratio_hi), n_tok, 0.0)
            n_dual = n_tok * dual
            tl.store(row_dpg_ptr + rows64, tl.where(tl.abs(seq_lr) <= log_ratio_clamp, dpg, 0.0), mask=row_ok)
        else:
            tl.store(row_dpg_ptr + rows64, tl.zeros_like(n_tok), mask=row_ok)
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
            tl.store(row_w_ptr + rows64, 1.0 / n_tok_c, mask=row_ok)
        else:
            tl.store(row_w_ptr + rows64, tl.zeros_like(n_tok) + 1.0, mask=row_ok)

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
        acc = _put(acc, slots, S_PHI, tl.where(row_ok, phi, 0.0))
        acc = _put(acc, slots, S_ADV_ABS, tl.where(row_ok, tl.abs(a), 0.0))
        acc = _put(acc, slots, S_DEGENERATE, tl.where(row_ok & degenerate, 1.0, 0.0))
        acc = _put(acc, slots, S_BAD, bad_lp)
        acc = _put(acc, slots, S_BAD + 1, bad_old)
        acc = _put(acc, slots, S_BAD + 2, bad_ref)
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
def _hadw_finalize_kernel(
    # data ptrs
    partial_ptr, normalizer_ptr, loss_ptr, metrics_ptr, nonfinite_ptr, denom_ptr,
    # shapes
    n_prog, N,
    # fp32 scalars
    norm_len,
    # switches
    TOKEN_MEAN: tl.constexpr, SUM_NORM: tl.constexpr, HAS_NORMALIZER: tl.constexpr, HAS_REF: tl.constexpr,
    # blocks
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, NUM_SLOTS: tl.constexpr,
):
    """One program: the forward's [n_prog, NUM_SLOTS] float64 partials -> loss, metrics, NaN/Inf counts, denominator.
    Sums run in float64 (counts stay exact past 2^24 tokens); each result is rounded once to fp32, in the same
    order of operations as the reference (count.clamp(min=1) -> fp32, total / denom)."""
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
    tl.store(metrics_ptr + 0, (low + high).to(tl.float32) / per_token)
    tl.store(metrics_ptr + 1, low.to(tl.float32) / per_token)
    tl.store(metrics_ptr + 2, high.to(tl.float32) / per_token)
    tl.store(metrics_ptr + 3, _pick(sums, slots, S_DUAL).to(tl.float32) / per_token)
    tl.store(metrics_ptr + 4, _pick(sums, slots, S_APPROX_KL).to(tl.float32) / per_token)
    if HAS_REF:
        tl.store(metrics_ptr + 5, _pick(sums, slots, S_PG).to(tl.float32) / denom)
    else:
        tl.store(metrics_ptr + 5, loss)
    tl.store(metrics_ptr + 6, _pick(sums, slots, S_PHI).to(tl.float32) / N)
    tl.store(metrics_ptr + 7, tl.min(phi_min, axis=0).to(tl.float32))
    tl.store(metrics_ptr + 8, tl.max(phi_max, axis=0).to(tl.float32))
    tl.store(metrics_ptr + 9, _pick(sums, slots, S_ADV_ABS).to(tl.float32) / N)
    # degenerate rows / N = degenerate groups / groups: every group has G rows
    tl.store(metrics_ptr + 10, _pick(sums, slots, S_DEGENERATE).to(tl.float32) / N)
    tl.store(metrics_ptr + 11, n_tokens.to(tl.float32) / N)
    tl.store(metrics_ptr + 12, n_tokens.to(tl.float32))
    tl.store(metrics_ptr + 13, n_seqs.to(tl.float32))
    tl.store(metrics_ptr + 14, _pick(sums, slots, S_KL_TOK).to(tl.float32) / per_token)
    tl.store(metrics_ptr + 15, _pick(sums, slots, S_KL_AGG).to(tl.float32) / denom)
    for j in tl.static_range(3):
        tl.store(nonfinite_ptr + j, _pick(sums, slots, S_BAD + j).to(tl.int64))


@triton.jit
def _hadw_bwd_kernel(
    # data ptrs
    grad_ptr, logp_ptr, old_ptr, ref_ptr, mask_ptr, adv_ptr, row_w_ptr, row_dpg_ptr, grad_loss_ptr, denom_ptr,
    # shapes
    N, T,
    # strides
    stride_g_n, stride_g_t, stride_lp_n, stride_lp_t, stride_old_n, stride_old_t, stride_ref_n, stride_ref_t,
    stride_m_n, stride_m_t,
    # fp32 scalars
    ratio_lo, ratio_hi, clip_c, kl_coef, log_ratio_clamp,
    # switches
    SEQ_RATIO: tl.constexpr, ROW_MEAN: tl.constexpr, DUAL_CLIP: tl.constexpr, KL_IN_LOSS: tl.constexpr,
    KL_EST: tl.constexpr, GRAD_BF16: tl.constexpr,
    # blocks
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    # dL/dtotal (upstream gradient / denominator) times the row's aggregation weight
    scale = tl.load(grad_loss_ptr).to(tl.float32) / tl.load(denom_ptr)
    w = tl.zeros([BLOCK_R], dtype=tl.float32) + scale
    if ROW_MEAN:
        w = w * tl.load(row_w_ptr + rows64, mask=row_ok, other=0.0)
    if SEQ_RATIO:
        dpg_row = tl.load(row_dpg_ptr + rows64, mask=row_ok, other=0.0)
    else:
        a_col = tl.load(adv_ptr + rows64, mask=row_ok, other=0.0)[:, None]
    for t0 in range(0, T, BLOCK_T):
        cols = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        inb = row_ok[:, None] & (cols < T)[None, :]
        mv = tl.load(mask_ptr + rows64[:, None] * stride_m_n + cols[None, :] * stride_m_t, mask=inb, other=0)
        m = (mv != 0) & inb
        if SEQ_RATIO:
            # d(|y_i| pg_i)/dlogp[i, t] = pg_i'(log s_i) * |y_i| * (1 / |y_i|): the same for every token of the row
            g = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32) + dpg_row[:, None]
        if KL_IN_LOSS or not SEQ_RATIO:
            lp = tl.where(m, tl.load(logp_ptr + rows64[:, None] * stride_lp_n + cols[None, :] * stride_lp_t,
                                     mask=inb, other=0).to(tl.float32), 0.0)
        if not SEQ_RATIO:
            old = tl.where(m, tl.load(old_ptr + rows64[:, None] * stride_old_n + cols[None, :] * stride_old_t,
                                      mask=inb, other=0).to(tl.float32), 0.0)
            lr = lp - old
            ratio = tl.exp(_clamp(lr, log_ratio_clamp))
            _, dpg, _ = _surrogate(ratio, a_col, ratio_lo, ratio_hi, clip_c, DUAL_CLIP)
            g = tl.where(tl.abs(lr) <= log_ratio_clamp, dpg, 0.0)
        if KL_IN_LOSS:
            ref = tl.where(m, tl.load(ref_ptr + rows64[:, None] * stride_ref_n + cols[None, :] * stride_ref_t,
                                      mask=inb, other=0).to(tl.float32), 0.0)
            _, dkl = _kl(lp, ref, log_ratio_clamp, KL_EST)
            g = g + kl_coef * dkl
        g = tl.where(m, g * w[:, None], 0.0)
        if GRAD_BF16:
            g = _bf16_rtne(g)
        tl.store(grad_ptr + rows64[:, None] * stride_g_n + cols[None, :] * stride_g_t,
                 g.to(grad_ptr.dtype.element_ty), mask=inb)
