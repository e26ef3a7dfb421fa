"""The fused Triton loss against the reference, under the Triton interpreter on CPU (TRITON_INTERPRET=1 is set by
conftest.py): every preset x HA-DW on/off x fp32/bf16/fp16 x hostile shapes, options (dual clip, KL estimators,
normalizer, ...), named regimes in which each clip branch really fires; the loss, every metric, advantages, phi and
the gradient. Kernel outputs are poisoned with NaN before each run, so an unwritten element fails loudly. Also: the
custom op under torch.compile(fullgraph=True), and hadw_loss(..., backend="triton") end to end."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from hadw_kernels import LossConfig, hadw_loss  # noqa: E402
from hadw_kernels.ops import _triton_runtime, triton_loss  # noqa: E402
from hadw_kernels.ops._config_json import config_to_json  # noqa: E402
from hadw_kernels.reference import loss_terms  # noqa: E402

PRESETS = ["grpo", "dapo", "gspo", "dr_grpo"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ANCHOR = torch.tensor(0.45, dtype=torch.float64)
# (rtol on the loss / metrics / advantages, max-rel and rms-rel on the gradient) per input dtype: inputs are identical
# for both sides and computed in fp32, so the only differences are fp32 rounding order and the rounding of the
# gradient to the input dtype (one ulp: 2^-8 for bf16, 2^-11 for fp16).
TOL = {torch.float32: (2e-5, 2e-5, 2e-6), torch.bfloat16: (2e-5, 8e-3, 2e-3), torch.float16: (2e-5, 1e-3, 3e-4)}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(_triton_runtime, "POISON_OUTPUTS", True)


# -- helpers ------------------------------------------------------------------------------------------------------
def assert_close(actual, expected, *, max_rel, rms_rel=None, floor=1e-6, name="value"):
    """Max and RMS error relative to the expected tensor's magnitude (max |expected|, at least `floor`: the size of
    the terms a cancelling sum is made of); on failure print the worst failing coordinates. Non-finite values in
    `actual` always fail (a poisoned output was not written)."""
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    bad = ~torch.isfinite(actual)
    assert not bad.any(), f"{name}: non-finite at {bad.nonzero()[:8].tolist()} (unwritten output?)"
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs()
    max_err = err.max().item() / scale
    rms = (err.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp(min=floor)).item()
    rms_rel = max_rel if rms_rel is None else rms_rel
    if max_err > max_rel or rms > rms_rel:
        fail = (err / scale > max_rel).nonzero()
        order = err[tuple(fail.T)].argsort(descending=True)[:8] if fail.numel() else []
        lines = [f"  at {tuple(fail[i].tolist())}: got {actual[tuple(fail[i])].item():.9g}, "
                 f"expected {expected[tuple(fail[i])].item():.9g}" for i in order]
        raise AssertionError(f"{name}: max rel err {max_err:.3e} (tol {max_rel:.1e}), rms rel err {rms:.3e} "
                             f"(tol {rms_rel:.1e}), {fail.shape[0]} coordinate(s) over:\n" + "\n".join(lines))


def make_inputs(P, G, T, *, dtype=torch.float32, seq=False, seed=0, masked_rows=(1,), equal_groups=(0,),
                with_ref=False, binary=True):
    """A batch whose per-row log-ratio offsets cycle through values that make each clip branch fire (token level:
    offsets +-0.3 and 1.5 with noise 0.3; sequence level: offsets around the 3e-4 / 4e-4 bounds with tiny noise).
    Padding holds NaN / -inf, which must never leak."""
    g = torch.Generator().manual_seed(seed)
    N = P * G
    old = -torch.rand(N, T, generator=g) * 3 - 0.05
    if seq:
        offsets = torch.tensor([0.0, 1e-3, -1e-3, 1e-4, -2e-3, 1.5, 0.5, -0.5])
        noise = 1e-4
    else:
        offsets = torch.tensor([0.0, 0.3, -0.3, 1.5, 0.1, -0.6])
        noise = 0.3
    off = offsets[torch.arange(N) * 5 % len(offsets)]
    logp = old + off[:, None] + noise * torch.randn(N, T, generator=g)
    rewards = (torch.randint(0, 2, (N,), generator=g) if binary else torch.rand(N, generator=g)).float()
    grp = rewards.view(P, G)
    equal = torch.zeros(P, dtype=torch.bool)
    equal[list(equal_groups)] = True
    grp[equal] = grp[equal][:, :1]
    flip = (grp.amax(dim=1) == grp.amin(dim=1)) & ~equal  # the other groups really are non-degenerate
    grp[flip, 0] = 1.0 - grp[flip, 0]
    mask = torch.rand(N, T, generator=g) > 0.25
    mask[:, 0] = True
    mask[[i for i in masked_rows if i < N]] = False
    ref = old + 0.2 * torch.randn(N, T, generator=g) if with_ref else None
    # padding: garbage that would poison the loss if it were read as data
    logp = torch.where(mask, logp, torch.full_like(logp, float("nan")))
    old = torch.where(mask, old, torch.full_like(old, -float("inf")))
    if ref is not None:
        ref = torch.where(mask, ref, torch.full_like(ref, float("nan")))
    return dict(logprobs=logp.to(dtype).requires_grad_(), old_logprobs=old.to(dtype), rewards=rewards, mask=mask,
                ref_logprobs=None if ref is None else ref.to(dtype))


def run_both(batch, G, cfg, anchor=ANCHOR, normalizer=None):
    """(kernel, reference) results: ((loss, advantages, phi, metrics), grad) each, plus the kernel's nonfinite."""
    args = (batch["old_logprobs"], batch["rewards"], batch["mask"], G, anchor, cfg, batch["ref_logprobs"], normalizer)
    lp = batch["logprobs"]
    (loss, adv, phi, metrics), nonfinite = triton_loss.loss_terms_with_checks(lp, *args)
    (grad,) = torch.autograd.grad(loss, lp)
    ref_out = loss_terms(lp, *args)
    (ref_grad,) = torch.autograd.grad(ref_out[0], lp)
    return ((loss, adv, phi, metrics), grad), (ref_out, ref_grad), nonfinite


