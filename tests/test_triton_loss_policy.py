"""The Triton policy loss on precomputed advantages (`hadw_policy_loss(..., backend="triton")`, the custom op
`hadw_kernels::policy_loss`) against the reference `policy_loss_terms`, under the Triton interpreter on CPU: every
preset x per-row / per-token advantages x fp32 / bf16 / fp16, hostile shapes, rollout IS weights (truncation firing),
ratio-weighted KL (token and sequence ratio), dual clip, normalizer, NaN at padding and on fully masked rows; the
loss, every metric, the NaN/Inf counts and the gradient. Kernel outputs are poisoned with NaN before each run. Also:
the op under torch.compile(fullgraph=True), opcheck, and the two stages on the kernels against the fused kernel."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from test_triton_loss import TOL, assert_close, make_inputs  # noqa: E402

from hadw_kernels import LossConfig, hadw_advantages, hadw_loss, hadw_policy_loss, loss_normalizer  # noqa: E402
from hadw_kernels.ops import _triton_runtime, triton_loss  # noqa: E402
from hadw_kernels.ops._config_json import config_to_json  # noqa: E402
from hadw_kernels.reference import POLICY_METRICS, metric_names, policy_loss_terms  # noqa: E402

PRESETS = ["grpo", "dapo", "gspo", "dr_grpo"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAN = float("nan")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(_triton_runtime, "POISON_OUTPUTS", True)


def policy_batch(P, G, T, *, dtype=torch.float32, seq=False, seed=0, token_adv=False, weights=False,
                 with_ref=False, masked_rows=(1,)):
    """make_inputs' batch (each clip branch fires, NaN / -inf at padding) plus advantages [N] (a fully masked row's
    is NaN: it must not leak) or [N, T] (varying along the row, NaN at padding), and IS weights in [0.2, 3.2] (NaN
    at padding) so that a threshold of 2 truncates some."""
    batch = make_inputs(P, G, T, dtype=dtype, seq=seq, seed=seed, with_ref=with_ref, masked_rows=masked_rows)
    g = torch.Generator().manual_seed(seed + 100)
    N, mask = P * G, batch["mask"]
    adv = torch.randn(N, generator=g)
    adv[adv.abs() < 0.05] = 0.0
    adv[~mask.any(dim=1)] = NAN
    if token_adv:
        adv = torch.where(mask, adv[:, None] + 0.5 * torch.randn(N, T, generator=g), torch.tensor(NAN))
    batch["advantages"] = adv
    batch["rollout_is_weights"] = torch.where(mask, 0.2 + 3.0 * torch.rand(N, T, generator=g), torch.tensor(NAN)) \
        if weights else None
    return batch


def run_both(batch, cfg, normalizer=None):
    """((loss, metrics), grad, nonfinite) of the kernel and ((loss, metrics), grad) of the reference."""
    args = (batch["old_logprobs"], batch["advantages"], batch["mask"], cfg, batch["ref_logprobs"],
            batch["rollout_is_weights"], normalizer)
    lp = batch["logprobs"]
    (loss, metrics), nonfinite = triton_loss.policy_loss_terms_with_checks(lp, *args)
    (grad,) = torch.autograd.grad(loss, lp)
    r_loss, r_metrics = policy_loss_terms(lp, *args)
    (r_grad,) = torch.autograd.grad(r_loss, lp)
    return (loss, metrics), grad, nonfinite, (r_loss, r_metrics), r_grad


def check_parity(batch, cfg, dtype=torch.float32, normalizer=None):
    rtol, grad_max, grad_rms = TOL[dtype]
    (loss, metrics), grad, nonfinite, (r_loss, r_metrics), r_grad = run_both(batch, cfg, normalizer)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.requires_grad
    assert grad.dtype == batch["logprobs"].dtype
    assert tuple(metrics) == tuple(r_metrics) == metric_names(advantages=False, kl=batch["ref_logprobs"] is not None)
    adv = batch["advantages"]
    term = max(torch.nan_to_num(adv.abs(), nan=0.0).mean().item(), 1e-6)
    floors = {"pg_loss": term, "approx_kl": 1e-2, "kl": 1e-2, "kl_loss": 1e-2}
    assert_close(loss, r_loss, max_rel=rtol, floor=term, name="loss")
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad and v.dtype == r_metrics[k].dtype, k
        assert_close(v, r_metrics[k], max_rel=rtol, floor=floors.get(k, 1e-6), name=f"metric {k}")
    assert_close(grad, r_grad, max_rel=grad_max, rms_rel=grad_rms, name="grad")
    m = batch["mask"].bool()
    expected = []
    for name in ("logprobs", "old_logprobs", "ref_logprobs", "advantages", "rollout_is_weights"):
        t = batch[name]
        valid = m.any(dim=1) if t is not None and t.dim() == 1 else m
        expected.append(0 if t is None else int((~torch.isfinite(t.detach()) & valid).sum()))
    assert nonfinite.dtype == torch.int64 and nonfinite.tolist() == expected
    return metrics


# -- parity: presets x advantage shape x dtype ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("token_adv", [False, True], ids=["row-adv", "token-adv"])
@pytest.mark.parametrize("preset", PRESETS)
def test_parity_presets(preset, token_adv, dtype):
    cfg = LossConfig.preset(preset)
    batch = policy_batch(3, 4, 33, dtype=dtype, seq=cfg.ratio_level == "sequence", seed=1, token_adv=token_adv)
    metrics = check_parity(batch, cfg, dtype)
    if dtype == torch.float32:  # the regimes really are mixed: both clip branches fire and some tokens are unclipped
        assert 0 < metrics["clipfrac_low"] and 0 < metrics["clipfrac_high"] and metrics["clipfrac"] < 1
        assert metrics["num_seqs"] < 12


# -- parity: shapes (odd N, T = 1, several programs, several T chunks) ---------------------------------------------
SHAPES = {"N21-T1": (7, 3, 1), "N16-T70": (2, 8, 70), "N48-T9": (3, 16, 9)}


@pytest.mark.parametrize("token_adv", [False, True], ids=["row-adv", "token-adv"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("preset", ["dapo", "gspo"])
def test_parity_shapes(preset, shape, token_adv):
    P, G, T = SHAPES[shape]
    cfg = LossConfig.preset(preset)
    batch = policy_batch(P, G, T, seq=cfg.ratio_level == "sequence", seed=2, token_adv=token_adv, weights=True,
                         masked_rows=(2,))
    check_parity(batch, cfg)


# -- parity: options ------------------------------------------------------------------------------------------------
OPTIONS = [
    ("grpo", dict(clip_ratio_c=3.0), False),
    ("gspo", dict(clip_ratio_c=3.0), True),
    ("grpo", dict(rollout_is_threshold=2.0, clip_ratio_c=3.0), False),
    ("grpo", dict(rollout_is_threshold=2.0), True),
    ("gspo", dict(rollout_is_threshold=2.0), False),
    ("gspo", dict(rollout_is_threshold=2.0), True),
    ("dapo", dict(rollout_is_threshold=None), False),
    ("grpo", dict(kl_coef=0.1, kl_estimator="k1", kl_ratio_weighted=True), False),
    ("dapo", dict(kl_coef=0.1, kl_estimator="k2", kl_ratio_weighted=True, rollout_is_threshold=2.0), True),
    ("grpo", dict(kl_coef=0.1, kl_estimator="k3", kl_ratio_weighted=True, clip_ratio_c=2.5), True),
    ("gspo", dict(kl_coef=0.1, kl_estimator="k3", kl_ratio_weighted=True), False),
    ("gspo", dict(kl_coef=0.1, kl_estimator="k1", kl_ratio_weighted=True, rollout_is_threshold=2.0), True),
    ("gspo", dict(kl_coef=0.1, kl_estimator="k2"), True),
    ("grpo", dict(kl_coef=0.0, kl_ratio_weighted=True), False),  # ref given, KL in the metrics only
    ("dapo", dict(loss_agg="seq-mean-token-sum"), True),
    ("dr_grpo", dict(norm_len=50, kl_coef=0.05), False),
    ("gspo", dict(loss_agg="token-mean", log_ratio_clamp=0.01, kl_coef=0.1, kl_ratio_weighted=True), True),
]


@pytest.mark.parametrize("preset, overrides, token_adv", OPTIONS,
                         ids=[f"{p}-{'token' if t else 'row'}-{o}" for p, o, t in OPTIONS])
def test_parity_options(preset, overrides, token_adv):
    cfg = LossConfig.preset(preset, **overrides)
    with_ref = "kl_coef" in overrides
    weights = "rollout_is_threshold" in overrides
    batch = policy_batch(3, 4, 21, seq=cfg.ratio_level == "sequence", seed=3, token_adv=token_adv, weights=weights,
                         with_ref=with_ref)
    metrics = check_parity(batch, cfg)
    if cfg.clip_ratio_c is not None:
        assert metrics["dual_clipfrac"] > 0
    if cfg.kl_coef:
        assert metrics["kl_loss"] != 0
    if weights and cfg.rollout_is_threshold is not None:  # the truncation really fires
        w = batch["rollout_is_weights"]
        assert (w[batch["mask"]] > cfg.rollout_is_threshold).any()


@pytest.mark.parametrize("token_adv", [False, True], ids=["row-adv", "token-adv"])
@pytest.mark.parametrize("preset", PRESETS)
def test_parity_normalizer(preset, token_adv):
    cfg = LossConfig.preset(preset)
    batch = policy_batch(3, 4, 10, seq=cfg.ratio_level == "sequence", seed=4, token_adv=token_adv)
    check_parity(batch, cfg, normalizer=torch.tensor(37.0, dtype=torch.float64))


def test_weights_change_the_loss_and_truncation_matters():
    """The IS weights really enter (loss differs from weights = 1) and so does their truncation."""
    batch = policy_batch(2, 4, 12, seed=5, weights=True)
    cfg = LossConfig.grpo()
    losses = []
    for weights, threshold in ((None, None), (batch["rollout_is_weights"], None), (batch["rollout_is_weights"], 1.5)):
        (loss, _), _ = triton_loss.policy_loss_terms_with_checks(
            batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"],
            cfg.replace(rollout_is_threshold=threshold), rollout_is_weights=weights)
        losses.append(loss.item())
    assert len(set(losses)) == 3, losses


def test_nonfinite_at_valid_positions_are_counted():
    batch = policy_batch(2, 4, 5, seed=6, token_adv=True, weights=True, with_ref=True)
    with torch.no_grad():
        batch["logprobs"][0, 0] = NAN
    batch["advantages"][2, 0] = float("inf")
    batch["advantages"][3, 0] = NAN
    batch["rollout_is_weights"][4, 0] = NAN
    cfg = LossConfig.grpo(kl_coef=0.1)
    _, nonfinite = triton_loss.policy_loss_terms_with_checks(
        batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"], cfg, batch["ref_logprobs"],
        batch["rollout_is_weights"])
    assert nonfinite.tolist() == [1, 0, 0, 2, 1]
    row = policy_batch(2, 4, 5, seed=6)
    row["advantages"][0] = NAN  # row 0 has valid tokens (row 1, fully masked, holds NaN already: not counted)
    _, nonfinite = triton_loss.policy_loss_terms_with_checks(row["logprobs"], row["old_logprobs"], row["advantages"],
                                                             row["mask"], cfg)
    assert nonfinite.tolist() == [0, 0, 0, 1, 0]


def test_fully_masked_batch():
    for token_adv in (False, True):
        batch = policy_batch(2, 4, 5, seed=7, masked_rows=range(8), token_adv=token_adv)
        for preset in PRESETS:
            metrics = check_parity(batch, LossConfig.preset(preset))
            assert metrics["num_tokens"] == 0 and metrics["pg_loss"] == 0


def test_gspo_gradient_with_per_token_advantages_is_uniform_per_row():
    """GSPO: every token's gradient is the same within a row (all of it flows through the sequence ratio), also when
    the advantages and IS weights vary along the row."""
    batch = policy_batch(2, 4, 9, seq=True, seed=8, token_adv=True, weights=True)
    (_, _), grad, _, _, r_grad = run_both(batch, LossConfig.gspo(clip_low=0.5, clip_high=10.0))
    assert_close(grad, r_grad, max_rel=2e-5, rms_rel=2e-6, name="grad")
    mask = batch["mask"]
    for i in range(8):
        vals = grad[i][mask[i]]
        if vals.numel():
            assert torch.allclose(vals, vals[0].expand_as(vals), rtol=1e-6, atol=0) and grad[i][~mask[i]].eq(0).all()


# -- the public function, the op, the two stages ---------------------------------------------------------------------
@pytest.mark.parametrize("token_adv", [False, True], ids=["row-adv", "token-adv"])
def test_hadw_policy_loss_backend_triton(token_adv):
    batch = policy_batch(3, 4, 12, seed=9, token_adv=token_adv, weights=True, with_ref=True)
    cfg = LossConfig.grpo(kl_coef=0.05, kl_ratio_weighted=True, rollout_is_threshold=2.0)
    outs = {}
    for backend in ("torch", "triton"):
        batch["logprobs"].grad = None
        out = hadw_policy_loss(batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"],
                               config=cfg, ref_logprobs=batch["ref_logprobs"],
                               rollout_is_weights=batch["rollout_is_weights"], normalizer=20.0, backend=backend)
        out.loss.backward()
        outs[backend] = (out, batch["logprobs"].grad.clone())
    (o, g), (r, rg) = outs["triton"], outs["torch"]
    assert_close(o.loss, r.loss, max_rel=2e-5, name="loss")
    assert_close(g, rg, max_rel=2e-5, rms_rel=2e-6, name="grad")
    assert tuple(o.metrics) == tuple(r.metrics) and tuple(o.metrics)[:9] == POLICY_METRICS
    assert o.phi is None and not o.advantages.requires_grad


@pytest.mark.parametrize("name", ["advantages", "rollout_is_weights"])
def test_hadw_policy_loss_backend_triton_rejects_nonfinite(name):
    batch = policy_batch(2, 4, 5, seed=10, token_adv=True, weights=True)
    batch[name][0, 0] = NAN
    with pytest.raises(ValueError, match=rf"non-finite values at valid \(mask=1\) positions: {name}: 1 NaN/Inf"):
        hadw_policy_loss(batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"],
                         rollout_is_weights=batch["rollout_is_weights"], backend="triton")


@pytest.mark.parametrize("preset", ["grpo", "gspo"])
def test_two_stages_on_the_kernels_equal_the_fused_kernel(preset):
    """hadw_advantages (group kernel) then hadw_policy_loss (row advantages) on the same batch, split into shuffled
    micro-batches with the global normalizer, equals the fused kernel's hadw_loss."""
    cfg = LossConfig.preset(preset, adv_norm="batch_std")
    batch = make_inputs(4, 4, 11, seq=preset == "gspo", seed=11)
    rewards = batch["rewards"].clone()
    rewards[5] = NAN
    lp = batch["logprobs"]
    fused = hadw_loss(lp, batch["old_logprobs"], rewards, batch["mask"], 4, anchor=0.4, config=cfg, backend="triton")
    (g_fused,) = torch.autograd.grad(fused.loss, lp)
    adv = hadw_advantages(rewards, 4, anchor=0.4, config=cfg, backend="triton")
    assert_close(adv.advantages, fused.advantages, max_rel=1e-6, name="advantages")
    total = loss_normalizer(batch["mask"], cfg)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    loss = 0.0
    for rows in perm.split(5):
        loss = loss + hadw_policy_loss(lp[rows], batch["old_logprobs"][rows], adv.advantages[rows],
                                       batch["mask"][rows], config=cfg, normalizer=total, backend="triton").loss
    (g_two,) = torch.autograd.grad(loss, lp)
    assert_close(loss, fused.loss, max_rel=2e-6, floor=fused.metrics["adv_abs_mean"].item(), name="loss")
    assert_close(g_two, g_fused, max_rel=2e-6, rms_rel=2e-7, name="grad")


