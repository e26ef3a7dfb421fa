"""The loss and log-probs from hidden states (torch path) against the materialised-logits reference: log-probs,
entropy, the loss, every metric and the gradients w.r.t. hidden, weight and bias, in float64 (to rounding) and fp32;
both strategies (one pass, two passes) with several chunks and vocabulary blocks; both layouts ([N, T, H] and packed
[L, H] in shuffled order); temperature, bias, odd sizes, T = 1, fully masked rows and batches; float64 gradcheck;
bad input; the custom op (opcheck, fullgraph compile); chunk temporaries within the budget."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from hadw_kernels import LossConfig, hadw_policy_loss
from hadw_kernels import linear_logprobs as ll
from hadw_kernels.from_hidden import hadw_policy_loss_from_hidden
from hadw_kernels.linear_logprobs import fused_linear_logprobs, plan_chunks

PRESETS = ["grpo", "dapo", "gspo", "dr_grpo"]


# -- inputs and the reference -------------------------------------------------------------------------------------
def make_case(N=3, T=7, H=12, V=150, *, dtype=torch.float64, bias=True, seed=0, masked_rows=(1,), spread=0.4,
              with_ref=False, with_is=False, token_adv=False, full=False):
    """Hidden states, an LM head whose logits spread over a few units, ids, a mask with a masked row, and old
    log-probs = the model's own + noise (so ratios spread over the clip range). Padding holds NaN hidden states and
    out-of-range ids, which must never matter."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.6
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.3 if bias else None
    ids = torch.randint(0, V, (N, T), generator=g)
    mask = (torch.rand(N, T, generator=g) > 0.3) | full
    mask[:, 0] = True
    for r in masked_rows:
        mask[r] = False
    with torch.no_grad():
        lp, _ = reference(hidden, weight, b, ids, mask)
    old = (lp + spread * torch.randn(N, T, generator=g, dtype=torch.float64)).where(mask, torch.nan)
    adv = torch.randn(N, T, generator=g, dtype=torch.float64) if token_adv else torch.randn(N, generator=g,
                                                                                            dtype=torch.float64)
    ref = (lp + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)) if with_ref else None
    w = (0.5 + torch.rand(N, T, generator=g, dtype=torch.float64) * 2) if with_is else None
    hidden = hidden.masked_fill(~mask[..., None], float("nan"))  # padding: anything, even NaN
    ids = ids.masked_fill(~mask, -100)
    leaf = lambda t: None if t is None else t.to(dtype).requires_grad_(True)  # noqa: E731
    return dict(hidden=leaf(hidden), weight=leaf(weight), bias=leaf(b), ids=ids, mask=mask,
                old=old.to(dtype), adv=adv.to(dtype), ref=None if ref is None else ref.to(dtype),
                w=None if w is None else w.to(dtype))


