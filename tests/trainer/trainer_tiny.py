"""A tiny, fast configuration of the tiny-arith job for tests (a 60k-parameter model, seconds per run)."""

from __future__ import annotations

from hadw_trainer.config import JobConfig, apply_overrides
from hadw_trainer.recipes import get_recipe


def tiny_overrides(cache_dir: str) -> list[str]:
    return [
        "model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128", "model.max_position_embeddings=32",
        "task.levels=1,2", "task.eval_per_level=16", "sft.steps=60", "sft.batch_size=32", f"sft.cache_dir={cache_dir}",
        "rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=4",
        "algo.mini_batch_prompts=4", "algo.micro_batch_prompts=2", "algo.backend=torch",
        "optim.lr=1e-3", "optim.warmup_steps=2", "eval.every=0", "eval.k=2", "eval.batch_prompts=64",
        "checkpoint.every=0", "train.max_steps=3", "train.threads=1", "train.plots=false", "train.tensorboard=false",
        "train.progress=false",
    ]


def tiny_config(cache_dir: str, *extra: str) -> JobConfig:
    return apply_overrides(get_recipe("tiny-arith"), tiny_overrides(cache_dir) + list(extra))
