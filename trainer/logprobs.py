"""Per-token log-probs of sampled responses, and the policy loss on them, from the model's last hidden states and
its LM head through the library's from-hidden path: the old-policy, reference and policy passes of the update, with
the entropy of each position. The [rows, T, vocab] logits never exist, forward or backward: the head runs in chunks
sized by a memory budget (`hadw_kernels.fused_linear_logprobs`, `hadw_kernels.hadw_policy_loss_from_hidden`).

    scorer = PolicyScorer(model)                    # what the data-parallel backends wrap (trainer.parallel.backends)
    rows = ResponseRows.of(gen, slice(0, 16))       # prompt + response tokens of some rows
    lp, ent = response_logprobs(scorer, rows, temperature=1.0)                  # [16, T] each
    out = response_policy_loss(scorer, rows, old_lp, adv, temperature=1.0, config=cfg, normalizer=n)
    out.loss.backward()                             # out.metrics["entropy"]: the policy's, over valid tokens
    old, ent = batch_logprobs(scorer, gen, rows_per_call=64, temperature=1.0)   # [N, T] each, no grad, in calls

Why a module: the head has to run inside the forward of whatever wraps the policy. DDP reduces only the gradients
of a backward its own forward prepared; FSDP2 holds the root's parameters (embeddings, LM head) unsharded during the
root's forward and from its pre-backward hook on; ZeRO-3 gathers a parameter that a module uses outside its owner
only inside the engine's forward, and again for the backward when it is registered on that module (the backends do,
for the LM head's weight). So the scorer's forward runs the transformer body and the head together, and every
backend wraps the scorer. (The chunked LM-head pass this replaces called the body and the head separately, outside
the wrapper: DDP and FSDP2 could not follow it and ZeRO-3 hung.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hadw_kernels import HiddenLossOutput, LossConfig, fused_linear_logprobs, hadw_policy_loss_from_hidden
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


@dataclass
class PolicyLossInputs:
    """What the policy pass needs besides the rows: the arguments of `hadw_policy_loss_from_hidden`."""

    old_logprobs: torch.Tensor
    """[n, T] log-probs before the update (the rows' slice of the old pass)."""
    advantages: torch.Tensor
    """[n] the rows' advantages (detached)."""
    config: LossConfig
    normalizer: float | None = None
    """The aggregation denominator of the whole mini-batch over ranks (None: this call's own)."""
    ref_logprobs: torch.Tensor | None = None
    """[n, T] the reference policy's log-probs (KL penalty), or None."""
    backend: str = "auto"
    """The `hadw_policy_loss` backend of the loss value and metrics."""


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token is at 0 (what `generate` uses)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyScorer(torch.nn.Module):
    """A causal LM seen as a scorer of sampled responses: one forward from the tokens to the responses' log-probs
    and entropy (old / ref passes) or to the policy loss (the policy pass), the LM head always through the
    from-hidden path. Holds the model as `.model` (parameter names gain the prefix "model.")."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def head_weight(self) -> torch.Tensor:
        """[V, H] the LM head's weight (the input embedding's when they are tied)."""
        return self.model.get_output_embeddings().weight

    def forward(self, rows: ResponseRows, temperature: float, memory_budget: int | None = None,
                loss: PolicyLossInputs | None = None) -> dict[str, Any]:
        """{"logprobs", "entropy"} [n, T] (0 where response_mask is 0) of `rows` at `temperature`; with `loss`
        also {"loss": 0-d differentiable, "metrics": `hadw_policy_loss`'s + "entropy"}. A dict: the backends'
        hooks (ZeRO-3's pre-backward gathering, FSDP2's) find the tensors of a dict, not of a dataclass."""
        ids = torch.cat([rows.prompt_ids, rows.response_ids], dim=1)
        attn = torch.cat([rows.prompt_mask, rows.response_mask], dim=1).long()
        T = rows.response_ids.shape[1]
        out = self.model.base_model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn),
                                    use_cache=False)
        hidden = out.last_hidden_state[:, -(T + 1):-1]  # [n, T, H]: position t predicts response token t
        head = self.model.get_output_embeddings()
        common = dict(bias=head.bias, temperature=temperature, memory_budget=memory_budget)
        if loss is None:
            lp = fused_linear_logprobs(hidden, head.weight, rows.response_ids, mask=rows.response_mask, **common)
            return {"logprobs": lp.logprobs, "entropy": lp.entropy}
        res = hadw_policy_loss_from_hidden(
            hidden, head.weight, rows.response_ids, loss.old_logprobs, loss.advantages, rows.response_mask,
            config=loss.config, ref_logprobs=loss.ref_logprobs, normalizer=loss.normalizer, loss_backend=loss.backend,
            **common)
        return {"loss": res.loss, "logprobs": res.logprobs, "entropy": res.entropy, "metrics": res.metrics}


def as_scorer(model: torch.nn.Module) -> torch.nn.Module:
    """`model` when it is a `PolicyScorer` or a backend's wrapper of one (DDP, DeepSpeed engine: `.module`; FSDP2
    shards it in place); else a `PolicyScorer` around it (a plain HF causal LM, e.g. the reference policy)."""
    if isinstance(model, PolicyScorer) or isinstance(getattr(model, "module", None), PolicyScorer):
        return model
    return PolicyScorer(model)


def response_logprobs(model: torch.nn.Module, rows: ResponseRows, temperature: float = 1.0,
                      memory_budget: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(response token | prefix), entropy of the next-token distribution) at `temperature`, each [n, T]
    fp32 and 0 where response_mask is 0; differentiable when grad is enabled. `model`: a scorer, a backend's
    wrapper of one, or a plain HF causal LM; `memory_budget`: bytes of LM-head chunk temporaries (None: the
    library's default for the device)."""
    out = as_scorer(model)(rows=rows, temperature=temperature, memory_budget=memory_budget)
    return out["logprobs"], out["entropy"]


