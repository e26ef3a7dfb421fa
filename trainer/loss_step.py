"""The update: old log-probs recomputed by the policy, then mini-batch optimizer steps over micro-batches.

Splits are always on group boundaries (the loss computes group statistics from the rewards it is given). For
each mini-batch the aggregation denominator is summed over its micro-batches and all ranks first and handed to
`hadw_loss(normalizer=...)`, so the accumulated gradient equals the gradient of the whole mini-batch's loss in
one call, whatever the micro-batch size or the number of ranks (the loss runs no collective itself).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from hadw_kernels import LossConfig, hadw_loss, loss_normalizer
from hadw_trainer import distributed as dist
from hadw_trainer.model import response_logprobs
from hadw_trainer.parallel import Parallel
from hadw_trainer.rollout import Generation


def group_slices(num_prompts: int, prompts_per_slice: int, group_size: int) -> list[slice]:
    """Row slices holding `prompts_per_slice` whole groups each (the last may hold fewer)."""
    rows = prompts_per_slice * group_size
    return [slice(i, min(i + rows, num_prompts * group_size)) for i in range(0, num_prompts * group_size, rows)]


def _rows(gen: Generation, sl: slice) -> tuple[torch.Tensor, ...]:
    mask = gen.response_mask[sl]
    width = max(1, int(mask.sum(-1).max()))  # trim right padding common to the micro-batch (masked anyway)
    return gen.prompt_ids[sl], gen.prompt_mask[sl], gen.response_ids[sl, :width], mask[:, :width]


@torch.no_grad()
def batch_logprobs(model: torch.nn.Module, gen: Generation, rows_per_call: int, temperature: float,
                   chunk_tokens: int = 0) -> torch.Tensor:
    """[N, T] log-probs of the sampled responses under `model` (the policy before the update = old log-probs, or
    the reference policy), computed in chunks of whole groups."""
    was_training = model.training
    model.eval()
    out = torch.zeros(gen.response_ids.shape, dtype=torch.float32)
    try:
        for i in range(0, gen.response_ids.shape[0], rows_per_call):
            sl = slice(i, i + rows_per_call)
            p_ids, p_mask, r_ids, r_mask = _rows(gen, sl)
            lp = response_logprobs(model, p_ids, p_mask, r_ids, r_mask, temperature, chunk_tokens)
            out[sl, :lp.shape[1]] = lp.float().cpu()
    finally:
        model.train(was_training)
    return out


def update(
    par: Parallel, gen: Generation, rewards: torch.Tensor,
    old_logprobs: torch.Tensor, prior: float, loss_cfg: LossConfig, *, group_size: int, mini_prompts: int,
    micro_prompts: int, epochs: int, grad_clip: float, temperature: float, backend: str,
    ref_logprobs: torch.Tensor | None = None, chunk_tokens: int = 0,
) -> dict[str, Any]:
    """All optimizer steps of one RL step on this rank's rollout batch, through the backend `par` (which owns the
    wrapped model, the optimizer and the cross-rank gradient reduction). Returns metrics averaged over the optimizer
    steps (this rank; the loop reduces them over ranks). `loss` is the mean mini-batch loss."""
    model = par.model
    G = group_size
    n_prompts = rewards.numel() // G
    device = next(par.rollout_module.parameters()).device
    sums: dict[str, float] = defaultdict(float)
    n_updates = 0
    for _ in range(epochs):
        for mini in group_slices(n_prompts, mini_prompts, G):
            micro = [slice(mini.start + s.start, mini.start + s.stop)
                     for s in group_slices((mini.stop - mini.start) // G, micro_prompts, G)]
            local = sum(loss_normalizer(gen.response_mask[s], loss_cfg) for s in micro)
            normalizer = dist.all_reduce_sum(torch.tensor([local], dtype=torch.float64)).item()
            par.zero_grad()
            mini_loss, mini_metrics = 0.0, defaultdict(float)
            for i, s in enumerate(micro):
                p_ids, p_mask, r_ids, r_mask = (t.to(device) for t in _rows(gen, s))
                T = r_ids.shape[1]
                with par.accumulating(last=i == len(micro) - 1):
                    lp = response_logprobs(model, p_ids, p_mask, r_ids, r_mask, temperature, chunk_tokens)
                    out = hadw_loss(
                        lp, old_logprobs[s, :T].to(device), rewards[s].to(device), r_mask, group_size=G,
                        anchor=prior, config=loss_cfg, normalizer=max(normalizer, 1.0),
                        ref_logprobs=None if ref_logprobs is None else ref_logprobs[s, :T].to(device),
                        backend=backend,
                    )
                    par.backward(out.loss)
                mini_loss += out.loss.item()
                for k, v in out.metrics.items():
                    mini_metrics[k] += float(v) / len(micro)
            gnorm = par.step(grad_clip)
            n_updates += 1
            sums["loss"] += mini_loss
            sums["grad_norm"] += float(gnorm)
            for k, v in mini_metrics.items():
                if k not in ("num_tokens", "num_seqs"):
                    sums[k] += v
    par.zero_grad()
    out_metrics = {k: v / max(1, n_updates) for k, v in sums.items()}
    out_metrics["optimizer_steps"] = n_updates
    return out_metrics
