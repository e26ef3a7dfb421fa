"""The supervised warm-up that makes the tiny job's "base model", cached by config hash so reruns skip it.

RL needs a policy that is sometimes, but not always, right on most prompts. A random tiny model never is, so the
job first trains it briefly on worked solutions of the arithmetic task (prompt -> running totals, the eval problems
held out): long enough that every level is reachable, short enough that sampled answers are still often wrong,
which is what RL lifts. The result is an ordinary HF model directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from typing import Any

import torch

from hadw_trainer.config import JobConfig
from hadw_trainer.data.tasks import ArithTask, task_problems
from hadw_trainer.model import build_tiny_model, char_tokenizer, save_model

SFT_VERSION = 2  # bump when the warm-up recipe changes, so stale caches are not reused


def cache_root(cfg: JobConfig) -> str:
    return cfg.sft.cache_dir or os.environ.get("HADW_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hadw_trainer")


def base_model_key(cfg: JobConfig) -> str:
    """Hash of everything that determines the base model (model shape, task levels, warm-up settings)."""
    m, s = cfg.model, cfg.sft
    blob = dict(v=SFT_VERSION, arch=m.arch, hidden=m.hidden_size, layers=m.num_layers, heads=m.num_heads,
                inter=m.intermediate_size, maxpos=m.max_position_embeddings, dtype=m.dtype,
                levels=list(cfg.task.levels), held_out=[cfg.task.eval_per_level, cfg.task.eval_seed],
                template=cfg.task.prompt_template, steps=s.steps, bs=s.batch_size, lr=s.lr, seed=s.seed,
                **({'slip': s.slip} if s.slip else {}))
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _batch(tok: Any, task: ArithTask, rng: random.Random, n: int, template: str,
           slip: float = 0.0) -> tuple[torch.Tensor, ...]:
    """Right-padded [prompt solution <eos>] rows and a mask over the solution + EOS tokens (the supervised part);
    a `slip` fraction of the solutions carries one slip (`ArithTask.slipped_solution`)."""
    rows, masks = [], []
    for p in task.sample(rng, n):
        prompt = tok(template.replace("{question}", p.question), add_special_tokens=False).input_ids
        text = task.slipped_solution(p, rng) if slip and rng.random() < slip else (p.solution or p.answer)
        answer = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return ids, mask


def warmup(cfg: JobConfig, log: Any = print) -> str:
    """Return the directory of the cached base model, training it first when missing."""
    root = cache_root(cfg)
    path = os.path.join(root, f"base-{base_model_key(cfg)}")
    if os.path.exists(os.path.join(path, "sft.json")):
        log(f"base model: cached at {path}")
        return path
    s = cfg.sft
    log(f"base model: supervised warm-up, {s.steps} steps x {s.batch_size} examples (cached afterwards at {path})")
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        tok = char_tokenizer()
        model = build_tiny_model(cfg.model, tok)
        model.train()
        task = task_problems(cfg.task, s.seed)[0].task  # the RL task itself, eval problems held out
        rng = random.Random(f"sft-{s.seed}")
        opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01, betas=(0.9, 0.98))
        warm = max(1, s.steps // 20)

        def lr_at(i: int) -> float:  # linear warm-up, cosine to 10%
            if i < warm:
                return (i + 1) / warm
            return 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warm) / max(1, s.steps - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        losses = []
        for i in range(s.steps):
            ids, mask = _batch(tok, task, rng, s.batch_size, cfg.task.prompt_template, s.slip)
            logits = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), use_cache=False).logits
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            m = mask[:, 1:].float()
            loss = -(lp * m).sum() / m.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if (i + 1) % max(1, s.steps // 10) == 0:
                log(f"  warm-up step {i + 1}/{s.steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(model, tok, tmp)
    with open(os.path.join(tmp, "sft.json"), "w") as f:
        json.dump(dict(key=base_model_key(cfg), steps=s.steps, seconds=round(time.time() - t0, 1),
                       final_loss=losses[-1] if losses else None, losses=losses[:: max(1, s.steps // 100)]), f)
    os.makedirs(root, exist_ok=True)
    try:
        os.replace(tmp, path)  # atomic: another process that finished first wins, ours is dropped
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"base model: warm-up took {time.time() - t0:.0f}s")
    return path
