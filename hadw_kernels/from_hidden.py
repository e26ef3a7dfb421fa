"""Log-probs, entropy and the policy loss straight from the last hidden states and the LM head, without ever holding
the [tokens x vocab] logits.

    >>> lp = fused_linear_logprobs(hidden, lm_head.weight, ids, mask=mask)          # old / ref / rollout passes
    >>> out = hadw_policy_loss_from_hidden(hidden, lm_head.weight, ids, lp_old, adv, mask, config=cfg)
    >>> out.loss.backward()                       # gradients reach hidden (so the model) and lm_head.weight

At the paper's scale (vocab 151,936, 16k tokens) the fp32 logits alone are 9.7 GB, and as much again for their
gradient. Here the valid tokens are processed in chunks: a chunk's logits z = (h W^T + b) / temperature are computed,
reduced to the log-prob of the target, the log-sum-exp and the entropy, and dropped. Where a budget cannot hold a
chunk's logits over the whole vocabulary, the vocabulary is split too, with an online log-sum-exp. The chunk size
comes from `memory_budget` (bytes of chunk temporaries, `plan_chunks`), not from a constant.

Two strategies for the loss, decided in one place (`_one_pass_chunks`):
- one pass (the default for token-level ratios): each chunk's logits are computed once; the loss's per-token gradient
  g = dL/dlogp of that chunk is computed right there, from the chunk's log-probs alone (exact because that gradient
  depends only on the token's own log-prob and per-row constants, given the batch's denominator: see
  `_chunk_token_grads`), and the chunk's gradient dz = g (onehot(y) - softmax(z)) / temperature is pushed through the
  two backward matmuls before the next chunk. Three matmuls in all, as for materialised logits; the gradients are
  kept until `backward()` scales them by the incoming gradient.
- two passes (GSPO's sequence ratio when a chunk cannot hold whole rows, or a budget that splits the vocabulary):
  `hadw_policy_loss(fused_linear_logprobs(...))`, whose backward recomputes each chunk's logits (four matmuls).

Layouts: `hidden` [N, T, H] with everything else [N, T]; or packed [L, H] with every per-token tensor [L],
advantages [N] and `token_rows` [L] (the row of each token: the i-th valid token of row r is position i of row r,
T = the longest row). Only tokens with mask != 0 are computed; padding may hold anything.

Backends for the log-prob part: "torch" (this module: chunked matmuls + eager reductions, CPU or CUDA), "triton"
(`hadw_kernels.ops.triton_linear_logprobs`: fused matmul tiles + online log-softmax + gather + entropy, CUDA or the
interpreter) and "auto" (Triton for CUDA tensors when triton imports, else torch). float64 always runs the torch path.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hadw_kernels.config import LossConfig
from hadw_kernels.loss import hadw_policy_loss
from hadw_kernels.reference import LossOutput, compute_dtype, policy_loss_terms
from hadw_kernels.validation import (
    INT_DTYPES,
    check_backend,
    check_config,
    check_token_inputs,
    compiling,
    nonfinite_suspects,
    raise_nonfinite,
    resolve_normalizer,
)

LOGPROB_BACKENDS = ("auto", "torch", "triton")
DEFAULT_MEMORY_BUDGET = {"cpu": 256 * 2**20, "cuda": 2**30}
"""Bytes of chunk temporaries (a chunk's logits and their gradient) per call, by device type (others: the CPU's).
On the torch path one fp32 logit costs 4 bytes, so 256 MiB is a chunk of ~440 tokens over a 151,936-token
vocabulary; on a GPU 1 GiB is ~1,180 tokens in the one-pass bf16 layout (6 bytes a logit), wide enough for cuBLAS.
Either is well under the 9.7 GB of fp32 logits of 16k tokens."""
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


def _elementwise(fn, *args):
    """fn(*args), compiled where it pays (COMPILE_MIN_ELEMENTS) and compiles; the in-place helpers compile without a
    [C, Vb] temporary (measured: 0 bytes above the buffer)."""
    z = args[0]
    if z.numel() >= COMPILE_MIN_ELEMENTS and not _COMPILE_FAILED and not compiling() and \
            os.environ.get("HADW_KERNELS_NO_COMPILE", "0") in ("", "0"):
        try:
            return _compiled(fn)(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the same eager code
            _COMPILE_FAILED.append(repr(e))
            warnings.warn(f"hadw_kernels.from_hidden: torch.compile failed ({type(e).__name__}: {e}); the chunk "
                          f"reductions run eagerly from now on", RuntimeWarning, stacklevel=3)
    return fn(*args)


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
    empty = hidden.new_empty(0)
    return (empty if dh is None else dh), (empty if dw is None else dw), (empty if db is None else db)


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


def _valid_mask(mask, shape, name="mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {tuple(shape)} (the shape of target_ids)")
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
        valid = _valid_mask(mask, target_ids.shape).reshape(-1)
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


# -- the loss from hidden states ------------------------------------------------------------------------------------
@dataclass
class HiddenLossOutput(LossOutput):
    """What `hadw_policy_loss_from_hidden` returns: `LossOutput` (loss, advantages, phi None, metrics with
    "entropy" added) and the per-token log-probs and entropy, detached, in the layout of target_ids (0 where mask
    is 0)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor


