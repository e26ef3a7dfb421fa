"""The data-parallel backends on two gloo ranks (CPU), two torchrun launches in all:

1. `dist_worker.py` trains the tiny recipe with ddp, fsdp2, zero2 and zero3 (and ZeRO with CPU offload) on a fixed
   batch, and runs each sharded format's save / resume. Every backend must match a single-process run on the same
   global batch (losses, gradient norms, both entropies, weights of the HF export), both ranks must hold the same
   anchor, metrics and weights, and a run resumed from a DCP / DeepSpeed checkpoint must log exactly the metrics of
   an uninterrupted run. Then each backend runs `head_check`: an update of a model whose LM head ZeRO-3 really
   partitions, through the from-hidden log-probs and loss in several chunks and vocabulary blocks (GSPO's two
   passes with a tied head, GRPO's one pass with a KL reference and an untied head), against the same on one
   process. Every log-prob and loss goes through the from-hidden path (the trainer has no other); a
   desynchronised collective fails after parallel.timeout_s = 120 s instead of hanging.
2. `python -m hadw_trainer` under `torchrun --max-restarts 1` with rank 1 killed at the start of step 3: torchrun
   restarts the group, the run resumes from its step-2 checkpoint by itself, and ends with the uninterrupted run's
   metrics, every step logged once.

DeepSpeed builds a shared-memory comm op the first time it starts on a machine (35-65 s here, cached under
~/.cache/torch_extensions afterwards); the first launch pays it once per machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402

from hadw_trainer.loop import train  # noqa: E402
from hadw_trainer.sft import warmup  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "trainer")
# the worker script's fixed-batch settings and engine, loaded from its file (torchrun runs the same file)
_spec = importlib.util.spec_from_file_location("dist_worker", os.path.join(HERE, "dist_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
FIXED, VARIANTS, FixedRollout, tiny_config = worker.FIXED, worker.VARIANTS, worker.FixedRollout, worker.tiny_config

pytestmark = pytest.mark.distributed

# the zero backends need the optional DeepSpeed (not imported here: it only runs in the torchrun workers)
BACKENDS = ["ddp", "fsdp2"] + (["zero2", "zero3"] if importlib.util.find_spec("deepspeed") else [])
# + DeepSpeed CPU offload
FIXED_RUNS = BACKENDS + (list(VARIANTS) if "zero2" in BACKENDS else [])
RESUMABLE = [b for b in ("ddp", "fsdp2", "zero2", "zero3") if b in BACKENDS]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0"}


def _torchrun(args: list[str], timeout: int = 1200) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(output root, cache): the single-process reference in this process, then one 2-rank launch of every backend."""
    root = tmp_path_factory.mktemp("dist")
    cache, out = str(root / "cache"), str(root / "out")
    warmup(tiny_config(cache), lambda *_: None)  # the base model, built once outside the launches
    train(tiny_config(cache, *FIXED), os.path.join(out, "fixed_single"), engine_factory=FixedRollout)
    _torchrun([os.path.join(HERE, "dist_worker.py"), cache, out, ",".join(FIXED_RUNS)])
    return out, cache


def _rank(out: str, run: str, r: int) -> dict:
    with open(os.path.join(out, run, f"rank{r}.json")) as f:
        return json.load(f)


def _rows(run_dir: str) -> list[dict]:
    from hadw_trainer.observe.logger import TIMING_KEYS

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def _hf_weights(run_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "hf", "model.safetensors"))


@pytest.mark.parametrize("backend", FIXED_RUNS)
def test_backend_matches_single_process(runs, backend):
    out, _ = runs
    single = _rows(os.path.join(out, "fixed_single"))
    got = _rows(os.path.join(out, f"fixed_{backend}"))
    assert [r["step"] for r in got] == [1, 2, 3] and all(r["world_size"] == 2 for r in got)
    for g, s in zip(got, single, strict=True):
        for k in ("reward_mean", "anchor_prior", "anchor_posterior", "response_len_mean", "degenerate_group_frac"):
            assert g[k] == s[k], (backend, g["step"], k)  # the same global batch
        for k in ("loss", "grad_norm", "phi_mean", "adv_abs_mean", "clipfrac", "approx_kl", "entropy",
                  "rollout_entropy"):
            assert g[k] == pytest.approx(s[k], rel=1e-5, abs=1e-7), (backend, g["step"], k)
    # the weights after 3 optimizer steps, from each run's consolidated HF export. Adam turns gradients that are fp
    # noise (k_proj.bias: softmax ignores it) into lr-sized steps, so summation order shows at ~1e-6 there.
    want, have = _hf_weights(os.path.join(out, "fixed_single")), _hf_weights(os.path.join(out, f"fixed_{backend}"))
    assert set(have) == set(want)
    for k in want:
        torch.testing.assert_close(have[k], want[k], rtol=1e-5, atol=2e-5, msg=lambda m, k=k: f"{backend} {k}: {m}")


@pytest.fixture(scope="module")
def head_single(runs):
    """`head_check` of every case on one process (backend single, the whole batch)."""
    _, cache = runs
    return {case: worker.head_check(cache, "single", case) for case in worker.HEAD_CASES}


