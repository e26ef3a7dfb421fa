"""`HFRollout`: sampling with transformers' `generate` on the policy module itself (so there are no weights to sync)."""

from __future__ import annotations

from typing import Any

import torch

from hadw_trainer.rollout.engine import Generation, concat_generations, response_mask_from_ids


class HFRollout:
    """A `RolloutEngine` on `model.generate` (KV cache, left padding); sampling log-probs from the returned logits.

    Args:
        model: the full-weight policy (for fsdp2 / zero3 the synced replica, never the sharded module).
        tokenizer: left-padding tokenizer.
        chunk_prompts: prompts per `generate` call (0 = all at once); bounds generation memory on real models.
        sampling_logprobs: keep the sampling log-probs (needs the [N, T, vocab] logits from `generate`).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, chunk_prompts: int = 0,
                 sampling_logprobs: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.chunk_prompts = chunk_prompts
        self.sampling_logprobs = sampling_logprobs
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else tokenizer.eos_token_id
        self.eos_ids = eos if isinstance(eos, list) else [eos]

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: generation runs on the training module (or the replica the backend keeps synced)."""

    def sleep(self) -> None:
        """Nothing to release: the engine is the policy module."""

    def close(self) -> None:
        """Nothing to free."""

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
                          truncated=truncated).cpu()

    def generate(self, prompts: list[str], n: int, *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 top_k: int = 0, greedy: bool = False) -> Generation:
        step = self.chunk_prompts or len(prompts)
        parts = [self._generate_chunk(prompts[i:i + step], n, max_new_tokens, temperature, top_p, top_k, greedy)
                 for i in range(0, len(prompts), step)]
        return concat_generations(parts, self.tokenizer.pad_token_id)
