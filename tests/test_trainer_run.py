"""End-to-end trainer runs of the `smoke` recipe (a 60k-parameter tiny-arith): golden losses, exact resume, corrupt
checkpoints, micro-batch invariance, the CLI and the math (math-verify) pipeline. Each run takes a few seconds on
one CPU thread."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402

from hadw_trainer.config import apply_overrides  # noqa: E402
from hadw_trainer.loop import train  # noqa: E402
from hadw_trainer.observe.logger import TIMING_KEYS  # noqa: E402
from hadw_trainer.parallel import checkpoint as ckpt  # noqa: E402
from hadw_trainer.recipes import get_recipe  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "trainer_tiny_3steps.json")
GOLDEN_KEYS = ("loss", "reward_mean", "anchor_prior", "phi_mean", "grad_norm", "adv_abs_mean", "response_len_mean")


def tiny_config(cache: str, *overrides: str):
    """The `smoke` recipe with its base model cached under `cache`."""
    return apply_overrides(get_recipe("smoke"), [f"sft.cache_dir={cache}", *overrides])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny base model is warmed up once per module (cached by config hash under this directory)."""
    return str(tmp_path_factory.mktemp("base_cache"))


@pytest.fixture(scope="module")
def full_run(cache, tmp_path_factory):
    """4 uninterrupted steps with checkpoints at 2 and 4: the reference for resume and corruption tests."""
    out = str(tmp_path_factory.mktemp("full"))
    cfg = tiny_config(cache, "train.max_steps=4", "checkpoint.every=2", "eval.every=2")
    train(cfg, out)
    return out


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_golden_losses(cache, tmp_path):
    """The smoke recipe's first 3 steps against the committed golden file. A missing file fails; the file is only
    written when asked (HADW_UPDATE_GOLDEN=1), deliberately, when the recipe or the task changes."""
    train(tiny_config(cache), str(tmp_path))
    got = [{k: r[k] for k in ("step", *GOLDEN_KEYS)} for r in _metrics(tmp_path)]
    if os.environ.get("HADW_UPDATE_GOLDEN") == "1":
        with open(GOLDEN, "w") as f:
            json.dump({"recipe": "smoke", "steps": got}, f, indent=1)
        pytest.skip(f"HADW_UPDATE_GOLDEN=1: wrote {GOLDEN}; review and commit it, saying why it changed")
    assert os.path.exists(GOLDEN), f"{GOLDEN} is missing: restore it from git, or regenerate it deliberately with " \
                                   f"HADW_UPDATE_GOLDEN=1 (and say why in the commit)"
    with open(GOLDEN) as f:
        want = json.load(f)["steps"]
    assert len(got) == len(want) == 3
    assert any(abs(w["loss"]) > 1e-4 for w in want), "the golden run must have a non-zero loss to guard anything"
    for g, w in zip(got, want, strict=True):
        for k in GOLDEN_KEYS:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (g["step"], k)


def test_resume_is_exact(cache, full_run, tmp_path):
    out = str(tmp_path)
    cfg = tiny_config(cache, "train.max_steps=2", "checkpoint.every=2", "eval.every=2")
    train(cfg, out)
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_2"))
    # a crash after step 2 may leave later lines: resume must drop them
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    cfg = tiny_config(cache, "train.max_steps=4", "checkpoint.every=2", "eval.every=2")
    res = train(cfg, out, resume=True)
    assert _metrics(out) == _metrics(full_run)
    with open(os.path.join(out, "eval.json")) as f, open(os.path.join(full_run, "eval.json")) as g:
        assert json.load(f)["history"] == json.load(g)["history"]
    assert res["anchor"]["accuracies"] == [m["reward_mean"] for m in _metrics(full_run)]


def test_fresh_run_refuses_existing_checkpoints(cache, full_run):
    with pytest.raises(ckpt.CheckpointError, match="--resume"):
        train(tiny_config(cache), full_run)