@pytest.mark.parametrize("case", list(worker.HEAD_CASES))
@pytest.mark.parametrize("backend", RESUMABLE)
def test_from_hidden_head_matches_single_process(runs, head_single, backend, case):
    """Old / ref log-probs, the loss and its metrics (entropy of the policy being trained included), the gradient
    norm and the weights after 2 optimizer steps through the from-hidden head under `backend` equal one process's;
    both ranks agree; under ZeRO-3 the LM head's weight was really partitioned."""
    out, _ = runs
    want = head_single[case]
    r0, r1 = (torch.load(os.path.join(out, "head", f"{backend}_{case}_rank{r}.pt"), weights_only=False)
              for r in (0, 1))
    assert r0["metrics"] == r1["metrics"] and r0["optimizer_steps"] == want["optimizer_steps"] == 2
    assert set(r0["metrics"]) == set(want["metrics"]) and want["metrics"]["clipfrac"] > 0
    for k, v in want["metrics"].items():
        # grad_norm: torch's clip_grad_norm_ sums squares in fp32; on the tied 131k-entry embedding that norm is
        # 1.2e-5 below the float64 norm of the same gradient (measured), so the single-process, DDP and FSDP2
        # (per-shard) norms and DeepSpeed's float64 one differ by up to 7.7e-6 while the gradients agree within
        # 5e-8 (compared one by one through deepspeed.utils.safe_get_full_grad)
        rel = 3e-5 if k == "grad_norm" else 1e-5
        assert r0["metrics"][k] == pytest.approx(v, rel=rel, abs=1e-7), (backend, case, k)
    assert set(r0["weights"]) == set(want["weights"])
    for k, v in want["weights"].items():
        assert torch.equal(r0["weights"][k], r1["weights"][k]), (backend, case, k)
        torch.testing.assert_close(r0["weights"][k], v, rtol=1e-5, atol=2e-5,
                                   msg=lambda m, k=k: f"{backend} {case} {k}: {m}")
    assert r0["head_partitioned"] == r1["head_partitioned"] == (backend == "zero3")


@pytest.mark.parametrize("backend", FIXED_RUNS)
def test_ranks_hold_the_same_anchor_metrics_and_weights(runs, backend):
    out, _ = runs
    r0, r1 = _rank(out, f"fixed_{backend}", 0), _rank(out, f"fixed_{backend}", 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["anchor"] == r1["anchor"] and len(r0["anchor"]["accuracies"]) == 3
    assert r0["metrics"] == r1["metrics"]  # every logged metric is reduced over ranks
    assert r0["params"] == r1["params"]  # the generation replicas are identical


@pytest.mark.parametrize("backend", RESUMABLE)
def test_sharded_checkpoint_resumes_exactly(runs, backend):
    out, _ = runs
    full, resumed = os.path.join(out, f"full_{backend}"), os.path.join(out, f"res_{backend}")
    assert _rows(resumed) == _rows(full)
    assert _rank(out, f"res_{backend}", 0)["params"] == _rank(out, f"full_{backend}", 0)["params"]
    with open(os.path.join(resumed, "eval.json")) as f, open(os.path.join(full, "eval.json")) as g:
        assert json.load(f)["history"] == json.load(g)["history"]
    step2 = os.path.join(resumed, "checkpoints", "step_2")
    with open(os.path.join(step2, "manifest.json")) as f:
        files = json.load(f)["files"]
    if backend == "ddp":  # the single-process format: rank 0's full weights and optimizer
        assert {"model.safetensors", "optimizer.pt"} <= set(files)
    else:  # the backend's own sharded format, every shard hashed
        sharded = "dcp/" if backend == "fsdp2" else "zero/"
        assert any(name.startswith(sharded) for name in files) and "model.safetensors" not in files
    assert {"rng_rank0.pt", "rng_rank1.pt", "state.json"} <= set(files)


@pytest.mark.skipif("fsdp2" not in BACKENDS, reason="needs torch.distributed.fsdp")
def test_torchrun_restart_after_a_killed_rank_loses_no_step(runs, tmp_path):
    out, cache = runs
    run = str(tmp_path / "crash")
    sets = [f"sft.cache_dir={cache}", "train.max_steps=3", "checkpoint.every=2", "eval.every=2",
            "parallel.timeout_s=120"]
    ENV["HADW_TEST_CRASH"] = "1:3"  # rank 1 exits hard at the start of step 3, on the first start only
    try:
        proc = _torchrun(["--max-restarts=1", "-m", "hadw_trainer", "--backend", "fsdp2", "--recipe", "smoke",
                          "--output-dir", run, "--set", *sets])
    finally:
        del ENV["HADW_TEST_CRASH"]
    log = proc.stdout + proc.stderr
    assert "HADW_TEST_CRASH: rank 1 exits at step 3" in log
    assert "resumed from" in log and "(step 2)" in log
    assert _rows(run) == _rows(os.path.join(out, "full_fsdp2"))  # steps 1, 2, 3 once each, same numbers
