"""Run under torchrun by tests/test_trainer_ddp.py: a tiny job on every rank, then dump what each rank holds."""

import hashlib
import json
import os
import sys

from hadw_trainer.config import apply_overrides
from hadw_trainer.loop import train
from hadw_trainer.observe.logger import TIMING_KEYS
from hadw_trainer.parallel import process_group as dist
from hadw_trainer.recipes import get_recipe

cache, out = sys.argv[1], sys.argv[2]
cfg = apply_overrides(get_recipe("smoke"), [f"sft.cache_dir={cache}", "train.max_steps=2", "checkpoint.every=1",
                                            "eval.every=1"])
res = train(cfg, out)
params = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in res["model"].parameters()))
state = {"rank": dist.rank(), "world_size": dist.world_size(), "anchor": res["anchor"],
         "metrics": {k: v for k, v in res["metrics"].items() if k not in TIMING_KEYS},
         "final_eval": res["final_eval"], "params": params.hexdigest()}
with open(os.path.join(out, f"rank{dist.rank()}.json"), "w") as f:
    json.dump(state, f)
dist.shutdown()
