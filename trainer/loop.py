"""The RL loop, top to bottom: `setup` builds a `Run`, `rl_step` runs one step, `finish` exports and plots.

    run = setup(cfg, "runs/x")                # policy, backend, rollout engine, anchor, prompts, logger; resume
    for step in range(run.start + 1, cfg.train.max_steps + 1):
        metrics = rl_step(run, step)          # rollout -> rewards -> anchor -> advantages -> old log-probs
                                              #   -> updates -> metrics (one reduction over ranks)
        maybe_eval_and_checkpoint(run, step)
    finish(run)                               # HF export, plots, the before/after table

`train(cfg, output_dir)` does all of it. Under torchrun every rank runs the same code on its share of each batch.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hadw_kernels import DifficultyAnchor, LossConfig, hadw_advantages
from hadw_kernels.reference import advantage_metrics
from hadw_trainer.config import JobConfig
from hadw_trainer.data.tasks import Problem, PromptSource, drop_long_prompts, task_problems
from hadw_trainer.logprobs import batch_logprobs
from hadw_trainer.model import build_tiny_model, char_tokenizer, load_model, save_model
from hadw_trainer.observe.evaluate import evaluate, format_eval_table
from hadw_trainer.observe.logger import RunLogger, StepSums
from hadw_trainer.parallel import checkpoint as ckpt
from hadw_trainer.parallel import process_group as dist
from hadw_trainer.parallel.backends import Parallel
from hadw_trainer.rollout.batch import RolloutBatch, collect
from hadw_trainer.rollout.engine import RolloutEngine
from hadw_trainer.rollout.hf_engine import HFRollout
from hadw_trainer.update import update


@dataclass
class Run:
    """Everything a running job holds (the same objects on every rank, each with its own share of the data)."""

    cfg: JobConfig
    output_dir: str
    par: Parallel
    """The policy behind its data-parallel backend, with the optimizer."""
    tokenizer: Any
    engine: RolloutEngine
    loss_cfg: LossConfig
    anchor: DifficultyAnchor
    source: PromptSource
    """The training prompt stream (its cursor is checkpointed)."""
    eval_problems: list[Problem]
    logger: RunLogger
    ref: torch.nn.Module | None
    """The frozen initial policy, for the KL penalty (None when algo.loss.kl_coef is 0)."""
    start: int
    """The last step already done (0 for a fresh run; the checkpoint's step on resume)."""
    history: list[dict] = field(default_factory=list)
    """Eval results so far, step 0 (the base model) first."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last step's metrics."""
    t_start: float = field(default_factory=time.time)


# -- setup ----------------------------------------------------------------------------------------------------------
def _policy(cfg: JobConfig, log: Callable[[str], None]) -> tuple[torch.nn.Module, Any]:
    """The starting policy: a local HF model, the cached warmed-up tiny model, or a fresh tiny model."""
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


def _engine(cfg: JobConfig, par: Parallel, tok: Any) -> RolloutEngine:
    """The rollout engine; it generates from `par.rollout_module` (full weights, synced after every update)."""
    r = cfg.rollout
    if r.engine == "vllm":
        from hadw_trainer.rollout.vllm_engine import VLLMRollout  # imported only when selected

        return VLLMRollout(par.rollout_module, tok, model_path=cfg.model.path,
                           tensor_parallel_size=r.vllm_tensor_parallel_size,
                           gpu_memory_utilization=r.vllm_gpu_memory_utilization)
    return HFRollout(par.rollout_module, tok, r.chunk_prompts, r.sampling_logprobs)


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


def _restarted() -> int:
    """How often torchrun (--max-restarts) has restarted this worker group (0 on the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def setup(cfg: JobConfig, output_dir: str, *, resume: bool = False,
          engine_factory: Callable[[torch.nn.Module, Any], RolloutEngine] | None = None) -> Run:
    """Build a run (every rank). With `resume` (automatic after a torchrun restart) it continues from the newest
    complete checkpoint under OUTPUT/checkpoints. `engine_factory(model, tokenizer)` replaces the rollout engine
    (tests feed a fixed batch through it)."""
    dist.init(cfg.parallel.timeout_s)
    cfg.validate(dist.world_size())
    resume = resume or _restarted() > 0  # torchrun --max-restarts: continue from the latest complete checkpoint
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    os.makedirs(output_dir, exist_ok=True)
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    resume_from, start = None, 0
    if resume:
        resume_from = ckpt.latest_complete(ckpt_dir, print if dist.is_main() else (lambda *_: None))
        if resume_from is None and ckpt.list_checkpoints(ckpt_dir):
            raise ckpt.CheckpointError(f"--resume: every checkpoint under {ckpt_dir} is partial or corrupt (see the "
                                       f"warnings above); move them away to start over")
        start = ckpt.verify(resume_from)["step"] if resume_from else 0
    elif ckpt.list_checkpoints(ckpt_dir):
        raise ckpt.CheckpointError(f"{output_dir} already holds checkpoints; pass --resume to continue that run or "
                                   f"choose a new --output-dir")
    t = cfg.train
    logger = RunLogger(output_dir, dist.is_main(), t.tensorboard, t.progress, t.max_steps, start=start,
                       log_every=t.log_every)
    log = logger.print
    if resume and resume_from is None:
        log(f"--resume: no checkpoint under {ckpt_dir}; starting from step 0")

    model, tok = _policy(cfg, log)
    model.to(dist.device()).train()
    dist.broadcast_model(model)
    loss_cfg = cfg.algo.loss_config()
    ref = copy.deepcopy(model).eval().requires_grad_(False) if loss_cfg.kl_coef > 0 else None
    par = Parallel.build(cfg, model)
    source, eval_problems = task_problems(cfg.task, cfg.train.seed)
    drop_long_prompts(source, cfg.task, tok, log)
    engine = engine_factory(par.rollout_module, tok) if engine_factory else _engine(cfg, par, tok)
    run = Run(cfg=cfg, output_dir=output_dir, par=par, tokenizer=tok, engine=engine, loss_cfg=loss_cfg,
              anchor=cfg.algo.build_anchor(), source=source, eval_problems=eval_problems, logger=logger, ref=ref,
              start=start)
    if resume_from is not None:
        state = ckpt.load(resume_from, None, None, par)
        engine.sync_weights(par.rollout_module)
        run.anchor.load_state_dict(state["anchor"])
        source.load_state_dict(state["data"])
        run.history = state["eval_history"]
        log(f"resumed from {resume_from} (step {start})")
        changed = _config_diff(state.get("config", {}), cfg.to_dict())
        if changed:
            log("WARNING: the resumed run's config differs from the checkpoint's (saved -> now): " + ", ".join(changed))
    else:
        torch.manual_seed(cfg.train.seed * 1000 + dist.rank())  # the rollout sampling stream of this rank

    if dist.is_main():
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"recipe {cfg.recipe}: {n_params / 1e6:.2f}M params, {cfg.rollout.prompts_per_step} prompts x "
        f"G={cfg.rollout.group_size} per step, {cfg.train.max_steps} steps, world_size {dist.world_size()}, backend "
        f"{cfg.parallel.backend}, output {output_dir}\n{loss_cfg}\n{run.anchor}")
    if start == 0 and (cfg.eval.greedy or cfg.eval.k):
        run_eval(run, 0)  # the base model, before RL
    return run


# -- one step -------------------------------------------------------------------------------------------------------
def rl_step(run: Run, step: int) -> dict[str, Any]:
    """One RL step on every rank: rollout -> rewards -> anchor -> advantages -> old log-probs -> updates -> metrics.
    Returns the step's metrics (reduced over ranks; also written to metrics.jsonl)."""
    cfg, par, r, a = run.cfg, run.par, run.cfg.rollout, run.cfg.algo
    t0 = time.time()
    lr = _set_lr(run, step)

    # rollout: this rank's prompts x G, sampled and scored
    batch = collect(run.source, run.engine, run.tokenizer, cfg)
    run.engine.sleep()  # vLLM on GPU: free its memory for the update (sync_weights wakes it)
    t_rollout = time.time()

    # rewards of every rank (reward, task reward, level per row), so the anchor and the group statistics see the
    # whole batch, identically on every rank
    rows = dist.all_gather_rows(torch.stack([batch.rewards, batch.correct, batch.levels.float()], 1).double())
    sampled = dist.all_gather_rows(batch.sampled_rewards) if r.dynamic_sampling else rows[:, 0]

    # anchor: the prior C_t^- this batch is weighted against, then y_t (every response sampled) folded in
    prior = run.anchor.step(sampled)

    # advantages: once for the whole batch (a group = a prompt's rows), then this rank's rows
    group_ids = torch.arange(rows.shape[0]) // batch.group_size
    adv = hadw_advantages(rows[:, 0].float(), group_ids=group_ids, anchor=prior, config=run.loss_cfg)
    mine = adv.advantages.view(dist.world_size(), -1)[dist.rank()]

    # old log-probs (and the reference policy's): the policy before this step's first update
    per_call, budget = a.micro_batch_prompts * r.group_size, cfg.model.logprob_memory_budget()
    old_lp, entropy = batch_logprobs(par.model, batch.gen, per_call, r.temperature, budget)
    ref_lp = batch_logprobs(run.ref, batch.gen, per_call, r.temperature, budget)[0] if run.ref is not None else None

    # updates: optimizer steps over mini-batches of this rank's rows; then the rollout engine gets the new weights
    sums = StepSums()
    n_updates = update(par, batch.gen, mine, old_lp, run.loss_cfg, sums, mini_rows=a.mini_batch_prompts //
                       dist.world_size() * r.group_size, micro_rows=per_call, epochs=a.ppo_epochs,
                       grad_clip=cfg.optim.grad_clip, temperature=r.temperature, backend=a.backend,
                       ref_logprobs=ref_lp, memory_budget=budget)
    par.sync_rollout()
    run.engine.sync_weights(par.rollout_module)

    # metrics: this rank's sums reduced over ranks once, with what every rank already holds
    _rollout_sums(sums, batch, old_lp, entropy, r.dynamic_sampling)
    run.metrics = _step_metrics(run, step, lr, n_updates, rows, sampled.numel(), prior, adv, sums.reduce(),
                                (t0, t_rollout, time.time()))
    run.logger.log_step(run.metrics)
    return run.metrics


def _set_lr(run: Run, step: int) -> float:
    """Linear warm-up over the first optim.warmup_steps RL steps, then constant (verl's schedule)."""
    o = run.cfg.optim
    lr = o.lr * (min(1.0, step / o.warmup_steps) if o.warmup_steps else 1.0)
    for g in run.par.optimizer.param_groups:
        g["lr"] = lr
    return lr


def _step_metrics(run: Run, step: int, lr: float, n_updates: int, rows: torch.Tensor, n_sampled: int, prior: float,
                  adv: Any, reduced: dict[str, float], times: tuple[float, float, float]) -> dict[str, Any]:
    """The metrics.jsonl row of a step (the same on every rank)."""
    t0, t_rollout, t_end = times
    tokens = reduced.pop("tokens")
    return {
        "step": step, "world_size": dist.world_size(), "epoch": round(run.source.epoch, 4),
        "reward_mean": run.anchor.last_accuracy, "reward_by_level": _reward_by_level(rows[:, 1], rows[:, 2]),
        "anchor_prior": prior, "anchor_posterior": run.anchor.posterior, "anchor_eta": run.anchor.eta_t,
        **{k: float(v) for k, v in advantage_metrics(adv).items()}, **reduced,
        "lr": lr, "optimizer_steps": n_updates, "responses_generated": n_sampled,
        "time_s": round(t_end - run.t_start, 3), "step_time_s": round(t_end - t0, 3),
        "rollout_time_s": round(t_rollout - t0, 3), "update_time_s": round(t_end - t_rollout, 3),
        "tokens_per_s": tokens / max(1e-9, t_end - t0),
    }


def _rollout_sums(sums: StepSums, batch: RolloutBatch, old_lp: torch.Tensor, entropy: torch.Tensor,
                  dynamic_sampling: bool) -> None:
    """This rank's rollout statistics, added to the step's sums."""
    world = dist.world_size()
    gen, mask = batch.gen, batch.gen.response_mask.float()
    n_tok, n_rows = mask.sum().item(), mask.shape[0]
    sums.add("tokens", n_tok, 1.0 / world)
    sums.add("response_len_mean", n_tok, n_rows)
    # the policy that sampled the batch, before the update (the update logs "entropy": the policy being trained)
    sums.add("rollout_entropy", (entropy * mask).sum().item(), n_tok)
    sums.add("truncated_frac", gen.truncated.float().sum().item() if gen.truncated is not None else 0.0, n_rows)
    if gen.sampling_logprobs is not None:  # sampling engine vs the trainer's recomputed log-probs
        sums.add("rollout_logprob_diff", ((gen.sampling_logprobs - old_lp).abs() * mask).sum().item(), n_tok)
    if dynamic_sampling:
        sums.add("dropped_groups", batch.dropped_groups, 1.0 / world)


def _reward_by_level(correct: torch.Tensor, levels: torch.Tensor) -> dict[str, float]:
    """Mean task reward per level of the whole batch ('all' for rows without a level)."""
    out = {}
    for lv in sorted(set(levels.long().tolist())):
        sel = levels.long() == lv
        out["all" if lv == 0 else f"level_{lv}"] = correct[sel].mean().item()
    return out


# -- evaluation, checkpoints, the end ------------------------------------------------------------------------------
def run_eval(run: Run, step: int) -> None:
    """Held-out accuracy per level (greedy and avg@k), appended to the history and eval.json."""
    res = evaluate(run.engine, run.tokenizer, run.eval_problems, run.cfg, seed=run.cfg.task.eval_seed + step)
    run.history.append({"step": step, **res})
    run.logger.log_eval(step, res, run.history)
    run.logger.print(format_eval_table([run.history[-1]]))


def save_checkpoint(run: Run, step: int) -> None:
    """OUTPUT/checkpoints/step_N (every rank; atomic)."""
    state = {"step": step, "anchor": run.anchor.state_dict(), "data": run.source.state_dict(),
             "eval_history": run.history, "config": run.cfg.to_dict()}
    path = ckpt.save(os.path.join(run.output_dir, "checkpoints"), step, run.par, state, run.cfg.checkpoint.keep_last)
    if path:
        run.logger.print(f"checkpoint: {path}")


def _maybe_crash(step: int) -> None:
    """Test hook: HADW_TEST_CRASH="RANK:STEP" kills that rank hard at the start of that step, on the first start
    only (torchrun restarts the group; tests/test_trainer_distributed.py checks that no step is lost)."""
    spec = os.environ.get("HADW_TEST_CRASH")
    if spec and _restarted() == 0:
        r, s = (int(x) for x in spec.split(":"))
        if r == dist.rank() and s == step:
            print(f"HADW_TEST_CRASH: rank {r} exits at step {s}", flush=True)
            os._exit(17)


def finish(run: Run) -> dict[str, Any]:
    """Close the engine, export the policy as a HF model (OUTPUT/hf), write plots, print the before/after table.
    Returns {'final_eval', 'metrics', 'output_dir', 'anchor', 'step', 'model', 'tokenizer'}."""
    cfg, out = run.cfg, run.output_dir
    run.logger.close()
    run.engine.close()  # vLLM: free the engine and its model directory
    if cfg.checkpoint.export_hf and dist.is_main():
        hf_dir = os.path.join(out, "hf")
        tmp = hf_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(run.par.rollout_module, run.tokenizer, tmp)  # full weights: the replica is synced every step
        shutil.rmtree(hf_dir, ignore_errors=True)
        os.replace(tmp, hf_dir)
        print(f"exported the policy as a Hugging Face model: {hf_dir}")
    dist.barrier()
    if dist.is_main() and cfg.train.plots:
        try:
            from hadw_trainer.observe.plots import plot_run

            print(f"plots: {', '.join(plot_run(out))}")
        except ImportError:
            print("plots skipped: matplotlib is not installed")
    h = run.history
    if dist.is_main() and h:
        print("held-out accuracy by level:\n" + format_eval_table([h[0], h[-1]] if len(h) > 1 else h))
        print(f"outputs: {out}/metrics.jsonl, eval.json, plots/, checkpoints/")
    return {"final_eval": h[-1] if h else None, "metrics": run.metrics, "output_dir": out,
            "anchor": run.anchor.state_dict(), "step": cfg.train.max_steps, "model": run.par.rollout_module,
            "tokenizer": run.tokenizer}


def train(cfg: JobConfig, output_dir: str, resume: bool = False,
          engine_factory: Callable[[torch.nn.Module, Any], RolloutEngine] | None = None) -> dict[str, Any]:
    """Run a job (every rank under torchrun): setup, the RL steps with periodic eval and checkpoints, finish."""
    run = setup(cfg, output_dir, resume=resume, engine_factory=engine_factory)
    ev, ck = cfg.eval, cfg.checkpoint
    for step in range(run.start + 1, cfg.train.max_steps + 1):
        _maybe_crash(step)
        rl_step(run, step)
        last = step == cfg.train.max_steps
        if (ev.every and step % ev.every == 0) or (last and (ev.greedy or ev.k)):
            run_eval(run, step)
        if (ck.every and step % ck.every == 0) or (last and ck.save_final):
            save_checkpoint(run, step)
    return finish(run)
