"""Per-token log-probs and entropy straight from the last hidden states and the LM head, without ever holding the
[tokens x vocab] logits: `fused_linear_logprobs`, and the chunk machinery `hadw_kernels.from_hidden` builds the loss
on.

    >>> with torch.no_grad():                                                       # old / ref / rollout passes
    ...     old = fused_linear_logprobs(hidden, lm_head.weight, ids, mask=mask).logprobs

At the paper's scale (vocab 151,936, 16k tokens) the fp32 logits alone are 9.7 GB, and as much again for their
gradient. Here the valid tokens are processed in chunks: a chunk's logits z = (h W^T + b) / temperature are computed,
reduced to the log-prob of the target, the log-sum-exp and the entropy, and dropped; the backward recomputes them
chunk by chunk. Where a budget cannot hold a chunk's logits over the whole vocabulary, the vocabulary is split too,
with an online log-sum-exp. The chunk size comes from `memory_budget` (bytes of chunk temporaries, `plan_chunks`), not
from a constant.

Layers: the chunk primitives of a backend (`TorchChunkOps` here: matmuls + reductions compiled where it pays;
`hadw_kernels.ops.triton_linear_logprobs.TritonChunkOps`: fused Triton kernels) -> the drivers shared by both
(`_forward`, `_backward`, `_Grads`: chunk loops and the two backward matmuls) -> the custom op
`hadw_kernels::fused_linear_logprobs` with its autograd -> the public function, which validates and dispatches.

Backends: "torch" (CPU or CUDA), "triton" (CUDA, or CPU tensors in the interpreter) and "auto" (Triton for CUDA
tensors when triton imports, else torch). float64 always runs the torch path.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import NamedTuple

import torch

from hadw_kernels.reference import compute_dtype
from hadw_kernels.validation import INT_DTYPES, check_backend, compiling

LOGPROB_BACKENDS = ("auto", "torch", "triton")
DEFAULT_MEMORY_BUDGET = {"cpu": 128 * 2**20, "cuda": 2**30}
"""Bytes of chunk temporaries (a chunk's logits, then their gradient) per call, by device type (others: the CPU's).
CPU: 128 MiB is a chunk of 220 tokens over a 151,936-token vocabulary (one fp32 logit = 4 bytes on the torch path).
At 4k tokens (H = 256) 256 MiB measured 410 MB peak against Liger's 341 MB for ~6% less time than 128 MiB (10.2 vs
10.9 s of CPU time at 2k tokens); 128 MiB keeps the peak (the LM head's fp32 gradient + one chunk) under Liger's:
281 MiB (148 + 127.5) against 357 MiB at 4k tokens, each in a fresh process (bench/RESULTS.md).
CUDA: 1 GiB is ~1,180 tokens in the one-pass bf16 layout (6 bytes a logit), wide enough for cuBLAS. Both are far
below the 9.7 GB of fp32 logits of 16k tokens."""
MIN_CHUNK_TOKENS = 64
"""Below this many tokens per chunk the vocabulary is split instead (the matmuls of a thinner chunk re-read the whole
LM head for too little work)."""
VOCAB_ALIGN = 128


# -- chunk planning -----------------------------------------------------------------------------------------------
class ChunkPlan(NamedTuple):
    tokens: int
    """Valid tokens per chunk."""
    vocab: int
    """Vocabulary entries per block (the whole vocabulary when the budget allows)."""


def plan_chunks(n_tokens: int, vocab: int, bytes_per_logit: int, budget: int,
                min_tokens: int | None = None) -> ChunkPlan:
    """Chunk sizes whose temporaries (`bytes_per_logit` per token x vocabulary entry) fit `budget` bytes: whole-vocab
    chunks of as many tokens as fit when that is at least `min_tokens` (or all tokens), else `min_tokens` tokens
    and the largest vocabulary block that fits (a multiple of 128, at least 128)."""
    n_tokens = max(int(n_tokens), 1)
    min_tokens = MIN_CHUNK_TOKENS if min_tokens is None else min_tokens
    full = budget // (vocab * bytes_per_logit)
    if full >= min(min_tokens, n_tokens):
        return ChunkPlan(min(full, n_tokens), vocab)
    tokens = min(min_tokens, n_tokens)
    block = budget // (tokens * bytes_per_logit) // VOCAB_ALIGN * VOCAB_ALIGN
    return ChunkPlan(tokens, min(max(block, VOCAB_ALIGN), vocab))


# -- the torch chunk primitives -----------------------------------------------------------------------------------
def _row_sums(z, m):
    """s = sum_v exp(z - m), t = sum_v exp(z - m) (z - m) per row of z [C, Vb]; m [C, 1]."""
    d = z - m
    e = torch.exp(d)
    return e.sum(dim=1), (e * d).sum(dim=1)


def _scaled_exp_(z, m, coef):
    """z <- exp(z - m) * coef, in place (the one-pass gradient before its one-hot term); m, coef [C, 1]."""
    z.copy_(torch.exp(z - m) * coef)


def _dlogits_(z, lse, a_lp):
    """z <- exp(z - lse) * a_lp in place: -g p / temperature."""
    z.copy_(torch.exp(z - lse) * a_lp)


def _dlogits_entropy_(z, lse, ent, a_lp, a_ent):
    """z <- p (a_lp + a_ent (log p + H)) in place, p = exp(z - lse): the log-prob and the entropy terms."""
    logp = z - lse
    z.copy_(torch.exp(logp) * (a_lp + a_ent * (logp + ent)))


COMPILE_MIN_ELEMENTS = 2**22
"""Chunks of at least this many logits run their elementwise work through torch.compile: on this project's CPU the
row reductions of a [256, 151936] fp32 chunk took 220 ms compiled against 580 ms eager (one fused loop instead of
five passes), about half the chunk's first matmul. Smaller chunks (tests) stay eager: compiling costs seconds.
HADW_KERNELS_NO_COMPILE=1 turns it off; a failed compilation falls back to eager for good (one warning)."""
_COMPILE_FAILED: list[str] = []


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=None)


EAGER_SLICE_ELEMENTS = 2**20
"""The eager helpers run on row slices of at most this many logits: each of their steps allocates a temporary the
size of its input (three or four alive at once), so a whole chunk would hold several chunks' worth of logits."""


def _elementwise(fn, z, *per_row):
    """fn(z, *per_row) for z [C, Vb] and per-row operands [C, 1], compiled where it pays (COMPILE_MIN_ELEMENTS) and
    compiles; the in-place helpers compile without a [C, Vb] temporary (measured: 0 bytes above the buffer). Eager:
    on row slices (EAGER_SLICE_ELEMENTS), so that the temporaries stay a small fraction of the chunk."""
    if z.numel() >= COMPILE_MIN_ELEMENTS and not _COMPILE_FAILED and not compiling() and \
            os.environ.get("HADW_KERNELS_NO_COMPILE", "0") in ("", "0"):
        try:
            return _compiled(fn)(z, *per_row)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the same eager code
            _COMPILE_FAILED.append(repr(e))
            warnings.warn(f"hadw_kernels.from_hidden: torch.compile failed ({type(e).__name__}: {e}); the chunk "
                          f"reductions run eagerly from now on", RuntimeWarning, stacklevel=3)
    rows = max(1, EAGER_SLICE_ELEMENTS // max(z.shape[1], 1))
    if rows >= z.shape[0]:
        return fn(z, *per_row)
    parts = [fn(z[r0:r0 + rows], *(a[r0:r0 + rows] for a in per_row)) for r0 in range(0, z.shape[0], rows)]
    return None if parts[0] is None else tuple(torch.cat(p) for p in zip(*parts, strict=True))


class TorchChunkOps:
    """The per-chunk work in plain torch (any device), logits [C, Vb] (tokens x a vocabulary block) in the compute
    dtype, the elementwise work compiled where it pays (`_elementwise`):

    - `stats`: (log-prob, entropy, log-sum-exp) of a chunk without keeping its logits, vocabulary blocks merged
      with an online log-sum-exp;
    - `dlogits`: one vocabulary block of the logits' gradient, the logits recomputed;
    - `one_pass`: the logits over the whole vocabulary turned into their gradient in place.
    One [C, Vb] buffer in the compute dtype (and one in the matmul dtype when that is lower), allocated once per
    call and reused: on a CPU every fresh large tensor is fresh pages (glibc maps blocks over 32 MB) whose first
    touch cost more than the reductions.
    """

    vocab_major = False
    """dlogits / one_pass return [C, Vb] (the Triton ops return the transpose)."""

    def __init__(self, compute: torch.dtype):
        self.compute = compute
        self._buffers: dict[str, torch.Tensor] = {}

    @staticmethod
    def bytes_per_logit(compute: torch.dtype, matmul: torch.dtype, one_pass: bool) -> int:
        """Chunk-temporary bytes per token x vocabulary entry: the logits (then their gradient) in the compute
        dtype, and a copy in the matmul dtype where that is lower."""
        size = torch.finfo(compute).bits // 8
        return size + (torch.finfo(matmul).bits // 8 if matmul != compute else 0)

    def _buffer(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < rows * cols or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)
            buf = self._buffers[name] = torch.empty(rows * cols, dtype=dtype, device=device)
        return buf[: rows * cols].view(rows, cols)

    def _logits(self, h, w, b, inv_t):
        """z [C, Vb] = (h W^T + b) / temperature in the compute dtype, into the reused buffer."""
        z = self._buffer("z", h.shape[0], w.shape[0], self.compute, h.device)
        if h.dtype == self.compute:
            torch.mm(h, w.t(), out=z)
        else:
            z.copy_(torch.mm(h, w.t()))
        if b is not None:
            z.add_(b.to(self.compute))
        if inv_t != 1.0:
            z.mul_(inv_t)
        return z

    @staticmethod
    def _target_logit(z, y_local):
        inside = (y_local >= 0) & (y_local < z.shape[1])
        picked = z.gather(1, y_local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
        return torch.where(inside, picked, torch.zeros_like(picked))

    def stats(self, h, w, b, y, inv_t: float, vocab_block: int):
        """(logp, entropy, lse) [C] in the compute dtype, the vocabulary in blocks with an online log-sum-exp."""
        V = w.shape[0]
        m = s = t = None
        zy = torch.zeros(h.shape[0], dtype=self.compute, device=h.device)
        for v0 in range(0, V, vocab_block):
            v1 = min(v0 + vocab_block, V)
            z = self._logits(h, w[v0:v1], None if b is None else b[v0:v1], inv_t)
            mb = z.amax(dim=1)
            sb, tb = _elementwise(_row_sums, z, mb[:, None])
            zy += self._target_logit(z, y - v0)
            if m is None:
                m, s, t = mb, sb, tb
            else:  # both sums re-expressed relative to the new maximum
                m_new = torch.maximum(m, mb)
                a, ab = torch.exp(m - m_new), torch.exp(mb - m_new)
                t = a * (t + (m - m_new) * s) + ab * (tb + (mb - m_new) * sb)
                m, s = m_new, a * s + ab * sb
        return _finish_stats(m, s, t, zy)

    def dlogits(self, h, w_blk, b_blk, y_local, lse, ent, g_lp, g_ent, inv_t: float, out_dtype: torch.dtype):
        """dz [C, Vb], d loss / d raw logits of one vocabulary block (recomputed): with p = softmax(z) and the
        incoming gradients g_lp of the log-prob and g_ent of the entropy, dz = g_lp (onehot(y) - p) - g_ent p
        (log p + H), divided by the temperature."""
        z = self._logits(h, w_blk, b_blk, inv_t)
        a_lp = (-g_lp * inv_t)[:, None]
        if g_ent is None:
            _elementwise(_dlogits_, z, lse[:, None], a_lp)
        else:
            _elementwise(_dlogits_entropy_, z, lse[:, None], ent[:, None], a_lp, (-g_ent * inv_t)[:, None])
        _add_onehot(z, y_local, g_lp * inv_t)
        return self._cast(z, out_dtype)

    def one_pass(self, h, w, b, y, inv_t: float, grad_fn, out_dtype: torch.dtype):
        """(logp, entropy, dz [C, V]) for a loss whose gradient w.r.t. this chunk's log-probs is grad_fn(logp,
        entropy): the logits are computed once, reduced, and turned into their gradient in place."""
        z = self._logits(h, w, b, inv_t)
        m = z.amax(dim=1)
        zy = self._target_logit(z, y)
        s, t = _elementwise(_row_sums, z, m[:, None])
        logp, ent, _ = _finish_stats(m, s, t, zy)
        g = grad_fn(logp, ent)
        _elementwise(_scaled_exp_, z, m[:, None], (-g * inv_t / s)[:, None])  # -g p / temperature, p = e / s
        _add_onehot(z, y, g * inv_t)
        return logp, ent, self._cast(z, out_dtype)

    def _cast(self, dz, dtype):
        if dz.dtype == dtype:
            return dz
        return self._buffer("cast", *dz.shape, dtype, dz.device).copy_(dz)


def _finish_stats(m, s, t, zy):
    """(logp, entropy, lse) from the maximum m, s = sum exp(z - m), t = sum exp(z - m) (z - m) and the target's
    logit zy: H = lse - E_p[z] = log s - t / s (relative to m, so no cancellation of two large numbers)."""
    log_s = torch.log(s)
    return zy - (m + log_s), (log_s - t / s).clamp(min=0.0), m + log_s


def _add_onehot(dz, y_local, values):
    """dz[c, y_local[c]] += values[c] where y_local[c] is inside this vocabulary block."""
    inside = (y_local >= 0) & (y_local < dz.shape[1])
    rows = torch.arange(dz.shape[0], device=dz.device)
    dz.index_put_((rows, y_local.clamp(0, dz.shape[1] - 1)), torch.where(inside, values, torch.zeros_like(values)),
                  accumulate=True)


def _triton_ops_module():
    from hadw_kernels.ops import triton_linear_logprobs  # imports triton: only on the Triton path

    return triton_linear_logprobs


def _chunk_ops(backend: str, compute: torch.dtype):
    if backend == "triton":
        try:
            module = _triton_ops_module()
        except ImportError as e:
            raise RuntimeError("backend='triton' needs triton and the kernel module: pip install "
                               "'hadw-kernels[triton]'") from e
        return module.TritonChunkOps(compute)
    return TorchChunkOps(compute)


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'torch' or 'triton'. float64 (a test dtype) always runs the torch path."""
    if dtype == torch.float64:
        return "torch"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            _triton_ops_module()
        except ImportError:
            return "torch"
        return "triton"
    return backend


# -- the chunk drivers (shared by the backends) -------------------------------------------------------------------
class _Tokens(NamedTuple):
    """The tokens to compute: rows `index` [M] of the flat hidden [M_all, H] (None = all, in order) with target ids
    `targets` [M], in chunks of `plan.tokens`."""

    hidden: torch.Tensor
    index: torch.Tensor | None
    targets: torch.Tensor

    @property
    def count(self) -> int:
        return self.targets.shape[0]

    def chunk(self, start: int, end: int) -> torch.Tensor:
        if self.index is None:
            return self.hidden[start:end]
        return self.hidden.index_select(0, self.index[start:end])


def _forward(ops, tok: _Tokens, w, b, inv_t: float, plan: ChunkPlan):
    """(logp, entropy, lse) [M] for every token, chunk by chunk; nothing of a chunk's logits is kept."""
    M = tok.count
    out = [torch.empty(M, dtype=ops.compute, device=tok.hidden.device) for _ in range(3)]
    for start in range(0, M, plan.tokens):
        end = min(start + plan.tokens, M)
        for dst, src in zip(out, ops.stats(tok.chunk(start, end), w, b, tok.targets[start:end], inv_t, plan.vocab),
                            strict=True):
            dst[start:end] = src
    return tuple(out)


class _Grads:
    """Gradient accumulators: hidden [M_all, H] in its dtype (each token's row is written once), weight and bias in
    fp32 (or the compute dtype) across chunks, cast once at the end."""

    def __init__(self, tok: _Tokens, w, b, compute, need_hidden: bool, need_weight: bool, need_bias: bool):
        acc = torch.float64 if compute == torch.float64 else torch.float32
        self.hidden = torch.zeros_like(tok.hidden) if need_hidden else None
        self.weight = torch.zeros(w.shape, dtype=acc, device=w.device) if need_weight else None
        self.bias = torch.zeros(b.shape, dtype=acc, device=b.device) if need_bias and b is not None else None
        self.tok, self.acc = tok, acc

    def add_chunk(self, h, dz, w_blk, v0: int, dh_acc):
        """The two backward matmuls of a logits gradient dz [C, Vb] (matmul dtype; any strides, e.g. the transpose
        of a vocabulary-major buffer) of vocabulary rows v0 : v0 + Vb: dh_acc [C, H] += dz W_blk, d weight[v0 : v0 +
        Vb] += dz^T h, d bias += column sums."""
        v1 = v0 + dz.shape[1]
        if dh_acc is not None:
            if dz.dtype == dh_acc.dtype:
                dh_acc.addmm_(dz, w_blk)
            else:
                dh_acc += torch.mm(dz, w_blk)
        if self.weight is not None:
            if dz.dtype == self.acc:
                self.weight[v0:v1].addmm_(dz.t(), h)
            else:  # a low-precision matmul added into fp32, in vocabulary slices so the temporary stays small
                step = max(1, 2**24 // (h.shape[1] * dz.element_size()))
                for s0 in range(0, dz.shape[1], step):
                    s1 = min(s0 + step, dz.shape[1])
                    self.weight[v0 + s0:v0 + s1] += torch.mm(dz[:, s0:s1].t(), h)
        if self.bias is not None:
            self.bias[v0:v1] += dz.sum(dim=0, dtype=self.acc)

    def put_hidden(self, start: int, end: int, dh):
        if self.hidden is None:
            return
        if self.tok.index is None:
            self.hidden[start:end] = dh
        else:
            self.hidden.index_copy_(0, self.tok.index[start:end], dh.to(self.hidden.dtype))

    def results(self, w, b):
        weight = None if self.weight is None else self.weight.to(w.dtype)
        bias = None if self.bias is None else self.bias.to(b.dtype)
        return self.hidden, weight, bias


def _backward(ops, tok: _Tokens, w, b, inv_t: float, plan: ChunkPlan, lse, ent, g_lp, g_ent, grads: _Grads):
    """Accumulate the gradients of sum(g_lp * logp + g_ent * entropy), recomputing each chunk's logits block by
    vocabulary block."""
    V, M = w.shape[0], tok.count
    for start in range(0, M, plan.tokens):
        end = min(start + plan.tokens, M)
        h, y = tok.chunk(start, end), tok.targets[start:end]
        dh = (torch.zeros(h.shape, dtype=grads.acc, device=h.device) if grads.hidden is not None else None)
        ge = None if g_ent is None else g_ent[start:end]
        for v0 in range(0, V, plan.vocab):
            v1 = min(v0 + plan.vocab, V)
            dz = ops.dlogits(h, w[v0:v1], None if b is None else b[v0:v1], y - v0, lse[start:end], ent[start:end],
                             g_lp[start:end], ge, inv_t, w.dtype)
            grads.add_chunk(h, dz.t() if ops.vocab_major else dz, w[v0:v1], v0, dh)
        if dh is not None:
            grads.put_hidden(start, end, dh)


def _check_finite_logprobs(logp, rows, w, b, position) -> None:
    """A clear error for non-finite log-probs [C] of the hidden states `rows` [C, H]: name the hidden states (with
    the position in target_ids of the first bad one, `position(i)`), or the LM head. One read-back per check; the
    counts only on failure."""
    if compiling() or bool(torch.isfinite(logp).all()):
        return
    bad = ~torch.isfinite(rows).all(dim=1)
    if bad.any():
        raise ValueError(f"hidden has non-finite values (NaN/Inf) at {int(bad.sum())} valid token position(s), "
                         f"the first at {position(int(bad.nonzero()[0, 0]))}")
    for name, t in (("weight", w), ("bias", b)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} (the LM head) has {int((~torch.isfinite(t)).sum())} non-finite value(s)")
    raise ValueError("log-probs are not finite although hidden and the LM head are: the logits overflow the compute "
                     "dtype")


# -- fused_linear_logprobs: a custom op with autograd ---------------------------------------------------------------
@torch.library.custom_op("hadw_kernels::fused_linear_logprobs", mutates_args=())
def _fused_linear_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    index: torch.Tensor | None,
    inv_temperature: float,
    chunk_tokens: int,
    vocab_block: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse) [M] of the tokens `index` [M] (None = all rows) of hidden [M_all, H] with targets [M];
    fp32 (fp64 for fp64 hidden)."""
    compute = compute_dtype(hidden)
    ops = _chunk_ops(backend, compute)
    tok = _Tokens(hidden, index, targets)
    logp, ent, lse = _forward(ops, tok, weight, bias, inv_temperature, ChunkPlan(chunk_tokens, vocab_block))
    return logp, ent, lse


@_fused_linear_logprobs_op.register_fake
def _(hidden, weight, bias, targets, index, inv_temperature, chunk_tokens, vocab_block, backend):
    out = targets.new_empty(targets.shape, dtype=compute_dtype(hidden))
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("hadw_kernels::fused_linear_logprobs_backward", mutates_args=())
def _fused_linear_logprobs_backward_op(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    index: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    chunk_tokens: int,
    vocab_block: int,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden [M_all, H], d weight [V, H], d bias [V]) of sum(grad_logp * logp + grad_entropy * entropy); an
    empty tensor for each gradient `needs` (hidden, weight, bias) does not ask for."""
    compute = lse.dtype
    ops = _chunk_ops(backend, compute)
    tok = _Tokens(hidden, index, targets)
    grads = _Grads(tok, weight, bias, compute, *needs)
    g_ent = grad_entropy.to(compute) if grad_entropy is not None and bool(grad_entropy.any()) else None
    _backward(ops, tok, weight, bias, inv_temperature, ChunkPlan(chunk_tokens, vocab_block), lse, entropy,
              grad_logp.to(compute), g_ent, grads)
    dh, dw, db = grads.results(weight, bias)
    # one empty tensor per gradient not asked for: returns of a custom op must not alias each other (a shared one
    # failed torch's aliasing check whenever two gradients were not needed, e.g. a frozen LM head without bias)
    return tuple(hidden.new_empty(0) if t is None else t for t in (dh, dw, db))


@_fused_linear_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, index, lse, entropy, inv_temperature, chunk_tokens,
      vocab_block, backend, needs):
    dh = torch.empty_like(hidden) if needs[0] else hidden.new_empty(0)
    dw = torch.empty_like(weight) if needs[1] else hidden.new_empty(0)
    db = torch.empty_like(bias) if needs[2] and bias is not None else hidden.new_empty(0)
    return dh, dw, db


def _fll_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, index, inv_t, chunk_tokens, vocab_block, backend = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, index, lse, ent)
    ctx.args = (inv_t, chunk_tokens, vocab_block, backend)


def _fll_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, index, lse, ent = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if not any(needs):
        return None, None, None, None, None, None, None, None, None
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    dh, dw, db = _fused_linear_logprobs_backward_op(grad_logp, grad_entropy, hidden, weight, bias, targets, index,
                                                    lse, ent, *ctx.args, needs)
    return (dh if needs[0] else None), (dw if needs[1] else None), (db if needs[2] else None), \
        None, None, None, None, None, None


_fused_linear_logprobs_op.register_autograd(_fll_backward, setup_context=_fll_setup_context)


# -- validation ---------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_head(hidden, weight, target_ids, bias, temperature) -> float:
    """hidden / weight / bias / target_ids: types, shapes, dtypes, one device; returns 1 / temperature."""
    for name, t in (("hidden", hidden), ("weight", weight), ("target_ids", target_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, T, H] or packed [L, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16, float16 or float64, got dtype {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the LM head [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but hidden has H = {hidden.shape[-1]}; expected "
                         f"weight [V, {hidden.shape[-1]}]")
    if weight.shape[0] == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"empty LM head: weight has shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected [V] = ({weight.shape[0]},)")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}; they must match")
    if target_ids.shape != hidden.shape[:-1]:
        raise ValueError(f"target_ids has shape {tuple(target_ids.shape)} but hidden has {tuple(hidden.shape)}; "
                         f"expected {tuple(hidden.shape[:-1])}")
    if target_ids.dtype.is_floating_point or target_ids.dtype.is_complex or target_ids.dtype == torch.bool:
        raise ValueError(f"target_ids must be an integer tensor, got dtype {target_ids.dtype}")
    named = {"hidden": hidden, "weight": weight, "target_ids": target_ids, "bias": bias}
    devices = {k: t.device for k, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("hidden, weight, bias and target_ids must be on one device, got "
                         + ", ".join(f"{k} on {v}" for k, v in devices.items()))
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got a tensor of shape {tuple(temperature.shape)}")
        temperature = float(temperature.item())
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return 1.0 / float(temperature)


def _check_ids(targets: torch.Tensor, vocab: int) -> None:
    """targets [M]: the ids at the valid positions, each in [0, V)."""
    if compiling() or targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= vocab)
    if bool(bad.any()):
        first = int(targets[bad.nonzero()[0, 0]])
        raise ValueError(f"target_ids has {int(bad.sum())} id(s) outside [0, V = {vocab}) at valid positions, "
                         f"e.g. {first}")


def _check_budget(memory_budget, device: torch.device) -> int:
    if memory_budget is None:
        return DEFAULT_MEMORY_BUDGET.get(device.type, DEFAULT_MEMORY_BUDGET["cpu"])
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive int (bytes) or None, got {memory_budget!r}")
    return memory_budget


def _valid_mask(mask, target_ids: torch.Tensor, name="mask") -> torch.Tensor:
    """mask (bool, integer or float, the shape and device of target_ids) -> bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != target_ids.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {tuple(target_ids.shape)} (the shape of "
                         f"target_ids)")
    if mask.device != target_ids.device:
        raise ValueError(f"{name} is on {mask.device} but target_ids is on {target_ids.device}")
    if not (mask.dtype.is_floating_point or mask.dtype in INT_DTYPES):
        raise ValueError(f"{name} must be bool, integer or float, got dtype {mask.dtype}")
    return mask if mask.dtype == torch.bool else mask != 0


# -- fused_linear_logprobs ----------------------------------------------------------------------------------------
class LinearLogprobs(NamedTuple):
    """What `fused_linear_logprobs` returns; both in the layout of target_ids, fp32 (fp64 for fp64 hidden), zero
    where mask is 0, differentiable w.r.t. hidden, weight and bias."""

    logprobs: torch.Tensor
    """log softmax((h W^T + b) / temperature)[target] per token."""
    entropy: torch.Tensor
    """Entropy of softmax((h W^T + b) / temperature) per token."""


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
) -> LinearLogprobs:
    """Per-token log-probs and entropy of `target_ids` under the LM head, never materialising the logits.

    Args:
        hidden: [N, T, H] or [L, H] last hidden states (any float dtype; weight and bias must have the same).
        weight: [V, H] the LM head; bias: [V] or None.
        target_ids: hidden.shape[:-1] integer ids in [0, V) (at positions where mask != 0).
        temperature: logits are divided by it (> 0), as the sampler did.
        mask: hidden.shape[:-1], nonzero where to compute; elsewhere the outputs are 0 and nothing is computed
            (padding may hold any hidden state and any id). None = everywhere.
        memory_budget: bytes of chunk temporaries (default `DEFAULT_MEMORY_BUDGET`); sets the chunk sizes.
        backend: 'auto' | 'torch' | 'triton' (module docstring).

    Returns:
        `LinearLogprobs(logprobs, entropy)`, both shaped like target_ids. The backward recomputes each chunk's logits.

    Example:
        >>> with torch.no_grad():
        ...     old = fused_linear_logprobs(hidden, model.lm_head.weight, ids, mask=mask).logprobs
    """
    inv_t = _check_head(hidden, weight, target_ids, bias, temperature)
    check_backend(backend, LOGPROB_BACKENDS)
    budget = _check_budget(memory_budget, hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = target_ids.reshape(-1)
    if mask is None:
        index, targets = None, ids.long()
    else:
        valid = _valid_mask(mask, target_ids).reshape(-1)
        index = valid.nonzero().squeeze(1)
        targets = ids.index_select(0, index).long()
    _check_ids(targets, weight.shape[0])
    compute = compute_dtype(hidden)
    kind = _resolve_backend(backend, hidden.device, hidden.dtype)
    ops_cls = _triton_ops_module().TritonChunkOps if kind == "triton" else TorchChunkOps
    plan = plan_chunks(targets.shape[0], weight.shape[0], ops_cls.bytes_per_logit(compute, weight.dtype, False),
                       budget)
    logp, ent, _ = _fused_linear_logprobs_op(flat, weight, bias, targets, index, inv_t, plan.tokens, plan.vocab, kind)
    if not compiling() and not bool(torch.isfinite(logp).all()):
        rows = flat if index is None else flat.index_select(0, index)
        _check_finite_logprobs(logp, rows, weight, bias,
                               lambda i: _position(target_ids.shape, i if index is None else int(index[i])))
    if index is not None:
        logp = logp.new_zeros(ids.shape).index_copy(0, index, logp)
        ent = ent.new_zeros(ids.shape).index_copy(0, index, ent)
    return LinearLogprobs(logp.view(target_ids.shape), ent.view(target_ids.shape))


def _position(shape, flat_index: int) -> tuple[int, ...]:
    return tuple(int(c) for c in torch.unravel_index(torch.tensor(flat_index), shape))
