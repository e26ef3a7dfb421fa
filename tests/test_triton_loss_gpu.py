"""The compiled Triton loss on a CUDA device against the reference at large shapes: N*T >= 16M tokens in bf16 and fp32,
and >= 65,536 rows (the grid is 1-D over row blocks, so there is no grid-dimension limit).

Skipped without CUDA (tests/conftest.py). The compiled kernels are tested only with TRITON_INTERPRET=0 (conftest
defaults it to 1, under which CUDA tensors would be copied through the CPU interpreter):

    TRITON_INTERPRET=0 pytest -m gpu tests/test_triton_loss_gpu.py
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from test_triton_loss import ANCHOR, assert_close, make_inputs  # noqa: E402

from hadw_kernels import LossConfig, hadw_loss  # noqa: E402
from hadw_kernels.ops import _triton_runtime, triton_loss  # noqa: E402
from hadw_kernels.reference import loss_terms  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="compiled-kernel tests: run with TRITON_INTERPRET=0"),
]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(_triton_runtime, "POISON_OUTPUTS", True)


def to_cuda(batch):
    out = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    out["logprobs"] = out["logprobs"].detach().requires_grad_()
    return out


def compare(batch, G, cfg, *, grad_outlier_frac=0.0, rtol=1e-4, grad_max=2e-5, grad_rms=2e-6):
    """Kernel vs reference on the device. On 16M tokens a few ratios sit within an ulp of a clip bound, where the two
    sides may take different branches (the gradient there is -A rho / n on one side, 0 on the other): up to
    `grad_outlier_frac` of the gradient's coordinates may differ by more than `grad_max`, none may be non-finite."""
    args = (batch["old_logprobs"], batch["rewards"], batch["mask"], G, ANCHOR.cuda(), cfg, batch["ref_logprobs"], None)
    lp = batch["logprobs"]
    (loss, adv, phi, metrics), nonfinite = triton_loss.loss_terms_with_checks(lp, *args)
    (grad,) = torch.autograd.grad(loss, lp)
    r_loss, r_adv, r_phi, r_metrics = loss_terms(lp, *args)
    (r_grad,) = torch.autograd.grad(r_loss, lp)
    assert grad.dtype == lp.dtype and nonfinite.tolist() == [0, 0, 0]
    term = r_metrics["adv_abs_mean"].item()
    assert_close(loss, r_loss, max_rel=rtol, floor=term, name="loss")
    assert list(metrics) == list(r_metrics)
    floors = {"pg_loss": term, "approx_kl": 1e-2, "kl": 1e-2, "kl_loss": 1e-2}
    for k, v in metrics.items():
        assert_close(v, r_metrics[k], max_rel=rtol, floor=floors.get(k, 1e-6), name=f"metric {k}")
    assert_close(adv, r_adv, max_rel=1e-6, name="advantages")
    assert_close(phi, r_phi, max_rel=1e-6, name="phi")
    err = (grad.double() - r_grad.double()).abs() / r_grad.double().abs().max()
    outliers = int((err > grad_max).sum())
    assert outliers <= grad_outlier_frac * grad.numel(), f"{outliers} gradient coordinates over {grad_max}"
    keep = err <= grad_max
    assert_close(torch.where(keep, grad.double(), 0), torch.where(keep, r_grad.double(), 0), max_rel=grad_max,
                 rms_rel=grad_rms, name="grad")
    return metrics


GRAD_TOL = {torch.float32: dict(grad_max=2e-5, grad_rms=2e-6), torch.bfloat16: dict(grad_max=8e-3, grad_rms=2e-3)}


# Each case compiles its own kernel variants (~1-2 s each): the list is kept short for bench/gpu_check.sh's budget.
@pytest.mark.parametrize("preset, dtype", [("grpo", torch.bfloat16), ("grpo", torch.float32),
                                           ("gspo", torch.bfloat16), ("dapo", torch.float32)], ids=str)
def test_parity_16m_tokens(preset, dtype):
    cfg = LossConfig.preset(preset, **({"kl_coef": 0.05} if preset == "dapo" else {}))
    P, G, T = 512, 8, 4096  # N * T = 16.8M
    batch = to_cuda(make_inputs(P, G, T, dtype=dtype, seq=cfg.ratio_level == "sequence", seed=20,
                                masked_rows=(3, 1000), with_ref=preset == "dapo"))
    metrics = compare(batch, G, cfg, grad_outlier_frac=1e-5, **GRAD_TOL[dtype])
    assert metrics["clipfrac_low"] > 0 and metrics["clipfrac_high"] > 0


@pytest.mark.parametrize("preset", ["grpo", "gspo"])
def test_parity_65536_rows(preset):
    cfg = LossConfig.preset(preset, clip_ratio_c=3.0)
    P, G, T = 8192, 8, 24  # N = 65,536 rows
    batch = to_cuda(make_inputs(P, G, T, dtype=torch.bfloat16, seq=cfg.ratio_level == "sequence", seed=21,
                                masked_rows=(0, 65535)))
    metrics = compare(batch, G, cfg, grad_outlier_frac=1e-5, **GRAD_TOL[torch.bfloat16])
    assert metrics["dual_clipfrac"] > 0