def test_custom_op_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    batch = policy_batch(2, 4, 9, seed=12, token_adv=True, weights=True, with_ref=True)
    cfg = LossConfig.gspo(kl_coef=0.1, kl_ratio_weighted=True, rollout_is_threshold=2.0)

    def step(logp, old, adv, mask, ref, weights):
        out = hadw_policy_loss(logp * 1.0, old, adv, mask, config=cfg, ref_logprobs=ref, rollout_is_weights=weights,
                               normalizer=torch.tensor(6.0), backend="triton")
        return 2.0 * out.loss, out.metrics["clipfrac"], out.metrics["kl"]

    args = (batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"], batch["ref_logprobs"],
            batch["rollout_is_weights"])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    want = step(*args)
    (g_got,) = torch.autograd.grad(got[0], batch["logprobs"])
    (g_want,) = torch.autograd.grad(want[0], batch["logprobs"])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(g_got, g_want)


@pytest.mark.parametrize("token_adv", [False, True], ids=["row-adv", "token-adv"])
def test_opcheck_and_every_output_is_written(token_adv):
    batch = policy_batch(2, 2, 3, seed=13, masked_rows=(), token_adv=token_adv, weights=True, with_ref=True)
    cfg = LossConfig.gspo(kl_coef=0.1, kl_ratio_weighted=True)
    args = (batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"], batch["ref_logprobs"],
            batch["rollout_is_weights"], None, config_to_json(cfg))
    torch.library.opcheck(triton_loss.policy_loss, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    for i, t in enumerate(triton_loss.policy_loss(*args)):
        assert torch.isfinite(t.float()).all(), f"output {i} has unwritten (NaN) elements"
