"""The native CPU kernel (hadw_kernels/csrc, hadw_kernels/ops/cpu_loss.py) against the reference: every preset x
HA-DW on/off x fp32/bf16/fp16, options, odd shapes, fully masked rows, named regimes in which each clip branch
really fires; the loss, every metric, advantages, phi and the gradient. Padding holds NaN / -inf, which must never
leak. Also: NaN/Inf counted at valid positions only, threads 1 and 2 bit-identical, split invariance, the custom
ops under torch.compile(fullgraph=True) and torch.library.opcheck, hadw_loss / hadw_policy_loss with
backend="native" and "auto", the same errors as the torch backend, and the fallback when the kernel is missing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import assert_close, make_batch

from hadw_kernels import LossConfig, hadw_loss, hadw_policy_loss
from hadw_kernels import loss as loss_module
from hadw_kernels.ops import cpu_loss
from hadw_kernels.reference import compute_advantages, loss_terms, metric_names, policy_loss_terms

if cpu_loss.unavailable_reason() is not None:
    if shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"):
        pytest.fail(f"{cpu_loss.unavailable_reason()}, but a C++ compiler is here: {cpu_loss.BUILD_HINT}",
                    pytrace=False)
    pytest.skip(f"{cpu_loss.unavailable_reason()} and no C++ compiler", allow_module_level=True)

PRESETS = ["grpo", "dapo", "gspo", "dr_grpo"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ANCHOR = torch.tensor(0.45, dtype=torch.float64)
# (rtol of loss / metrics, rtol of the gradient) per input dtype. Both sides read the same (rounded) inputs and
# compute in fp32, so the differences are fp32 rounding order, exp's last bit, and the rounding of the gradient to
# the input dtype (one ulp: 2^-8 for bf16, 2^-11 for fp16).
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 8e-3), torch.float16: (2e-5, 1e-3)}


# -- inputs ---------------------------------------------------------------------------------------------------------
def batch_for(P, G, T, *, dtype=torch.float32, seq=False, seed=0, masked_rows=(1,), equal_groups=(0,),
              with_ref=False, binary=True):
    """`helpers.make_batch`, with per-row log-ratio offsets that make every clip branch fire (token level: offsets
    +-0.3 and 1.5 with noise 0.3; sequence level: offsets around GSPO's 3e-4 / 4e-4 bounds with tiny noise), and
    padding that holds NaN / -inf."""
    b = make_batch(P, G, T, dtype=torch.float64, masked_rows=[i for i in masked_rows if i < P * G],
                   equal_groups=equal_groups, seed=seed, binary=binary, with_ref=with_ref)
    g = torch.Generator().manual_seed(seed + 1000)
    N = P * G
    old = b["old_logprobs"]
    offsets = torch.tensor([0.0, 1e-3, -1e-3, 1e-4, -2e-3, 1.5, 0.5, -0.5] if seq else [0.0, 0.3, -0.3, 1.5, 0.1,
                                                                                           -0.6])
    noise = 1e-4 if seq else 0.3
    logp = old + offsets[torch.arange(N) * 5 % len(offsets)].double()[:, None] + noise * torch.randn(
        N, T, generator=g, dtype=torch.float64)
    mask = b["mask"]
    logp = torch.where(mask, logp, float("nan"))
    old = torch.where(mask, old, -float("inf"))
    ref = b["ref_logprobs"]
    if ref is not None:
        ref = torch.where(mask, ref, float("nan")).to(dtype)
    return dict(logprobs=logp.to(dtype).requires_grad_(), old_logprobs=old.to(dtype), rewards=b["rewards"].float(),
                mask=mask, ref_logprobs=ref)


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def expected_nonfinite(batch, names):
    m = batch["mask"].bool()
    out = []
    for k in names:
        t = batch.get(k)
        if t is None:
            out.append(0)
        else:
            valid = m.any(dim=1) if t.dim() == 1 else m
            out.append(int((~torch.isfinite(t.detach()) & valid).sum()))
    return out


def check_loss_parity(batch, G, cfg, dtype=torch.float32, anchor=ANCHOR, normalizer=None):
    """Native fused loss vs the reference: loss, metrics (keys, order, dtypes), advantages, phi, gradient, the
    NaN/Inf counts. Returns the native metrics."""
    rtol, grad_rtol = TOL[dtype]
    lp = batch["logprobs"]
    args = (batch["old_logprobs"], batch["rewards"], batch["mask"], G, anchor, cfg, batch["ref_logprobs"], normalizer)
    (loss, adv, phi, metrics), nonfinite = cpu_loss.loss_terms_with_checks(lp, *args)
    r_loss, r_adv, r_phi, r_metrics = loss_terms(lp, *args)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.requires_grad
    assert list(metrics) == list(r_metrics) == list(metric_names(advantages=True, kl=batch["ref_logprobs"] is not None))
    grad, r_grad = grad_of(loss, lp), grad_of(r_loss, lp)
    assert grad.dtype == lp.dtype
    # The loss is a sum of +-A rho terms that may cancel (GSPO with rho ~ 1): measure it against the terms' size.
    # k3-type estimators, exp(x) - x - 1, cancel near x = 0: an ulp of exp(x) ~ 1 is 6e-8 absolute.
    term = max(r_metrics["adv_abs_mean"].item(), 1e-6)
    floors = {"pg_loss": term, "approx_kl": 1e-2, "kl": 1e-2, "kl_loss": 1e-2}
    assert_close(loss, r_loss, rtol=rtol, atol=rtol * term, name="loss")
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad and v.dtype == r_metrics[k].dtype, k
        assert_close(v, r_metrics[k], rtol=rtol, atol=rtol * floors.get(k, 1e-6), name=f"metric {k}")
    assert_close(adv, r_adv, rtol=1e-6, atol=1e-6, name="advantages")
    assert_close(phi, r_phi, rtol=1e-6, atol=0, name="phi")
    assert_close(grad, r_grad, rtol=grad_rtol, atol=grad_rtol * r_grad.abs().max().item() * 1e-3, name="grad")
    assert nonfinite.dtype == torch.int64
    assert nonfinite.tolist() == expected_nonfinite(batch, ("logprobs", "old_logprobs", "ref_logprobs"))
    return metrics


def check_policy_parity(batch, advantages, cfg, dtype=torch.float32, rollout_is_weights=None, normalizer=None):
    rtol, grad_rtol = TOL[dtype]
    lp = batch["logprobs"]
    args = (batch["old_logprobs"], advantages, batch["mask"], cfg, batch["ref_logprobs"], rollout_is_weights,
            normalizer)
    (loss, metrics), nonfinite = cpu_loss.policy_loss_terms_with_checks(lp, *args)
    r_loss, r_metrics = policy_loss_terms(lp, *args)
    assert list(metrics) == list(r_metrics)
    term = max(advantages.abs().mean().item(), 1e-6)
    floors = {"pg_loss": term, "approx_kl": 1e-2, "kl": 1e-2, "kl_loss": 1e-2}
    assert_close(loss, r_loss, rtol=rtol, atol=rtol * term, name="loss")
    for k, v in metrics.items():
        assert_close(v, r_metrics[k], rtol=rtol, atol=rtol * floors.get(k, 1e-6), name=f"metric {k}")
    grad, r_grad = grad_of(loss, lp), grad_of(r_loss, lp)
    assert_close(grad, r_grad, rtol=grad_rtol, atol=grad_rtol * r_grad.abs().max().item() * 1e-3, name="grad")
    named = {**batch, "advantages": advantages, "rollout_is_weights": rollout_is_weights}
    assert nonfinite.tolist() == expected_nonfinite(named, ("logprobs", "old_logprobs", "ref_logprobs", "advantages",
                                                            "rollout_is_weights"))
    return metrics


# -- parity: presets x HA-DW x dtype (a fully masked row, an equal-reward group) ------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hadw", [True, False], ids=["hadw", "plain"])
@pytest.mark.parametrize("preset", PRESETS)
def test_parity_presets(preset, hadw, dtype):
    cfg = LossConfig.preset(preset, hadw=hadw)
    batch = batch_for(3, 4, 33, dtype=dtype, seq=cfg.ratio_level == "sequence", seed=1)
    metrics = check_loss_parity(batch, 4, cfg, dtype)
    if dtype == torch.float32:  # the regimes really are mixed: both clip branches fire and some tokens are unclipped
        assert 0 < metrics["clipfrac_low"] and 0 < metrics["clipfrac_high"] and metrics["clipfrac"] < 1
        assert metrics["degenerate_group_frac"] > 0 and metrics["num_seqs"] < 12


# -- parity: shapes (odd N, T = 1, G in {2, 3, 8, 16}, T longer than a work chunk) ---------------------------------
SHAPES = {
    "N21-G3-T1": (7, 3, 1),
    "N10-G2-T12": (5, 2, 12),
    "N16-G8-T70": (2, 8, 70),
    "N48-G16-T9": (3, 16, 9),
    "N6-G3-T301": (2, 3, 301),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("preset", PRESETS)
def test_parity_shapes(preset, shape, dtype):
    P, G, T = SHAPES[shape]
    cfg = LossConfig.preset(preset)
    batch = batch_for(P, G, T, dtype=dtype, seq=cfg.ratio_level == "sequence", seed=2, masked_rows=(2,))
    check_loss_parity(batch, G, cfg, dtype)


# -- parity: options ------------------------------------------------------------------------------------------------
OPTIONS = [
    ("grpo", dict(clip_ratio_c=3.0)),
    ("gspo", dict(clip_ratio_c=3.0)),
    ("grpo", dict(kl_coef=0.1, kl_estimator="k1")),
    ("dapo", dict(kl_coef=0.1, kl_estimator="k2")),
    ("grpo", dict(kl_coef=0.1, kl_estimator="k3", clip_ratio_c=2.5)),
    ("gspo", dict(kl_coef=0.1, kl_estimator="k3")),
    ("gspo", dict(kl_coef=0.1, kl_estimator="k2", kl_ratio_weighted=True)),
    ("grpo", dict(kl_coef=0.1, kl_estimator="k3", kl_ratio_weighted=True)),
    ("dr_grpo", dict(kl_coef=0.05, kl_estimator="k2")),
    ("grpo", dict(kl_coef=0.0)),  # ref given but not in the loss: kl metrics only
    ("grpo", dict(std_unbiased=False, lambda_scale=1.7)),
    ("grpo", dict(adv_norm="none")),
    ("grpo", dict(adv_norm="batch_std")),
    ("dapo", dict(loss_agg="seq-mean-token-sum")),
    ("dr_grpo", dict(norm_len=50)),
    ("gspo", dict(loss_agg="token-mean", log_ratio_clamp=0.01)),  # the GSPO clamp gates the gradient
]


@pytest.mark.parametrize("preset, overrides", OPTIONS, ids=[f"{p}-{o}" for p, o in OPTIONS])
def test_parity_options(preset, overrides):
    cfg = LossConfig.preset(preset, **overrides)
    batch = batch_for(3, 4, 21, seq=cfg.ratio_level == "sequence", seed=3, with_ref="kl_coef" in overrides)
    metrics = check_loss_parity(batch, 4, cfg)
    if cfg.clip_ratio_c is not None:
        assert metrics["dual_clipfrac"] > 0
    if cfg.kl_coef:
        assert metrics["kl_loss"] != 0


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("normalizer", [7.0, 123.0])
def test_parity_normalizer(preset, normalizer):
    cfg = LossConfig.preset(preset)
    batch = batch_for(3, 4, 10, seq=cfg.ratio_level == "sequence", seed=4)
    check_loss_parity(batch, 4, cfg, normalizer=torch.tensor(normalizer, dtype=torch.float64))


def test_parity_real_valued_and_unscorable_rewards_no_anchor():
    batch = batch_for(4, 3, 8, seed=5, binary=False, equal_groups=())
    check_loss_parity(batch, 3, LossConfig.grpo(), anchor=None)
    check_loss_parity(batch, 3, LossConfig.grpo(), anchor=torch.tensor(0.9, dtype=torch.float64))
    rewards = batch["rewards"].clone()
    rewards[[0, 4, 5]] = float("nan")  # unscorable: one in group 0, two in group 1 (leaving one: degenerate)
    for norm in ("group_std", "batch_std", "none"):
        metrics = check_loss_parity({**batch, "rewards": rewards}, 3, LossConfig.grpo(adv_norm=norm))
        assert metrics["degenerate_group_frac"] == 0.25


# -- the policy loss on precomputed advantages ----------------------------------------------------------------------
@pytest.mark.parametrize("per_token", [False, True], ids=["adv[N]", "adv[N,T]"])
@pytest.mark.parametrize("preset, overrides", [
    ("grpo", {}),
    ("gspo", {}),
    ("dapo", dict(clip_ratio_c=3.0, rollout_is_threshold=1.2)),
    ("gspo", dict(rollout_is_threshold=1.1, kl_coef=0.1, kl_ratio_weighted=True)),
    ("grpo", dict(kl_coef=0.1, kl_estimator="k3", kl_ratio_weighted=True)),
    ("dr_grpo", dict(kl_coef=0.05, kl_estimator="k1")),
], ids=lambda x: str(x))
def test_parity_policy_loss(preset, overrides, per_token):
    cfg = LossConfig.preset(preset, **overrides)
    seq = cfg.ratio_level == "sequence"
    batch = batch_for(3, 4, 19, seq=seq, seed=6, with_ref="kl_coef" in overrides)
    adv = compute_advantages(batch["rewards"], 4, ANCHOR, cfg).advantages
    g = torch.Generator().manual_seed(7)
    if per_token:
        adv = adv[:, None] * (1 + 0.5 * torch.rand(12, 19, generator=g))
        adv = torch.where(batch["mask"], adv, float("nan"))  # padding: never read
    is_weights = torch.where(batch["mask"], 0.5 + torch.rand(12, 19, generator=g), float("nan"))
    for weights in (None, is_weights):
        metrics = check_policy_parity(batch, adv, cfg, rollout_is_weights=weights)
        assert metrics["clipfrac_low"] > 0 and metrics["clipfrac_high"] > 0


def test_parity_policy_loss_low_precision_advantages_and_weights():
    cfg = LossConfig.dapo(rollout_is_threshold=1.3)
    batch = batch_for(2, 4, 15, dtype=torch.bfloat16, seed=8)
    adv = compute_advantages(batch["rewards"], 4, ANCHOR, cfg).advantages
    weights = (0.5 + torch.rand(8, 15, generator=torch.Generator().manual_seed(9))).to(torch.float16)
    check_policy_parity(batch, adv.to(torch.bfloat16)[:, None].expand(8, 15), cfg, torch.bfloat16, weights)


# -- regimes --------------------------------------------------------------------------------------------------------
def test_log_ratio_clamp_fires():
    """Log-ratios beyond +-20 are clamped: the gradient there is 0 (token level), and no ratio overflows."""
    batch = batch_for(2, 4, 6, seed=10, masked_rows=())
    with torch.no_grad():
        batch["logprobs"][1, 2] = batch["old_logprobs"][1, 2] + 25.0
        batch["logprobs"][5, 3] = batch["old_logprobs"][5, 3] - 25.0
    check_loss_parity(batch, 4, LossConfig.grpo(clip_ratio_c=3.0))
    (loss, *_), _ = cpu_loss.loss_terms_with_checks(batch["logprobs"], batch["old_logprobs"], batch["rewards"],
                                                    batch["mask"], 4, ANCHOR, LossConfig.grpo())
    grad = grad_of(loss, batch["logprobs"])
    assert grad[1, 2] == 0 and grad[5, 3] == 0


def test_ties_follow_autograd():
    """rho exactly on a clip bound and the dual-clip tie (-A rho == -c A): the gradient the reference's autograd
    gives (the unclipped arm's at the bound; half at the dual-clip tie)."""
    cfg = LossConfig.grpo(clip_low=0.5, clip_high=0.25, clip_ratio_c=2.0)
    old = torch.zeros(2, 3)
    lp = torch.log(torch.tensor([[1.25, 0.5, 2.0], [1.25, 0.5, 1.0]])).requires_grad_()
    adv = torch.tensor([-1.0, 1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert torch.exp(lp.detach())[0].tolist() == [1.25, 0.5, 2.0]  # exactly on the bounds and on c
    (loss, metrics), _ = cpu_loss.policy_loss_terms_with_checks(lp, old, adv, mask, cfg)
    r_loss, r_metrics = policy_loss_terms(lp, old, adv, mask, cfg)
    assert_close(grad_of(loss, lp), grad_of(r_loss, lp), rtol=1e-6, name="grad at ties")
    assert_close(loss, r_loss, rtol=1e-6, name="loss at ties")


def test_fully_masked_batch():
    batch = batch_for(2, 4, 5, seed=11, masked_rows=range(8))
    for preset in PRESETS:
        metrics = check_loss_parity(batch, 4, LossConfig.preset(preset))
        assert metrics["num_tokens"] == 0 and metrics["pg_loss"] == 0


def test_float32_kernel_is_as_accurate_as_the_float32_reference():
    """Against float64 ground truth the kernel's fp32 error is of the order of the fp32 reference's own error."""
    batch = batch_for(8, 8, 300, seed=12)
    for cfg in (LossConfig.grpo(clip_ratio_c=3.0), LossConfig.dapo(), LossConfig.gspo()):
        args = (batch["old_logprobs"], batch["rewards"], batch["mask"], 8, ANCHOR, cfg)
        (loss, *_), _ = cpu_loss.loss_terms_with_checks(batch["logprobs"], *args)
        f64 = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in batch.items()}
        exact = loss_terms(f64["logprobs"], f64["old_logprobs"], f64["rewards"], f64["mask"], 8, ANCHOR, cfg)[0]
        ref32 = loss_terms(batch["logprobs"], *args)[0]
        err, ref_err = abs(loss.item() - exact.item()), abs(ref32.item() - exact.item())
        assert err <= max(4 * ref_err, 1e-6 * abs(exact.item())), (cfg, err, ref_err)


# -- inputs read in place ------------------------------------------------------------------------------------------
MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32,
               torch.float64, torch.float16, torch.bfloat16]


def test_any_mask_dtype_strides_and_reward_dtypes():
    batch = batch_for(3, 4, 16, seed=13)
    base = check_loss_parity(batch, 4, LossConfig.dapo())
    for dtype in MASK_DTYPES:
        check_loss_parity({**batch, "mask": batch["mask"].to(dtype)}, 4, LossConfig.dapo())
    strided = torch.stack([batch["rewards"], -batch["rewards"]], dim=1)[:, 0]  # stride 2
    for rewards in (batch["rewards"].bool(), batch["rewards"].to(torch.int64), batch["rewards"].double(), strided):
        check_loss_parity({**batch, "rewards": rewards}, 4, LossConfig.dapo())
    # transposed storage: strides (1, N)
    t = {k: (v.detach().t().contiguous().t() if isinstance(v, torch.Tensor) and v.dim() == 2 else v)
         for k, v in batch.items()}
    t["logprobs"].requires_grad_()
    assert t["logprobs"].stride() != batch["logprobs"].stride()
    metrics = check_loss_parity(t, 4, LossConfig.dapo())
    assert_close(metrics["pg_loss"], base["pg_loss"], rtol=1e-6)
    # a column slice: unit stride along T, row stride > T
    wide = {k: (torch.cat([v.detach(), v.detach()], dim=1)[:, 3:19] if isinstance(v, torch.Tensor) and v.dim() == 2
                else v) for k, v in batch.items()}
    wide["logprobs"].requires_grad_()
    check_loss_parity(wide, 4, LossConfig.grpo())


def test_nonfinite_at_valid_positions_are_counted():
    batch = batch_for(2, 4, 5, seed=14, with_ref=True)
    with torch.no_grad():
        batch["logprobs"][0, 0] = float("nan")
        batch["old_logprobs"][2, 0] = float("inf")
        batch["old_logprobs"][3, 0] = -float("inf")
    batch["ref_logprobs"][4, 0] = float("nan")
    args = (batch["old_logprobs"], batch["rewards"], batch["mask"], 4, ANCHOR, LossConfig.grpo(kl_coef=0.1),
            batch["ref_logprobs"], None)
    _, nonfinite = cpu_loss.loss_terms_with_checks(batch["logprobs"], *args)
    assert nonfinite.tolist() == [1, 2, 1]
    # the policy loss: [N] advantages count per row with a valid token (row 1 has none), [N, T] per valid position
    adv = torch.ones(8)
    adv[[1, 3]] = float("nan")
    weights = torch.ones(5, dtype=torch.float32).expand(8, 5).clone()
    weights[6, 0] = float("inf")
    weights[1, 0] = float("inf")  # a masked row: not counted
    _, nonfinite = cpu_loss.policy_loss_terms_with_checks(batch["logprobs"], batch["old_logprobs"], adv,
                                                          batch["mask"], LossConfig.grpo(), None, weights)
    assert nonfinite.tolist() == [1, 2, 0, 1, 1]


# -- threads, chunks, split invariance -----------------------------------------------------------------------------
@pytest.fixture
def small_chunks():
    """Chunks of 64 tokens and a second thread from 128 tokens, so that small shapes really run on two threads."""
    cpu_loss.set_tuning(64, 128)
    yield
    cpu_loss.set_tuning()


def skip_without_openmp():
    """Skips the test where the core was built without OpenMP (it then has threads of its own only)."""
    built = cpu_loss.set_threading_mode("openmp") == "openmp"
    cpu_loss.set_threading_mode()
    if not built:
        pytest.skip("the native CPU kernel was built without OpenMP")


@pytest.fixture(params=["openmp", "own"])
def threading_mode(request):
    """Both sources of threads: torch's OpenMP pool (where the build has OpenMP) and the core's own threads."""
    if cpu_loss.set_threading_mode(request.param) != request.param:
        pytest.skip("the native CPU kernel was built without OpenMP")
    yield request.param
    cpu_loss.set_threading_mode()


@pytest.mark.parametrize("preset", ["grpo", "gspo"])
def test_threads_one_and_two_agree_bit_for_bit(small_chunks, threading_mode, preset):
    cfg = LossConfig.preset(preset, kl_coef=0.1, clip_ratio_c=3.0)
    batch = batch_for(8, 8, 37, seq=preset == "gspo", seed=15, with_ref=True)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 2, 3):  # 3 threads on 2 cores: more threads than cores still splits the same chunks
            torch.set_num_threads(n)
            (loss, adv, phi, metrics), nonfinite = cpu_loss.loss_terms_with_checks(
                batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 8, ANCHOR, cfg,
                batch["ref_logprobs"])
            outs.append((loss.detach(), torch.stack(list(metrics.values())), grad_of(loss, batch["logprobs"])))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b)
    check_loss_parity(batch, 8, cfg)  # many chunks, two threads: still the reference's values


