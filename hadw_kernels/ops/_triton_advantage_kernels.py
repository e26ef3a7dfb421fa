"""The @triton.jit code of the HA-DW advantages (spec §2, §4). Private: `hadw_kernels.ops.triton_advantages` and
`hadw_kernels.ops.triton_loss` own allocation and launch.

The math of one group lives in three helpers, used by both kernels here and by the fused loss's forward kernel (which
computes each row's advantage from its contiguous group's rewards in the same pass as the tokens):
- `_group_sums` / `_group_sq_dev`: the scorable count, sum, max, min and the centred sum of squares of a tile of
  rewards [X, BLOCK] along axis 1 (NaN = unscorable, masked lanes ignored); callable once per tile or accumulated
  over chunks;
- `_group_stats`: those sums -> mean, std, degenerate, exactly as `hadw_kernels.reference.compute_advantages`;
- `_anchor_diff` / `_scaled_advantage`: a group's diff = mean - C_t^-; a row's reward and its group's statistics
  -> A_hat, Phi.

Kernels:
- `_batch_std_kernel` (one program): the whole batch's std of scorable rewards plus std_eps, the denominator of
  adv_norm="batch_std" (TRL's scale_rewards="batch");
- `_group_advantages_kernel`: a block of groups per program; rows of a group are `order[start[p] : start[p + 1]]`
  (rows sorted by group, any order and any sizes) or, with CONTIGUOUS, rows p*G ... p*G+G-1; two passes over each
  group's rows for its statistics (chunks of BLOCK_G, so a group may have any size), a third writes each row's
  A_hat, Phi and A.
Every value is fp32; rewards of any real dtype are converted on load.
"""

import triton
import triton.language as tl

ADV_NORM_GROUP = tl.constexpr(0)  # (r - mean) / (group std + std_eps)
ADV_NORM_BATCH = tl.constexpr(1)  # (r - mean) / (batch std + std_eps)
ADV_NORM_NONE = tl.constexpr(2)  # r - mean
ADV_NORMS = {"group_std": 0, "batch_std": 1, "none": 2}
"""config.adv_norm -> the ADV_NORM switch (the one mapping; the constants above name its values in kernel code)."""


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _group_sums(r, ok):
    """Per row of the tile r [X, BLOCK] (lanes with ok false ignored; NaN = unscorable): (count, sum, max, min) of
    the scorable rewards, each [X]."""
    scorable = ok & (r == r)
    count = tl.sum(tl.where(scorable, 1.0, 0.0), axis=1)
    total = tl.sum(tl.where(scorable, r, 0.0), axis=1)
    high = tl.max(tl.where(scorable, r, -float("inf")), axis=1)
    low = tl.min(tl.where(scorable, r, float("inf")), axis=1)
    return count, total, high, low


@triton.jit
def _group_sq_dev(r, ok, mean):
    """Per row of the tile r [X, BLOCK]: the sum of squared deviations of the scorable rewards from mean [X]."""
    centred = tl.where(ok & (r == r), r - mean[:, None], 0.0)
    return tl.sum(centred * centred, axis=1)


@triton.jit
def _group_stats(count, total, sq_dev, high, low, STD_UNBIASED: tl.constexpr):
    """(mean, std, degenerate) from the sums: mean over the scorable rewards (0 with none), std with n - 1 (or n)
    (0 with too few), degenerate where fewer than two are scorable or all are equal (decided exactly, max == min)."""
    mean = total / tl.maximum(count, 1.0)
    if STD_UNBIASED:
        std = tl.sqrt(sq_dev / tl.maximum(count - 1.0, 1.0))
        std = tl.where(count > 1.0, std, 0.0)
    else:
        std = tl.sqrt(sq_dev / tl.maximum(count, 1.0))
        std = tl.where(count > 0.0, std, 0.0)
    degenerate = (count < 2.0) | (high == low)
    return mean, std, degenerate


@triton.jit
def _anchor_diff(count, mean, anchor, HADW: tl.constexpr):
    """diff = group mean - C_t^- (0 for a group with no scorable reward, and without HA-DW)."""
    if HADW:
        diff = tl.where(count > 0.0, mean - anchor, 0.0)
    else:
        diff = tl.zeros_like(mean)
    return diff


@triton.jit
def _scaled_advantage(r, mean, std, degenerate, diff, batch_denom, std_eps, lambda_scale, ADV_NORM: tl.constexpr,
                      HADW: tl.constexpr):
    """A row's (A_hat, Phi) from its reward r (NaN = unscorable: A_hat = 0) and its group's statistics.
    batch_denom: the batch std + std_eps (ADV_NORM_BATCH only). Phi = lambda exp(D |diff|), D = -sgn(A_hat) sgn(diff)
    with HA-DW, else 1."""
    if ADV_NORM == ADV_NORM_GROUP:
        raw = (r - mean) / (std + std_eps)
    elif ADV_NORM == ADV_NORM_BATCH:
        raw = (r - mean) / batch_denom
    else:
        raw = r - mean
    raw = tl.where(degenerate | (r != r), 0.0, raw)
    if HADW:
        phi = lambda_scale * tl.exp(-_sign(raw) * _sign(diff) * tl.abs(diff))
    else:
        phi = tl.zeros_like(raw) + 1.0
    return raw, phi