def reference(hidden, weight, bias, ids, mask, temperature=1.0):
    """Materialised logits in float64: (log-probs, entropy) [N, T], zero where mask is 0."""
    h = torch.where(mask[..., None], hidden.double(), 0.0)
    z = h @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    lsm = torch.log_softmax(z / temperature, dim=-1)
    lp = lsm.gather(-1, ids.clamp(min=0)[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return torch.where(mask, lp, 0.0), torch.where(mask, ent, 0.0)


def params(c):
    return [t for t in (c["hidden"], c["weight"], c["bias"]) if t is not None]


def grads(loss, c):
    return torch.autograd.grad(loss, params(c))


def assert_close(actual, expected, tol, name):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = max(expected.abs().max().item(), 1e-3)
    err = (actual - expected).abs().max().item() / scale
    assert err <= tol, f"{name}: max error {err:.3e} relative to max |expected| {scale:.3e} (tol {tol:.1e})"


def reference_loss(c, cfg, temperature=1.0, normalizer=None):
    lp, ent = reference(c["hidden"], c["weight"], c["bias"], c["ids"], c["mask"], temperature)
    out = hadw_policy_loss(lp, c["old"].double(), c["adv"].double(), c["mask"], config=cfg,
                           ref_logprobs=None if c["ref"] is None else c["ref"].double(),
                           rollout_is_weights=None if c["w"] is None else c["w"].double(), normalizer=normalizer,
                           backend="torch")
    return out, lp, ent


def ours(c, cfg, **kw):
    return hadw_policy_loss_from_hidden(c["hidden"], c["weight"], c["ids"], c["old"], c["adv"], c["mask"],
                                        bias=c["bias"], config=cfg, ref_logprobs=c["ref"],
                                        rollout_is_weights=c["w"], loss_backend="torch", **kw)


@pytest.fixture
def strategy(monkeypatch):
    """Records which strategy each call took: the number of one-pass chunks (0 = two passes)."""
    calls = []
    orig = ll.TorchChunkOps.one_pass

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(ll.TorchChunkOps, "one_pass", counting)
    monkeypatch.setattr(ll, "MIN_CHUNK_TOKENS", 1)
    return calls


def budget_for(tokens, V, dtype=torch.float64, vocab=None):
    """A budget giving chunks of `tokens` tokens over `vocab` (default: all V) entries on the torch path."""
    return tokens * (vocab or V) * (torch.finfo(dtype).bits // 8)


# -- fused_linear_logprobs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget_tokens, vocab_block", [(None, None), (4, None), (3, 64), (1, 128)],
                         ids=["one-chunk", "chunks", "chunks+vocab-blocks", "token-by-token"])
@pytest.mark.parametrize("bias, temperature", [(True, 1.0), (False, 0.7), (True, 1.6)])
def test_fused_linear_logprobs_matches_reference(budget_tokens, vocab_block, bias, temperature, monkeypatch):
    monkeypatch.setattr(ll, "MIN_CHUNK_TOKENS", budget_tokens or 1)
    c = make_case(V=150, bias=bias, seed=1)
    budget = None if budget_tokens is None else budget_for(budget_tokens, 150, vocab=vocab_block)
    lp, ent = fused_linear_logprobs(c["hidden"], c["weight"], c["ids"], bias=c["bias"], temperature=temperature,
                                    mask=c["mask"], memory_budget=budget, backend="torch")
    rlp, rent = reference(c["hidden"], c["weight"], c["bias"], c["ids"], c["mask"], temperature)
    assert_close(lp, rlp, 1e-12, "logprobs")
    assert_close(ent, rent, 1e-12, "entropy")
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(lp.shape, generator=g, dtype=lp.dtype), torch.randn(lp.shape, generator=g, dtype=lp.dtype)
    got = grads((lp * u + ent * v).sum(), c)
    want = grads((rlp * u + rent * v).sum(), c)
    for name, a, b in zip(("hidden", "weight", "bias"), got, want, strict=False):
        assert_close(a, b, 1e-11, f"grad {name}")


def test_fused_linear_logprobs_without_mask_and_packed_layout():
    """No mask: every position; a packed [L, H] input is the same computation."""
    c = make_case(masked_rows=(), seed=3)
    c["hidden"] = c["hidden"].detach().nan_to_num().requires_grad_()
    full = torch.ones_like(c["mask"])
    ids = c["ids"].clamp(min=0)
    lp, ent = fused_linear_logprobs(c["hidden"], c["weight"], ids, bias=c["bias"])
    rlp, rent = reference(c["hidden"], c["weight"], c["bias"], ids, full)
    assert_close(lp, rlp, 1e-12, "logprobs")
    assert_close(ent, rent, 1e-12, "entropy")
    plp, pent = fused_linear_logprobs(c["hidden"].reshape(-1, 12), c["weight"], ids.reshape(-1), bias=c["bias"])
    assert torch.equal(plp, lp.reshape(-1)) and torch.equal(pent, ent.reshape(-1))


def test_fused_linear_logprobs_fp32_against_float64():
    c = make_case(dtype=torch.float32, V=300, H=32, seed=4)
    lp, ent = fused_linear_logprobs(c["hidden"], c["weight"], c["ids"], bias=c["bias"], mask=c["mask"])
    rlp, rent = reference(c["hidden"], c["weight"], c["bias"], c["ids"], c["mask"])
    assert lp.dtype == torch.float32
    assert_close(lp, rlp, 2e-6, "logprobs")
    assert_close(ent, rent, 2e-6, "entropy")
    u = torch.randn(lp.shape)
    got, want = grads((lp * u + ent).sum(), c), grads((rlp * u + rent).sum(), c)
    for name, a, b in zip(("hidden", "weight", "bias"), got, want, strict=True):
        assert_close(a, b, 2e-5, f"grad {name}")


def test_fused_linear_logprobs_gradcheck():
    c = make_case(N=2, T=3, H=4, V=11, seed=5, masked_rows=())
    c["hidden"] = c["hidden"].detach().nan_to_num().requires_grad_()
    ids = c["ids"].clamp(min=0)

    def f(h, w, b):
        lp, ent = fused_linear_logprobs(h, w, ids, bias=b, temperature=0.8, mask=c["mask"],
                                        memory_budget=2 * 4 * 8)  # 2 tokens x 4 vocabulary entries a chunk
        return lp, ent

    fh_min = ll.MIN_CHUNK_TOKENS
    ll.MIN_CHUNK_TOKENS = 2
    try:
        assert torch.autograd.gradcheck(f, (c["hidden"], c["weight"], c["bias"]))
    finally:
        ll.MIN_CHUNK_TOKENS = fh_min


# -- the loss -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("chunk", ["one-chunk", "chunks", "vocab-blocks"])
def test_loss_matches_reference(preset, chunk, strategy):
    """Loss, every metric, entropy, log-probs and all gradients, float64, both strategies. GSPO's clip range is widened
    so its gradient is not zero."""
    cfg = LossConfig.preset(preset, **({"clip_low": 0.5, "clip_high": 1.0} if preset == "gspo" else {}))
    c = make_case(seed=6)
    budget = {"one-chunk": None, "chunks": budget_for(3, 150), "vocab-blocks": budget_for(1, 150, vocab=128)}[chunk]
    out = ours(c, cfg, memory_budget=budget, temperature=0.9)
    got = grads(out.loss, c)
    ref, rlp, rent = reference_loss(c, cfg, temperature=0.9)
    want = grads(ref.loss, c)
    one_pass = len(strategy) > 0
    if chunk == "vocab-blocks":
        assert not one_pass
    elif chunk == "one-chunk" or preset != "gspo":
        assert one_pass
    assert_close(out.loss, ref.loss, 1e-12, "loss")
    assert list(out.metrics) == list(ref.metrics) + ["entropy"]
    for k, v in ref.metrics.items():
        assert_close(out.metrics[k], v, 1e-12, k)
    assert_close(out.metrics["entropy"], rent.sum() / c["mask"].sum(), 1e-12, "entropy metric")
    assert_close(out.logprobs, rlp, 1e-12, "logprobs")
    assert_close(out.entropy, rent, 1e-12, "entropy")
    assert not out.logprobs.requires_grad and not out.entropy.requires_grad
    for name, a, b in zip(("hidden", "weight", "bias"), got, want, strict=True):
        assert_close(a, b, 1e-11, f"grad {name}")
        assert a.abs().max() > 0, f"grad {name} is zero: the test would not see a wrong gradient"


def test_gspo_chunks_of_whole_rows_take_one_pass_and_long_rows_two(strategy):
    """GSPO's gradient at a token depends on its whole row: one pass only with chunks of whole rows."""
    cfg = LossConfig.gspo(clip_low=0.5, clip_high=1.0)
    c = make_case(N=4, T=3, seed=7, masked_rows=())
    ref, _, _ = reference_loss(c, cfg)
    want = grads(ref.loss, c)
    for tokens, expect_one_pass in ((4, True), (2, False)):  # rows have up to 3 valid tokens
        strategy.clear()
        out = ours(c, cfg, memory_budget=budget_for(tokens, 150))
        assert (len(strategy) > 0) == expect_one_pass
        for name, a, b in zip(("hidden", "weight", "bias"), grads(out.loss, c), want, strict=True):
            assert_close(a, b, 1e-11, f"grad {name} (chunks of {tokens})")


@pytest.mark.parametrize("options", [
    dict(with_ref=True, cfg=dict(kl_coef=0.1, kl_estimator="k3")),
    dict(with_ref=True, cfg=dict(kl_coef=0.05, kl_ratio_weighted=True, clip_ratio_c=3.0)),
    dict(with_is=True, cfg=dict(rollout_is_threshold=1.5)),
    dict(token_adv=True, cfg=dict(loss_agg="token-mean")),
    dict(normalizer=37.0, cfg=dict(loss_agg="token-mean")),
    dict(normalizer=5.0, cfg=dict(loss_agg="seq-mean-token-sum-norm", norm_len=9)),
], ids=["kl", "kl-ratio-dual-clip", "is-weights", "token-advantages", "normalizer-token", "normalizer-sum-norm"])
def test_loss_options(options, strategy):
    options = dict(options)
    normalizer = options.pop("normalizer", None)
    cfg = LossConfig.grpo(**options.pop("cfg"))
    c = make_case(seed=8, spread=1.0, **options)
    out = ours(c, cfg, memory_budget=budget_for(4, 150), normalizer=normalizer)
    assert len(strategy) > 1
    ref, _, _ = reference_loss(c, cfg, normalizer=normalizer)
    assert_close(out.loss, ref.loss, 1e-12, "loss")
    for k, v in ref.metrics.items():
        assert_close(out.metrics[k], v, 1e-12, k)
    for name, a, b in zip(("hidden", "weight", "bias"), grads(out.loss, c), grads(ref.loss, c), strict=True):
        assert_close(a, b, 1e-11, f"grad {name}")


def pack(c, seed=3, n_pad=4):
    """The valid tokens of a padded case as a packed sequence: rows interleaved at random (each row's tokens in
    column order, which is what the packed layout means), with `n_pad` masked junk slots scattered in between.
    Returns (source [L] flat padded position or -1, token_rows [L], mask [L])."""
    g = torch.Generator().manual_seed(seed)
    T = c["mask"].shape[1]
    valid = c["mask"].reshape(-1).nonzero().squeeze(1)
    perm = valid[torch.randperm(valid.numel(), generator=g)]
    for r in (perm // T).unique():  # keep column order within each row
        slots = (perm // T == r).nonzero().squeeze(1)
        perm[slots] = perm[slots].sort().values
    L = perm.numel() + n_pad
    pad_slots = torch.randperm(L, generator=g)[:n_pad]
    is_pad = torch.zeros(L, dtype=torch.bool)
    is_pad[pad_slots] = True
    source = torch.full((L,), -1)
    source[~is_pad] = perm
    rows = torch.where(is_pad, torch.randint(0, c["mask"].shape[0], (L,), generator=g), source // T)
    return source, rows, ~is_pad


def packed_args(c, source, rows, mask_p):
    """hidden [L, H] (a new leaf; +inf at padding), ids, old, ref [L] gathered from the padded case."""
    H = c["hidden"].shape[-1]
    src = source.clamp(min=0)
    hidden = c["hidden"].detach().reshape(-1, H)[src].masked_fill(~mask_p[:, None], float("inf")).requires_grad_()

    def per_token(t, fill=0.0):
        return None if t is None else t.reshape(-1)[src].masked_fill(~mask_p, fill)

    return hidden, per_token(c["ids"], 10**6), per_token(c["old"], float("nan")), per_token(c["ref"])


@pytest.mark.parametrize("preset", ["grpo", "gspo"])
def test_packed_layout_equals_padded(preset, strategy):
    """The same tokens packed (rows interleaved, junk padding in between): same loss, metrics and gradients, the
    log-probs in the packed layout. GSPO's chunks of whole rows are found in the interleaved order too."""
    cfg = LossConfig.preset(preset, **({"clip_low": 0.5, "clip_high": 1.0} if preset == "gspo" else {}))
    c = make_case(seed=9, with_ref=True, masked_rows=(1,))
    budget = budget_for(5, 150)
    padded = ours(c, cfg, memory_budget=budget)
    want = grads(padded.loss, c)
    strategy.clear()
    source, rows, mask_p = pack(c)
    hidden, ids, old, ref = packed_args(c, source, rows, mask_p)
    out = hadw_policy_loss_from_hidden(hidden, c["weight"], ids, old, c["adv"], mask_p, bias=c["bias"], config=cfg,
                                       ref_logprobs=ref, token_rows=rows, memory_budget=budget, loss_backend="torch")
    assert strategy  # one pass (GSPO: rows of at most 5 tokens fit a chunk)
    assert_close(out.loss, padded.loss, 1e-12, "loss")
    for k, v in padded.metrics.items():
        assert_close(out.metrics[k], v, 1e-12, k)
    src = source.clamp(min=0)
    assert_close(out.logprobs, padded.logprobs.reshape(-1)[src] * mask_p, 1e-12, "packed logprobs")
    assert_close(out.entropy, padded.entropy.reshape(-1)[src] * mask_p, 1e-12, "packed entropy")
    gh, gw, gb = torch.autograd.grad(out.loss, (hidden, c["weight"], c["bias"]))
    assert_close(gh[mask_p], want[0].reshape(-1, 12)[source[mask_p]], 1e-11, "grad hidden")
    assert torch.all(gh[~mask_p] == 0)
    assert_close(gw, want[1], 1e-11, "grad weight")
    assert_close(gb, want[2], 1e-11, "grad bias")


def test_packed_rows_in_any_order():
    """Tokens of different rows interleaved in the packed sequence: the i-th valid token of row r is column i."""
    c = make_case(N=2, T=3, seed=10, masked_rows=(), full=True)
    rows = torch.tensor([1, 0, 1, 0, 0, 1])
    cols = torch.tensor([0, 0, 1, 1, 2, 2])
    flat = rows * 3 + cols
    h = c["hidden"].detach().reshape(-1, 12)[flat].requires_grad_()
    ids = c["ids"].reshape(-1)[flat]
    old = c["old"].reshape(-1)[flat]
    cfg = LossConfig.gspo(clip_low=0.5, clip_high=1.0)
    packed = hadw_policy_loss_from_hidden(h, c["weight"], ids, old, c["adv"], torch.ones(6, dtype=torch.bool),
                                          config=cfg, bias=c["bias"], token_rows=rows, loss_backend="torch")
    hid = c["hidden"].detach().requires_grad_()
    padded = hadw_policy_loss_from_hidden(hid, c["weight"], c["ids"], c["old"], c["adv"], c["mask"], config=cfg,
                                          bias=c["bias"], loss_backend="torch")
    assert_close(packed.loss, padded.loss, 1e-12, "loss")
    (gp,) = torch.autograd.grad(packed.loss, h)
    (gq,) = torch.autograd.grad(padded.loss, hid)
    assert_close(gp, gq.reshape(-1, 12)[flat], 1e-11, "grad hidden")


@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (5, 1, 3, 129), (2, 9, 1, 257), (7, 4, 6, 131)],
                         ids=["single-token", "T=1", "H=1", "odd"])
def test_hostile_shapes(shape, strategy):
    N, T, H, V = shape
    cfg = LossConfig.dapo()
    c = make_case(N=N, T=T, H=H, V=V, seed=11, masked_rows=())
    out = ours(c, cfg, memory_budget=budget_for(2, V, vocab=min(V, 128)), temperature=1.3)
    ref, _, _ = reference_loss(c, cfg, temperature=1.3)
    assert_close(out.loss, ref.loss, 1e-12, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), grads(out.loss, c), grads(ref.loss, c), strict=True):
        assert_close(a, b, 1e-11, f"grad {name}")


@pytest.mark.parametrize("budget_tokens", [None, 2])
def test_fully_masked_batch(budget_tokens, strategy):
    """No valid token: loss 0, metrics as the policy loss gives them, zero gradients, no NaN anywhere."""
    c = make_case(N=2, T=3, seed=12, masked_rows=(0, 1))
    budget = None if budget_tokens is None else budget_for(budget_tokens, 150)
    out = ours(c, LossConfig.grpo(), memory_budget=budget)
    assert out.loss.item() == 0.0 and out.metrics["entropy"].item() == 0.0
    assert torch.all(out.logprobs == 0) and torch.all(out.entropy == 0)
    for g in grads(out.loss, c):
        assert torch.all(g == 0)


def test_backward_scales_by_the_incoming_gradient(strategy):
    cfg = LossConfig.grpo()
    c = make_case(seed=13)
    out = ours(c, cfg)
    assert strategy
    got = grads(-2.5 * out.loss, c)
    ref, _, _ = reference_loss(c, cfg)
    for name, a, b in zip(("hidden", "weight", "bias"), got, grads(-2.5 * ref.loss, c), strict=True):
        assert_close(a, b, 1e-11, f"grad {name}")


def test_backward_twice_with_a_retained_graph(strategy):
    """One pass: the gradients are kept for a second backward only when the graph is retained; without it a second
    backward is a clear error (they were released), not a silent zero."""
    cfg = LossConfig.grpo()
    c = make_case(seed=31)
    out = ours(c, cfg)
    assert strategy
    out.loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in params(c)]
    out.loss.backward()
    want = grads(reference_loss(c, cfg)[0].loss, c)
    for name, a, b, w in zip(("hidden", "weight", "bias"), first, params(c), want, strict=True):
        assert_close(a, w, 1e-11, f"grad {name}")
        assert_close(b.grad, 2 * w, 1e-11, f"grad {name}, accumulated twice")
    with pytest.raises(RuntimeError, match="backward through the loss a second time"):
        out.loss.backward()


def test_only_what_requires_grad(strategy):
    """A frozen LM head (e.g. LoRA) gets no gradient and costs no weight matmul; no grad at all: a plain forward."""
    cfg = LossConfig.grpo()
    c = make_case(seed=14)
    c["weight"].requires_grad_(False)
    c["bias"].requires_grad_(False)
    out = ours(c, cfg)
    (gh,) = torch.autograd.grad(out.loss, c["hidden"])
    ref, _, _ = reference_loss(c, cfg)
    (want,) = torch.autograd.grad(ref.loss, c["hidden"])
    assert_close(gh, want, 1e-11, "grad hidden")
    strategy.clear()
    with torch.no_grad():
        out = ours(c, cfg)
    assert not out.loss.requires_grad and not strategy
    assert_close(out.loss, ref.loss, 1e-12, "loss without grad")


@pytest.mark.parametrize("frozen", ["head", "hidden"])
@pytest.mark.parametrize("path", ["logprobs", "two-pass"])
def test_frozen_head_or_hidden_through_the_custom_op(frozen, path, strategy):
    """The custom op's backward with only some gradients wanted (a frozen LM head without bias, as with LoRA; or a
    frozen backbone): the gradients that are wanted match the reference (its unused returns once aliased one empty
    tensor, which torch's custom-op check rejected)."""
    c = make_case(seed=33, bias=False, masked_rows=())
    (c["weight"] if frozen == "head" else c["hidden"]).requires_grad_(False)
    leaf = c["hidden"] if frozen == "head" else c["weight"]
    cfg = LossConfig.gspo(clip_low=0.5, clip_high=1.0)
    if path == "logprobs":
        lp, ent = fused_linear_logprobs(c["hidden"], c["weight"], c["ids"], mask=c["mask"])
        rlp, rent = reference(c["hidden"], c["weight"], None, c["ids"], c["mask"])
        got, want = (lp + 0.3 * ent).sum(), (rlp + 0.3 * rent).sum()
    else:  # GSPO with rows longer than a chunk: two passes, the backward through the custom op
        got = ours(c, cfg, memory_budget=budget_for(2, 150)).loss
        want = reference_loss(c, cfg)[0].loss
        assert not strategy
    (g,) = torch.autograd.grad(got, leaf)
    (w,) = torch.autograd.grad(want, leaf)
    assert_close(g, w, 1e-11, f"grad {'hidden' if frozen == 'head' else 'weight'}")


def test_loss_fp32_against_float64(strategy):
    cfg = LossConfig.dapo()
    c = make_case(dtype=torch.float32, H=32, V=300, seed=15)
    out = ours(c, cfg, memory_budget=4 * 300 * 4)
    assert out.loss.dtype == torch.float32 and len(strategy) > 1
    ref, _, _ = reference_loss(c, cfg)
    assert_close(out.loss, ref.loss, 2e-6, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), grads(out.loss, c), grads(ref.loss, c), strict=True):
        assert a.dtype == torch.float32
        assert_close(a, b, 5e-5, f"grad {name}")