def check_parity(batch, G, cfg, dtype=torch.float32, **kw):
    rtol, grad_max, grad_rms = TOL[dtype]
    ((loss, adv, phi, metrics), grad), ((r_loss, r_adv, r_phi, r_metrics), r_grad), nonfinite = run_both(
        batch, G, cfg, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.requires_grad
    assert grad.dtype == batch["logprobs"].dtype
    assert list(metrics) == list(r_metrics), "metric keys / order differ from the reference"
    # The loss is a sum of +-A rho terms that may cancel (e.g. GSPO with rho ~ 1): measure it against the size of
    # the terms. k3-type estimators, exp(x) - x - 1, cancel near x = 0: an ulp of exp(x) ~ 1 is 6e-8 absolute.
    term = max(r_metrics["adv_abs_mean"].item(), 1e-6)
    floors = {"pg_loss": term, "approx_kl": 1e-2, "kl": 1e-2, "kl_loss": 1e-2}
    assert_close(loss, r_loss, max_rel=rtol, floor=term, name="loss")
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad and v.dtype == r_metrics[k].dtype, k
        assert_close(v, r_metrics[k], max_rel=rtol, floor=floors.get(k, 1e-6), name=f"metric {k}")
    assert_close(adv, r_adv, max_rel=1e-6, name="advantages")
    assert_close(phi, r_phi, max_rel=1e-6, name="phi")
    assert_close(grad, r_grad, max_rel=grad_max, rms_rel=grad_rms, name="grad")
    m = batch["mask"].bool()
    expected_bad = [int((~torch.isfinite(batch[k]) & m).sum()) if batch[k] is not None else 0
                    for k in ("logprobs", "old_logprobs", "ref_logprobs")]
    assert nonfinite.dtype == torch.int64 and nonfinite.tolist() == expected_bad
    return metrics


# -- parity: presets x HA-DW x dtype (shape with a fully masked row and an equal-reward group) ---------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hadw", [True, False], ids=["hadw", "plain"])
@pytest.mark.parametrize("preset", PRESETS)
def test_parity_presets(preset, hadw, dtype):
    cfg = LossConfig.preset(preset, hadw=hadw)
    batch = make_inputs(3, 4, 33, dtype=dtype, seq=cfg.ratio_level == "sequence", seed=1)
    metrics = check_parity(batch, 4, cfg, dtype)
    if dtype == torch.float32:  # the regimes really are mixed: both clip branches fire and some tokens are unclipped
        assert 0 < metrics["clipfrac_low"] and 0 < metrics["clipfrac_high"] and metrics["clipfrac"] < 1
        assert metrics["degenerate_group_frac"] > 0 and metrics["num_seqs"] < 12


# -- parity: shapes (odd N, T = 1, G in {2, 3, 8, 16}, several programs, several T chunks) ------------------------
SHAPES = {
    "N21-G3-T1": (7, 3, 1),  # odd N, T = 1, two programs
    "N10-G2-T12": (5, 2, 12),
    "N16-G8-T70": (2, 8, 70),  # two T chunks in the interpreter (BLOCK_T = 64)
    "N48-G16-T9": (3, 16, 9),  # three row blocks on two programs: the grid-stride loop
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("preset", PRESETS)
def test_parity_shapes(preset, shape, dtype):
    P, G, T = SHAPES[shape]
    cfg = LossConfig.preset(preset)
    batch = make_inputs(P, G, T, dtype=dtype, seq=cfg.ratio_level == "sequence", seed=2, masked_rows=(2,))
    check_parity(batch, G, cfg, dtype)


# -- parity: options --------------------------------------------------------------------------------------------
OPTIONS = [
    ("grpo", dict(clip_ratio_c=3.0)),
    ("gspo", dict(clip_ratio_c=3.0)),
    ("grpo", dict(kl_coef=0.1, kl_estimator="k1")),
    ("dapo", dict(kl_coef=0.1, kl_estimator="k2")),
    ("grpo", dict(kl_coef=0.1, kl_estimator="k3", clip_ratio_c=2.5)),
    ("gspo", dict(kl_coef=0.1, kl_estimator="k3")),
    ("dr_grpo", dict(kl_coef=0.05, kl_estimator="k2")),
    ("grpo", dict(kl_coef=0.0)),  # ref given but not in the loss: kl metrics only
    ("grpo", dict(std_unbiased=False, lambda_scale=1.7)),
    ("grpo", dict(adv_norm="none")),
    ("grpo", dict(adv_norm="batch_std")),
    ("gspo", dict(adv_norm="batch_std", std_unbiased=False)),
    ("grpo", dict(kl_coef=0.1, kl_estimator="k2", kl_ratio_weighted=True)),
    ("gspo", dict(kl_coef=0.1, kl_estimator="k3", kl_ratio_weighted=True, clip_ratio_c=3.0)),
    ("dapo", dict(loss_agg="seq-mean-token-sum")),
    ("dr_grpo", dict(norm_len=50)),
    ("gspo", dict(loss_agg="token-mean", log_ratio_clamp=0.01)),  # the GSPO clamp gates the gradient
]


@pytest.mark.parametrize("preset, overrides", OPTIONS, ids=[f"{p}-{o}" for p, o in OPTIONS])
def test_parity_options(preset, overrides):
    cfg = LossConfig.preset(preset, **overrides)
    batch = make_inputs(3, 4, 21, seq=cfg.ratio_level == "sequence", seed=3, with_ref="kl_coef" in overrides)
    metrics = check_parity(batch, 4, cfg)
    if cfg.clip_ratio_c is not None:
        assert metrics["dual_clipfrac"] > 0
    if cfg.kl_coef:
        assert metrics["kl_loss"] != 0


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("normalizer", [7.0, 123.0])
def test_parity_normalizer(preset, normalizer):
    cfg = LossConfig.preset(preset)
    batch = make_inputs(3, 4, 10, seq=cfg.ratio_level == "sequence", seed=4)
    check_parity(batch, 4, cfg, normalizer=torch.tensor(normalizer, dtype=torch.float64))


def test_parity_real_valued_rewards_and_no_anchor():
    batch = make_inputs(4, 3, 8, seed=5, binary=False, equal_groups=())
    check_parity(batch, 3, LossConfig.grpo(), anchor=None)
    check_parity(batch, 3, LossConfig.grpo(), anchor=torch.tensor(0.9, dtype=torch.float64))


@pytest.mark.parametrize("adv_norm", ["group_std", "batch_std", "none"])
def test_parity_unscorable_rewards(adv_norm):
    """NaN rewards (unscorable) in the fused kernel: left out of their group's statistics, advantage 0; a group with
    one scorable reward (or none) is degenerate."""
    batch = make_inputs(4, 4, 9, seed=19, equal_groups=())
    rewards = batch["rewards"].clone()
    rewards[[0, 5, 6, 7, 8, 9]] = float("nan")  # group 0: three scorable; group 1: one; group 2: two
    rewards[[12, 13, 14, 15]] = float("nan")  # group 3: none
    metrics = check_parity({**batch, "rewards": rewards}, 4, LossConfig.grpo(adv_norm=adv_norm))
    assert metrics["degenerate_group_frac"] >= 0.5


def test_log_ratio_clamp_fires():
    """Log-ratios beyond +-20 are clamped: the gradient there is 0 (token level), and no ratio overflows."""
    batch = make_inputs(2, 4, 6, seed=6, masked_rows=())
    with torch.no_grad():
        batch["logprobs"][1, 2] = batch["old_logprobs"][1, 2] + 25.0
        batch["logprobs"][5, 3] = batch["old_logprobs"][5, 3] - 25.0
    check_parity(batch, 4, LossConfig.grpo(clip_ratio_c=3.0))
    (_, grad), _, _ = run_both(batch, 4, LossConfig.grpo())
    assert grad[1, 2] == 0 and grad[5, 3] == 0


def test_non_contiguous_inputs_mask_and_reward_dtypes():
    batch = make_inputs(3, 4, 16, seed=7)
    base = check_parity(batch, 4, LossConfig.dapo())
    for mask in (batch["mask"].float(), batch["mask"].to(torch.int64), batch["mask"].to(torch.uint8)):
        check_parity({**batch, "mask": mask}, 4, LossConfig.dapo())
    strided = torch.stack([batch["rewards"], -batch["rewards"]], dim=1)[:, 0]  # stride 2
    for rewards in (batch["rewards"].bool(), batch["rewards"].to(torch.int64), batch["rewards"].double(), strided):
        check_parity({**batch, "rewards": rewards}, 4, LossConfig.dapo())
    # transposed storage: strides (1, N)
    t = {k: (v.detach().t().contiguous().t() if isinstance(v, torch.Tensor) and v.dim() == 2 else v)
         for k, v in batch.items()}
    t["logprobs"].requires_grad_()
    assert t["logprobs"].stride() != batch["logprobs"].stride()
    metrics = check_parity(t, 4, LossConfig.dapo())
    assert_close(metrics["pg_loss"], base["pg_loss"], max_rel=1e-6)


def test_nonfinite_at_valid_positions_are_counted():
    batch = make_inputs(2, 4, 5, seed=8, with_ref=True)
    with torch.no_grad():
        batch["logprobs"][0, 0] = float("nan")
        batch["old_logprobs"][2, 0] = float("inf")
        batch["old_logprobs"][3, 0] = -float("inf")
    batch["ref_logprobs"][4, 0] = float("nan")
    args = (batch["old_logprobs"], batch["rewards"], batch["mask"], 4, ANCHOR, LossConfig.grpo(kl_coef=0.1),
            batch["ref_logprobs"], None)
    _, nonfinite = triton_loss.loss_terms_with_checks(batch["logprobs"], *args)
    assert nonfinite.tolist() == [1, 2, 1]


def test_fully_masked_batch():
    batch = make_inputs(2, 4, 5, seed=9, masked_rows=range(8))
    for preset in PRESETS:
        metrics = check_parity(batch, 4, LossConfig.preset(preset))
        assert metrics["num_tokens"] == 0 and metrics["pg_loss"] == 0


def test_float32_kernel_is_as_accurate_as_the_float32_reference():
    """Against float64 ground truth the kernel's fp32 error is of the order of the fp32 reference's own error."""
    batch = make_inputs(4, 8, 40, seed=10)
    cfg = LossConfig.grpo(clip_ratio_c=3.0)
    (loss, _, _, _), _ = triton_loss.loss_terms_with_checks(batch["logprobs"], batch["old_logprobs"],
                                                             batch["rewards"], batch["mask"], 8, ANCHOR, cfg)
    f64 = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in batch.items()}
    exact = loss_terms(f64["logprobs"], f64["old_logprobs"], f64["rewards"], f64["mask"], 8, ANCHOR, cfg)[0]
    ref32 = loss_terms(batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 8, ANCHOR, cfg)[0]
    err, ref_err = abs(loss.item() - exact.item()), abs(ref32.item() - exact.item())
    assert err <= max(4 * ref_err, 1e-6 * abs(exact.item())), (err, ref_err)


def test_float64_uses_the_reference():
    """hadw_loss(backend="triton") computes float64 inputs with the reference (the kernels are fp32 by design); the
    kernel entry point itself refuses them rather than silently computing in fp32."""
    batch = make_inputs(2, 4, 6, dtype=torch.float64, seed=11)
    args = (batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 4)
    out = hadw_loss(*args, anchor=0.45, backend="triton")
    ref = hadw_loss(*args, anchor=0.45, backend="torch")
    assert out.loss.dtype == torch.float64 and out.loss.item() == ref.loss.item()
    assert torch.equal(out.advantages, ref.advantages) and torch.equal(out.phi, ref.phi)
    with pytest.raises(ValueError, match="float64 inputs are computed by the reference"):
        triton_loss.loss_terms_with_checks(*args, ANCHOR, LossConfig.grpo())


# -- the custom op -------------------------------------------------------------------------------------------------
def test_custom_op_under_torch_compile_fullgraph():
    """A function calling the op compiles with fullgraph=True (no graph break) and equals eager, gradient included."""
    torch._dynamo.reset()
    batch = make_inputs(2, 4, 9, seed=12, with_ref=True)
    cfg = LossConfig.gspo(kl_coef=0.1)

    def step(logp, old, rewards, mask, ref, anchor):
        (loss, adv, phi, metrics), nonfinite = triton_loss.loss_terms_with_checks(
            logp * 1.0, old, rewards, mask, 4, anchor, cfg, ref, None)
        return 2.0 * loss, adv, metrics["clipfrac"], metrics["kl"], nonfinite

    args = (batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], batch["ref_logprobs"], ANCHOR)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(*args), step(*args)
    (g_got,) = torch.autograd.grad(got[0], batch["logprobs"])
    (g_want,) = torch.autograd.grad(want[0], batch["logprobs"])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(g_got, g_want)


