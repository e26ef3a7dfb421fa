"""From prompts to a scored rollout batch: sample G responses per prompt, reward them, optionally filter groups
(DAPO dynamic sampling), and build the difficulty anchor. The group-relative advantage and the HA-DW weight Phi
themselves are computed inside `hadw_loss` from the rewards (so micro-batches always hold whole groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hadw_kernels import DifficultyAnchor
from hadw_trainer import distributed as dist
from hadw_trainer.config import AlgoConfig, JobConfig
from hadw_trainer.rewards import REWARD_FNS, overlong_penalty
from hadw_trainer.rollout import Generation, RolloutEngine, concat_generations, format_prompt, select_rows
from hadw_trainer.tasks import Problem, PromptSource


def build_anchor(algo: AlgoConfig) -> DifficultyAnchor:
    return DifficultyAnchor(mode=algo.anchor_mode, window=algo.anchor_window,
                            include_current=algo.anchor_include_current, eta=algo.anchor_eta,
                            fixed_value=algo.anchor_fixed)


@dataclass
class RolloutBatch:
    """One rank's slice of a step's rollout batch, groups contiguous (rows g*G ... g*G+G-1 = prompt g)."""

    gen: Generation
    """Token ids, masks, sampling log-probs, texts."""
    problems: list[Problem]
    """One per prompt (per group)."""
    rewards: torch.Tensor
    """[N] float32 rewards (after overlong shaping, when on)."""
    correct: torch.Tensor
    """[N] float32 task reward before shaping (what accuracy means)."""
    all_rewards: torch.Tensor
    """Rewards of every response sampled this step on this rank, dropped groups included (the anchor's y_t)."""
    num_generated: int
    """Responses generated this step on this rank (dynamic sampling generates more than it keeps)."""
    dropped_groups: int = 0
    """Groups removed by dynamic sampling (this rank)."""

    @property
    def levels(self) -> torch.Tensor:
        G = self.rewards.numel() // len(self.problems)
        lv = torch.tensor([p.level if p.level is not None else 0 for p in self.problems], dtype=torch.long)
        return lv.repeat_interleave(G)


def _score(gen: Generation, problems: list[Problem], G: int, cfg: JobConfig) -> tuple[torch.Tensor, torch.Tensor]:
    fn = REWARD_FNS[cfg.task.reward]
    correct = torch.tensor([fn(text, problems[i // G].answer) for i, text in enumerate(gen.texts)],
                           dtype=torch.float32)
    r = cfg.rollout
    shaped = correct + overlong_penalty(gen.response_mask.sum(-1), r.max_new_tokens, r.overlong_buffer,
                                        r.overlong_penalty)
    return shaped, correct


def _sample(source: PromptSource, engine: RolloutEngine, tokenizer: Any, cfg: JobConfig) -> RolloutBatch:
    r = cfg.rollout
    world, rank = dist.world_size(), dist.rank()
    per_rank = r.prompts_per_step // world
    problems = source.draw(r.prompts_per_step)[rank * per_rank:(rank + 1) * per_rank]
    prompts = [format_prompt(p, cfg.task.prompt_template, tokenizer, cfg.task.chat_template) for p in problems]
    gen = engine.generate(prompts, r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                          top_p=r.top_p, top_k=r.top_k)
    rewards, correct = _score(gen, problems, r.group_size, cfg)
    return RolloutBatch(gen=gen, problems=problems, rewards=rewards, correct=correct, all_rewards=rewards,
                        num_generated=len(gen.texts))


def collect(source: PromptSource, engine: RolloutEngine, tokenizer: Any, cfg: JobConfig) -> RolloutBatch:
    """This rank's rollout batch for one step.

    With `rollout.dynamic_sampling`, groups whose rewards are all equal are dropped and new prompts are drawn
    (every rank draws in lockstep, so the prompt cursor stays identical) until this rank has its share or
    `max_refill_rounds` is spent; the remainder is then filled with dropped groups (their advantage is zero),
    so every rank keeps the same batch shape and the same number of optimizer steps.
    """
    batch = _sample(source, engine, tokenizer, cfg)
    if not cfg.rollout.dynamic_sampling:
        return batch
    G = cfg.rollout.group_size
    want = len(batch.problems)
    parts = [batch]
    generated, all_rewards = batch.num_generated, [batch.rewards]
    for _ in range(cfg.rollout.max_refill_rounds + 1):
        kept = sum(int(_informative(p.rewards, G).sum()) for p in parts)
        deficit = torch.tensor([float(max(0, want - kept))])
        if dist.all_reduce_max(deficit).item() == 0 or len(parts) > cfg.rollout.max_refill_rounds:
            break
        extra = _sample(source, engine, tokenizer, cfg)
        parts.append(extra)
        generated += extra.num_generated
        all_rewards.append(extra.rewards)
    gen = concat_generations([p.gen for p in parts], tokenizer.pad_token_id)
    problems = [q for p in parts for q in p.problems]
    rewards = torch.cat([p.rewards for p in parts])
    correct = torch.cat([p.correct for p in parts])
    info = _informative(rewards, G)
    order = torch.cat([info.nonzero().flatten(), (~info).nonzero().flatten()])[:want]  # informative groups first
    order = order.sort().values  # keep the original prompt order among the chosen groups
    rows = (order[:, None] * G + torch.arange(G)).flatten()
    return RolloutBatch(gen=select_rows(gen, rows), problems=[problems[i] for i in order.tolist()],
                        rewards=rewards[rows], correct=correct[rows], all_rewards=torch.cat(all_rewards),
                        num_generated=generated, dropped_groups=int((~info).sum()))


def _informative(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """[P] bool: the group's rewards are not all equal (it carries a learning signal)."""
    g = rewards.view(-1, G)
    return (g.max(-1).values - g.min(-1).values) > 0


def reward_by_level(batch: RolloutBatch) -> dict[str, float]:
    """Mean task reward per level over all ranks (levels absent everywhere are omitted)."""
    levels = batch.levels
    keys = list(range(0, 6))
    stats = torch.zeros(len(keys), 2, dtype=torch.float64)
    for i, lv in enumerate(keys):
        sel = levels == lv
        stats[i, 0] = batch.correct[sel].double().sum()
        stats[i, 1] = sel.sum()
    stats = dist.all_reduce_sum(stats)
    return {("all" if lv == 0 else f"level_{lv}"): (stats[i, 0] / stats[i, 1]).item()
            for i, lv in enumerate(keys) if stats[i, 1] > 0}
