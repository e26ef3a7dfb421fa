"""One step's rollout batch: draw prompts -> sample G responses each -> score them -> (DAPO dynamic sampling:
drop groups whose rewards are all equal and refill). The advantages are computed afterwards, once, from every
rank's rewards (`hadw_trainer.loop.rl_step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hadw_trainer.config import JobConfig
from hadw_trainer.data.rewards import REWARD_FNS, overlong_penalty
from hadw_trainer.data.tasks import Problem, PromptSource, format_prompt
from hadw_trainer.parallel import process_group as dist
from hadw_trainer.rollout.engine import Generation, RolloutEngine, concat_generations, select_rows


@dataclass
class RolloutBatch:
    """One rank's share of a step's rollout batch, groups contiguous (rows g*G ... g*G+G-1 = prompt g). Every rank
    holds the same number of rows."""

    gen: Generation
    """Token ids, masks, sampling log-probs, texts (CPU)."""
    problems: list[Problem]
    """One per prompt (per group)."""
    rewards: torch.Tensor
    """[N] float32 rewards (after overlong shaping, when on): what the advantages are computed from."""
    correct: torch.Tensor
    """[N] float32 task reward before shaping (what accuracy means)."""
    sampled_rewards: torch.Tensor
    """Rewards of every response sampled this step on this rank, dynamic-sampling drops included (the anchor's
    y_t is their mean over all ranks); `rewards` itself without dynamic sampling."""
    dropped_groups: int = 0
    """Groups removed by dynamic sampling (this rank)."""

    @property
    def group_size(self) -> int:
        return self.rewards.numel() // len(self.problems)

    @property
    def levels(self) -> torch.Tensor:
        """[N] int64 difficulty level of each row's prompt (0 where unknown)."""
        lv = torch.tensor([p.level if p.level is not None else 0 for p in self.problems], dtype=torch.long)
        return lv.repeat_interleave(self.group_size)


def _score(gen: Generation, problems: list[Problem], G: int, cfg: JobConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """([N] shaped rewards, [N] task rewards) of the responses; row i answers problems[i // G]."""
    fn = REWARD_FNS[cfg.task.reward]
    correct = torch.tensor([fn(text, problems[i // G].answer) for i, text in enumerate(gen.texts)],
                           dtype=torch.float32)
    r = cfg.rollout
    shaped = correct + overlong_penalty(gen.response_mask.sum(-1), r.max_new_tokens, r.overlong_buffer,
                                        r.overlong_penalty)
    return shaped, correct


def _sample(source: PromptSource, engine: RolloutEngine, tokenizer: Any, cfg: JobConfig) -> RolloutBatch:
    """The next global batch of prompts; this rank samples and scores its slice."""
    r = cfg.rollout
    per_rank = r.prompts_per_step // dist.world_size()
    rank = dist.rank()
    problems = source.draw(r.prompts_per_step)[rank * per_rank:(rank + 1) * per_rank]
    prompts = [format_prompt(p, cfg.task.prompt_template, tokenizer, cfg.task.chat_template) for p in problems]
    gen = engine.generate(prompts, r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                          top_p=r.top_p, top_k=r.top_k)
    rewards, correct = _score(gen, problems, r.group_size, cfg)
    return RolloutBatch(gen=gen, problems=problems, rewards=rewards, correct=correct, sampled_rewards=rewards)


def _informative(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """[P] bool: the group's rewards are not all equal (it carries a learning signal)."""
    g = rewards.view(-1, G)
    return (g.max(-1).values - g.min(-1).values) > 0


def collect(source: PromptSource, engine: RolloutEngine, tokenizer: Any, cfg: JobConfig) -> RolloutBatch:
    """This rank's rollout batch for one step.

    With `rollout.dynamic_sampling`, groups whose rewards are all equal are dropped and new prompts are drawn
    (every rank draws in lockstep, so the prompt cursor stays identical) until every rank has its share or
    `max_refill_rounds` is spent; the remainder is then filled with dropped groups (their advantage is zero), so
    every rank keeps the same batch shape and the same number of optimizer steps.
    """
    batch = _sample(source, engine, tokenizer, cfg)
    if not cfg.rollout.dynamic_sampling:
        return batch
    G = cfg.rollout.group_size
    want = len(batch.problems)
    parts = [batch]
    for _ in range(cfg.rollout.max_refill_rounds):
        kept = sum(int(_informative(p.rewards, G).sum()) for p in parts)
        if dist.all_reduce_max(torch.tensor([float(max(0, want - kept))])).item() == 0:
            break
        parts.append(_sample(source, engine, tokenizer, cfg))
    gen = concat_generations([p.gen for p in parts], tokenizer.pad_token_id)
    problems = [q for p in parts for q in p.problems]
    rewards = torch.cat([p.rewards for p in parts])
    correct = torch.cat([p.correct for p in parts])
    info = _informative(rewards, G)
    order = torch.cat([info.nonzero().flatten(), (~info).nonzero().flatten()])[:want]  # informative groups first
    order = order.sort().values  # keep the original prompt order among the chosen groups
    rows = (order[:, None] * G + torch.arange(G)).flatten()
    return RolloutBatch(gen=select_rows(gen, rows), problems=[problems[i] for i in order.tolist()],
                        rewards=rewards[rows], correct=correct[rows], sampled_rewards=rewards,
                        dropped_groups=int((~info).sum()))
