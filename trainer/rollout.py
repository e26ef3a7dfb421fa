"""Rollout: prompts x G -> response token ids, masks and sampling log-probs, behind a small interface.

`RolloutEngine` is what the loop needs; `HFRollout` implements it with transformers' `generate` on the policy
module itself (so there is no weight sync to do). The distributed issue adds a vLLM engine behind the same
interface. Rows of one prompt's group are contiguous: rows g*G ... g*G+G-1 belong to prompt g.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from hadw_trainer.tasks import Problem


@dataclass
class Generation:
    """What an engine returns for P prompts x n samples (N = P * n rows)."""

    prompt_ids: torch.Tensor
    """[N, P_len] left-padded prompt tokens (each prompt repeated n times, contiguous)."""
    prompt_mask: torch.Tensor
    """[N, P_len] 1 on real prompt tokens."""
    response_ids: torch.Tensor
    """[N, T] right-padded response tokens (up to and including EOS)."""
    response_mask: torch.Tensor
    """[N, T] 1 on response tokens (EOS included), 0 on padding after it."""
    sampling_logprobs: torch.Tensor | None = None
    """[N, T] log-probs under the sampling distribution (at the sampling temperature); None for greedy."""
    texts: list[str] = field(default_factory=list)
    """N decoded responses (special tokens removed)."""
    truncated: torch.Tensor | None = None
    """[N] bool: the response hit max_new_tokens without EOS."""


class RolloutEngine(Protocol):
    """The interface the loop uses. `sync_weights` runs after every optimizer update that a rollout will see."""

    def generate(self, prompts: list[str], n: int, *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 top_k: int = 0, greedy: bool = False) -> Generation: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including the first EOS; also returns [N] bool 'no EOS' (truncated)."""
    eos_ids = torch.as_tensor(eos_id if isinstance(eos_id, (list, tuple)) else [eos_id], device=response_ids.device)
    is_eos = torch.isin(response_ids, eos_ids)
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # an EOS strictly before this position
    return (~seen_before).long(), ~is_eos.any(-1)


class HFRollout:
    """Sampling with `model.generate` (KV cache, left padding); log-probs from the returned raw logits."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, chunk_prompts: int = 0,
                 sampling_logprobs: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.chunk_prompts = chunk_prompts  # 0: all prompts in one generate call
        self.sampling_logprobs = sampling_logprobs  # needs the [N, T, V] logits from generate
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else tokenizer.eos_token_id
        self.eos_ids = eos if isinstance(eos, list) else [eos]

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: generation runs on the training module itself."""

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float, top_p: float,
                        top_k: int, greedy: bool) -> Generation:
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(self.model.parameters()).device
        ids, attn = enc.input_ids.to(device), enc.attention_mask.to(device)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                      eos_token_id=self.eos_ids, return_dict_in_generate=True)
        if greedy:
            kwargs.update(do_sample=False, num_return_sequences=1)
            n = 1
        else:
            kwargs.update(do_sample=True, num_return_sequences=n, temperature=temperature, top_p=top_p,
                          top_k=top_k if top_k > 0 else None, output_logits=self.sampling_logprobs)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(input_ids=ids, attention_mask=attn, **kwargs)
        finally:
            self.model.train(was_training)
        P = ids.shape[1]
        resp = out.sequences[:, P:]
        mask, truncated = response_mask_from_ids(resp, self.eos_ids)
        resp = torch.where(mask.bool(), resp, torch.full_like(resp, tok.pad_token_id))
        slp = None
        if not greedy and self.sampling_logprobs:
            logits = torch.stack(out.logits, dim=1).float() / temperature  # [N, T, V] raw logits of each step
            slp = torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1) * mask
        texts = tok.batch_decode(resp * mask + tok.pad_token_id * (1 - mask), skip_special_tokens=True)
        return Generation(prompt_ids=ids.repeat_interleave(n, 0), prompt_mask=attn.repeat_interleave(n, 0),
                          response_ids=resp, response_mask=mask, sampling_logprobs=slp, texts=texts,
                          truncated=truncated)

    def generate(self, prompts: list[str], n: int, *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 top_k: int = 0, greedy: bool = False) -> Generation:
        step = self.chunk_prompts or len(prompts)
        parts = [self._generate_chunk(prompts[i:i + step], n, max_new_tokens, temperature, top_p, top_k, greedy)
                 for i in range(0, len(prompts), step)]
        return concat_generations(parts, self.tokenizer.pad_token_id)


def _pad_cat(tensors: list[torch.Tensor], value: int | float, left: bool) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = width - t.shape[1]
        if pad:
            fill = torch.full((t.shape[0], pad), value, dtype=t.dtype, device=t.device)
            t = torch.cat([fill, t] if left else [t, fill], dim=1)
        out.append(t)
    return torch.cat(out, dim=0)


def concat_generations(parts: list[Generation], pad_id: int) -> Generation:
    """Stack generations row-wise (prompts re-padded on the left, responses on the right)."""
    if len(parts) == 1:
        return parts[0]
    slp = None
    if all(p.sampling_logprobs is not None for p in parts):
        slp = _pad_cat([p.sampling_logprobs for p in parts], 0.0, left=False)
    return Generation(
        prompt_ids=_pad_cat([p.prompt_ids for p in parts], pad_id, left=True),
        prompt_mask=_pad_cat([p.prompt_mask for p in parts], 0, left=True),
        response_ids=_pad_cat([p.response_ids for p in parts], pad_id, left=False),
        response_mask=_pad_cat([p.response_mask for p in parts], 0, left=False),
        sampling_logprobs=slp, texts=[t for p in parts for t in p.texts],
        truncated=torch.cat([p.truncated for p in parts]) if all(p.truncated is not None for p in parts) else None,
    )


def select_rows(gen: Generation, rows: torch.Tensor | list[int]) -> Generation:
    """The sub-batch with these rows (keep whole groups: callers pass group-aligned rows)."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    return Generation(
        prompt_ids=gen.prompt_ids[idx], prompt_mask=gen.prompt_mask[idx], response_ids=gen.response_ids[idx],
        response_mask=gen.response_mask[idx],
        sampling_logprobs=None if gen.sampling_logprobs is None else gen.sampling_logprobs[idx],
        texts=[gen.texts[i] for i in idx.tolist()],
        truncated=None if gen.truncated is None else gen.truncated[idx],
    )


def format_prompt(problem: Problem, template: str, tokenizer: Any = None, chat: bool = False) -> str:
    """Apply the prompt template (and the tokenizer's chat template for instruct models)."""
    text = template.replace("{question}", problem.question)
    if chat:
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("task.chat_template=true but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text
