"""Held-out evaluation per difficulty level: greedy accuracy and avg@k (mean accuracy of k samples).

Eval sampling runs under its own fixed seed inside `torch.random.fork_rng`, so evaluating (or not) never changes
the training run's random stream: a resumed run and an uninterrupted one stay identical.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from hadw_trainer.config import JobConfig
from hadw_trainer.data.rewards import REWARD_FNS
from hadw_trainer.data.tasks import Problem, format_prompt
from hadw_trainer.parallel import process_group as dist
from hadw_trainer.rollout.engine import RolloutEngine


def level_name(level: int | None) -> str:
    return "all" if level is None else f"level_{level}"


def _score(engine: RolloutEngine, prompts: list[str], problems: list[Problem], n: int, greedy: bool,
           cfg: JobConfig, max_new: int) -> dict[str, list[float]]:
    reward_fn = REWARD_FNS[cfg.task.reward]
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    step = cfg.eval.batch_prompts
    for i in range(0, len(prompts), step):
        gen = engine.generate(prompts[i:i + step], n, max_new_tokens=max_new, temperature=cfg.eval.temperature,
                              greedy=greedy)
        k = 1 if greedy else n
        for row, text in enumerate(gen.texts):
            p = problems[i + row // k]
            r = reward_fn(text, p.answer)
            for key in (level_name(p.level), "overall"):
                sums[key][0] += r
                sums[key][1] += 1
    return sums


def evaluate(engine: RolloutEngine, tokenizer: Any, problems: list[Problem], cfg: JobConfig, seed: int) -> dict:
    """{'greedy': {level_k: acc, ..., 'overall': acc}, 'avg@k': {...}, 'n': {level_k: count}} over all ranks.

    Problems are sharded across ranks (rank r takes every world_size-th problem) and the counts all-reduced.
    """
    rank, world = dist.rank(), dist.world_size()
    mine = problems[rank::world]
    prompts = [format_prompt(p, cfg.task.prompt_template, tokenizer, cfg.task.chat_template) for p in mine]
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    keys = sorted({level_name(p.level) for p in problems}) + ["overall"]
    result: dict[str, Any] = {}
    modes = []
    if cfg.eval.greedy:
        modes.append(("greedy", 1, True))
    if cfg.eval.k > 0:
        modes.append((f"avg@{cfg.eval.k}", cfg.eval.k, False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919 * rank)
        for name, n, greedy in modes:
            sums = _score(engine, prompts, mine, n, greedy, cfg, max_new) if mine else {}
            flat = torch.tensor([[sums.get(k, [0.0, 0.0])[0], sums.get(k, [0.0, 0.0])[1]] for k in keys],
                                dtype=torch.float64)
            flat = dist.all_reduce_sum(flat)
            result[name] = {k: (flat[i, 0] / flat[i, 1]).item() if flat[i, 1] > 0 else None
                            for i, k in enumerate(keys)}
            if name == modes[0][0]:
                per = max(1, n)
                result["n"] = {k: int(flat[i, 1].item() / per) for i, k in enumerate(keys)}
    return result


def format_eval_table(history: list[dict]) -> str:
    """A small text table: one row per eval, one column per level (greedy, then avg@k when present)."""
    if not history:
        return ""
    lines = []
    for mode in [m for m in history[-1] if m not in ("step", "n")]:
        keys = list(history[-1][mode])
        lines.append(f"{mode:>8} | " + " ".join(f"{k.replace('level_', 'L'):>8}" for k in keys))
        for h in history:
            if mode in h:
                vals = " ".join(f"{'-' if h[mode][k] is None else format(h[mode][k], '.3f'):>8}" for k in keys)
                lines.append(f"{'step ' + str(h['step']):>8} | {vals}")
    return "\n".join(lines)