@pytest.mark.parametrize("preset", ["dapo", "gspo"], ids=["one-pass", "two-pass"])
def test_loss_bf16_against_float64(preset, strategy):
    """bf16 hidden states and LM head on the torch path (the training dtype; also what backend='torch' runs on a
    GPU): the bf16 matmul's logits widened to fp32, the logits' gradient rounded to bf16 for the backward matmuls
    (one pass and two passes), the gradients returned in bf16. Against float64 math on the same bf16 values:
    measured errors 1e-3 (loss, log-probs), 6e-3 (entropy), 5-8e-3 (gradients), relative to the largest value."""
    cfg = LossConfig.preset(preset, **({"clip_low": 0.5, "clip_high": 1.0} if preset == "gspo" else {}))
    c = make_case(dtype=torch.bfloat16, H=32, V=300, seed=32)
    out = ours(c, cfg, memory_budget=4 * 300 * 6)  # 4 tokens a chunk: fp32 logits + their bf16 copy
    assert (len(strategy) > 1) == (preset == "dapo")  # GSPO: rows of up to 7 tokens exceed a chunk
    ref, rlp, rent = reference_loss(c, cfg)
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, ref.loss, 5e-3, "loss")
    assert_close(out.logprobs, rlp, 5e-3, "logprobs")
    assert_close(out.entropy, rent, 2e-2, "entropy")
    for name, a, b in zip(("hidden", "weight", "bias"), grads(out.loss, c), grads(ref.loss, c), strict=True):
        assert a.dtype == torch.bfloat16
        assert_close(a, b, 2e-2, f"grad {name}")


