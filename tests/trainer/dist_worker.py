"""Run under torchrun by tests/test_trainer_distributed.py: several short tiny-arith jobs per launch (a launch costs
10-16 s), one per backend, each rank dumping what it holds to OUT/<run>/rank<r>.json.

    python -m torch.distributed.run --nproc-per-node 2 dist_worker.py CACHE OUT BACKEND|VARIANT[,...]

For each backend: `fixed_<b>` trains on a fixed batch (FixedRollout: the same responses on any number of ranks, so
the test compares it with a single-process run), and for ddp / fsdp2 / zero2 / zero3 `full_<b>` (3 steps) and `res_<b>`
(2 steps, then resumed to 3) check that the backend's sharded checkpoint resumes exactly. A VARIANT (below) is a
backend with an option (CPU offload, chunked LM-head log-probs), run on the fixed batch only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

from hadw_trainer.config import JobConfig, apply_overrides
from hadw_trainer.observe.logger import TIMING_KEYS
from hadw_trainer.parallel import process_group as dist
from hadw_trainer.recipes import get_recipe
from hadw_trainer.rollout.engine import concat_generations
from hadw_trainer.rollout.hf_engine import HFRollout

# The fixed-batch runs: one optimizer step per RL step (so a global mini-batch holds the same prompts on any
# number of ranks) and no evaluation (it would draw from the engine).
FIXED = ("algo.mini_batch_prompts=8", "algo.micro_batch_prompts=2", "eval.greedy=false", "eval.k=0",
         "parallel.timeout_s=120")  # a desynchronised collective fails in 2 min instead of hanging for 10
RESUMABLE = ("ddp", "fsdp2", "zero2", "zero3")
# Fixed-batch runs of options on top of a backend (run name -> overrides).
VARIANTS = {
    "zero2_offload": ("parallel.backend=zero2", "parallel.offload=true"),
    "zero3_offload": ("parallel.backend=zero3", "parallel.offload=true"),
    "zero2_chunked": ("parallel.backend=zero2", "model.logprob_chunk_tokens=3"),
}


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
    dist.shutdown()


if __name__ == "__main__":
    main()
