"""The @triton.jit code of the fused linear log-probs. Private: `hadw_kernels.ops.triton_linear_logprobs` owns
allocation and launch.

For a chunk of C tokens with hidden states h [C, H], the LM head W [V, H] (bias b [V]) and targets y [C], the logits
z = (h W^T + b) / temperature are computed tile by tile, vocabulary-major ([BLOCK_V vocabulary entries, BLOCK_M
tokens] = W_tile h_tile^T, a tl.dot loop over H in steps of BLOCK_K, fp32 accumulation; the layout of the buffers,
so stores are coalesced along the tokens) and never written (except in the one-pass mode, below):

- `_stats_kernel`, grid (token blocks, vocabulary splits): each program runs an online log-sum-exp over its split of
  the vocabulary and writes, per token, the running maximum m, s = sum exp(z - m), t = sum exp(z - m) (z - m) and
  the target's logit when it falls in the split. The launcher merges the splits (a few [splits, C] vectors) into
  lse = m + log s, the entropy H = log s - t / s and log p(y) = z_y - lse. The splits give a GPU enough programs
  when a chunk has few token blocks; each loops over its vocabulary blocks from 0 (no runtime loop start).
- `_dlogits_kernel`, grid (token blocks, vocabulary blocks): the gradient of the raw logits of one tile,
  dz = (g_lp (onehot(y) - p) - g_ent p (log p + H)) / temperature, p = exp(z - lse), written vocabulary-major
  (dzT [Vb, C]) in the LM head's dtype for the two backward matmuls (cuBLAS, in the launcher's caller).
  RECOMPUTE: the logits come from the tl.dot loop; otherwise from a buffer the stats kernel stored (one pass).

fp32 inputs use IEEE fp32 dot products (TF32 would cost ~1e-3 relative error in the logits); bf16 / fp16 inputs
multiply exactly and accumulate in fp32. Loop bounds are runtime values starting at 0 (triton 3.6's interpreter
needs `hadw_kernels.ops._triton_compat.fix_interpreter` for those, which the launcher applies).
"""

import triton
import triton.language as tl


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_hm, stride_hk, stride_wv, stride_wk,
                 inv_t, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_V, BLOCK_M] fp32 logits, vocabulary-major ((W h^T + b) * inv_t, the layout of the buffers it is stored
    in, so stores are coalesced along the tokens); -inf outside the vocabulary."""
    acc = tl.zeros([BLOCK_V, BLOCK_M], dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wv + k[None, :] * stride_wk,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        ht = tl.load(h_ptr + rows[None, :].to(tl.int64) * stride_hm + k[:, None] * stride_hk,
                     mask=row_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(w, ht, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    z = acc * inv_t
    return tl.where(col_ok[:, None], z, float("-inf"))


@triton.jit
def _stats_kernel(
    # data ptrs
    h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, z_ptr,
    # shapes
    C, V, H, blocks_per_split,
    # strides
    stride_hm, stride_hk, stride_wv, stride_wk, stride_zv, stride_zc,
    # scalars
    inv_t,
    # switches
    HAS_BIAS: tl.constexpr, STORE_LOGITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part [4, splits, C] (m, s, t, z_y) of this program's tokens over its vocabulary split; with STORE_LOGITS the
    logits also go to zT [V, C] (fp32)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < C
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    zy = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_begin = split * blocks_per_split * BLOCK_V
    for i in range(0, blocks_per_split):
        cols = v_begin + i * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_hm, stride_hk, stride_wv,
                         stride_wk, inv_t, HAS_BIAS, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        if STORE_LOGITS:
            tl.store(z_ptr + cols[:, None].to(tl.int64) * stride_zv + rows[None, :] * stride_zc, z,
                     mask=col_ok[:, None] & row_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(z, axis=0))
        # A block past the end of the vocabulary (the last split's tail) leaves everything as it was.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        shift = tl.where(m_i == float("-inf"), 0.0, m_i - m_safe)
        d = tl.where(col_ok[:, None], z - m_safe[None, :], 0.0)  # no inf * 0 outside the vocabulary
        e = tl.where(col_ok[:, None], tl.exp(d), 0.0)
        t_i = alpha * (t_i + shift * s_i) + tl.sum(e * d, axis=0)
        s_i = alpha * s_i + tl.sum(e, axis=0)
        m_i = m_new
        zy += tl.sum(tl.where(cols[:, None] == y[None, :], z, 0.0), axis=0)
    plane = n_splits * C
    base = split * C + rows
    tl.store(part_ptr + base, m_i, mask=row_ok)
    tl.store(part_ptr + plane + base, s_i, mask=row_ok)
    tl.store(part_ptr + 2 * plane + base, t_i, mask=row_ok)
    tl.store(part_ptr + 3 * plane + base, zy, mask=row_ok)


@triton.jit
def _dlogits_kernel(
    # data ptrs
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, z_ptr, out_ptr,
    # shapes
    C, V, H,
    # strides
    stride_hm, stride_hk, stride_wv, stride_wk, stride_zv, stride_zc, stride_ov, stride_oc,
    # scalars
    inv_t,
    # switches
    HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr, RECOMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dzT [V, C] (out's dtype) of one [BLOCK_V, BLOCK_M] tile. Without RECOMPUTE the logits are read from zT [V, C]
    (fp32, stored by the stats kernel), which may be `out` itself: each element is read before it is written, by the
    same program."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < C
    col_ok = cols < V
    ok = col_ok[:, None] & row_ok[None, :]
    if RECOMPUTE:
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_hm, stride_hk, stride_wv,
                         stride_wk, inv_t, HAS_BIAS, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    else:
        z = tl.load(z_ptr + cols[:, None].to(tl.int64) * stride_zv + rows[None, :] * stride_zc, mask=ok,
                    other=float("-inf"))
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    logp = tl.where(ok, z - lse[None, :], 0.0)  # no inf * 0 outside the tile's valid part
    p = tl.where(ok, tl.exp(logp), 0.0)
    dz = -g[None, :] * p
    if HAS_GENT:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        ge = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        dz -= ge[None, :] * p * (logp + ent[None, :])
    dz = tl.where(cols[:, None] == y[None, :], dz + g[None, :], dz) * inv_t
    tl.store(out_ptr + cols[:, None].to(tl.int64) * stride_ov + rows[None, :] * stride_oc,
             dz.to(out_ptr.dtype.element_ty), mask=ok)