@pytest.mark.parametrize("preset", ["dapo", "gspo"])
def test_loss_gradcheck(preset, monkeypatch):
    """float64 gradcheck of the loss w.r.t. hidden, weight and bias, one pass (DAPO) and two passes (GSPO: rows longer
    than a chunk). A small spread keeps the finite differences away from the clip kinks."""
    monkeypatch.setattr(ll, "MIN_CHUNK_TOKENS", 1)
    cfg = LossConfig.preset(preset, **({"clip_low": 0.5, "clip_high": 1.0} if preset == "gspo" else {}))
    c = make_case(N=2, T=3, H=4, V=9, seed=16, masked_rows=(), spread=0.05)
    c["hidden"] = c["hidden"].detach().requires_grad_()

    def f(h, w, b):
        return hadw_policy_loss_from_hidden(h, w, c["ids"], c["old"], c["adv"], c["mask"], bias=b, config=cfg,
                                            temperature=0.9, memory_budget=2 * 9 * 8, loss_backend="torch").loss

    assert torch.autograd.gradcheck(f, (c["hidden"], c["weight"], c["bias"]))


# -- bad input ----------------------------------------------------------------------------------------------------
def _bad_cases():
    def case(**changes):
        return changes

    return [
        (case(weight=torch.zeros(150, 11, dtype=torch.float64)), r"weight has shape \(150, 11\) but hidden has H = 12"),
        (case(weight=torch.zeros(150, 12, dtype=torch.float32)), r"weight has dtype torch.float32 but hidden has"),
        (case(bias=torch.zeros(149, dtype=torch.float64)), r"bias has shape \(149,\)"),
        (case(ids=torch.zeros(3, 6, dtype=torch.long)), r"target_ids has shape \(3, 6\)"),
        (case(ids=torch.zeros(3, 7)), r"target_ids must be an integer tensor"),
        (case(weight=torch.zeros(150, 12, dtype=torch.float64, device="meta")), r"must be on one device"),
        (case(temperature=0.0), r"temperature must be a finite number > 0"),
        (case(temperature=-1.0), r"temperature must be a finite number > 0"),
        (case(temperature=float("nan")), r"temperature must be a finite number > 0"),
        (case(memory_budget=0), r"memory_budget must be a positive int"),
        (case(mask=torch.ones(3, 6, dtype=torch.bool)), r"mask has shape \(3, 6\)"),
        (case(mask=torch.ones(3, 7, dtype=torch.bool, device="meta")), r"mask is on meta but target_ids is on cpu"),
        (case(old=torch.zeros(3, 6, dtype=torch.float64)), r"old_logprobs has shape \(3, 6\)"),
        (case(adv=torch.zeros(4, dtype=torch.float64)), r"advantages has shape \(4,\)"),
        (case(hidden=torch.zeros(3, 7, 2, 12, dtype=torch.float64)), r"hidden must be \[N, T, H\] or packed"),
    ]


