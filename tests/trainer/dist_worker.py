"""Run under torchrun by tests/test_trainer_distributed.py: several short tiny-arith jobs per launch (a launch costs
10-16 s), one per backend, each rank dumping what it holds to OUT/<run>/rank<r>.json.

    python -m torch.distributed.run --nproc-per-node 2 dist_worker.py CACHE OUT BACKEND|VARIANT[,...]

For each backend: `fixed_<b>` trains on a fixed batch (FixedRollout: the same responses on any number of ranks, so
the test compares it with a single-process run), and for ddp / fsdp2 / zero2 / zero3 `full_<b>` (3 steps) and `res_<b>`
(2 steps, then resumed to 3) check that the backend's sharded checkpoint resumes exactly; then `head_<b>_<case>`
(`head_check`, below): one update of a model whose LM head ZeRO-3 really partitions, through the from-hidden path in
chunks and vocabulary blocks. A VARIANT (below) is a backend with an option (CPU offload), run on the fixed batch only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys

import torch

from hadw_trainer.config import JobConfig, apply_overrides
from hadw_trainer.logprobs import batch_logprobs
from hadw_trainer.observe.logger import TIMING_KEYS, StepSums
from hadw_trainer.parallel import process_group as dist
from hadw_trainer.parallel.backends import Parallel
from hadw_trainer.recipes import get_recipe
from hadw_trainer.rollout.engine import Generation, concat_generations
from hadw_trainer.rollout.hf_engine import HFRollout
from hadw_trainer.update import update

# The fixed-batch runs: one optimizer step per RL step (so a global mini-batch holds the same prompts on any
# number of ranks) and no evaluation (it would draw from the engine).
FIXED = ("algo.mini_batch_prompts=8", "algo.micro_batch_prompts=2", "eval.greedy=false", "eval.k=0",
         "parallel.timeout_s=120")  # a desynchronised collective fails in 2 min instead of hanging for 10
RESUMABLE = ("ddp", "fsdp2", "zero2", "zero3")
# Fixed-batch runs of options on top of a backend (run name -> overrides).
VARIANTS = {
    "zero2_offload": ("parallel.backend=zero2", "parallel.offload=true"),
    "zero3_offload": ("parallel.backend=zero3", "parallel.offload=true"),
}

# The from-hidden LM head where the tiny recipe cannot reach: its 60k-parameter model has no parameter above ZeRO-3's
# persistence threshold (1e5 entries; smaller ones are never partitioned) and a 20-token vocabulary (one chunk).
# Here a Llama-style model with a 1024 x 128 LM head (131k entries: partitioned under ZeRO-3), micro-batches of one
# prompt x 4 responses (~85 valid tokens), one update of 2 micro-batches per rank (4 on one process) through
# `update` for 2 epochs (the second off-policy: the clip branches fire), the old / ref passes through
# `batch_logprobs`. Cases (name -> tied head, overrides):
HEAD_CASES = {
    # GSPO over vocabulary blocks: two passes, the head's weight needed again in the backward (64-token chunks,
    # 4 blocks of 256 entries at 64 KiB); clip range 0.05 so that some sequences clip in the second epoch
    "tied_gspo_split": (True, ("algo.preset=gspo", "algo.loss.clip_low=0.05", "algo.loss.clip_high=0.05",
                               "model.logprob_memory_mb=0.0625")),
    # GRPO with a KL reference: one pass over whole-vocabulary chunks of 64 tokens (256 KiB)
    "untied_grpo_kl": (False, ("algo.preset=grpo", "algo.loss.kl_coef=0.05", "model.logprob_memory_mb=0.25")),
}
HEAD_VOCAB, HEAD_TEMPERATURE = 1024, 0.7
HEAD_SCALE = {True: 2.0, False: 8.0}
HEAD_SETTINGS = ("rollout.group_size=4", "rollout.prompts_per_step=4", "algo.mini_batch_prompts=4",
                 "algo.micro_batch_prompts=1", "optim.lr=1e-4", "optim.grad_clip=1.0")


def tiny_config(cache: str, *overrides: str) -> JobConfig:
    """The `smoke` recipe with its base model cached under `cache`."""
    return apply_overrides(get_recipe("smoke"), [f"sft.cache_dir={cache}", *overrides])


class FixedRollout(HFRollout):
    """HF sampling, one prompt per `generate` call, seeded by (call number, the prompt's index in the global batch):
    rank r of W holds global prompts r*P ... r*P+P-1, so every prompt gets the same responses whatever W is."""

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        super().__init__(model, tokenizer)
        self.calls = 0

    def generate(self, prompts, n, **kw):
        self.calls += 1
        parts = []
        for i, p in enumerate(prompts):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1_000_003 * self.calls + dist.rank() * len(prompts) + i)
                parts.append(super().generate([p], n, **kw))
        return concat_generations(parts, self.tokenizer.pad_token_id)


def dump(res: dict, out: str) -> None:
    params = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in res["model"].parameters()))
    rows = []
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]
    norms = [p.detach().double().norm().item() for p in res["model"].parameters()]
    state = {"rank": dist.rank(), "param_norms": norms, "world_size": dist.world_size(), "anchor": res["anchor"],
             "metrics": {k: v for k, v in res["metrics"].items() if k not in TIMING_KEYS},
             "final_eval": res["final_eval"], "params": params.hexdigest(), "rows": rows}
    with open(os.path.join(out, f"rank{dist.rank()}.json"), "w") as f:
        json.dump(state, f)


def head_batch(n: int = 16, P: int = 6, T: int = 30) -> tuple[Generation, torch.Tensor]:
    """A fixed batch of 4 prompts x 4 responses (left-padded prompts, responses of 12..T tokens) and advantages."""
    g = torch.Generator().manual_seed(7)
    p_ids = torch.randint(3, HEAD_VOCAB, (n, P), generator=g)
    p_mask = torch.ones_like(p_ids)
    p_mask[::3, :2] = 0
    lengths = torch.randint(12, T + 1, (n,), generator=g)
    r_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    r_ids = torch.randint(3, HEAD_VOCAB, (n, T), generator=g) * r_mask
    return Generation(p_ids, p_mask, r_ids, r_mask), torch.randn(n, generator=g)


def head_check(cache: str, backend: str, case: str) -> dict:
    """One RL update of `HEAD_CASES[case]` under `backend` on this rank's rows of `head_batch` (all of them on one
    process): the reduced old-pass and loss metrics, the gradient norm, the full weights after the step, and
    whether ZeRO-3 partitioned the LM head's weight."""
    import transformers as tf

    tied, overrides = HEAD_CASES[case]
    cfg = tiny_config(cache, f"parallel.backend={backend}", *HEAD_SETTINGS, *overrides)
    cfg.validate(dist.world_size())
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=HEAD_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=tied)).train()
    with torch.no_grad():  # logits spread over a few units: the ratios move, the clip branches fire
        model.get_output_embeddings().weight.mul_(HEAD_SCALE[tied])
    loss_cfg = cfg.algo.loss_config()
    ref = copy.deepcopy(model).eval().requires_grad_(False) if loss_cfg.kl_coef > 0 else None
    par = Parallel.build(cfg, model)
    gen, adv = head_batch()
    world, rank = dist.world_size(), dist.rank()
    n = adv.numel() // world
    mine = slice(rank * n, (rank + 1) * n)
    gen = Generation(gen.prompt_ids[mine], gen.prompt_mask[mine], gen.response_ids[mine], gen.response_mask[mine])
    budget, per_call = cfg.model.logprob_memory_budget(), cfg.algo.micro_batch_prompts * cfg.rollout.group_size
    old_lp, old_ent = batch_logprobs(par.model, gen, per_call, HEAD_TEMPERATURE, budget)
    ref_lp = batch_logprobs(ref, gen, per_call, HEAD_TEMPERATURE, budget)[0] if ref is not None else None
    sums = StepSums()
    mask = gen.response_mask.float()
    sums.add("old_logprob", (old_lp * mask).sum().item(), mask.sum().item())
    sums.add("rollout_entropy", (old_ent * mask).sum().item(), mask.sum().item())
    steps = update(par, gen, adv[mine], old_lp, loss_cfg, sums, mini_rows=n, micro_rows=per_call, epochs=2,
                   grad_clip=cfg.optim.grad_clip, temperature=HEAD_TEMPERATURE, backend="torch",
                   ref_logprobs=ref_lp, memory_budget=budget)
    head = par.model.module.head_weight() if backend.startswith("zero") else None
    partitioned = bool(head is not None and hasattr(head, "ds_persist") and not head.ds_persist and
                       head.ds_status.name == "NOT_AVAILABLE")
    weights = {k: v.detach().cpu().clone() for k, v in par.full_state_dict().items()}
    return {"metrics": sums.reduce(), "optimizer_steps": steps, "weights": weights, "head_partitioned": partitioned}


def main() -> None:
    from hadw_trainer.loop import train

    cache, out, backends = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    for b in backends:
        run = os.path.join(out, f"fixed_{b}")
        over = VARIANTS.get(b, (f"parallel.backend={b}",))
        dump(train(tiny_config(cache, *over, *FIXED), run, engine_factory=FixedRollout), run)
        if b in RESUMABLE:
            common = (f"parallel.backend={b}", "checkpoint.every=2", "eval.every=2", "parallel.timeout_s=120")
            run = os.path.join(out, f"full_{b}")
            dump(train(tiny_config(cache, "train.max_steps=3", *common), run), run)
            run = os.path.join(out, f"res_{b}")
            train(tiny_config(cache, "train.max_steps=2", *common), run)
            dump(train(tiny_config(cache, "train.max_steps=3", *common), run, resume=True), run)
        if b in RESUMABLE:
            for case in HEAD_CASES:
                res = head_check(cache, b, case)
                os.makedirs(os.path.join(out, "head"), exist_ok=True)
                torch.save(res, os.path.join(out, "head", f"{b}_{case}_rank{dist.rank()}.pt"))
    dist.shutdown()


if __name__ == "__main__":
    main()