def test_threads_come_from_torchs_openmp_runtime():
    """Where the build has OpenMP and torch runs on libgomp (Linux wheels), the kernel runs on torch's pool: the
    process maps one OpenMP runtime, not a second one next to torch's."""
    skip_without_openmp()
    runtimes = cpu_loss._openmp_runtimes()
    if not any("gomp" in r for r in runtimes):
        pytest.skip(f"this torch does not run on libgomp ({sorted(runtimes)})")
    assert len(runtimes) == 1, f"two OpenMP runtimes mapped: {sorted(runtimes)}"
    assert cpu_loss.threading_mode() == "openmp"


FORK_CHILD = """
import os, signal, sys, time, torch
from hadw_kernels import LossConfig
from hadw_kernels.ops import cpu_loss
torch.set_num_threads(2)
N, T = 4096, 256  # 1M tokens: two threads
lp = torch.randn(N, T) * 0.1 - 1
args = (lp, lp + 0.05, (torch.rand(N) > 0.5).float(), torch.ones(N, T), 8, torch.tensor(0.5, dtype=torch.float64),
        LossConfig.grpo())
parent = cpu_loss.loss_terms_with_checks(*args)[0][0]
pid = os.fork()
if pid == 0:
    child = cpu_loss.loss_terms_with_checks(*args)[0][0]
    os._exit(0 if torch.equal(child, parent) and cpu_loss.threading_mode() == "own" else 3)
for _ in range(600):
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.1)
os.kill(pid, signal.SIGKILL)
sys.exit(4)
"""