@pytest.mark.parametrize("changes, message", _bad_cases())
@pytest.mark.parametrize("fn", ["loss", "logprobs"])
def test_bad_input_raises(changes, message, fn):
    c = make_case(seed=17)
    args = dict(hidden=c["hidden"], weight=c["weight"], bias=c["bias"], ids=c["ids"], old=c["old"], adv=c["adv"],
                mask=c["mask"], temperature=1.0, memory_budget=None)
    args.update(changes)
    if fn == "logprobs" and ("old" in changes or "adv" in changes):
        fn = "loss"  # not arguments of fused_linear_logprobs
    with pytest.raises(ValueError, match=message):
        if fn == "loss":
            hadw_policy_loss_from_hidden(args["hidden"], args["weight"], args["ids"], args["old"], args["adv"],
                                         args["mask"], bias=args["bias"], temperature=args["temperature"],
                                         memory_budget=args["memory_budget"], loss_backend="torch")
        else:
            fused_linear_logprobs(args["hidden"], args["weight"], args["ids"], bias=args["bias"], mask=args["mask"],
                                  temperature=args["temperature"], memory_budget=args["memory_budget"])


@pytest.mark.parametrize("bad_id", [-1, 150, 10**9])
@pytest.mark.parametrize("fn", ["loss", "logprobs"])
def test_ids_outside_the_vocabulary_raise_at_valid_positions_only(bad_id, fn):
    c = make_case(seed=18)
    ids = c["ids"].clone()
    ids[~c["mask"]] = bad_id  # at padding: fine
    run = (lambda i: ours(dict(c, ids=i), LossConfig.grpo())) if fn == "loss" else (
        lambda i: fused_linear_logprobs(c["hidden"], c["weight"], i, bias=c["bias"], mask=c["mask"]))
    run(ids)
    ids[0, 0] = bad_id
    with pytest.raises(ValueError, match=r"target_ids has 1 id\(s\) outside \[0, V = 150\) at valid positions"):
        run(ids)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("chunk", ["one-pass", "two-pass", "logprobs"])
