"""The update of one RL step: optimizer steps over mini-batches of this rank's rollout batch, each accumulated
over micro-batches with the library's policy loss from the hidden states (`hadw_policy_loss_from_hidden`, through
`hadw_trainer.logprobs.response_policy_loss`: no [rows, T, vocab] logits) on advantages computed beforehand.

The advantages come from the whole batch (every rank's rewards, `hadw_advantages` in the loop), so a micro-batch
may hold any rows: the split needs no group boundaries. For each mini-batch the aggregation denominator is summed
over its micro-batches and all ranks first and handed to the loss as `normalizer`, so the accumulated gradient
equals the gradient of the whole mini-batch's loss in one call, whatever the micro-batch size or the number of
ranks (the loss runs no collective itself).
"""

from __future__ import annotations

import torch

from hadw_kernels import LossConfig, loss_normalizer
from hadw_trainer.logprobs import ResponseRows, response_policy_loss
from hadw_trainer.observe.logger import StepSums
from hadw_trainer.parallel import process_group as dist
from hadw_trainer.parallel.backends import Parallel
from hadw_trainer.rollout.engine import Generation

# Loss metrics aggregated like the loss itself (with the global normaliser): summed over micro-batches. Counts are
# reported from the rollout batch instead. Every other loss metric is a mean over the call's valid tokens (so is
# "entropy": the policy being trained, at the sampling temperature), averaged over the step's tokens.
_SUMMED = ("pg_loss", "kl_loss")
_SKIPPED = ("num_tokens", "num_seqs", "response_len_mean")


def row_slices(n_rows: int, rows_per_slice: int) -> list[slice]:
    """Consecutive slices of `rows_per_slice` rows (the last may be shorter)."""
    return [slice(i, min(i + rows_per_slice, n_rows)) for i in range(0, n_rows, rows_per_slice)]


def update(par: Parallel, gen: Generation, advantages: torch.Tensor, old_logprobs: torch.Tensor,
           loss_cfg: LossConfig, sums: StepSums, *, mini_rows: int, micro_rows: int, epochs: int, grad_clip: float,
           temperature: float, backend: str, ref_logprobs: torch.Tensor | None = None,
           memory_budget: int | None = None) -> int:
    """Every optimizer step of one RL step on this rank's rows, through the backend `par` (which owns the wrapped
    model, the optimizer and the cross-rank gradient reduction). Adds the loss, gradient norm and loss metrics to
    `sums` (reduced over ranks by the caller); returns the number of optimizer steps.

    Args:
        gen: this rank's rollout rows [N, ...] (CPU).
        advantages: [N] this rank's rows of the batch's advantages (detached).
        old_logprobs: [N, T] the log-probs before this step's first update (`ref_logprobs` likewise).
        mini_rows: rows of this rank per optimizer step; `micro_rows`: rows per forward / backward.
        backend: the `hadw_policy_loss` backend; memory_budget: bytes of LM-head chunk temporaries (None: the
            library's default for the device).
    """
    device = next(par.rollout_module.parameters()).device
    world = dist.world_size()
    n_updates = 0
    for _ in range(epochs):
        for mini in row_slices(advantages.numel(), mini_rows):
            micro = [slice(mini.start + s.start, mini.start + s.stop) for s in row_slices(mini.stop - mini.start,
                                                                                         micro_rows)]
            local = sum(loss_normalizer(gen.response_mask[s], loss_cfg) for s in micro)
            normalizer = max(1.0, dist.all_reduce_sum(torch.tensor([local], dtype=torch.float64)).item())
            par.zero_grad()
            loss = 0.0
            for i, s in enumerate(micro):
                rows = ResponseRows.of(gen, s, device)
                T = rows.response_ids.shape[1]
                with par.accumulating(last=i == len(micro) - 1):
                    out = response_policy_loss(
                        par.model, rows, old_logprobs[s, :T].to(device), advantages[s].to(device),
                        temperature=temperature, config=loss_cfg, normalizer=normalizer, backend=backend,
                        ref_logprobs=None if ref_logprobs is None else ref_logprobs[s, :T].to(device),
                        memory_budget=memory_budget)
                    par.backward(out.loss)
                loss += out.loss.item()
                n_tok = float(out.metrics["num_tokens"])
                for k, v in out.metrics.items():
                    if k in _SUMMED:
                        sums.add(k, float(v), 1.0 / world / len(micro))  # ranks and micro-batches add up
                    elif k not in _SKIPPED:
                        sums.add(k, float(v) * n_tok, n_tok)
            grad_norm = par.step(grad_clip)
            n_updates += 1
            sums.add("loss", loss, 1.0 / world)  # each rank holds its share of the mini-batch loss
            sums.add("grad_norm", grad_norm / world, 1.0 / world)  # already global: the same on every rank
    par.zero_grad()
    return n_updates