def test_a_forked_child_runs_the_kernel():
    """libgomp's pool does not survive fork(): after the parent ran a parallel region, a child's region waits
    forever for the parent's workers. A forked child runs the kernel on threads of its own, with the same result
    (exit 4 = the child hung and was killed)."""
    skip_without_openmp()
    out = subprocess.run([sys.executable, "-c", FORK_CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])


def test_another_openmp_runtime_keeps_the_kernel_on_its_own_threads(monkeypatch):
    """Loading the core must not start a second OpenMP pool: where its load maps a runtime the process did not
    have (a torch on LLVM's or Intel's OpenMP), the loader switches it to threads of its own."""
    lib = cpu_loss._lib()
    seen = iter([{"/x/libiomp5.so"}, {"/x/libiomp5.so", "/y/libgomp.so.1"}])
    monkeypatch.setattr(cpu_loss, "_openmp_runtimes", lambda: next(seen))
    try:
        again, why = cpu_loss._load.__wrapped__()  # the same library (dlopen counts references)
        assert why is None and again.default_threading == 0 and cpu_loss.threading_mode() == "own"
    finally:
        lib.hadw_cpu_threading(lib.default_threading)
    with pytest.raises(ValueError, match="'own' or 'openmp'"):
        cpu_loss.set_threading_mode("tbb")