def test_many_rows_one_token():
    """N = 262,144 rows of T = 1, G = 2: many programs, the reward tile at its smallest."""
    batch = to_cuda(make_inputs(131072, 2, 1, seed=22, masked_rows=(5,), equal_groups=(0, 7)))
    compare(batch, 2, LossConfig.dapo(), grad_outlier_frac=1e-5)


def test_hadw_loss_auto_uses_triton_on_cuda():
    batch = to_cuda(make_inputs(64, 8, 300, seed=23))
    out = hadw_loss(batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 8, anchor=0.45,
                    config=LossConfig.grpo(), backend="auto")
    direct = triton_loss.loss_terms_with_checks(batch["logprobs"], batch["old_logprobs"], batch["rewards"],
                                                batch["mask"], 8, ANCHOR.cuda(), LossConfig.grpo())[0]
    assert torch.equal(out.loss, direct[0])
    out.loss.backward()
    assert torch.isfinite(batch["logprobs"].grad).all()


def test_compiled_function_calling_the_op():
    torch._dynamo.reset()
    batch = to_cuda(make_inputs(32, 8, 128, seed=24))
    cfg = LossConfig.gspo()

    def step(logp, old, rewards, mask, anchor):
        (loss, _, _, metrics), _ = triton_loss.loss_terms_with_checks(logp, old, rewards, mask, 8, anchor, cfg)
        return loss, metrics["clipfrac"]

    args = (batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], ANCHOR.cuda())
    got, want = torch.compile(step, fullgraph=True)(*args), step(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# -- the policy loss on precomputed advantages and the advantages by group id ---------------------------------------
@pytest.mark.parametrize("preset, token_adv", [("grpo", True), ("gspo", True), ("dapo", False)], ids=str)
def test_policy_parity_16m_tokens(preset, token_adv):
    """hadw_policy_loss's kernel at 16.8M bf16 tokens: per-row or per-token advantages, truncated IS weights and the
    ratio-weighted KL, against the reference on the device."""
    from test_triton_loss_policy import policy_batch

    from hadw_kernels.reference import policy_loss_terms

    cfg = LossConfig.preset(preset, kl_coef=0.05, kl_ratio_weighted=True, rollout_is_threshold=2.0)
    batch = to_cuda(policy_batch(512, 8, 4096, dtype=torch.bfloat16, seq=cfg.ratio_level == "sequence", seed=25,
                                 token_adv=token_adv, weights=True, with_ref=True, masked_rows=(3, 1000)))
    args = (batch["old_logprobs"], batch["advantages"], batch["mask"], cfg, batch["ref_logprobs"],
            batch["rollout_is_weights"], None)
    lp = batch["logprobs"]
    (loss, metrics), nonfinite = triton_loss.policy_loss_terms_with_checks(lp, *args)
    (grad,) = torch.autograd.grad(loss, lp)
    r_loss, r_metrics = policy_loss_terms(lp, *args)
    (r_grad,) = torch.autograd.grad(r_loss, lp)
    assert nonfinite.tolist() == [0, 0, 0, 0, 0] and list(metrics) == list(r_metrics)
    term = torch.nan_to_num(batch["advantages"].abs()).mean().item()
    assert_close(loss, r_loss, max_rel=1e-4, floor=term, name="loss")
    for k, v in metrics.items():
        assert_close(v, r_metrics[k], max_rel=1e-4, floor={"pg_loss": term}.get(k, 1e-2), name=f"metric {k}")
    err = (grad.double() - r_grad.double()).abs() / r_grad.double().abs().max()
    assert int((err > 8e-3).sum()) <= 1e-5 * grad.numel()
    assert metrics["clipfrac_low"] > 0 and metrics["clipfrac_high"] > 0


@pytest.mark.parametrize("adv_norm", ["group_std", "batch_std", "none"])
def test_advantages_by_group_id_one_million_rows(adv_norm):
    """hadw_advantages on the kernel for 1M rows in random order, groups of 1 to 64 responses, 1% unscorable."""
    from hadw_kernels import hadw_advantages

    g = torch.Generator().manual_seed(26)
    sizes = torch.randint(1, 65, (40000,), generator=g)
    ids = torch.repeat_interleave(torch.arange(sizes.numel()) * 3 + 11, sizes)[:1_000_000]
    ids = ids[torch.randperm(ids.numel(), generator=g)].cuda()
    rewards = (torch.rand(ids.numel(), generator=g) < 0.4).float()
    rewards[torch.rand(ids.numel(), generator=g) < 0.01] = float("nan")
    rewards = rewards.cuda()
    cfg = LossConfig.grpo(adv_norm=adv_norm)
    got = hadw_advantages(rewards, anchor=0.45, config=cfg, group_ids=ids, backend="triton")
    want = hadw_advantages(rewards, anchor=0.45, config=cfg, group_ids=ids, backend="torch")
    for name in ("advantages", "raw", "phi", "group_mean", "group_std", "diff"):
        assert_close(getattr(got, name), getattr(want, name), max_rel=1e-5, name=name)
    for name in ("degenerate", "group_index", "unscorable"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.degenerate.any() and not got.degenerate.all()
