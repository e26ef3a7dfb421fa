"""The fused linear log-prob kernels under the Triton interpreter (TRITON_INTERPRET=1, conftest.py), fp32 on small
shapes (the interpreter's bf16 tl.dot is wrong: bf16 is in test_triton_linear_logprobs_gpu.py): each op against
float64 materialised logits (several token and vocabulary tiles, tails of both, vocabulary splits merged, bias,
temperature, the entropy gradient, logits recomputed / stored / overwritten in place), every output written (outputs
poisoned with NaN), opcheck, a fullgraph-compiled caller, the public functions with backend="triton" (both
strategies of the loss), and an ahead-of-time compile of every kernel variant for sm_90 with no GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")

from test_from_hidden import assert_close, budget_for, grads, make_case, reference, reference_loss  # noqa: E402

from hadw_kernels import LossConfig, fused_linear_logprobs, hadw_policy_loss_from_hidden  # noqa: E402
from hadw_kernels import linear_logprobs as ll  # noqa: E402
from hadw_kernels.ops import _triton_runtime  # noqa: E402
from hadw_kernels.ops import triton_linear_logprobs as K  # noqa: E402

TOL = 3e-6  # fp32 kernels against float64, relative to the largest value


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(_triton_runtime, "POISON_OUTPUTS", True)


def chunk(C=21, H=24, V=150, bias=True, seed=0):
    """hidden [C, H], weight [V, H], bias, targets: C, H and V all leave partial tiles (16 x 32 x 16 here)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(C, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    y = torch.randint(0, V, (C,), generator=g)
    return h, w, b, y


def ref_stats(h, w, b, y, inv_t):
    z = h.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    z = z * inv_t
    lsm = torch.log_softmax(z, dim=1)
    return lsm.gather(1, y[:, None]).squeeze(1), -(lsm.exp() * lsm).sum(1), torch.logsumexp(z, 1), z


def ref_dlogits(h, w, b, y, inv_t, g_lp, g_ent):
    """d sum(g_lp logp + g_ent H) / d raw logits, [C, V], by float64 autograd."""
    z = (h.double() @ w.double().t() + (0 if b is None else b.double())).requires_grad_()
    lsm = torch.log_softmax(z * inv_t, dim=1)
    lp = lsm.gather(1, y[:, None]).squeeze(1)
    ent = -(lsm.exp() * lsm).sum(1)
    (dz,) = torch.autograd.grad((lp * g_lp.double()).sum() + (0 if g_ent is None else (ent * g_ent.double()).sum()),
                                z)
    return dz


# -- the ops ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias, temperature", [(True, 1.0), (False, 0.6)])
@pytest.mark.parametrize("store", [False, True])
def test_stats_op(bias, temperature, store):
    h, w, b, y = chunk(bias=bias)
    z = torch.full((w.shape[0], h.shape[0]), float("nan")) if store else None
    lp, ent, lse = K.linear_logprobs_stats(h, w, b, y, 1.0 / temperature, z)
    rlp, rent, rlse, rz = ref_stats(h, w, b, y, 1.0 / temperature)
    assert_close(lp, rlp, TOL, "logp")
    assert_close(ent, rent, TOL, "entropy")
    assert_close(lse, rlse, TOL, "lse")
    if store:
        assert_close(z, rz.t(), TOL, "stored logits")


def test_stats_op_merges_vocabulary_splits():
    """Two splits in the interpreter (so the merge is exercised), and a single vocabulary tile (no merge)."""
    for V in (150, 20):
        h, w, b, y = chunk(C=5, V=V, seed=1)
        assert K._splits(1, triton.cdiv(V, 32), h.device) == (2 if V > 32 else 1)
        lp, ent, lse = K.linear_logprobs_stats(h, w, b, y, 1.0, None)
        rlp, rent, rlse, _ = ref_stats(h, w, b, y, 1.0)
        assert_close(lp, rlp, TOL, f"logp V={V}")
        assert_close(ent, rent, TOL, f"entropy V={V}")


@pytest.mark.parametrize("source, with_entropy_grad", [("recompute", False), ("recompute", True), ("stored", False),
                                                       ("stored", True), ("in-place", False)])
def test_dlogits_op(source, with_entropy_grad):
    """Logits recomputed (two passes), read from a stored buffer or overwritten in place (one pass, where there is
    no entropy gradient)."""
    h, w, b, y = chunk(seed=2)
    inv_t = 1.0 / 0.8
    g = torch.Generator().manual_seed(3)
    g_lp = torch.randn(h.shape[0], generator=g)
    g_ent = torch.randn(h.shape[0], generator=g) if with_entropy_grad else None
    _, ent, lse = K.linear_logprobs_stats(h, w, b, y, inv_t, None)
    want = ref_dlogits(h, w, b, y, inv_t, g_lp, g_ent).t()
    out = torch.full((w.shape[0], h.shape[0]), float("nan"))
    if source == "recompute":
        K.linear_logprobs_dlogits(h, w, b, y, lse, ent, g_lp, g_ent, inv_t, None, out, False)
    else:
        z = torch.full_like(out, float("nan"))
        K.linear_logprobs_stats(h, w, b, y, inv_t, z)
        if source == "stored":
            K.linear_logprobs_dlogits(h, w, b, y, lse, ent, g_lp, g_ent, inv_t, z, out, False)
        else:
            K.linear_logprobs_dlogits(h, w, b, y, lse, ent, g_lp, g_ent, inv_t, None, z, True)
            out = z
    assert_close(out, want, TOL, "dlogits")


def test_dlogits_op_on_a_vocabulary_block():
    """A block of rows v0 : v1 of the head with targets relative to it: targets outside never match."""
    h, w, b, y = chunk(seed=4)
    inv_t = 1.0
    g_lp = torch.randn(h.shape[0])
    _, ent, lse = K.linear_logprobs_stats(h, w, b, y, inv_t, None)
    want = ref_dlogits(h, w, b, y, inv_t, g_lp, None).t()
    v0, v1 = 64, 130
    out = torch.full((v1 - v0, h.shape[0]), float("nan"))
    K.linear_logprobs_dlogits(h, w[v0:v1], b[v0:v1], y - v0, lse, ent, g_lp, None, inv_t, None, out, False)
    assert_close(out, want[v0:v1], TOL, "dlogits block")


def test_opcheck():
    h, w, b, y = chunk(C=5, V=40, seed=5)
    z = torch.empty(40, 5)
    torch.library.opcheck(K.linear_logprobs_stats, (h, w, b, y, 1.25, z), test_utils=("test_schema",
                                                                                       "test_faketensor"))
    _, ent, lse = K.linear_logprobs_stats(h, w, b, y, 1.25, None)
    args = (h, w, b, y, lse, ent, torch.randn(5), torch.randn(5), 1.25, None, torch.empty(40, 5), False)
    torch.library.opcheck(K.linear_logprobs_dlogits, args, test_utils=("test_schema", "test_faketensor"))


# -- the public functions on backend="triton" -----------------------------------------------------------------------
@pytest.mark.parametrize("vocab_block", [None, 64], ids=["whole-vocab", "vocab-blocks"])
def test_fused_linear_logprobs_triton(vocab_block, monkeypatch):
    monkeypatch.setattr(ll, "MIN_CHUNK_TOKENS", 6)
    c = make_case(N=3, T=6, H=24, V=150, dtype=torch.float32, seed=6)
    budget = 6 * (vocab_block or 150) * 4
    lp, ent = fused_linear_logprobs(c["hidden"], c["weight"], c["ids"], bias=c["bias"], temperature=0.7,
                                    mask=c["mask"], memory_budget=budget, backend="triton")
    rlp, rent = reference(c["hidden"], c["weight"], c["bias"], c["ids"], c["mask"], 0.7)
    assert_close(lp, rlp, TOL, "logprobs")
    assert_close(ent, rent, TOL, "entropy")
    u = torch.randn(lp.shape)
    got = torch.autograd.grad((lp * u - 0.3 * ent).sum(), (c["hidden"], c["weight"], c["bias"]), retain_graph=True)
    want = torch.autograd.grad((rlp * u - 0.3 * rent).sum(), (c["hidden"], c["weight"], c["bias"]),
                               retain_graph=True)
    for name, a, b in zip(("hidden", "weight", "bias"), got, want, strict=True):
        assert_close(a, b, 2e-5, f"grad {name}")
    # the gradient of a sum arrives expanded (stride 0): the kernels must not read it as a dense vector
    got, want = grads(lp.sum() + ent.sum(), c), grads(rlp.sum() + rent.sum(), c)
    for name, a, b in zip(("hidden", "weight", "bias"), got, want, strict=True):
        assert_close(a, b, 2e-5, f"grad of a sum, {name}")


@pytest.mark.parametrize("preset, tokens", [("dapo", 5), ("gspo", 2)], ids=["one-pass", "two-pass"])
def test_loss_from_hidden_triton(preset, tokens, monkeypatch):
    """One pass (DAPO, chunks of 5 tokens: logits stored by the stats kernel, gradient in place) and two passes
    (GSPO with rows longer than a chunk of 2: logits recomputed in the backward)."""
    monkeypatch.setattr(ll, "MIN_CHUNK_TOKENS", 1)
    calls = []
    orig = K.TritonChunkOps.one_pass
    monkeypatch.setattr(K.TritonChunkOps, "one_pass", lambda self, *a: calls.append(1) or orig(self, *a))
    cfg = LossConfig.preset(preset, **({"clip_low": 0.5, "clip_high": 1.0} if preset == "gspo" else {}))
    c = make_case(N=3, T=5, H=24, V=150, dtype=torch.float32, seed=7, with_ref=True)
    out = hadw_policy_loss_from_hidden(c["hidden"], c["weight"], c["ids"], c["old"], c["adv"], c["mask"],
                                       bias=c["bias"], config=cfg, ref_logprobs=c["ref"], temperature=1.2,
                                       memory_budget=budget_for(tokens, 150, dtype=torch.float32), backend="triton",
                                       loss_backend="torch")
    assert (len(calls) > 1) == (preset == "dapo")
    ref, rlp, rent = reference_loss(c, cfg, temperature=1.2)
    assert_close(out.loss, ref.loss, TOL, "loss")
    for k, v in ref.metrics.items():
        assert_close(out.metrics[k], v, 2e-5, k)
    assert_close(out.logprobs, rlp, TOL, "logprobs")
    assert_close(out.metrics["entropy"], rent.sum() / c["mask"].sum(), TOL, "entropy")
    for name, a, b in zip(("hidden", "weight", "bias"), grads(out.loss, c), grads(ref.loss, c), strict=True):
        assert_close(a, b, 2e-5, f"grad {name}")


def test_fused_linear_logprobs_triton_compiles_fullgraph():
    torch._dynamo.reset()
    c = make_case(N=2, T=4, H=16, V=40, seed=8, masked_rows=(), dtype=torch.float32)
    h = c["hidden"].detach().nan_to_num().requires_grad_()
    ids = c["ids"].clamp(min=0)

    def step(h, w):
        lp, ent = fused_linear_logprobs(h, w, ids, backend="triton")
        return lp.sum() + 0.1 * ent.sum()

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(h, c["weight"])
    want = step(h, c["weight"])
    assert torch.equal(got, want)
    for a, b in zip(torch.autograd.grad(got, (h, c["weight"])), torch.autograd.grad(want, (h, c["weight"])),
                    strict=True):
        assert torch.equal(a, b)


# -- ahead-of-time compilation for sm_90 ----------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import contextlib, io, re
import torch
import triton
from triton.backends.compiler import GPUTarget
from hadw_kernels.ops import _triton_linear_logprobs_kernels as K
from hadw_kernels.ops import triton_linear_logprobs as L

def sig(fn, constexprs, dt):
    ptr = {"h_ptr": dt, "w_ptr": dt, "b_ptr": dt, "y_ptr": "*i64", "out_ptr": dt}
    s = {}
    for name in fn.arg_names:
        if name in constexprs:
            s[name] = "constexpr"
        elif name.endswith("_ptr"):
            s[name] = ptr.get(name, "*fp32")
        elif name.startswith("stride"):
            s[name] = "i64"
        elif name in ("C", "V", "H", "blocks_per_split"):
            s[name] = "i32"
        else:
            s[name] = "fp32"
    return s

n = 0
for dtype, dt in ((torch.bfloat16, "*bf16"), (torch.float16, "*fp16"), (torch.float32, "*fp32")):
    launch = L._blocks(dtype)  # what the launcher uses on a GPU (this process does not interpret)
    opts = {"num_warps": launch.pop("num_warps"), "num_stages": launch.pop("num_stages")}
    prec = L._precision(dtype)
    variants = [
        (K._stats_kernel, dict(HAS_BIAS=True, STORE_LOGITS=True, DOT_PRECISION=prec, **launch)),
        (K._stats_kernel, dict(HAS_BIAS=False, STORE_LOGITS=False, DOT_PRECISION=prec, **launch)),
        (K._dlogits_kernel, dict(HAS_BIAS=True, HAS_GENT=True, RECOMPUTE=True, DOT_PRECISION=prec, **launch)),
        (K._dlogits_kernel, dict(HAS_BIAS=False, HAS_GENT=False, RECOMPUTE=False, DOT_PRECISION=prec, **launch)),
    ]
    for fn, cst in variants:
        src = triton.compiler.ASTSource(fn=fn, signature=sig(fn, cst, dt), constexprs=cst)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v's report
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        text = log.getvalue()
        regs = re.search(r"Used (\d+) registers", text).group(1)
        spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
        print(fn.__name__, dt, cst, opts, "regs", regs, "spill_bytes", spill)
        n += 1
print("compiled", n)
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """Every kernel variant the launchers use, compiled for sm_90 with triton's bundled ptxas (TRITON_INTERPRET=0
    in a subprocess): what the interpreter forgives (types through loops, casts) the compiler does not."""
    pytest.importorskip("triton.backends.nvidia")
    with tempfile.TemporaryDirectory() as cache:  # an empty cache: every kernel really goes through ptxas
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache, "TRITON_DUMP_PTXAS_LOG": "1"}
        proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=600)
    assert proc.returncode == 0 and "compiled 12" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    spilled = [line for line in proc.stdout.splitlines() if "spill_bytes" in line and not line.endswith(" 0")]
    assert not spilled, spilled