@pytest.mark.parametrize("preset", PRESETS)
def test_split_invariance(preset):
    """Micro-batches (rows in any order) given the global normalizer sum to the whole batch's loss and gradient."""
    cfg = LossConfig.preset(preset)
    batch = batch_for(4, 4, 23, seq=cfg.ratio_level == "sequence", seed=16)
    lp, mask = batch["logprobs"], batch["mask"]
    adv = compute_advantages(batch["rewards"], 4, ANCHOR, cfg).advantages
    whole, _ = policy_loss_terms(lp, batch["old_logprobs"], adv, mask, cfg)
    if cfg.loss_agg == "token-mean":
        norm = mask.sum().double()
    else:
        norm = (mask.sum(dim=1) > 0).sum().double()
    total = 0
    for rows in (torch.tensor([3, 0, 9, 14]), torch.tensor([1, 2, 15, 4, 5, 6]), torch.tensor([7, 8, 10, 11, 12, 13])):
        (part, _), _ = cpu_loss.policy_loss_terms_with_checks(lp[rows], batch["old_logprobs"][rows], adv[rows],
                                                              mask[rows], cfg, None, None, norm)
        total = total + part
    assert_close(total, whole, rtol=2e-6, atol=1e-7, name="sum of micro-batch losses")
    assert_close(grad_of(total, lp), grad_of(whole, lp), rtol=2e-5, atol=1e-9, name="gradient")