class _Grid(NamedTuple):
    """Where the valid tokens sit in the [N, T] grid of the policy loss, in row-major order."""

    index: torch.Tensor | None
    """[M] rows of the flat hidden holding the valid tokens, in grid order (None: all of them, already in order)."""
    cell: torch.Tensor
    """[M] flat grid position row * T + column of each valid token, ascending."""
    N: int
    T: int

    def scatter(self, values: torch.Tensor, fill=0.0) -> torch.Tensor:
        """[M] values -> [N, T] grid (fill elsewhere)."""
        out = values.new_full((self.N * self.T,), fill)
        return out.index_copy(0, self.cell, values).view(self.N, self.T)


def _packed_grid(token_rows: torch.Tensor, valid: torch.Tensor, n_rows: int) -> _Grid:
    """Grid positions of the packed valid tokens: row token_rows[l], column = rank of l among its row's valid tokens."""
    pos = valid.nonzero().squeeze(1)  # packed positions of valid tokens, ascending
    rows = token_rows.index_select(0, pos).long()
    order = torch.sort(rows, stable=True).indices  # grid order: by row, then by position in the packed sequence
    pos, rows = pos[order], rows[order]
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    cols = torch.arange(rows.shape[0], device=rows.device) - starts[rows]
    T = max(int(counts.max()) if counts.numel() else 1, 1)
    return _Grid(pos, rows * T + cols, n_rows, T)


