"""Fused linear log-probs in Triton: launchers, the torch custom ops, and `TritonChunkOps`, the chunk primitives the
drivers of `hadw_kernels.from_hidden` call on CUDA (backend="triton"). Kernels in `_triton_linear_logprobs_kernels`.

Layers:
- `_blocks` / `_splits`: the one place for tile sizes and grid shapes;
- `_stats` / `_dlogits`: launchers that own allocation, grid and launch settings;
- `linear_logprobs_stats` (`torch.ops.hadw_kernels.linear_logprobs_stats`) and `linear_logprobs_dlogits`: custom
  ops with fake implementations (torch.compile traces their callers without graph breaks); no autograd of their
  own: the gradient is assembled by the drivers (`fused_linear_logprobs`'s custom op and the one-pass loss);
- `TritonChunkOps`: `stats`, `dlogits` and `one_pass` with the signatures of `from_hidden.TorchChunkOps`.

The backward matmuls (dh = dz^T W, dW += dz h) are left to cuBLAS through torch.mm in the shared driver: tiles
of the logits' gradient come out of `_dlogits_kernel` in the LM head's dtype, vocabulary-major.

Kernels run in the Triton interpreter on CPU tensors when TRITON_INTERPRET=1 (how CI tests them, in fp32: the
interpreter's bf16 tl.dot is wrong, so bf16 is tested on a GPU only). Tile sizes on a GPU are a first choice
(`_blocks`: the largest that compile without register spills), not yet timed on one.
"""

from __future__ import annotations

import functools

import torch
import triton

from hadw_kernels.ops._triton_linear_logprobs_kernels import _dlogits_kernel, _stats_kernel
from hadw_kernels.ops._triton_runtime import alloc as _alloc
from hadw_kernels.ops._triton_runtime import fix_interpreter, interpreting


# -- the one place for tiles and grids ----------------------------------------------------------------------------
def _blocks(dtype: torch.dtype) -> dict:
    """Tile sizes and launch settings. Interpreter: small tiles so tiny test shapes still take several tiles (each
    program costs ~5 ms there). GPU: the largest tiles that ptxas (triton 3.7.1, sm_90a) compiles without spilling
    for every variant: 16-bit inputs 128 vocabulary entries x 64 tokens, steps of 32 along H, 8 warps, 2 stages
    (254 / 200 / 127 registers for the stats / recomputing / stored-logits kernels; 64 x 128 x 64 on 3 stages
    spilled 276 bytes in the stats kernel); fp32 (IEEE dots, no tensor cores) 64 x 32 x 32 on 4 warps (168 / 128 /
    64; 64 x 64 spilled). Register counts only: not yet timed on a GPU."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=2)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(token_blocks: int, vocab_blocks: int, device: torch.device) -> int:
    """Vocabulary splits of the stats grid: about four programs per SM on a GPU (a chunk of 1024 tokens is only 16
    token blocks); 2 in the interpreter, so that the merge of splits is tested."""
    if interpreting() or device.type != "cuda":
        want = 2
    else:
        want = triton.cdiv(4 * _sm_count(device), token_blocks)
    return max(1, min(want, vocab_blocks))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


# -- launchers ----------------------------------------------------------------------------------------------------
def _stats(h, w, b, y, inv_t: float, logits_out):
    """(logp, entropy, lse) [C] fp32; with logits_out [V, C] fp32 the logits are stored there too."""
    fix_interpreter()
    C, H = h.shape
    V = w.shape[0]
    y = y.contiguous()
    blk = _blocks(h.dtype)
    bm, bv = blk["BLOCK_M"], blk["BLOCK_V"]
    token_blocks, vocab_blocks = triton.cdiv(C, bm), triton.cdiv(V, bv)
    splits = _splits(token_blocks, vocab_blocks, h.device)
    per_split = triton.cdiv(vocab_blocks, splits)
    splits = triton.cdiv(vocab_blocks, per_split)  # no empty split
    part = _alloc((4, splits, C), torch.float32, h.device)
    z = logits_out if logits_out is not None else part
    _stats_kernel[(token_blocks, splits)](
        h, w, b if b is not None else w, y, part, z,
        C, V, H, per_split,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        z.stride(0) if logits_out is not None else 0, z.stride(1) if logits_out is not None else 0,
        inv_t,
        HAS_BIAS=b is not None, STORE_LOGITS=logits_out is not None, DOT_PRECISION=_precision(h.dtype), **blk,
    )
    m_k, s_k, t_k, zy_k = part.unbind(0)  # [splits, C] each: merge the splits' online sums
    m = m_k.amax(dim=0)
    a = torch.exp(m_k - m)
    s = (a * s_k).sum(dim=0)
    t = (a * (t_k + (m_k - m) * s_k)).sum(dim=0)
    log_s = torch.log(s)
    lse = m + log_s
    return zy_k.sum(dim=0) - lse, (log_s - t / s).clamp(min=0.0), lse


def _dlogits(h, w, b, y, lse, ent, g_lp, g_ent, inv_t: float, out, logits, logits_in_out: bool):
    """Fill out [Vb, C] with the raw logits' gradient of vocabulary rows w [Vb, H] (targets y local to the block)."""
    fix_interpreter()
    C, H = h.shape
    V = w.shape[0]
    blk = _blocks(h.dtype)
    z = out if logits_in_out else logits
    # The kernel reads per-token vectors densely; autograd hands in expanded (stride-0) gradients, e.g. of a sum.
    y, lse, ent, g_lp = y.contiguous(), lse.contiguous(), ent.contiguous(), g_lp.contiguous()
    g_ent = None if g_ent is None else g_ent.contiguous()
    grid = (triton.cdiv(C, blk["BLOCK_M"]), triton.cdiv(V, blk["BLOCK_V"]))
    _dlogits_kernel[grid](
        h, w, b if b is not None else w, y, lse, ent, g_lp, g_ent if g_ent is not None else g_lp,
        z if z is not None else out, out,
        C, V, H,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0, out.stride(0), out.stride(1),
        inv_t,
        HAS_BIAS=b is not None, HAS_GENT=g_ent is not None, RECOMPUTE=z is None,
        DOT_PRECISION=_precision(h.dtype), **blk,
    )