def test_no_grad_forward_writes_no_gradient():
    batch = batch_for(2, 4, 9, seed=17)
    cfg = LossConfig.grpo()
    args = (batch["old_logprobs"], batch["rewards"], batch["mask"], 4, ANCHOR, cfg)
    with torch.no_grad():
        (loss, _, _, metrics), _ = cpu_loss.loss_terms_with_checks(batch["logprobs"], *args)
        outs = cpu_loss.native_loss(batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], None,
                                    ANCHOR, None, 4, cpu_loss.config_to_json(cfg), False, cpu_loss.OP_VERSION)
    assert outs[-1].shape == (0,) and not loss.requires_grad
    (loss2, *_), _ = cpu_loss.loss_terms_with_checks(batch["logprobs"], *args)
    assert torch.equal(loss, loss2.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_twice_upstream_scale_and_no_aliasing(dtype):
    """The eager backward hands the forward's gradient buffer to autograd: a second backward through a retained
    graph recomputes it, an upstream gradient other than 1 scales it, and the buffer given away is not reused."""
    batch = batch_for(2, 4, 9, seed=28, dtype=dtype)
    lp = batch["logprobs"]
    args = (lp, batch["old_logprobs"], batch["rewards"], batch["mask"], 4)
    ref = grad_of(hadw_loss(*args, anchor=0.5, backend="torch").loss, lp)
    out = hadw_loss(*args, anchor=0.5, backend="native")
    out.loss.backward(retain_graph=True)
    first = lp.grad.clone()
    assert_close(first, ref, rtol=TOL[dtype][1], atol=1e-7, name="first backward")
    lp.grad.zero_()  # an in-place change to the .grad autograd was given must not leak into the next backward
    (3.0 * out.loss).backward()
    if dtype == torch.float32:
        assert torch.equal(lp.grad, 3.0 * first)
    else:  # rounded once from fp32 here, twice in the expectation
        assert_close(lp.grad, 3.0 * first.float(), rtol=TOL[dtype][1], atol=1e-7, name="second backward")
    lp.grad = None
    out2 = hadw_loss(*args, anchor=0.5, backend="native")
    with torch.no_grad():
        lp.add_(0.0)  # a new version of an input the backward may need
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out2.loss.backward()


# -- the custom ops ---------------------------------------------------------------------------------------------------
def test_opcheck():
    """torch.library's own checks of the schemas, the fake implementations and the autograd registrations."""
    batch = batch_for(2, 2, 3, seed=18, masked_rows=(), with_ref=True)
    cfg = cpu_loss.config_to_json(LossConfig.grpo(kl_coef=0.1))
    lp, old, mask, ref = batch["logprobs"], batch["old_logprobs"], batch["mask"], batch["ref_logprobs"]
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    v = cpu_loss.OP_VERSION
    torch.library.opcheck(cpu_loss.native_loss, (lp, old, batch["rewards"], mask, ref, ANCHOR, None, 2, cfg, True, v),
                          test_utils=checks)
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
    torch.library.opcheck(cpu_loss.native_policy_loss, (lp, old, adv, mask, ref, None, None, cfg, True, v),
                          test_utils=checks)


def test_public_functions_compile_fullgraph_with_native_backend():
    """Callers of hadw_loss / hadw_policy_loss(backend="native") trace without graph breaks and equal eager, the
    gradient included; the config built inside the traced function reaches the kernel."""
    torch._dynamo.reset()
    batch = batch_for(2, 4, 9, seed=19, with_ref=True)
    anchor, norm = torch.tensor(0.4), torch.tensor(30.0)
    adv = compute_advantages(batch["rewards"], 4, ANCHOR, LossConfig.grpo()).advantages

    def step(logp):
        out = hadw_loss(logp, batch["old_logprobs"], batch["rewards"], batch["mask"], 4, anchor=anchor,
                        config=LossConfig.dapo(kl_coef=0.1), ref_logprobs=batch["ref_logprobs"], normalizer=norm,
                        backend="native")
        pol = hadw_policy_loss(logp, batch["old_logprobs"], adv, batch["mask"], config=LossConfig.gspo(),
                               backend="native")
        return 2.0 * out.loss + pol.loss, out.metrics["clipfrac_high"], pol.metrics["num_seqs"]

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(batch["logprobs"])
    want = step(batch["logprobs"])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(grad_of(got[0], batch["logprobs"]), grad_of(want[0], batch["logprobs"]))


# -- through the public functions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["native", "auto"])
def test_hadw_loss_and_policy_loss_backends(backend):
    batch = batch_for(3, 4, 12, seed=20)
    cfg = LossConfig.grpo()
    args = (batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 4)
    out = hadw_loss(*args, anchor=0.45, config=cfg, backend=backend)
    ref = hadw_loss(*args, anchor=0.45, config=cfg, backend="torch")
    assert_close(out.loss, ref.loss, rtol=2e-5, name="loss")
    assert_close(grad_of(out.loss, batch["logprobs"]), grad_of(ref.loss, batch["logprobs"]), rtol=2e-5, atol=1e-9)
    assert out.metrics.keys() == ref.metrics.keys()
    assert not out.advantages.requires_grad and not out.phi.requires_grad
    pol = hadw_policy_loss(batch["logprobs"], batch["old_logprobs"], out.advantages, batch["mask"], config=cfg,
                           backend=backend)
    assert_close(pol.loss, ref.loss, rtol=2e-5, name="policy loss = fused loss")
    assert pol.phi is None and list(pol.metrics) == list(metric_names(advantages=False, kl=False))


def test_auto_uses_the_kernel_on_cpu(monkeypatch):
    monkeypatch.setenv("HADW_KERNELS_NO_COMPILE", "1")  # float64 then runs the eager reference, without a compile
    calls = []
    real = cpu_loss.loss_terms_with_checks
    monkeypatch.setattr(cpu_loss, "loss_terms_with_checks", lambda *a: calls.append(1) or real(*a))
    loss_module._native_fn.cache_clear()
    try:
        batch = batch_for(2, 4, 5, seed=21)
        hadw_loss(batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 4, anchor=0.5)
        assert calls == [1]
        hadw_loss(batch["logprobs"].detach().double(), batch["old_logprobs"].double(), batch["rewards"],
                  batch["mask"], 4, anchor=0.5)  # float64 stays on the reference
        assert calls == [1]
    finally:
        loss_module._native_fn.cache_clear()


@pytest.mark.parametrize("name", ["logprobs", "old_logprobs", "ref_logprobs"])
def test_nonfinite_is_rejected_like_the_torch_backend(name):
    batch = batch_for(2, 4, 5, seed=22, with_ref=True)
    t = batch[name].detach().clone()
    t[0, 0] = float("nan")
    batch[name] = t
    messages = []
    for backend in ("torch", "native"):
        with pytest.raises(ValueError) as err:
            hadw_loss(batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 4, anchor=0.5,
                      ref_logprobs=batch["ref_logprobs"], backend=backend)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and f"{name}: 1 NaN/Inf" in messages[1]


N_BAD, T_BAD = 8, 5
BAD_LOSS_INPUTS = [
    dict(group_size=1), dict(group_size=3), dict(mask=torch.ones(N_BAD, 4)), dict(normalizer=0.0),
    dict(rewards=torch.tensor([float("inf")] + [0.0] * (N_BAD - 1))), dict(anchor=float("nan")),
    dict(logprobs=torch.zeros(N_BAD, T_BAD, dtype=torch.int64)), dict(mask=torch.ones(N_BAD, T_BAD).to(torch.cfloat)),
    dict(ref_logprobs=torch.zeros(N_BAD - 1, T_BAD)),
]
BAD_POLICY_INPUTS = [
    dict(advantages=torch.zeros(N_BAD + 1)), dict(advantages=torch.zeros(N_BAD, T_BAD + 1)),
    dict(advantages=torch.tensor([float("nan")] + [0.0] * (N_BAD - 1))),
    dict(rollout_is_weights=torch.full((N_BAD, T_BAD), float("inf"))), dict(normalizer=-1.0),
    dict(rollout_is_weights=torch.ones(N_BAD, T_BAD - 1)),
]


def _error(fn, **kw):
    try:
        fn(**kw)
    except (ValueError, TypeError) as e:
        return type(e), str(e)
    return None


@pytest.mark.parametrize("changes", BAD_LOSS_INPUTS, ids=range(len(BAD_LOSS_INPUTS)))
def test_bad_loss_input_same_error_as_torch_backend(changes):
    batch = batch_for(2, 4, T_BAD, seed=23)
    kw = dict(logprobs=batch["logprobs"], old_logprobs=batch["old_logprobs"], rewards=batch["rewards"],
              mask=batch["mask"], group_size=4, anchor=0.5)
    kw.update(changes)
    torch_err = _error(hadw_loss, **kw, backend="torch")
    assert torch_err is not None and torch_err == _error(hadw_loss, **kw, backend="native")


@pytest.mark.parametrize("changes", BAD_POLICY_INPUTS, ids=range(len(BAD_POLICY_INPUTS)))
def test_bad_policy_input_same_error_as_torch_backend(changes):
    batch = batch_for(2, 4, T_BAD, seed=24)
    kw = dict(logprobs=batch["logprobs"], old_logprobs=batch["old_logprobs"], advantages=torch.ones(N_BAD),
              mask=batch["mask"])
    kw.update(changes)
    torch_err = _error(hadw_policy_loss, **kw, backend="torch")
    assert torch_err is not None and torch_err == _error(hadw_policy_loss, **kw, backend="native")


def test_native_backend_rejects_other_devices():
    batch = batch_for(2, 4, 5, seed=25)
    args = (batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 4, None, LossConfig.grpo(),
            None, None)
    with pytest.raises(RuntimeError, match="backend='native': runs on CPU tensors, got meta"):
        loss_module._run_native("loss", torch.device("meta"), args)
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        cpu_loss._view(torch.zeros(2, 3, device="meta"))


def test_an_eager_first_call_does_not_import_dynamo():
    """The first call of an eager caller loads the kernel and nothing of torch.compile (importing torch._dynamo took
    1.2 s here, most of a fresh process's first call)."""
    code = ("import sys, torch; from hadw_kernels import hadw_loss; "
            "lp = torch.randn(8, 5, requires_grad=True); "
            "hadw_loss(lp, lp.detach(), torch.rand(8), torch.ones(8, 5), 4, anchor=0.5).loss.backward(); "
            "from hadw_kernels.ops import cpu_loss; assert cpu_loss.unavailable_reason() is None; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_missing_kernel_falls_back_with_one_warning(monkeypatch):
    """Without the built library: backend="auto" warns once (saying how to build it) and computes the reference's
    values; backend="native" raises with the same hint."""
    monkeypatch.setenv("HADW_KERNELS_NO_COMPILE", "1")  # the fallback without a compile, to stay fast
    monkeypatch.setattr(cpu_loss, "_load", lambda: (None, "the native CPU kernel is not built (test)"))
    monkeypatch.setattr(cpu_loss, "_UNAVAILABLE", "the native CPU kernel is not built (test)")
    monkeypatch.setattr(loss_module, "_NATIVE_WARNED", [])
    loss_module._native_fn.cache_clear()
    try:
        batch = batch_for(2, 4, 5, seed=26)
        args = (batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = hadw_loss(*args, anchor=0.5)
            hadw_loss(*args, anchor=0.5)
            hadw_policy_loss(batch["logprobs"], batch["old_logprobs"], out.advantages, batch["mask"])
        ours = [w for w in caught if "native CPU kernel" in str(w.message)]
        assert len(ours) == 1 and "pip install -e ." in str(ours[0].message)
        assert torch.equal(out.loss, hadw_loss(*args, anchor=0.5, backend="torch").loss)
        with pytest.raises(RuntimeError, match="not built.*pip install -e ."):
            hadw_loss(*args, anchor=0.5, backend="native")
    finally:
        loss_module._native_fn.cache_clear()


# -- the instruction sets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_instruction_set_here_matches_the_reference(dtype):
    """The baseline (no AVX) code and, where the CPU has them, the AVX2 / AVX-512 code."""
    best = cpu_loss.isa()
    try:
        for name in dict.fromkeys(["default", "avx2", best]):
            used = cpu_loss.set_isa(name)
            for cfg in (LossConfig.grpo(kl_coef=0.1, clip_ratio_c=3.0), LossConfig.gspo(kl_coef=0.1, kl_estimator="k2"),
                        LossConfig.dapo(kl_coef=0.1, kl_estimator="k1", kl_ratio_weighted=True)):
                batch = batch_for(3, 4, 45, dtype=dtype, seq=cfg.ratio_level == "sequence", seed=27, with_ref=True)
                check_loss_parity(batch, 4, cfg, dtype)
                mask = batch["mask"].to(torch.float16)
                check_loss_parity({**batch, "mask": mask}, 4, cfg, dtype)
            assert used == name or name == "avx2"
    finally:
        cpu_loss.set_isa(None)
    assert cpu_loss.isa() == best
