"""The RL loop, top to bottom (paper semantics):

    for each step:  rollout batch (prompts x G) -> rewards -> anchor.step (once, global y_t)
                    -> old log-probs recomputed by the policy -> mini-batch updates with hadw_loss
                       (global normaliser over micro-batches and ranks, grad clip, AdamW with warm-up)
                    -> metrics.jsonl -> periodic eval -> checkpoint
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch

from hadw_trainer import checkpoint as ckpt
from hadw_trainer import distributed as dist
from hadw_trainer.advantage import build_anchor, collect, reward_by_level
from hadw_trainer.config import JobConfig
from hadw_trainer.evaluate import evaluate, format_eval_table
from hadw_trainer.logger import RunLogger
from hadw_trainer.loss_step import batch_logprobs, update
from hadw_trainer.model import build_tiny_model, char_tokenizer, load_model, save_model
from hadw_trainer.parallel import Parallel
from hadw_trainer.rollout import Generation, HFRollout, format_prompt
from hadw_trainer.tasks import ArithTask, Problem, PromptSource, load_jsonl


def _problems(cfg: JobConfig) -> tuple[PromptSource, list[Problem]]:
    t = cfg.task
    if t.name == "arith":
        task = ArithTask(t.levels)
        return PromptSource(cfg.train.seed, task=task), task.eval_set(t.eval_per_level, t.eval_seed)
    train = load_jsonl(t.path)
    evals = load_jsonl(t.eval_path) if t.eval_path else train
    if t.eval_per_level:
        count: dict[Any, int] = {}
        kept = []
        for p in evals:
            count[p.level] = count.get(p.level, 0) + 1
            if count[p.level] <= t.eval_per_level:
                kept.append(p)
        evals = kept
    return PromptSource(cfg.train.seed, problems=train), evals


def _drop_long_prompts(source: PromptSource, cfg: JobConfig, tok: Any, log: Any) -> None:
    """Drop training problems whose formatted prompt exceeds task.max_prompt_len tokens (reported, not silent)."""
    assert source.problems is not None
    keep = [p for p in source.problems if len(tok(format_prompt(p, cfg.task.prompt_template, tok,
                                                                cfg.task.chat_template), add_special_tokens=False
                                                  ).input_ids) <= cfg.task.max_prompt_len]
    if len(keep) < len(source.problems):
        log(f"dropped {len(source.problems) - len(keep)} of {len(source.problems)} training problems longer than "
            f"task.max_prompt_len={cfg.task.max_prompt_len} tokens")
    if not keep:
        raise ValueError(f"no training problem fits task.max_prompt_len={cfg.task.max_prompt_len}")
    source.problems = keep


def _policy(cfg: JobConfig, log: Any) -> tuple[torch.nn.Module, Any]:
    if cfg.model.path:
        return load_model(cfg.model.path, cfg.model)
    if cfg.sft.steps:
        from hadw_trainer.sft import warmup

        if dist.is_main():  # rank 0 builds (or finds) the cached base model; the others wait, then load it
            path = warmup(cfg, log)
        dist.barrier()
        if not dist.is_main():
            path = warmup(cfg, lambda *_: None)
        return load_model(path, cfg.model)
    torch.manual_seed(cfg.train.seed)
    tok = char_tokenizer()
    return build_tiny_model(cfg.model, tok), tok


def _lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up over the first `warmup` RL steps (step counts from 1), then constant."""
    return min(1.0, step / warmup) if warmup > 0 else 1.0