# -- custom ops ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("hadw_kernels::linear_logprobs_stats", mutates_args=("logits_out",))
def linear_logprobs_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temperature: float,
    logits_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse) [C] fp32 of hidden [C, H] under weight [V, H] (+ bias [V]) for targets [C] in [0, V);
    logits_out: None, or [V, C] fp32 to receive the logits (the one-pass strategy)."""
    return _stats(hidden, weight, bias, targets, inv_temperature, logits_out)


@linear_logprobs_stats.register_fake
def _(hidden, weight, bias, targets, inv_temperature, logits_out):
    out = hidden.new_empty(targets.shape, dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("hadw_kernels::linear_logprobs_dlogits", mutates_args=("out",))
def linear_logprobs_dlogits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
    logits: torch.Tensor | None,
    out: torch.Tensor,
    logits_in_out: bool,
) -> None:
    """Write into out [Vb, C] (the LM head's dtype) the gradient of sum(grad_logp * logp + grad_entropy * entropy)
    w.r.t. the raw logits of vocabulary rows weight [Vb, H]; targets are relative to the block (others never match).
    The logits are recomputed, or read from `logits` [Vb, C] fp32, or from `out` itself (logits_in_out)."""
    _dlogits(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, out, logits,
             logits_in_out)


@linear_logprobs_dlogits.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, logits, out,
      logits_in_out):
    return None


# -- what the drivers call ----------------------------------------------------------------------------------------
class TritonChunkOps:
    """The chunk primitives of `hadw_kernels.from_hidden` on the Triton kernels (fp32 compute; float64 never comes
    here). Buffers are fresh tensors: on CUDA the caching allocator reuses them."""

    vocab_major = True
    """dlogits / one_pass return dzT [Vb, C] (the kernels' coalesced layout); the driver uses its transpose."""

    def __init__(self, compute: torch.dtype):
        if compute != torch.float32:
            raise ValueError(f"the Triton path computes in float32, got {compute}")
        self.compute = compute

    @staticmethod
    def bytes_per_logit(compute: torch.dtype, matmul: torch.dtype, one_pass: bool) -> int:
        """Chunk-temporary bytes per token x vocabulary entry: the gradient tile buffer in the LM head's dtype, plus
        the fp32 logits in one pass (shared with the gradient when that is fp32 too)."""
        size = torch.finfo(matmul).bits // 8
        if not one_pass:
            return size
        return 4 + (size if matmul != torch.float32 else 0)

    def stats(self, h, w, b, y, inv_t: float, vocab_block: int):
        """(logp, entropy, lse) [C]; the whole vocabulary in one launch (`vocab_block` only sizes other buffers)."""
        return linear_logprobs_stats(h, w, b, y, inv_t, None)

    def dlogits(self, h, w_blk, b_blk, y_local, lse, ent, g_lp, g_ent, inv_t: float, out_dtype: torch.dtype):
        out = _alloc((w_blk.shape[0], h.shape[0]), out_dtype, h.device)
        linear_logprobs_dlogits(h, w_blk, b_blk, y_local, lse, ent, g_lp, g_ent, inv_t, None, out, False)
        return out

    def one_pass(self, h, w, b, y, inv_t: float, grad_fn, out_dtype: torch.dtype):
        z = _alloc((w.shape[0], h.shape[0]), torch.float32, h.device)
        logp, ent, lse = linear_logprobs_stats(h, w, b, y, inv_t, z)
        g = grad_fn(logp, ent).to(torch.float32).contiguous()
        if out_dtype == torch.float32:
            linear_logprobs_dlogits(h, w, b, y, lse, ent, g, None, inv_t, None, z, True)
            return logp, ent, z
        out = _alloc(z.shape, out_dtype, h.device)
        linear_logprobs_dlogits(h, w, b, y, lse, ent, g, None, inv_t, z, out, False)
        return logp, ent, out
