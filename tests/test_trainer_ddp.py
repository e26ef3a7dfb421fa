"""Two gloo processes under torchrun (one launch, ~15 s): every rank ends with the same anchor, the same reduced
metrics and the same weights; rank 0 writes world_size 2 into metrics.jsonl and a checkpoint per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from hadw_trainer.config import apply_overrides  # noqa: E402
from hadw_trainer.recipes import get_recipe  # noqa: E402
from hadw_trainer.sft import warmup  # noqa: E402

pytestmark = pytest.mark.distributed


def test_ddp_two_gloo_ranks_share_the_anchor(tmp_path):
    cache, out = str(tmp_path / "cache"), str(tmp_path / "run")
    # build the base model once, outside the timed launch
    warmup(apply_overrides(get_recipe("smoke"), [f"sft.cache_dir={cache}"]), lambda *_: None)
    worker = os.path.join(os.path.dirname(__file__), "trainer", "ddp_worker.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, cache, out]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["anchor"] == ranks[1]["anchor"]
    assert len(ranks[0]["anchor"]["accuracies"]) == 2  # one anchor.step per rollout batch
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # every logged metric is reduced over ranks
    assert ranks[0]["final_eval"] == ranks[1]["final_eval"]
    assert ranks[0]["params"] == ranks[1]["params"]  # gradients summed over ranks: the replicas stay identical
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["world_size"] for r in rows] == [2, 2]
    assert [r["anchor_prior"] for r in rows][1] == ranks[0]["anchor"]["accuracies"][0]  # window prior = y_1
    for step in (1, 2):
        man = json.load(open(os.path.join(out, "checkpoints", f"step_{step}", "manifest.json")))
        assert {"rng_rank0.pt", "rng_rank1.pt", "model.safetensors"} <= set(man["files"])
