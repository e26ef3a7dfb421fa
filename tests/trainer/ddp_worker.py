"""Run under torchrun by tests/test_trainer_ddp.py: a tiny job on every rank, then dump what each rank holds."""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from trainer_tiny import tiny_config  # noqa: E402

from hadw_trainer import distributed as dist  # noqa: E402
from hadw_trainer.logger import TIMING_KEYS  # noqa: E402
from hadw_trainer.loop import train  # noqa: E402

cache, out = sys.argv[1], sys.argv[2]
res = train(tiny_config(cache, "train.max_steps=2", "checkpoint.every=1", "eval.every=1"), out)
params = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in res["model"].parameters()))
state = {"rank": dist.rank(), "world_size": dist.world_size(), "anchor": res["anchor"],
         "metrics": {k: v for k, v in res["metrics"].items() if k not in TIMING_KEYS},
         "final_eval": res["final_eval"], "params": params.hexdigest()}
with open(os.path.join(out, f"rank{dist.rank()}.json"), "w") as f:
    json.dump(state, f)
dist.shutdown()
