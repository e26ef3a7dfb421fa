"""One-process checks of the distributed options: config validation of `parallel.*` / `rollout.engine`, the
`--backend` flag, the backend check on resume, and the loop's vLLM wiring (against a stand-in engine module, so it
runs without vLLM: constructed once from the full-weight policy, weights pushed after every update, closed)."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

pytest.importorskip("transformers")

from hadw_trainer.config import ConfigError, apply_overrides  # noqa: E402
from hadw_trainer.parallel import checkpoint as ckpt  # noqa: E402
from hadw_trainer.recipes import get_recipe  # noqa: E402


def tiny_config(cache: str, *overrides: str):
    """The `smoke` recipe with its base model cached under `cache`."""
    return apply_overrides(get_recipe("smoke"), [f"sft.cache_dir={cache}", *overrides])


def _invalid(*overrides: str, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_recipe("tiny-arith"), list(overrides)).validate(world_size)
    return str(e.value)


def test_parallel_config_validation():
    assert "choose one of single, ddp, fsdp2, zero2, zero3" in _invalid("parallel.backend=fsdp")
    assert "DeepSpeed's CPU offload" in _invalid("parallel.backend=ddp", "parallel.offload=true")
    for backend in ("single", "ddp", "fsdp2", "zero2", "zero3"):  # the from-hidden LM head runs on every backend
        apply_overrides(get_recipe("tiny-arith"), [f"parallel.backend={backend}", "model.logprob_memory_mb=1"]
                        ).validate(2)
    assert "model.logprob_memory_mb=-1.0 must be >= 0" in _invalid("model.logprob_memory_mb=-1")
    assert "choose one of hf, vllm" in _invalid("rollout.engine=sglang")
    assert "must divide world_size=2" in _invalid("rollout.engine=vllm", "rollout.vllm_tensor_parallel_size=4",
                                                  world_size=2)
    assert "parallel.timeout_s" in _invalid("parallel.timeout_s=0")
    for backend in ("single", "ddp", "fsdp2", "zero2", "zero3"):
        apply_overrides(get_recipe("tiny-arith"), [f"parallel.backend={backend}"]).validate(2)
    apply_overrides(get_recipe("tiny-arith"), ["parallel.backend=zero3", "parallel.offload=true"]).validate(2)
    for name in ("qwen3-4b-base-grpo-hadw", "qwen3-8b-base-dapo", "llama3.2-3b-instruct-gspo-hadw"):
        cfg = apply_overrides(get_recipe(name), ["model.path=/m", "task.path=/d.jsonl"])
        cfg.validate(8)  # the paper's runs on 8 GPUs
        assert cfg.parallel.backend == "zero2" and cfg.rollout.engine == "vllm"


def test_backend_flag(capsys):
    from hadw_trainer.cli import main

    assert main(["show", "--recipe", "tiny-arith", "--backend", "zero3"]) == 0
    assert json.loads(capsys.readouterr().out)["parallel"]["backend"] == "zero3"
    with pytest.raises(SystemExit):
        main(["show", "--recipe", "tiny-arith", "--backend", "fsdp1"])


def test_resume_refuses_another_backends_checkpoint(tmp_path):
    from hadw_trainer.loop import train

    cache, out = str(tmp_path / "cache"), str(tmp_path / "run")
    train(tiny_config(cache, "train.max_steps=1", "eval.k=0"), out)
    step1 = os.path.join(out, "checkpoints", "step_1")
    man_path = os.path.join(step1, "manifest.json")
    with open(man_path) as f:
        man = json.load(f)
    assert man["backend"] == "single" and "model.safetensors" in man["files"]
    man["backend"] = "zero3"  # as if written by a ZeRO-3 run (the manifest does not hash itself)
    with open(man_path, "w") as f:
        json.dump(man, f)
    with pytest.raises(ckpt.CheckpointError, match="written by backend 'zero3'; this run uses 'single'"):
        ckpt.load(step1, None, None, types.SimpleNamespace(backend="single"))
    # the consolidated export loads as a plain HF model
    from hadw_trainer.model import load_model

    model, _ = load_model(os.path.join(out, "hf"), tiny_config(cache).model)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_vllm_engine_wiring(tmp_path, monkeypatch):
    """rollout.engine=vllm: the loop imports hadw_trainer.rollout.vllm_engine only then, builds VLLMRollout from the
    policy with the config's settings, sleeps it after each rollout, pushes weights after every update and closes it.
    The stand-in generates with HF, so the run must equal an HF-engine run exactly."""
    from hadw_trainer.loop import train
    from hadw_trainer.rollout.hf_engine import HFRollout

    calls: dict = {"init": [], "sync": 0, "close": 0, "sleep": 0}

    class FakeVLLMRollout(HFRollout):
        def __init__(self, model, tokenizer, *, model_path, tensor_parallel_size, gpu_memory_utilization):
            calls["init"].append((model_path, tensor_parallel_size, gpu_memory_utilization))
            super().__init__(model, tokenizer)

        def sync_weights(self, model):
            assert model is self.model
            calls["sync"] += 1

        def close(self):
            calls["close"] += 1

        def sleep(self):
            calls["sleep"] += 1

    monkeypatch.setitem(sys.modules, "hadw_trainer.rollout.vllm_engine",
                        types.SimpleNamespace(VLLMRollout=FakeVLLMRollout))
    cache = str(tmp_path / "cache")
    common = ("train.max_steps=2", "eval.k=0")
    res = train(tiny_config(cache, *common, "rollout.engine=vllm", "rollout.vllm_gpu_memory_utilization=0.5"),
                str(tmp_path / "vllm"))
    assert calls == {"init": [(None, 1, 0.5)], "sync": 2, "close": 1, "sleep": 2}  # sleep after each rollout
    ref = train(tiny_config(cache, *common), str(tmp_path / "hf"))
    for k in ("loss", "grad_norm", "reward_mean", "anchor_prior"):
        assert res["metrics"][k] == ref["metrics"][k], k