def response_policy_loss(model: torch.nn.Module, rows: ResponseRows, old_logprobs: torch.Tensor,
                         advantages: torch.Tensor, *, temperature: float, config: LossConfig,
                         normalizer: float | None = None, ref_logprobs: torch.Tensor | None = None,
                         backend: str = "auto", memory_budget: int | None = None) -> HiddenLossOutput:
    """`hadw_policy_loss` of the rows' responses under `model` (as in `response_logprobs`), computed from the
    hidden states: the loss (differentiable w.r.t. the model), its metrics with "entropy" (the mean over valid
    tokens of the policy being trained), and the detached [n, T] log-probs and entropy.

    The library's one-pass strategy computes each chunk's logits once and pushes the loss's per-token gradient
    through the head right there (three matmuls, as for materialised logits; exact for token-level ratios, and
    for GSPO's sequence ratio when chunks hold whole rows); otherwise it takes two passes, log-probs then loss,
    recomputing each chunk in the backward. Either way at most one chunk of logits is alive."""
    inputs = PolicyLossInputs(old_logprobs, advantages, config, normalizer, ref_logprobs, backend)
    out = as_scorer(model)(rows=rows, temperature=temperature, memory_budget=memory_budget, loss=inputs)
    return HiddenLossOutput(loss=out["loss"], advantages=advantages, phi=None, metrics=out["metrics"],
                            logprobs=out["logprobs"], entropy=out["entropy"])


@torch.no_grad()
def batch_logprobs(model: torch.nn.Module, gen: Generation, rows_per_call: int, temperature: float,
                   memory_budget: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, T] log-probs, [N, T] entropy) of every sampled response under `model` in eval mode (the policy before
    the update: the old log-probs; or the reference policy), `rows_per_call` rows at a time, on the CPU."""
    scorer = as_scorer(model)
    was_training = scorer.training
    scorer.eval()
    device = next(scorer.parameters()).device
    lp_all = torch.zeros(gen.response_ids.shape, dtype=torch.float32)
    ent_all = torch.zeros(gen.response_ids.shape, dtype=torch.float32)
    try:
        for i in range(0, gen.response_ids.shape[0], rows_per_call):
            sl = slice(i, i + rows_per_call)
            lp, ent = response_logprobs(scorer, ResponseRows.of(gen, sl, device), temperature, memory_budget)
            lp_all[sl, :lp.shape[1]] = lp.float().cpu()
            ent_all[sl, :ent.shape[1]] = ent.float().cpu()
    finally:
        scorer.train(was_training)
    return lp_all, ent_all