def _chunk_rows(grid: _Grid, plan: ChunkPlan, token_local: bool) -> list[tuple[int, int]] | None:
    """Chunk boundaries over the valid tokens (grid order) for the one-pass strategy: any `plan.tokens`-sized chunks
    when the loss's per-token gradient is token-local, else whole rows greedily packed up to `plan.tokens` tokens;
    None where a row alone exceeds a chunk."""
    M = grid.cell.shape[0]
    if token_local:
        return [(s, min(s + plan.tokens, M)) for s in range(0, M, plan.tokens)]
    rows = (grid.cell // grid.T).tolist()
    bounds, start = [], 0
    row_starts = [0] + [i for i in range(1, M) if rows[i] != rows[i - 1]] + [M]
    for a, b in zip(row_starts[:-1], row_starts[1:], strict=True):
        if b - a > plan.tokens:
            return None
        if b - start > plan.tokens:
            bounds.append((start, a))
            start = a
    if M:
        bounds.append((start, M))
    return bounds


def _one_pass_chunks(config: LossConfig, grid: _Grid, plan: ChunkPlan, vocab: int) -> list[tuple[int, int]] | None:
    """The one place that decides the strategy: one pass (the chunk list) when a chunk holds the whole vocabulary and
    each chunk's gradient can be computed from its own log-probs, else None (two passes)."""
    if plan.vocab != vocab:
        return None
    return _chunk_rows(grid, plan, token_local=config.ratio_level == "token")


def _global_denominator(mask_grid: torch.Tensor, config: LossConfig, dtype) -> torch.Tensor:
    """The whole call's aggregation denominator, as `policy_loss_terms` computes it without a normalizer."""
    lengths = mask_grid.to(dtype).sum(dim=1)
    count = lengths.sum() if config.loss_agg == "token-mean" else (lengths > 0).to(dtype).sum()
    return count.clamp(min=1)


def _chunk_token_grads(grid: _Grid, lp_fill: torch.Tensor, loss_inputs: dict, config: LossConfig, denominator):
    """grad_fn for one chunk: dL/dlogp [C] of its tokens. The loss is evaluated on the rows the chunk touches, with
    the batch's denominator as the normalizer (so its gradient equals the whole batch's: per-row quantities come
    from full rows of the mask) and the chunk's log-probs placed into `lp_fill` (finite stand-ins elsewhere).
    Exact where each token's gradient depends only on its own log-prob (token-level ratio) or the chunk holds whole
    rows (`_chunk_rows`)."""
    T = grid.T

    def make(start: int, end: int):
        cells = grid.cell[start:end]
        r0, r1 = int(cells[0]) // T, int(cells[-1]) // T + 1
        local = cells - r0 * T
        sub = {k: (None if v is None else v[r0:r1]) for k, v in loss_inputs.items()}

        def grad_fn(logp, _ent):
            lp = lp_fill[r0:r1].clone().view(-1)
            lp[local] = logp.to(lp.dtype)
            lp = lp.view(r1 - r0, T).requires_grad_(True)
            with torch.enable_grad():
                loss, _ = policy_loss_terms(lp, sub["old_logprobs"], sub["advantages"], sub["mask"], config,
                                            sub["ref_logprobs"], sub["rollout_is_weights"], denominator)
                (g,) = torch.autograd.grad(loss, lp)
            return g.view(-1)[local].to(logp.dtype)

        return grad_fn

    return make


class _LossWithGradients(torch.autograd.Function):
    """The loss value with gradients computed in the forward (the one-pass strategy): backward scales them by the
    incoming gradient."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g):
        grads = []
        for t in ctx.saved_tensors:
            grads.append(None if t is None else t * g.to(t.dtype))
        return None, *grads, None, None, None


@torch.compiler.disable
def hadw_policy_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    config: LossConfig | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    token_rows: torch.Tensor | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    loss_backend: str = "auto",
) -> HiddenLossOutput:
    """`hadw_policy_loss` on the log-probs of `target_ids` under the LM head, without materialising the logits.

    Args:
        hidden: [N, T, H] last hidden states of the response positions, or packed [L, H] with `token_rows`.
        weight: [V, H] the LM head (same dtype as hidden); bias: [V] or None.
        target_ids: [N, T] (packed: [L]) the sampled token ids, in [0, V) where mask != 0.
        old_logprobs, mask, ref_logprobs, rollout_is_weights: [N, T] (packed: [L]), as in `hadw_policy_loss`.
        advantages: [N] or [N, T] (packed: [N], one per row).
        temperature: the sampling temperature the logits are divided by (> 0).
        config, normalizer: as in `hadw_policy_loss`.
        token_rows: packed layout only: [L] integer row (0 .. N-1) of each token; a row's valid tokens take the
            columns 0, 1, ... in packed order and T is the longest row (set config.norm_len for
            seq-mean-token-sum-norm).
        memory_budget: bytes of chunk temporaries (default `DEFAULT_MEMORY_BUDGET`).
        backend: 'auto' | 'torch' | 'triton' for the log-probs; loss_backend: the `hadw_policy_loss` backend of the
            loss value and metrics.

    Returns:
        `HiddenLossOutput`: loss (0-d, differentiable w.r.t. hidden, weight and bias), advantages (the input),
        phi None, metrics (`hadw_policy_loss`'s, then "entropy": the mean entropy over valid tokens), logprobs and
        entropy per token (detached, layout of target_ids).

    Example:
        >>> out = hadw_policy_loss_from_hidden(h, lm_head.weight, ids, old, adv[rows], mask, config=cfg,
        ...                                    normalizer=total_tokens)
        >>> out.loss.backward()
    """
    inv_t = _check_head(hidden, weight, target_ids, bias, temperature)
    config = check_config(config)
    check_backend(backend, LOGPROB_BACKENDS)
    check_backend(loss_backend)
    budget = _check_budget(memory_budget, hidden.device)
    valid = _valid_mask(mask, target_ids.shape)
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = target_ids.reshape(-1)
    compute = compute_dtype(hidden)
    per_token = dict(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_is_weights=rollout_is_weights)

    if hidden.dim() == 3:
        if token_rows is not None:
            raise ValueError("token_rows is for packed hidden [L, H]; hidden here is [N, T, H]")
        N, T = target_ids.shape
        cell = valid.reshape(-1).nonzero().squeeze(1)
        grid = _Grid(cell, cell, N, T)
        grid_inputs = dict(per_token, mask=mask, advantages=advantages)
    else:
        if token_rows is None:
            raise ValueError("packed hidden [L, H] needs token_rows: [L] the row of each token")
        grid, grid_inputs = _packed_inputs(valid, token_rows, advantages, per_token)
        N, T = grid.N, grid.T
    stand_in = torch.empty((N, T), dtype=compute, device=hidden.device)
    check_token_inputs(dict(logprobs=stand_in, **grid_inputs),
                       float_names=("logprobs", "old_logprobs", "advantages", "ref_logprobs", "rollout_is_weights"))
    if not compiling():
        raise_nonfinite(nonfinite_suspects(grid_inputs["mask"], *(grid_inputs[k] for k in _CHECKED)),
                        grid_inputs["mask"], {k: grid_inputs[k] for k in _CHECKED})
    targets = ids.index_select(0, grid.index).long()
    _check_ids(targets, weight.shape[0])
    norm = resolve_normalizer(normalizer, hidden.device)

    kind = _resolve_backend(backend, hidden.device, hidden.dtype)
    ops = _chunk_ops(kind, compute)
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    grad_wanted = torch.is_grad_enabled() and any(needs)
    plan = plan_chunks(targets.shape[0], weight.shape[0], type(ops).bytes_per_logit(compute, weight.dtype, True),
                       budget)
    chunks = _one_pass_chunks(config, grid, plan, weight.shape[0]) if grad_wanted else None
    tok = _Tokens(flat, grid.index, targets)
    position = _position_in(hidden.dim(), target_ids.shape, grid)

    if chunks is None:  # two passes: the log-probs (recomputed in their backward), then the policy loss on them
        lp = fused_linear_logprobs(hidden, weight, target_ids, bias=bias, temperature=temperature, mask=valid,
                                   memory_budget=budget, backend=kind)
        if hidden.dim() == 3:
            logp_grid, ent_grid = lp.logprobs, lp.entropy.detach()
        else:
            logp_grid = grid.scatter(lp.logprobs.reshape(-1).index_select(0, grid.index))
            ent_grid = grid.scatter(lp.entropy.detach().reshape(-1).index_select(0, grid.index))
        out = hadw_policy_loss(logp_grid, grid_inputs["old_logprobs"], grid_inputs["advantages"],
                               grid_inputs["mask"], config=config, ref_logprobs=grid_inputs["ref_logprobs"],
                               rollout_is_weights=grid_inputs["rollout_is_weights"], normalizer=norm,
                               backend=loss_backend)
        loss, logprobs, entropy = out.loss, lp.logprobs.detach(), lp.entropy.detach()
        ent_sum = ent_grid.sum()
    else:
        grads = _Grads(tok, weight, bias, compute, *needs)
        loss_inputs = {k: grid_inputs[k] for k in ("old_logprobs", "advantages", "mask", "ref_logprobs",
                                                   "rollout_is_weights")}
        valid_grid = grid_inputs["mask"] if grid_inputs["mask"].dtype == torch.bool else grid_inputs["mask"] != 0
        lp_fill = torch.where(valid_grid, grid_inputs["old_logprobs"].detach().to(compute), 0.0)
        denominator = norm if norm is not None else _global_denominator(valid_grid, config, compute)
        make_grad_fn = _chunk_token_grads(grid, lp_fill, loss_inputs, config, denominator)
        M = targets.shape[0]
        logp_flat = torch.empty(M, dtype=compute, device=hidden.device)
        ent_flat = torch.empty(M, dtype=compute, device=hidden.device)
        with torch.no_grad():
            for start, end in chunks:
                h, y = tok.chunk(start, end), targets[start:end]
                checked = _checked_grad_fn(make_grad_fn(start, end), h, weight, bias, start, position)
                lp_c, ent_c, dz = ops.one_pass(h, weight, bias, y, inv_t, checked, weight.dtype)
                logp_flat[start:end], ent_flat[start:end] = lp_c, ent_c
                dh = None
                if grads.hidden is not None:
                    dh = torch.zeros(h.shape, dtype=grads.acc, device=h.device)
                grads.add_chunk(h, dz.t() if ops.vocab_major else dz, weight, 0, dh)
                if dh is not None:
                    grads.put_hidden(start, end, dh)
        logp_grid = grid.scatter(logp_flat)
        out = hadw_policy_loss(logp_grid, grid_inputs["old_logprobs"], grid_inputs["advantages"],
                               grid_inputs["mask"], config=config, ref_logprobs=grid_inputs["ref_logprobs"],
                               rollout_is_weights=grid_inputs["rollout_is_weights"], normalizer=norm,
                               backend=loss_backend)
        dh, dw, db = grads.results(weight, bias)
        loss = _LossWithGradients.apply(out.loss, hidden, weight, bias, None if dh is None else dh.view_as(hidden),
                                        dw, db)
        logprobs = _to_layout(logp_flat, grid, ids.shape[0], hidden.dim(), target_ids.shape)
        entropy = _to_layout(ent_flat, grid, ids.shape[0], hidden.dim(), target_ids.shape)
        ent_sum = ent_flat.sum()
    n_valid = max(int(targets.shape[0]), 1)
    metrics = dict(out.metrics)
    metrics["entropy"] = (ent_sum / n_valid).to(out.loss.dtype).detach()
    return HiddenLossOutput(loss=loss, advantages=out.advantages, phi=None, metrics=metrics, logprobs=logprobs,
                            entropy=entropy)


_CHECKED = ("old_logprobs", "ref_logprobs", "advantages", "rollout_is_weights")


def _checked_grad_fn(grad_fn, h, weight, bias, start, position):
    """Check a chunk's log-probs before its gradient is formed: non-finite hidden states fail here, clearly."""
    def run(logp, ent):
        _check_finite_logprobs(logp, h, weight, bias, lambda i: position(start + i))
        return grad_fn(logp, ent)

    return run


def _position_in(dim: int, shape, grid: _Grid):
    """Valid token number -> its position in target_ids (for error messages)."""
    def position(i: int):
        return _position(shape, int(grid.index[i]))

    return position


def _to_layout(values: torch.Tensor, grid: _Grid, n_all: int, dim: int, shape) -> torch.Tensor:
    """[M] per valid token (grid order) -> the layout of target_ids, 0 elsewhere."""
    return values.new_zeros(n_all).index_copy(0, grid.index, values).view(shape)


def _packed_inputs(valid, token_rows, advantages, per_token):
    """Packed [L] per-token tensors -> the [N, T] grid of the policy loss; advantages [N] stay per row."""
    L = valid.shape[0]
    if not isinstance(token_rows, torch.Tensor) or token_rows.shape != (L,):
        shape = tuple(token_rows.shape) if isinstance(token_rows, torch.Tensor) else type(token_rows).__name__
        raise ValueError(f"token_rows must be an integer tensor [L] = ({L},), got {shape}")
    if token_rows.dtype.is_floating_point or token_rows.dtype.is_complex or token_rows.dtype == torch.bool:
        raise ValueError(f"token_rows must be an integer tensor, got dtype {token_rows.dtype}")
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1:
        shape = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"packed layout: advantages must be [N] (one per row), got {shape}")
    n_rows = advantages.shape[0]
    if n_rows == 0:
        raise ValueError("empty batch: advantages has no rows")
    if token_rows.device != valid.device:
        raise ValueError(f"token_rows is on {token_rows.device} but mask is on {valid.device}")
    if not compiling():
        out = (token_rows < 0) | (token_rows >= n_rows)
        if bool((out & valid).any()):
            raise ValueError(f"token_rows has {int((out & valid).sum())} value(s) outside [0, N = {n_rows}) at valid "
                             f"positions")
    grid = _packed_grid(token_rows, valid, n_rows)
    out = {"advantages": advantages, "mask": grid.scatter(torch.ones_like(grid.cell, dtype=torch.bool), False)}
    for name, t in per_token.items():
        if t is None:
            out[name] = None
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != (L,):
            raise ValueError(f"packed layout: {name} has shape {tuple(t.shape)}; expected [L] = ({L},)")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        out[name] = grid.scatter(t.index_select(0, grid.index))
    return grid, out