def test_nonfinite_hidden_at_valid_positions_raise(value, chunk, monkeypatch):
    """At valid positions: a ValueError naming hidden and the position; at padding (NaN in every test here): fine."""
    monkeypatch.setattr(ll, "MIN_CHUNK_TOKENS", 1)
    c = make_case(seed=19)
    h = c["hidden"].detach().clone()
    h[2, 3, 5] = value
    c["mask"][2, 3] = True
    c["ids"][2, 3] = 4
    c["old"][2, 3] = -1.0
    c["hidden"] = h.requires_grad_()
    message = r"hidden has non-finite values \(NaN/Inf\) at 1 valid token position\(s\), the first at \(2, 3\)"
    with pytest.raises(ValueError, match=message):
        if chunk == "logprobs":
            fused_linear_logprobs(c["hidden"], c["weight"], c["ids"], bias=c["bias"], mask=c["mask"])
        else:
            ours(c, LossConfig.grpo(), memory_budget=budget_for(3, 150, vocab=None if chunk == "one-pass" else 128))


@pytest.mark.parametrize("name, value", [("old", float("nan")), ("adv", float("inf")), ("ref", float("-inf")),
                                         ("w", float("nan"))])
def test_nonfinite_loss_inputs_at_valid_positions_raise(name, value):
    """NaN/Inf in old log-probs, advantages, ref log-probs or IS weights at a valid position: a ValueError naming
    the tensor, before any chunk is computed (at padding, NaN old log-probs are fine: every case has them)."""
    c = make_case(seed=30, with_ref=True, with_is=True)
    t = c[name].clone()
    t.view(-1)[0] = value  # row 0, column 0: valid
    c[name] = t
    label = {"old": "old_logprobs", "adv": "advantages", "ref": "ref_logprobs", "w": "rollout_is_weights"}[name]
    with pytest.raises(ValueError, match=rf"non-finite values at valid \(mask=1\) positions: {label}: 1 NaN/Inf"):
        ours(c, LossConfig.grpo(kl_coef=0.1))


def test_nonfinite_weight_is_named():
    c = make_case(seed=20)
    w = c["weight"].detach().clone()
    w[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"weight \(the LM head\) has 1 non-finite value"):
        fused_linear_logprobs(c["hidden"], w, c["ids"], mask=c["mask"])


def test_no_nan_gradient_with_junk_padding(strategy):
    """Padding holds NaN hidden states and ids of -100 in every case; here also +-inf, and the gradient at padding is
    exactly 0."""
    c = make_case(seed=21, masked_rows=(0, 2))
    h = c["hidden"].detach().clone()
    h[0, :, :] = float("inf")
    c["hidden"] = h.requires_grad_()
    out = ours(c, LossConfig.grpo(), memory_budget=budget_for(2, 150))
    gh, gw, gb = grads(out.loss, c)
    for g in (gh, gw, gb):
        assert torch.isfinite(g).all()
    assert torch.all(gh[~c["mask"]] == 0)


@pytest.mark.parametrize("changes, message", [
    (dict(token_rows=None), r"packed hidden \[L, H\] needs token_rows"),
    (dict(token_rows=torch.zeros(5, dtype=torch.long)), r"token_rows must be an integer tensor \[L\] = \(6,\)"),
    (dict(token_rows=torch.zeros(6)), r"token_rows must be an integer tensor, got dtype"),
    (dict(token_rows=torch.tensor([0, 0, 1, 1, 2, 2])), r"token_rows has 2 value\(s\) outside \[0, N = 2\)"),
    (dict(old=torch.zeros(2, 3, dtype=torch.float64)), r"packed layout: old_logprobs has shape \(2, 3\)"),
    (dict(adv=torch.zeros(2, 3, dtype=torch.float64)), r"packed layout: advantages must be \[N\]"),
])
def test_packed_bad_input(changes, message):
    c = make_case(N=2, T=3, seed=22, masked_rows=(), full=True)
    args = dict(hidden=c["hidden"].reshape(6, 12), ids=c["ids"].reshape(6), old=c["old"].reshape(6), adv=c["adv"],
                mask=c["mask"].reshape(6), token_rows=torch.tensor([0, 0, 0, 1, 1, 1]))
    args.update(changes)
    with pytest.raises(ValueError, match=message):
        hadw_policy_loss_from_hidden(args["hidden"], c["weight"], args["ids"], args["old"], args["adv"],
                                     args["mask"], token_rows=args["token_rows"], loss_backend="torch")