def test_corrupt_and_partial_checkpoints(cache, full_run, tmp_path):
    ckdir = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(full_run, "checkpoints"), ckdir)
    assert [s for s, _ in ckpt.list_checkpoints(ckdir)] == [2, 4]
    step4, step2 = os.path.join(ckdir, "step_4"), os.path.join(ckdir, "step_2")
    ckpt.verify(step4)
    # flip one byte in the weights: detected by the manifest hash, and nothing is loaded
    path = os.path.join(step4, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    from hadw_trainer.model import build_tiny_model, char_tokenizer

    cfg = tiny_config(cache)
    model = build_tiny_model(cfg.model, char_tokenizer())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError, match="corrupt: model.safetensors does not match"):
        ckpt.load(step4, model, None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    warnings = []
    assert ckpt.latest_complete(ckdir, warnings.append) == step2
    assert "step_4 is corrupt" in warnings[0]
    # a save that died before its manifest: partial
    os.remove(os.path.join(step2, "manifest.json"))
    with pytest.raises(ckpt.CheckpointError, match="partial"):
        ckpt.verify(step2)
    # a half-written temporary directory is never mistaken for a checkpoint
    os.makedirs(os.path.join(ckdir, ".tmp_step_6"))
    assert ckpt.latest_complete(ckdir, warnings.append) is None
    # --resume over nothing but broken checkpoints is an error, not a silent restart
    run = str(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="partial or corrupt"):
        train(tiny_config(cache, "train.max_steps=4"), run, resume=True)


def test_micro_batch_invariance(cache, tmp_path):
    """The same step with 1 or 2 prompts per micro-batch gives the same loss and gradient norm."""
    a = train(tiny_config(cache, "train.max_steps=1", "algo.micro_batch_prompts=1"), str(tmp_path / "a"))
    b = train(tiny_config(cache, "train.max_steps=1", "algo.micro_batch_prompts=4"), str(tmp_path / "b"))
    for k in ("loss", "grad_norm", "reward_mean"):
        assert a["metrics"][k] == pytest.approx(b["metrics"][k], rel=1e-5, abs=1e-7), k


def test_collectives_per_step(cache, tmp_path, monkeypatch):
    """What crosses ranks in a step: one gather of the rewards, one all-reduce of the loss normaliser per optimizer
    step, and one all-reduce of the metrics (counted on one process, where each is the identity)."""
    from hadw_trainer.parallel import process_group

    calls = {"gather": 0, "sum": 0}

    def count(name, fn):
        def wrapped(t):
            calls[name] += 1
            return fn(t)
        return wrapped

    monkeypatch.setattr(process_group, "all_gather_rows", count("gather", process_group.all_gather_rows))
    monkeypatch.setattr(process_group, "all_reduce_sum", count("sum", process_group.all_reduce_sum))
    res = train(tiny_config(cache, "train.max_steps=2", "eval.greedy=false", "eval.k=0"), str(tmp_path))
    steps = 2
    assert res["metrics"]["optimizer_steps"] == 2  # 8 prompts per step, 4 per optimizer step
    assert calls == {"gather": steps, "sum": steps * (2 + 1)}


def test_dynamic_sampling_and_ema_anchor_run(cache, tmp_path):
    res = train(tiny_config(cache, "train.max_steps=2", "rollout.dynamic_sampling=true", "rollout.max_refill_rounds=1",
                            "algo.anchor.mode=ema", "algo.preset=dapo", "rollout.overlong_buffer=1"), str(tmp_path))
    m = res["metrics"]
    assert m["anchor_eta"] is not None and 0 <= m["anchor_eta"] <= 1
    assert m["responses_generated"] >= 32 and "dropped_groups" in m


def test_cli_end_to_end(cache, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "hadw_trainer", "--recipe", "smoke", "--output-dir", out, "--max-steps", "2",
           "--seed", "1", "--set", f"sft.cache_dir={cache}", "train.plots=true", "train.tensorboard=true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy by level" in proc.stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("step", "world_size", "reward_mean", "reward_by_level", "anchor_prior", "anchor_eta", "loss",
                "phi_mean", "clipfrac", "approx_kl", "response_len_mean", "degenerate_group_frac", "entropy",
                "tokens_per_s"):
        assert key in rows[0], key
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert set(ev["final"]["greedy"]) == {"level_1", "level_2", "overall"} and "avg@2" in ev["final"]
    assert ev["base"]["step"] == 0 and ev["final"]["step"] == 2
    for name in ("plots/reward.png", "plots/accuracy_by_level.png", "checkpoints/step_2/manifest.json",
                 "config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    if _has("tensorboard"):
        assert os.listdir(os.path.join(out, "tb"))
    # compare, in-process (same entry point)
    from hadw_trainer.cli import main

    png = str(tmp_path / "cmp.png")
    assert main(["compare", out, out, "--labels", "a", "b", "--out", png]) == 0
    assert os.path.exists(png)


def _has(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def test_math_pipeline_with_local_model(tmp_path):
    """The paper-style recipe path: a local HF model dir + the shipped JSONL + math-verify reward."""
    pytest.importorskip("math_verify")
    import string

    from hadw_trainer.config import ModelConfig, apply_overrides
    from hadw_trainer.model import build_tiny_model, char_tokenizer, save_model
    from hadw_trainer.recipes import get_recipe

    tok = char_tokenizer(string.printable)
    model_dir = str(tmp_path / "model")
    torch.manual_seed(0)
    save_model(build_tiny_model(ModelConfig(hidden_size=32, num_layers=1, intermediate_size=64,
                                            max_position_embeddings=256), tok), tok, model_dir)
    cfg = apply_overrides(get_recipe("math-sample"), [f"model.path={model_dir}", "train.max_steps=1",
                                                      "rollout.max_new_tokens=8", "train.threads=1",
                                                      "train.plots=false", "train.tensorboard=false"])
    res = train(cfg, str(tmp_path / "run"))
    assert res["metrics"]["world_size"] == 1 and res["metrics"]["reward_mean"] == 0.0
    assert set(res["final_eval"]["greedy"]) == {"level_1", "level_2", "level_3", "level_4", "level_5", "overall"}
