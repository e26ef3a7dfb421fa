"""Per-token log-probs of sampled responses under a model: the one computation behind the old-policy pass, the
reference pass and the policy pass of the update.

    rows = ResponseRows.of(gen, slice(0, 16))           # prompt + response tokens of some rows
    lp = response_logprobs(model, rows, temperature=1.0)                  # [16, T], differentiable
    lp, ent = response_logprobs(model, rows, 1.0, with_entropy=True)      # + [16, T] entropy of each position
    old = batch_logprobs(model, gen, rows_per_call=64, temperature=1.0)   # [N, T], no grad, in chunks

The model runs once on prompt + response; only the last T + 1 positions reach the LM head. Two ways from there,
chosen by `chunk_tokens`: the whole [N, T, vocab] logits at once (0), or the LM head + log-softmax on that many
tokens at a time under activation checkpointing, so the logits never exist at once, forward or backward (real
models: vocab ~150k). A fused hidden-states -> log-probs kernel slots in at `logprobs_from_hidden`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from hadw_trainer.rollout.engine import Generation


@dataclass
class ResponseRows:
    """Some rows of a `Generation`, trimmed to their longest response (the rest is padding)."""

    prompt_ids: torch.Tensor
    """[n, P] left-padded prompt tokens."""
    prompt_mask: torch.Tensor
    """[n, P] 1 on prompt tokens."""
    response_ids: torch.Tensor
    """[n, T] right-padded response tokens."""
    response_mask: torch.Tensor
    """[n, T] 1 on response tokens."""

    @classmethod
    def of(cls, gen: Generation, rows: slice | torch.Tensor, device: torch.device | None = None) -> ResponseRows:
        mask = gen.response_mask[rows]
        width = max(1, int(mask.sum(-1).max()))  # right padding common to these rows is dropped (masked anyway)
        parts = (gen.prompt_ids[rows], gen.prompt_mask[rows], gen.response_ids[rows, :width], mask[:, :width])
        return cls(*(t.to(device) if device is not None else t for t in parts))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token is at 0 (what `generate` uses)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                   with_entropy: bool) -> torch.Tensor:
    """[n] log-prob of each target (and [n] entropy, stacked as [2, n]) from [n, H] hidden states."""
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return lp
    return torch.stack([lp, -(logp.exp() * logp).sum(-1)])


def logprobs_from_hidden(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                         chunk_tokens: int = 0, with_entropy: bool = False) -> torch.Tensor:
    """[n] log pi(target) from [n, H] hidden states and the LM head ([2, n] with the entropy when asked), at
    `temperature`. With `chunk_tokens` > 0 the head runs on that many rows at a time, checkpointed when grad flows."""
    if chunk_tokens <= 0:
        return _head_logprobs(head, hidden, targets, temperature, with_entropy)
    parts = []
    for i in range(0, hidden.shape[0], chunk_tokens):
        sl = slice(i, i + chunk_tokens)
        if torch.is_grad_enabled() and hidden.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(_head_logprobs, head, hidden[sl], targets[sl], temperature,
                                                           with_entropy, use_reentrant=False))
        else:
            parts.append(_head_logprobs(head, hidden[sl], targets[sl], temperature, with_entropy))
    return torch.cat(parts, dim=-1)


def response_logprobs(model: torch.nn.Module, rows: ResponseRows, temperature: float = 1.0, chunk_tokens: int = 0,
                      with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(response token | prefix) at `temperature` -> [n, T] fp32, 0 where response_mask is 0; with
    `with_entropy` also the [n, T] entropy of the next-token distribution at each response position.

    `model` is what training forwards run through (a DDP / FSDP2 / DeepSpeed wrapper, or the HF model). The
    one-shot path (`chunk_tokens` = 0) calls its forward with `logits_to_keep=T + 1`, so wrappers see an ordinary
    forward; the chunked path calls the base model and the LM head separately (backends single and zero2).
    """
    ids = torch.cat([rows.prompt_ids, rows.response_ids], dim=1)
    attn = torch.cat([rows.prompt_mask, rows.response_mask], dim=1).long()
    n, T = rows.response_ids.shape
    pos = position_ids(attn)
    mask = rows.response_mask.float()
    if chunk_tokens <= 0:
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1, use_cache=False)
        logits = out.logits[:, :-1].float()  # [n, T, V]: position t predicts response token t
        if temperature != 1.0:
            logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1)
        lp = logp.gather(-1, rows.response_ids.unsqueeze(-1)).squeeze(-1) * mask
        if not with_entropy:
            return lp
        return lp, -(logp.exp() * logp).sum(-1) * mask
    hidden = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    h = hidden[:, -(T + 1):-1].reshape(n * T, hidden.shape[-1])
    out = logprobs_from_hidden(model.get_output_embeddings(), h, rows.response_ids.reshape(-1), temperature,
                               chunk_tokens, with_entropy)
    if not with_entropy:
        return out.view(n, T) * mask
    return out[0].view(n, T) * mask, out[1].view(n, T) * mask


@torch.no_grad()
def batch_logprobs(model: torch.nn.Module, gen: Generation, rows_per_call: int, temperature: float,
                   chunk_tokens: int = 0, with_entropy: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """[N, T] log-probs of every sampled response under `model` in eval mode (the policy before the update: the old
    log-probs; or the reference policy), `rows_per_call` rows at a time; with `with_entropy` also [N, T] entropy."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lp_all = torch.zeros(gen.response_ids.shape, dtype=torch.float32)
    ent_all = torch.zeros(gen.response_ids.shape, dtype=torch.float32) if with_entropy else None
    try:
        for i in range(0, gen.response_ids.shape[0], rows_per_call):
            sl = slice(i, i + rows_per_call)
            out = response_logprobs(model, ResponseRows.of(gen, sl, device), temperature, chunk_tokens, with_entropy)
            lp, ent = out if with_entropy else (out, None)
            lp_all[sl, :lp.shape[1]] = lp.float().cpu()
            if ent_all is not None:
                ent_all[sl, :ent.shape[1]] = ent.float().cpu()
    finally:
        model.train(was_training)
    return (lp_all, ent_all) if with_entropy else lp_all
