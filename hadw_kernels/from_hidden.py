"""The policy loss straight from the last hidden states and the LM head, without ever holding the [tokens x vocab]
logits: `hadw_policy_loss_from_hidden` (= `hadw_policy_loss` on the log-probs of `fused_linear_logprobs`, with the
entropy as a metric).

    >>> out = hadw_policy_loss_from_hidden(hidden, lm_head.weight, ids, old_logp, adv, mask, config=cfg)
    >>> out.loss.backward()                       # gradients reach hidden (so the model) and lm_head.weight

Two strategies, decided in one place (`_one_pass_chunks`):
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
T = the longest row). Only tokens with mask != 0 are computed; padding may hold anything. Chunk sizes and backends
as in `hadw_kernels.linear_logprobs`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hadw_kernels.config import LossConfig
from hadw_kernels.linear_logprobs import (
    LOGPROB_BACKENDS,
    ChunkPlan,
    _check_budget,
    _check_finite_logprobs,
    _check_head,
    _check_ids,
    _chunk_ops,
    _Grads,
    _position,
    _resolve_backend,
    _Tokens,
    _valid_mask,
    fused_linear_logprobs,
    plan_chunks,
)
from hadw_kernels.loss import hadw_policy_loss
from hadw_kernels.reference import LossOutput, compute_dtype, policy_loss_terms
from hadw_kernels.validation import (
    check_backend,
    check_config,
    check_token_inputs,
    compiling,
    nonfinite_suspects,
    raise_nonfinite,
    resolve_normalizer,
)


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
    """The loss value with gradients computed in the forward (the one-pass strategy): backward hands them on, scaled
    by the incoming gradient. They are kept on ctx, not saved for backward, and released when handed on unless the
    graph is retained: a second reference makes autograd copy a gradient instead of taking it as .grad, one more
    [V, H] weight gradient at the peak."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.grads = [grad_hidden, grad_weight, grad_bias]
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("hadw_policy_loss_from_hidden: trying to backward through the loss a second time; its "
                               "gradients were handed on and released by the first backward (pass retain_graph=True "
                               "to the first backward to keep them)")
        keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)()
        if not keep:
            ctx.grads = None
        one = not compiling() and bool(g == 1)
        out = [None if t is None else (t if one else t * g.to(t.dtype)) for t in grads]
        del grads
        return None, *out, None, None, None


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
    args = (hidden, weight, target_ids, old_logprobs, advantages, mask)
    kwargs = dict(bias=bias, temperature=temperature, config=config, ref_logprobs=ref_logprobs,
                  rollout_is_weights=rollout_is_weights, normalizer=normalizer, token_rows=token_rows,
                  memory_budget=memory_budget, backend=backend, loss_backend=loss_backend)
    if compiling():  # under a caller's torch.compile: a graph break, then eager (chunk loop, data-dependent shapes)
        return _eager_entry()(*args, **kwargs)
    return _loss_from_hidden(*args, **kwargs)


@functools.cache
def _eager_entry():
    """`_loss_from_hidden` behind torch.compiler.disable, made on first use under a compile: the decorator imports
    torch._dynamo, and that imports triton, which `import hadw_kernels` must not."""
    return torch.compiler.disable(_loss_from_hidden)


def _loss_from_hidden(hidden, weight, target_ids, old_logprobs, advantages, mask, *, bias, temperature, config,
                      ref_logprobs, rollout_is_weights, normalizer, token_rows, memory_budget, backend,
                      loss_backend) -> HiddenLossOutput:
    """`hadw_policy_loss_from_hidden` (its arguments, all given)."""
    inv_t = _check_head(hidden, weight, target_ids, bias, temperature)
    config = check_config(config)
    check_backend(backend, LOGPROB_BACKENDS)
    check_backend(loss_backend)
    budget = _check_budget(memory_budget, hidden.device)
    valid = _valid_mask(mask, target_ids)
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
    position = _position_in(target_ids.shape, grid)

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
        logprobs = _to_layout(logp_flat, grid, ids.shape[0], target_ids.shape)
        entropy = _to_layout(ent_flat, grid, ids.shape[0], target_ids.shape)
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


def _position_in(shape, grid: _Grid):
    """Valid token number -> its position in target_ids (for error messages)."""
    def position(i: int):
        return _position(shape, int(grid.index[i]))

    return position


def _to_layout(values: torch.Tensor, grid: _Grid, n_all: int, shape) -> torch.Tensor:
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