def test_padded_layout_refuses_token_rows():
    c = make_case(seed=23)
    with pytest.raises(ValueError, match=r"token_rows is for packed hidden"):
        ours(c, LossConfig.grpo(), token_rows=torch.zeros(21, dtype=torch.long))


# -- chunk planning and memory ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_tokens, vocab, bpl, budget", [
    (4096, 151_936, 4, 256 * 2**20), (4096, 151_936, 4, 8 * 2**20), (10, 151_936, 4, 2**20), (3, 50, 8, 10**9),
    (100_000, 32_000, 6, 64 * 2**20), (5, 1000, 4, 1),
])
def test_plan_chunks_fits_the_budget(n_tokens, vocab, bpl, budget):
    plan = plan_chunks(n_tokens, vocab, bpl, budget)
    assert 1 <= plan.tokens <= n_tokens and 1 <= plan.vocab <= vocab
    fits = plan.tokens * plan.vocab * bpl <= budget
    minimal = plan.tokens == min(ll.MIN_CHUNK_TOKENS, n_tokens) and plan.vocab == min(ll.VOCAB_ALIGN, vocab)
    assert fits or minimal  # a budget below one minimal chunk gets the minimal chunk
    if budget // (vocab * bpl) >= min(ll.MIN_CHUNK_TOKENS, n_tokens):
        assert plan.vocab == vocab  # the whole vocabulary when a chunk of enough tokens fits


