"""What every rollout engine returns (`Generation`) and the interface the loop drives (`RolloutEngine`).

Engines: `HFRollout` (transformers `generate` on the policy module itself, `hf_engine`) and `VLLMRollout` (a
colocated vLLM engine per rank, `vllm_engine`). Rows of one prompt's group are contiguous: rows g*n ... g*n+n-1
belong to prompt g.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Generation:
    """What an engine returns for P prompts x n samples (N = P * n rows); every tensor on the CPU, where rewards,
    masks and metrics are computed (the update moves each micro-batch to the policy's device itself)."""

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

    def cpu(self) -> Generation:
        """The same generation with every tensor on the CPU (a no-op for CPU tensors)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).cpu() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


class RolloutEngine(Protocol):
    """The interface the loop drives, once per RL step: `generate` (rollout), `sleep` (before the update), then
    `sync_weights` (after it); `close` at the end."""

    def generate(self, prompts: list[str], n: int, *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 top_k: int = 0, greedy: bool = False) -> Generation:
        """n samples per prompt (1 when greedy), groups contiguous, tensors on the CPU."""
        ...

    def sleep(self) -> None:
        """Release memory the update needs (vLLM on a GPU: its weights and KV cache); a no-op where nothing is held."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the next `generate` sample from `model`'s current weights (after every optimizer update)."""
        ...

    def close(self) -> None:
        """Free the engine at the end of the run."""
        ...


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including the first EOS; also returns [N] bool 'no EOS' (truncated)."""
    eos_ids = torch.as_tensor(eos_id if isinstance(eos_id, (list, tuple)) else [eos_id], device=response_ids.device)
    is_eos = torch.isin(response_ids, eos_ids)
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # an EOS strictly before this position
    return (~seen_before).long(), ~is_eos.any(-1)


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
    """The sub-batch with these rows, in this order."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    return Generation(
        prompt_ids=gen.prompt_ids[idx], prompt_mask=gen.prompt_mask[idx], response_ids=gen.response_ids[idx],
        response_mask=gen.response_mask[idx],
        sampling_logprobs=None if gen.sampling_logprobs is None else gen.sampling_logprobs[idx],
        texts=[gen.texts[i] for i in idx.tolist()],
        truncated=None if gen.truncated is None else gen.truncated[idx],
    )