@triton.jit
def _batch_std_kernel(
    # data ptrs
    rewards_ptr, out_ptr,
    # shapes
    N,
    # fp32 scalars
    std_eps,
    # switches
    STD_UNBIASED: tl.constexpr,
    # blocks
    BLOCK: tl.constexpr,
):
    """One program: out = std of the scorable rewards (n - 1 or n, the count clamped at 1) + std_eps, in two passes
    (mean, then squared deviations), as the reference computes it."""
    offs = tl.arange(0, BLOCK)
    count = tl.zeros([1], dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        idx = n0 + offs
        r = tl.load(rewards_ptr + idx, mask=idx < N, other=0).to(tl.float32)[None, :]
        c, s, _, _ = _group_sums(r, (idx < N)[None, :])
        count += c
        total += s
    mean = total / tl.maximum(count, 1.0)
    sq_dev = tl.zeros([1], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        idx = n0 + offs
        r = tl.load(rewards_ptr + idx, mask=idx < N, other=0).to(tl.float32)[None, :]
        sq_dev += _group_sq_dev(r, (idx < N)[None, :], mean)
    if STD_UNBIASED:
        var = sq_dev / tl.maximum(count - 1.0, 1.0)
    else:
        var = sq_dev / tl.maximum(count, 1.0)
    std = tl.sqrt(var) + std_eps
    tl.store(out_ptr + tl.arange(0, 1), std)


@triton.jit
def _group_rows(order_ptr, start, size, j0, G, CONTIGUOUS: tl.constexpr, BLOCK_G: tl.constexpr):
    """The rows [BLOCK_P, BLOCK_G] (int64) of chunk j0 of each group, and which lanes hold one."""
    j = j0 + tl.arange(0, BLOCK_G)
    ok = j[None, :] < size[:, None]
    if CONTIGUOUS:
        rows = start[:, None] + j[None, :].to(tl.int64)
    else:
        rows = tl.load(order_ptr + start[:, None] + j[None, :], mask=ok, other=0).to(tl.int64)
    return rows, ok


@triton.jit
def _group_advantages_kernel(
    # data ptrs
    rewards_ptr, order_ptr, starts_ptr, anchor_ptr, batch_denom_ptr,
    adv_ptr, raw_ptr, phi_ptr, mean_ptr, std_ptr, diff_ptr, degenerate_ptr,
    # shapes
    P, G, max_size,
    # fp32 scalars
    std_eps, lambda_scale,
    # switches
    CONTIGUOUS: tl.constexpr, ADV_NORM: tl.constexpr, STD_UNBIASED: tl.constexpr, HADW: tl.constexpr,
    # blocks
    BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """BLOCK_P groups per program. Group p's rows: rows p*G ... p*G+G-1 (CONTIGUOUS), else order[starts[p] ...
    starts[p + 1] - 1]; max_size bounds every group's size. Writes adv / raw / phi [N] and mean / std / diff /
    degenerate (uint8) [P]."""
    pid = tl.program_id(0)
    groups = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    g_ok = groups < P
    groups64 = groups.to(tl.int64)
    if CONTIGUOUS:
        start = groups64 * G
        size = tl.where(g_ok, G, 0)
    else:
        start = tl.load(starts_ptr + groups64, mask=g_ok, other=0).to(tl.int64)
        size = tl.where(g_ok, tl.load(starts_ptr + groups64 + 1, mask=g_ok, other=0).to(tl.int64) - start, 0)

    count = tl.zeros([BLOCK_P], dtype=tl.float32)
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    high = tl.full([BLOCK_P], -float("inf"), dtype=tl.float32)
    low = tl.full([BLOCK_P], float("inf"), dtype=tl.float32)
    for j0 in range(0, max_size, BLOCK_G):
        rows, ok = _group_rows(order_ptr, start, size, j0, G, CONTIGUOUS, BLOCK_G)
        r = tl.load(rewards_ptr + rows, mask=ok, other=0).to(tl.float32)
        c, s, hi, lo = _group_sums(r, ok)
        count += c
        total += s
        high = tl.maximum(high, hi)
        low = tl.minimum(low, lo)
    mean = total / tl.maximum(count, 1.0)
    sq_dev = tl.zeros([BLOCK_P], dtype=tl.float32)
    for j0 in range(0, max_size, BLOCK_G):
        rows, ok = _group_rows(order_ptr, start, size, j0, G, CONTIGUOUS, BLOCK_G)
        r = tl.load(rewards_ptr + rows, mask=ok, other=0).to(tl.float32)
        sq_dev += _group_sq_dev(r, ok, mean)
    mean, std, degenerate = _group_stats(count, total, sq_dev, high, low, STD_UNBIASED)

    batch_denom = 1.0
    if ADV_NORM == ADV_NORM_BATCH:
        batch_denom = tl.load(batch_denom_ptr)
    anchor = 0.0
    if HADW:
        anchor = tl.load(anchor_ptr).to(tl.float32)
    diff = _anchor_diff(count, mean, anchor, HADW)
    tl.store(mean_ptr + groups64, mean, mask=g_ok)
    tl.store(std_ptr + groups64, std, mask=g_ok)
    tl.store(diff_ptr + groups64, diff, mask=g_ok)
    tl.store(degenerate_ptr + groups64, degenerate.to(tl.uint8), mask=g_ok)
    for j0 in range(0, max_size, BLOCK_G):
        rows, ok = _group_rows(order_ptr, start, size, j0, G, CONTIGUOUS, BLOCK_G)
        r = tl.load(rewards_ptr + rows, mask=ok, other=0).to(tl.float32)
        raw, phi = _scaled_advantage(r, mean[:, None], std[:, None], degenerate[:, None], diff[:, None], batch_denom,
                                     std_eps, lambda_scale, ADV_NORM, HADW)
        tl.store(raw_ptr + rows, raw, mask=ok)
        tl.store(phi_ptr + rows, phi, mask=ok)
        tl.store(adv_ptr + rows, raw * phi, mask=ok)
