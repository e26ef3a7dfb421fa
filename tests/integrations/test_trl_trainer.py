"""`HADWGRPOTrainer` against the real TRL 1.16: real `GRPOTrainer` steps on a tiny local Qwen2 on CPU.

- HA-DW off: every logged step's loss and grad-norm equal stock TRL's, for loss types grpo, bnpo, dr_grpo and dapo,
  in both modes (TRL's own loss; the fused `hadw_policy_loss`); step 2 reuses the generation batch
  (num_iterations=2), so its ratios are off 1, the clip fires and the KL (beta > 0) is non-zero.
- HA-DW on: the advantages entering the loss equal `hadw_advantages` on the same gathered rewards, the anchor steps
  once per generation batch, and it survives a checkpoint / resume.
- Two gloo processes under torchrun: the same anchor on both, each holding its slice of the global advantages.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from integration_support import require

require("trl")
import trl_runs as R  # noqa: E402

from hadw_kernels import DifficultyAnchor, LossConfig, hadw_advantages  # noqa: E402
from hadw_kernels.integrations.trl import ANCHOR_FILE  # noqa: E402

pytestmark = pytest.mark.slow
TOL = 1e-6
MEASURED: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def print_measured_parity():
    """Prints the measured differences after this module's tests; `pytest -s` shows them."""
    yield
    for case, text in sorted(MEASURED.items()):
        print(f"\n  {case}: {text}", end="")
    print()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return R.saved_model(str(tmp_path_factory.mktemp("tiny-qwen2")))


@pytest.fixture
def out(tmp_path):
    """The Trainer's output_dir."""
    return str(tmp_path / "out")