@pytest.mark.parametrize("budget_tokens, vocab", [(4, None), (2, 128)])
def test_chunk_temporaries_stay_within_the_budget(budget_tokens, vocab, monkeypatch):
    """Every [vocab, tokens] buffer the torch path allocates fits the budget (the logits are never whole)."""
    monkeypatch.setattr(ll, "MIN_CHUNK_TOKENS", budget_tokens)
    sizes = []
    orig = ll.TorchChunkOps._buffer

    def spy(self, name, rows, cols, dtype, device):
        sizes.append(rows * cols * torch.finfo(dtype).bits // 8)
        return orig(self, name, rows, cols, dtype, device)

    monkeypatch.setattr(ll.TorchChunkOps, "_buffer", spy)
    c = make_case(N=4, T=8, seed=24, masked_rows=())
    budget = budget_for(budget_tokens, 150, vocab=vocab)
    ours(c, LossConfig.dapo(), memory_budget=budget).loss.backward()
    assert sizes and max(sizes) <= budget
    assert max(sizes) < c["mask"].sum().item() * 150 * 8  # far below the whole logits


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors aten ops allocate while the mode is on and that are still referenced: an op output
    whose storage is none of its inputs' counts from its creation until its tensor is freed (weakref.finalize)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


@pytest.mark.parametrize("strategy_name, eager_slice", [("one-pass", 3000), ("two-pass", 3000), ("one-pass", None)],
                         ids=["one-pass", "two-pass", "one-pass-whole-chunk-steps"])
def test_one_chunk_of_logits_alive(strategy_name, eager_slice, monkeypatch):
    """The peak of everything the torch path allocates in a forward + backward (eager helpers, no compile) is one
    chunk's logits buffer + the gradient accumulators + a small rest, far below the whole logits: the eager helpers'
    temporaries (one per step) live on row slices only. One pass: the chunk loop of the loss; two passes: the drivers
    of fused_linear_logprobs (its custom op hides its insides from a dispatch mode), forward then backward."""
    monkeypatch.setenv("HADW_KERNELS_NO_COMPILE", "1")
    monkeypatch.setattr(ll, "MIN_CHUNK_TOKENS", 1)
    if eager_slice is not None:
        monkeypatch.setattr(ll, "EAGER_SLICE_ELEMENTS", eager_slice)
    N, T, H, V, chunk = 8, 10, 4, 3000, 16
    c = make_case(N=N, T=T, H=H, V=V, seed=29, masked_rows=(), full=True)
    budget = budget_for(chunk, V)
    accumulators = (V * H + V + N * T * H + chunk * H) * 8  # d weight, d bias, d hidden, one chunk's d hidden
    tracker = LiveBytes()
    if strategy_name == "one-pass":
        with tracker:
            out = ours(c, LossConfig.dapo(), memory_budget=budget)
        got = grads(out.loss, c)
        want = grads(reference_loss(c, LossConfig.dapo())[0].loss, c)
    else:
        flat, ids = c["hidden"].detach().reshape(-1, H), c["ids"].reshape(-1)
        tok, ops = ll._Tokens(flat, None, ids), ll.TorchChunkOps(torch.float64)
        plan = ll.ChunkPlan(chunk, V)
        g_lp, g_ent = torch.randn(N * T, dtype=torch.float64), torch.randn(N * T, dtype=torch.float64)
        with tracker:
            lp, ent, lse = ll._forward(ops, tok, c["weight"].detach(), c["bias"].detach(), 1.0, plan)
            acc = ll._Grads(tok, c["weight"], c["bias"], torch.float64, True, True, True)
            ll._backward(ops, tok, c["weight"].detach(), c["bias"].detach(), 1.0, plan, lse, ent, g_lp, g_ent, acc)
        got = acc.results(c["weight"], c["bias"])
        rlp, rent = reference(c["hidden"], c["weight"], c["bias"], c["ids"], c["mask"])
        want = grads((rlp.reshape(-1) * g_lp + rent.reshape(-1) * g_ent).sum(), c)
        got = (got[0].view_as(c["hidden"]), *got[1:])
    for name, a, b in zip(("hidden", "weight", "bias"), got, want, strict=True):
        assert_close(a, b, 1e-11, f"grad {name}")
    logits = N * T * V * 8
    rest = tracker.peak - budget - accumulators
    print(f"peak {tracker.peak} B: chunk {budget}, accumulators {accumulators}, rest {rest}; whole logits {logits}")
    assert tracker.peak > budget  # the tracker sees the chunk buffer
    if eager_slice is not None:
        assert rest <= budget // 2, f"{rest} bytes above one chunk ({budget}) and the accumulators"
        assert tracker.peak < logits / 2
    else:  # the tracker sees what the slices avoid: several chunk-sized temporaries at once
        assert rest > budget


@pytest.mark.slow
def test_compiled_chunk_reductions(monkeypatch):
    """The elementwise work of large chunks runs compiled (COMPILE_MIN_ELEMENTS, lowered here): the same numbers as
    eager, in both strategies and with the entropy gradient."""
    monkeypatch.setattr(ll, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(ll, "MIN_CHUNK_TOKENS", 1)
    monkeypatch.delenv("HADW_KERNELS_NO_COMPILE", raising=False)
    calls = []
    orig = ll._compiled
    monkeypatch.setattr(ll, "_compiled", lambda fn: calls.append(fn.__name__) or orig(fn))
    c = make_case(dtype=torch.float32, H=16, V=300, seed=28)
    out = ours(c, LossConfig.dapo(), memory_budget=4 * 300 * 4)
    lp, ent = fused_linear_logprobs(c["hidden"], c["weight"], c["ids"], bias=c["bias"], mask=c["mask"],
                                    memory_budget=4 * 128 * 4)
    ref, _, _ = reference_loss(c, LossConfig.dapo())
    rlp, rent = reference(c["hidden"], c["weight"], c["bias"], c["ids"], c["mask"])
    assert not ll._COMPILE_FAILED
    assert {"_row_sums", "_scaled_exp_"} <= set(calls)
    assert_close(out.loss, ref.loss, 2e-6, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), grads(out.loss, c), grads(ref.loss, c), strict=True):
        assert_close(a, b, 5e-5, f"grad {name}")
    assert_close(lp, rlp, 2e-6, "logprobs")
    got, want = grads((lp + 0.5 * ent).sum(), c), grads((rlp + 0.5 * rent).sum(), c)
    assert "_dlogits_entropy_" in calls
    for name, a, b in zip(("hidden", "weight", "bias"), got, want, strict=True):
        assert_close(a, b, 5e-5, f"grad {name} (log-probs and entropy)")


# -- the custom op ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", ["all", "index"])
def test_opcheck(rows):
    """Both custom ops (forward and backward), over all rows and over a subset of rows (index)."""
    c = make_case(N=2, T=3, H=4, V=20, seed=25, masked_rows=(), dtype=torch.float32)
    h = c["hidden"].detach().nan_to_num().reshape(6, 4).requires_grad_()
    index = None if rows == "all" else torch.tensor([0, 2, 3, 5])
    ids = c["ids"].clamp(min=0).reshape(6)
    ids = ids if index is None else ids[index]
    args = (h, c["weight"], c["bias"], ids, index, 1.25, 4, 8, "torch")
    torch.library.opcheck(ll._fused_linear_logprobs_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    _, ent, lse = ll._fused_linear_logprobs_op(*args)
    g = torch.randn(ids.shape)
    for needs in ([True, True, True], [True, False, False]):
        back = (g, 0.5 * g, h.detach(), c["weight"].detach(), c["bias"].detach(), ids, index, lse, ent, 1.25, 4, 8,
                "torch", needs)
        torch.library.opcheck(ll._fused_linear_logprobs_backward_op, back, test_utils=("test_schema",
                                                                                        "test_faketensor"))


def test_fused_linear_logprobs_compiles_fullgraph():
    """A caller of fused_linear_logprobs (no mask: no data-dependent shapes) traces without graph breaks and equals
    eager, gradients included."""
    torch._dynamo.reset()
    c = make_case(N=2, T=5, H=8, V=40, seed=26, masked_rows=(), dtype=torch.float32)
    h = c["hidden"].detach().nan_to_num().requires_grad_()
    ids = c["ids"].clamp(min=0)

    def step(h, w, b):
        lp, ent = fused_linear_logprobs(h * 1.0, w, ids, bias=b, temperature=0.8, memory_budget=4 * 16 * 4)
        return (lp * 2.0).sum() + ent.mean()

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(h, c["weight"], c["bias"])
    want = step(h, c["weight"], c["bias"])
    g_got = torch.autograd.grad(got, (h, c["weight"], c["bias"]))
    g_want = torch.autograd.grad(want, (h, c["weight"], c["bias"]))
    assert torch.equal(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        assert torch.equal(a, b)


def test_import_does_not_load_triton():
    """`import hadw_kernels` stays free of triton: the loss's graph break under a caller's compile
    (torch.compiler.disable, which imports torch._dynamo and with it triton) is made on first use, not at import."""
    code = "import sys, hadw_kernels; print(sorted(m for m in ('triton',) if m in sys.modules))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_loss_under_a_callers_compile_runs_eagerly():
    """The loss from hidden states is eager by design (chunk loop, data-dependent shapes): a compiled caller breaks
    the graph around it and gets the same numbers."""
    torch._dynamo.reset()
    cfg = LossConfig.grpo()
    c = make_case(seed=27, dtype=torch.float32)

    def step(h):
        return ours(dict(c, hidden=h), cfg).loss * 3.0

    got = torch.compile(step, backend="aot_eager")(c["hidden"])
    want = step(c["hidden"])
    assert torch.equal(got, want)