def _config_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Keys whose values changed (train.max_steps is expected to change on resume and is not reported)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b) \
                and f"{prefix}{k}" != "train.max_steps":
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _reduce_mean(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    t = dist.all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64)) / dist.world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def _restarted() -> int:
    """How often torchrun (--max-restarts) has restarted this worker group (0 on the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _maybe_crash(step: int) -> None:
    """Test hook: HADW_TEST_CRASH="RANK:STEP" kills that rank hard at the start of that step, on the first start
    only (torchrun restarts the group; tests/test_trainer_distributed.py checks that no step is lost)."""
    spec = os.environ.get("HADW_TEST_CRASH")
    if spec and _restarted() == 0:
        r, s = (int(x) for x in spec.split(":"))
        if r == dist.rank() and s == step:
            print(f"HADW_TEST_CRASH: rank {r} exits at step {s}", flush=True)
            os._exit(17)


def _engine(cfg: JobConfig, par: Parallel, tok: Any) -> Any:
    """The rollout engine; it generates from `par.rollout_module` (full weights, synced after every update)."""
    r = cfg.rollout
    if r.engine == "vllm":
        from hadw_trainer.rollout_vllm import VLLMRollout  # imported only when selected

        return VLLMRollout(par.rollout_module, tok, model_path=cfg.model.path,
                           tensor_parallel_size=r.vllm_tensor_parallel_size,
                           gpu_memory_utilization=r.vllm_gpu_memory_utilization)
    return HFRollout(par.rollout_module, tok, cfg.rollout.chunk_prompts, cfg.rollout.sampling_logprobs)


class _HostBatches:
    """Hands the loop every Generation on the CPU, where rewards, masks and metrics are computed (an engine on a
    GPU returns CUDA tensors; the update moves each micro-batch to the policy's device itself)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def generate(self, *args: Any, **kwargs: Any) -> Generation:
        gen = self.engine.generate(*args, **kwargs)
        return dataclasses.replace(gen, **{f.name: getattr(gen, f.name).cpu() for f in dataclasses.fields(gen)
                                           if isinstance(getattr(gen, f.name), torch.Tensor)})

    def __getattr__(self, name: str) -> Any:  # sync_weights, sleep, close, ...
        return getattr(self.engine, name)


def train(cfg: JobConfig, output_dir: str, resume: bool = False,
          engine_factory: Callable[[torch.nn.Module, Any], Any] | None = None) -> dict[str, Any]:
    """Run a job; returns {'final_eval': ..., 'metrics': last step's metrics, 'output_dir': ...}.

    Under torchrun every rank calls this. After a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) the run resumes
    from its latest complete checkpoint, as if `resume` were given. `engine_factory(model, tokenizer)` replaces the
    rollout engine (tests feed a fixed batch through it).
    """
    dist.init(cfg.parallel.timeout_s)
    cfg.validate(dist.world_size())
    if not resume and _restarted():
        resume = True  # torchrun --max-restarts: continue from the latest complete checkpoint
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    os.makedirs(output_dir, exist_ok=True)
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    logger = RunLogger(output_dir, dist.is_main(), False, False, cfg.train.max_steps, console_only=True)
    log = logger.print

    start, state = 0, None
    resume_from = ckpt.latest_complete(ckpt_dir, log) if resume else None
    if resume and resume_from is None:
        if ckpt.list_checkpoints(ckpt_dir):
            raise ckpt.CheckpointError(f"--resume: every checkpoint under {ckpt_dir} is partial or corrupt (see the "
                                       f"warnings above); move them away to start over")
        log(f"--resume: no checkpoint under {ckpt_dir}; starting from step 0")
    if not resume and ckpt.list_checkpoints(ckpt_dir):
        raise ckpt.CheckpointError(f"{output_dir} already holds checkpoints; pass --resume to continue that run or "
                                   f"choose a new --output-dir")

    model, tok = _policy(cfg, log)
    model.to(dist.device()).train()
    dist.broadcast_model(model)
    n_params = sum(p.numel() for p in model.parameters())
    loss_cfg = cfg.algo.loss_config()
    if cfg.algo.loss == "dr_grpo" and loss_cfg.norm_len is None:
        loss_cfg = loss_cfg.replace(norm_len=cfg.rollout.max_new_tokens)  # Dr. GRPO divides by the budget
    ref = None
    if loss_cfg.kl_coef > 0:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    o = cfg.optim
    par = Parallel.build(cfg, model)
    optimizer = par.optimizer
    anchor = build_anchor(cfg.algo)
    source, eval_problems = _problems(cfg)
    engine = _HostBatches(engine_factory(par.rollout_module, tok) if engine_factory else _engine(cfg, par, tok))
    if cfg.task.name == "jsonl":
        _drop_long_prompts(source, cfg, tok, log)
    history: list[dict] = []
    if resume_from is not None:
        state = ckpt.load(resume_from, None, None, par)
        engine.sync_weights(par.rollout_module)
        anchor.load_state_dict(state["anchor"])
        source.load_state_dict(state["data"])
        history = state["eval_history"]
        start = state["step"]
        log(f"resumed from {resume_from} (step {start})")
        changed = _config_diff(state.get("config", {}), cfg.to_dict())
        if changed:
            log("WARNING: the resumed run's config differs from the checkpoint's (saved -> now): " + ", ".join(changed))
    else:
        torch.manual_seed(cfg.train.seed * 1000 + dist.rank())  # the rollout sampling stream of this rank

    if dist.is_main():
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    log(f"recipe {cfg.recipe}: {cfg.algo.loss}{'+HA-DW' if cfg.algo.hadw else ''}, {n_params / 1e6:.2f}M params, "
        f"{cfg.rollout.prompts_per_step} prompts x G={cfg.rollout.group_size} per step, {cfg.train.max_steps} steps, "
        f"world_size {dist.world_size()}, backend {cfg.parallel.backend}, output {output_dir}")
    logger.close()
    logger = RunLogger(output_dir, dist.is_main(), cfg.train.tensorboard, cfg.train.progress, cfg.train.max_steps,
                       start=start, log_every=cfg.train.log_every)
    log = logger.print

    def run_eval(step: int) -> None:
        res = evaluate(engine, tok, eval_problems, cfg, seed=cfg.task.eval_seed + step)
        history.append({"step": step, **res})
        logger.log_eval(step, res, history)
        log(format_eval_table([history[-1]]))

    if start == 0 and (cfg.eval.greedy or cfg.eval.k):
        run_eval(0)  # the base model, before RL
    r, a = cfg.rollout, cfg.algo
    world = dist.world_size()
    metrics: dict[str, Any] = {}
    t_run = time.time()
    for step in range(start + 1, cfg.train.max_steps + 1):
        _maybe_crash(step)
        t0 = time.time()
        lr = o.lr * _lr_factor(step, o.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = collect(source, engine, tok, cfg)
        if hasattr(engine, "sleep"):
            engine.sleep()  # vLLM on GPU: free its weights and KV cache for the update (sync_weights wakes it)
        prior = anchor.step(batch.all_rewards)  # once per rollout batch; y_t is global over ranks
        t_roll = time.time()
        gen = batch.gen
        rows_per_call = a.micro_batch_prompts * r.group_size
        chunk = cfg.model.logprob_chunk_tokens
        # old log-probs: recomputed by the policy before any update of this step
        old_lp = batch_logprobs(par.model, gen, rows_per_call, r.temperature, chunk)
        ref_lp = batch_logprobs(ref, gen, rows_per_call, r.temperature, chunk) if ref is not None else None
        stats = update(par, gen, batch.rewards, old_lp, prior, loss_cfg, group_size=r.group_size,
                       mini_prompts=a.mini_batch_prompts // world, micro_prompts=a.micro_batch_prompts,
                       epochs=a.ppo_epochs, grad_clip=o.grad_clip, temperature=r.temperature, backend=a.backend,
                       ref_logprobs=ref_lp, chunk_tokens=chunk)
        par.sync_rollout()
        engine.sync_weights(par.rollout_module)
        t_end = time.time()
        mask = gen.response_mask.float()
        # phi_mean/min/max, adv_abs_mean, degenerate_group_frac, response_len_mean, clipfrac... come from the loss's
        # own metrics in `stats` (the advantages and Phi the update actually used)
        local = {
            "truncated_frac": gen.truncated.float().mean().item() if gen.truncated is not None else 0.0,
            "rollout_logprob_diff": ((gen.sampling_logprobs - old_lp).abs() * mask).sum().item() / max(
                1.0, mask.sum().item()) if gen.sampling_logprobs is not None else 0.0,
            **{k: v for k, v in stats.items() if k not in ("loss", "optimizer_steps")},
        }
        reduced = _reduce_mean(local)
        loss = dist.all_reduce_sum(torch.tensor([stats["loss"]], dtype=torch.float64)).item()
        tokens = dist.all_reduce_sum(torch.tensor([mask.sum().item()], dtype=torch.float64)).item()
        gen_count = dist.all_reduce_sum(torch.tensor([float(batch.num_generated)], dtype=torch.float64)).item()
        metrics = {
            "step": step, "world_size": world, "epoch": round(source.epoch, 4),
            "reward_mean": anchor.last_accuracy, "reward_by_level": reward_by_level(batch),
            "anchor_prior": prior, "anchor_posterior": anchor.posterior, "anchor_eta": anchor.eta_t,
            "loss": loss, **reduced, "lr": lr, "optimizer_steps": stats["optimizer_steps"],
            "responses_generated": int(gen_count),
            "time_s": round(t_end - t_run, 3), "step_time_s": round(t_end - t0, 3),
            "rollout_time_s": round(t_roll - t0, 3), "update_time_s": round(t_end - t_roll, 3),
            "tokens_per_s": tokens / max(1e-9, t_end - t0),
        }
        if r.dynamic_sampling:
            metrics["dropped_groups"] = int(dist.all_reduce_sum(torch.tensor([batch.dropped_groups])).item())
        logger.log_step(metrics)
        last = step == cfg.train.max_steps
        if (cfg.eval.every and step % cfg.eval.every == 0) or last:
            run_eval(step)
        c = cfg.checkpoint
        if (c.every and step % c.every == 0) or (last and c.save_final):
            state = {"step": step, "anchor": anchor.state_dict(), "data": source.state_dict(),
                     "eval_history": history, "config": cfg.to_dict()}
            path = ckpt.save(ckpt_dir, step, par, state, c.keep_last)
            if path:
                log(f"checkpoint: {path}")
    logger.close()
    if hasattr(engine, "close"):
        engine.close()  # vLLM: free the engine and its model directory
    if cfg.checkpoint.export_hf and dist.is_main():
        hf_dir = os.path.join(output_dir, "hf")
        tmp = hf_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(par.rollout_module, tok, tmp)  # full weights: the replica is synced after every step
        shutil.rmtree(hf_dir, ignore_errors=True)
        os.replace(tmp, hf_dir)
        log(f"exported the policy as a Hugging Face model: {hf_dir}")
    dist.barrier()
    if dist.is_main() and cfg.train.plots:
        try:
            from hadw_trainer.plots import plot_run

            paths = plot_run(output_dir)
            print(f"plots: {', '.join(paths)}")
        except ImportError:
            print("plots skipped: matplotlib is not installed")
    if dist.is_main() and history:
        print("held-out accuracy by level:\n" + format_eval_table([history[0], history[-1]]) if len(history) > 1
              else format_eval_table(history))
        print(f"outputs: {output_dir}/metrics.jsonl, eval.json, plots/, checkpoints/")
    return {"final_eval": history[-1] if history else None, "metrics": metrics, "output_dir": output_dir,
            "anchor": anchor.state_dict(), "step": cfg.train.max_steps, "model": par.rollout_module, "tokenizer": tok}