def compare_logs(name: str, reference, ours) -> None:
    """Loss and grad-norm of every logged step: |dloss| <= 1e-6 * max(1, |loss|) (the per-token loss terms are of
    the advantages' size, ~1, so a loss that cancels to ~0 is held to 1e-6 absolute), |dgrad_norm| / grad_norm <=
    1e-6."""
    ref_logs, our_logs = R.step_logs(reference), R.step_logs(ours)
    assert len(ref_logs) == len(our_logs) == reference.args.max_steps
    worst_loss = worst_rel = worst_gn = 0.0
    for ref, mine in zip(ref_logs, our_logs, strict=True):
        diff = abs(mine["loss"] - ref["loss"])
        worst_loss = max(worst_loss, diff / max(1.0, abs(ref["loss"])))
        worst_rel = max(worst_rel, diff / abs(ref["loss"]) if ref["loss"] else 0.0)
        worst_gn = max(worst_gn, abs(mine["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"])
    MEASURED[name] = (f"max |dloss| {worst_loss:.2e} (relative to |loss|: {worst_rel:.2e}), "
                      f"max |dgrad_norm| / grad_norm {worst_gn:.2e}")
    assert worst_loss <= TOL and worst_gn <= TOL, MEASURED[name]


PARITY = dict(num_iterations=2, beta=0.02, max_steps=2)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_hadw_off_equals_stock_trl_in_both_modes(loss_type, model_path, out):
    stock = R.train(R.RecordingStock, R.config(R.GRPOConfig, output_dir=out, loss_type=loss_type, **PARITY),
                    model_path)
    region = R.step_logs(stock)[1]["clip_ratio/region_mean"]
    assert region > 0 and R.step_logs(stock)[1]["kl"] > 0  # step 2 really clips and has a KL
    for mode in ("trl", "fused"):
        ours = R.train(R.RecordingHADW, R.config(output_dir=out, loss_type=loss_type, hadw=False, hadw_loss=mode,
                                                 hadw_backend="torch", **PARITY), model_path)
        compare_logs(f"{loss_type:7s} hadw off, hadw_loss={mode}", stock, ours)
        for ref, mine in zip(stock.records, ours.records, strict=True):  # advantages, TRL's vs ours with Phi = 1
            torch.testing.assert_close(mine["advantages"], ref["advantages"], rtol=0, atol=1e-5)
        if mode == "fused":
            for key in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
                for ref, mine in zip(R.step_logs(stock), R.step_logs(ours), strict=True):
                    assert mine[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key


def test_fused_gspo_with_masks_and_entropy_bonus_equals_stock_trl(model_path, out):
    """Sequence-level ratio (GSPO), off-policy sequence mask, high-entropy token mask and a static entropy bonus:
    TRL's multipliers enter the fused loss as rollout_is_weights."""
    extra = dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-2, epsilon_high=4e-2,
                 top_entropy_quantile=0.5, off_policy_mask_threshold=0.02, entropy_coef=0.01, **PARITY)
    stock = R.train(R.RecordingStock, R.config(R.GRPOConfig, output_dir=out, **extra), model_path)
    assert R.step_logs(stock)[1]["clip_ratio/region_mean"] > 0
    ours = R.train(R.RecordingHADW, R.config(output_dir=out, hadw=False, hadw_loss="fused", hadw_backend="torch",
                                             **extra), model_path)
    compare_logs("grpo    hadw off, fused, sequence ratio + masks + entropy bonus", stock, ours)
    for ref, mine in zip(R.step_logs(stock), R.step_logs(ours), strict=True):
        assert mine["policy_loss"] == pytest.approx(ref["policy_loss"], rel=1e-5, abs=1e-7)


def expected_advantages(record, config: LossConfig, group_size: int) -> torch.Tensor:
    return hadw_advantages(record["rewards"], group_size, anchor=record["prior"], config=config).advantages


@pytest.mark.parametrize("mode", ["trl", "fused"])
def test_hadw_on_advantages_equal_hadw_advantages_and_the_anchor_survives_a_checkpoint(mode, model_path, tmp_path):
    args = R.config(hadw_loss=mode, hadw_backend="torch", max_steps=3, save_strategy="steps", save_steps=2,
                    output_dir=str(tmp_path), hadw_lambda=1.5, hadw_anchor_window=4)
    run = R.train(R.RecordingHADW, args, model_path)
    cfg = LossConfig(std_eps=1e-4, lambda_scale=1.5)
    independent = DifficultyAnchor(window=4)
    assert len(run.records) == 3  # one generation batch per step (steps_per_generation = gradient accumulation)
    reweighted = False
    for record in run.records:
        assert record["prior"] == independent.step(record["rewards"])
        expected = expected_advantages(record, cfg, group_size=4)
        torch.testing.assert_close(record["advantages"], expected[record["rows"]], rtol=0, atol=0)
        plain = hadw_advantages(record["rewards"], 4, config=cfg.replace(hadw=False)).advantages
        if not torch.equal(expected, plain):
            reweighted = True
    assert reweighted  # Phi != 1 somewhere: HA-DW is really on
    logs = R.step_logs(run)
    assert [h["hadw/anchor"] for h in logs] == [r["prior"] for r in run.records]
    assert run.hadw_anchor.steps == 3

    saved = torch.load(os.path.join(tmp_path, "checkpoint-2", ANCHOR_FILE), weights_only=True)["anchor"]
    assert saved == run.records[1]["anchor"]
    resumed = R.train(R.RecordingHADW, args, model_path, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.records[0]["prior"] == run.records[2]["prior"]  # window prior of step 3 = mean(y_1, y_2)
    assert resumed.hadw_anchor.state_dict()["steps"] == 3


def test_unscorable_rewards_and_batch_scaling(model_path, out):
    args = R.config(output_dir=out, hadw_loss="trl", scale_rewards="batch", max_steps=2, hadw_anchor_mode="ema",
                    hadw_anchor_eta=0.5)
    run = R.train(R.RecordingHADW, args, model_path, reward=R.reward_unscorable_h)
    cfg = LossConfig(std_eps=1e-4, adv_norm="batch_std")
    anchor = DifficultyAnchor(mode="ema", eta=0.5)
    nan_rows = 0
    for record in run.records:
        assert record["prior"] == anchor.step(record["rewards"])
        expected = expected_advantages(record, cfg, group_size=4)
        torch.testing.assert_close(record["advantages"], expected[record["rows"]], rtol=0, atol=0)
        unscorable = torch.isnan(record["rewards"])
        nan_rows += int(unscorable.sum())
        assert (expected[unscorable] == 0).all()
    assert nan_rows > 0  # the None rewards really occurred

    # a batch with no scorable reward at all: no y_t, so the anchor keeps still; every advantage is 0
    run = R.train(R.RecordingHADW, R.config(output_dir=out, max_steps=1), model_path, reward=R.reward_none)
    assert run.hadw_anchor.steps == 0 and run.records[0]["prior"] is None
    assert (run.records[0]["advantages"] == 0).all()


def test_bad_settings_are_refused_with_the_reason(model_path, tmp_path, out):
    with pytest.raises(ValueError, match="hadw_loss='fused' supports loss_type"):
        R.train(R.RecordingHADW, R.config(output_dir=out, loss_type="sapo", hadw_loss="fused"), model_path)
    with pytest.raises(ValueError, match="normalize_then_sum"):
        R.train(R.RecordingHADW, R.config(output_dir=out, multi_objective_aggregation="normalize_then_sum"),
                model_path)
    with pytest.raises(ValueError, match="two-sided clipping"):
        R.train(R.RecordingHADW, R.config(output_dir=out, hadw_loss="fused", delta=2.0), model_path)
    with pytest.raises(ValueError, match="hadw_loss='x' is not valid"):
        R.config(output_dir=out, hadw_loss="x")
    with pytest.raises(ValueError, match="unknown mode|hadw_anchor_mode"):
        R.config(output_dir=out, hadw_anchor_mode="median")
    with pytest.raises(ValueError, match="lambda_scale"):
        R.config(output_dir=out, hadw_lambda=-1.0)
    with pytest.raises(ValueError, match="needs HADWGRPOConfig"):
        R.train(R.RecordingHADW, R.config(R.GRPOConfig, output_dir=out), model_path)
    # a checkpoint written without HA-DW cannot restore the anchor
    R.train(R.RecordingStock, R.config(R.GRPOConfig, max_steps=1, save_strategy="steps", save_steps=1,
                                       output_dir=str(tmp_path)), model_path)
    with pytest.raises(ValueError, match=f"holds no {ANCHOR_FILE}"):
        R.train(R.RecordingHADW, R.config(max_steps=2, output_dir=str(tmp_path)), model_path,
                resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


@pytest.mark.distributed
def test_two_gloo_processes_hold_the_same_anchor(model_path, tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "trl_worker.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, model_path,
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["anchor"] == ranks[1]["anchor"] and ranks[0]["anchor"]["steps"] == 3
    cfg = LossConfig(std_eps=1e-4)
    for step in range(3):
        r0, r1 = ranks[0]["records"][step], ranks[1]["records"][step]
        assert r0["rewards"] == r1["rewards"] or all(math.isnan(a) and math.isnan(b)
                                                     for a, b in zip(r0["rewards"], r1["rewards"], strict=True))
        assert r0["prior"] == r1["prior"]
        rewards = torch.tensor(r0["rewards"])
        expected = hadw_advantages(rewards, 4, anchor=r0["prior"], config=cfg).advantages
        torch.testing.assert_close(torch.tensor(r0["advantages"] + r1["advantages"]), expected, rtol=0, atol=0)
    assert ranks[0]["params_digest"] == ranks[1]["params_digest"]  # gradients averaged: replicas stay identical
    assert os.path.exists(tmp_path / "run" / "checkpoint-2" / ANCHOR_FILE)