def test_hadw_loss_caller_compiles_fullgraph_with_triton_backend():
    """The public function, not only the op: a caller of hadw_loss(backend="triton") traces without graph breaks
    (validation that reads values back steps aside while tracing) and equals eager. The config is built inside the
    traced function: it must reach the kernel as DAPO, not as the default config (a bug this caught)."""
    torch._dynamo.reset()
    batch = make_inputs(2, 4, 9, seed=14)
    anchor, norm = torch.tensor(0.4), torch.tensor(30.0)

    def step(logp):
        out = hadw_loss(logp, batch["old_logprobs"], batch["rewards"], batch["mask"], 4, anchor=anchor,
                        config=LossConfig.dapo(), normalizer=norm, backend="triton")
        return 2.0 * out.loss, out.metrics["clipfrac_high"]

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(batch["logprobs"])
    want = step(batch["logprobs"])
    (g_got,) = torch.autograd.grad(got[0], batch["logprobs"])
    (g_want,) = torch.autograd.grad(want[0], batch["logprobs"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(g_got, g_want)


def test_opcheck():
    """torch.library's own checks of the schema, the fake implementation and the autograd registration."""
    batch = make_inputs(2, 2, 3, seed=13, masked_rows=())
    args = (batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], None, ANCHOR, None, 2,
            config_to_json(LossConfig.grpo()))
    torch.library.opcheck(triton_loss.fused_loss, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# -- end to end through hadw_loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["grpo", "gspo"])
def test_hadw_loss_backend_triton(preset):
    batch = make_inputs(3, 4, 12, seq=preset == "gspo", seed=14)
    cfg = LossConfig.preset(preset)
    outs = {}
    for backend in ("torch", "triton"):
        batch["logprobs"].grad = None
        out = hadw_loss(batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 4, anchor=0.45,
                        config=cfg, backend=backend)
        out.loss.backward()
        outs[backend] = (out, batch["logprobs"].grad.clone())
    (o, g), (r, rg) = outs["triton"], outs["torch"]
    assert_close(o.loss, r.loss, max_rel=2e-5, name="loss")
    assert_close(o.advantages, r.advantages, max_rel=1e-6, name="advantages")
    assert_close(g, rg, max_rel=2e-5, rms_rel=2e-6, name="grad")
    assert o.metrics.keys() == r.metrics.keys()
    assert not o.advantages.requires_grad and not o.phi.requires_grad


@pytest.mark.parametrize("name", ["logprobs", "old_logprobs", "ref_logprobs"])
def test_hadw_loss_backend_triton_rejects_nonfinite(name):
    batch = make_inputs(2, 4, 5, seed=15, with_ref=True)
    t = batch[name].detach().clone()
    t[0, 0] = float("nan")
    batch[name] = t
    with pytest.raises(ValueError, match=rf"non-finite values at valid \(mask=1\) positions: {name}: 1 NaN/Inf"):
        hadw_loss(batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"], 4, anchor=0.5,
                  ref_logprobs=batch["ref_logprobs"], backend="triton")


@pytest.mark.parametrize("changes, message", [
    (dict(group_size=1), r"group_size must be >= 2"),
    (dict(group_size=3), r"not divisible by group_size = 3"),
    (dict(mask=torch.ones(8, 4)), r"mask has shape \(8, 4\)"),
    (dict(normalizer=0.0), r"normalizer must be a finite number > 0"),
])
def test_hadw_loss_backend_triton_validation(changes, message):
    batch = make_inputs(2, 4, 5, seed=16)
    kw = dict(logprobs=batch["logprobs"], old_logprobs=batch["old_logprobs"], rewards=batch["rewards"],
              mask=batch["mask"], group_size=4, anchor=0.5, backend="triton")
    with pytest.raises(ValueError, match=message):
        hadw_loss(**{**kw, **changes})


def test_gspo_gradient_is_uniform_per_row():
    """GSPO's gradient is -A_i s_i / |y_i| (times 1 / rows) on every valid token of row i, 0 elsewhere."""
    batch = make_inputs(2, 4, 7, seq=True, seed=17)
    ((_, adv, _, metrics), grad), _, _ = run_both(batch, 4, LossConfig.gspo(clip_low=0.5, clip_high=10.0))
    mask = batch["mask"]
    for i in range(8):
        vals = grad[i][mask[i]]
        if vals.numel():
            assert torch.all(vals == vals[0]) and torch.all(grad[i][~mask[i]] == 0)
            n = mask[i].sum().item()
            lr = (batch["logprobs"][i][mask[i]].double() - batch["old_logprobs"][i][mask[i]].double()).mean()
            expected = -adv[i].item() * math.exp(lr.item()) / n / metrics["num_seqs"].item()
            assert vals[0].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("preset", ["dapo", "gspo"])
def test_every_op_output_is_written(preset):
    """With outputs allocated as NaN, every output of the op (including what only the backward reads) is finite."""
    batch = make_inputs(5, 3, 11, seq=preset == "gspo", seed=18, with_ref=True)
    cfg = LossConfig.preset(preset, kl_coef=0.1)
    outs = triton_loss.fused_loss(batch["logprobs"], batch["old_logprobs"], batch["rewards"], batch["mask"],
                                  batch["ref_logprobs"], ANCHOR, None, 3, config_to_json(cfg))
    for i, t in enumerate(outs):
        assert torch.isfinite(t.float()).all(), f"output {i} has unwritten (NaN) elements"
