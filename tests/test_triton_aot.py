"""Ahead-of-time compilation of every Triton kernel for sm_90 (H100 / H200), with no GPU.

The interpreter (how the other Triton tests run) forgives what the compiler does not: types carried through loops,
casts, ops with no lowering. So this test compiles the kernels the way a GPU would, down to a cubin with the ptxas
bundled in triton's wheel, and compiles exactly what the launchers launch: it runs each launcher on small CPU
tensors with every @triton.jit kernel of its module replaced by a recorder, over cases chosen so that every constexpr
switch takes each of its values and the block sizes of short and long rows both occur; each distinct specialisation
(kernel, argument types, constexprs, num_warps) is then compiled once. ptxas's own report gives the registers and
spills of each (printed by the script below).

CI runs it for the pinned triton (3.7.1); it runs as well under triton 3.6 (what a GPU machine may come with):

    python tests/test_triton_aot.py            # the table: kernel, switches, warps, registers, spills
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

ARCH = 90
MARKER = "AOT-RESULTS "
MAX_SPILL_BYTES = 128
"""Spill bytes (stores + loads) allowed per kernel. Measured (ptxas of each triton's wheel, sm_90a): the heaviest
forward variants are kept at 64-96 registers with some bytes spilled, and which ones differs by version: 3.7.1
spills 24 (fused, KL + dual clip, 8 warps), 40 (per-token advantages + IS weights, 8 warps) and 64 (GSPO with
per-token advantages, 4 warps); 3.6.0 spills 44 and 16 (fused, 2 warps at 16 x 16) and none of the others. With
maxnreg=128 the 3.7.1 variants use 100-107 registers and spill nothing, at half the occupancy: which is faster is
for a GPU to measure. A block-size change that pushed whole [BLOCK_R, BLOCK_T] tiles out of registers would spill
far more than this bound."""


# -- the launches to compile (runs in a process with TRITON_INTERPRET=0) --------------------------------------------
def _loss_cases():
    """(name, thunk) pairs that run the loss launchers (fused and policy). The kernel switches they must cover are
    checked by the test, not assumed here."""
    import torch

    from hadw_kernels.config import LossConfig
    from hadw_kernels.ops import triton_loss as L

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

    def run(cfg, N, T, dtype, *, G=0, token_adv=False, mask_dtype=torch.bool, ref=False, anchor=True,
            normalizer=False, is_weights=False):
        """The fused loss with G > 0 (contiguous groups), else the policy loss ([N] or [N, T] advantages)."""
        lp = torch.zeros(N, T, dtype=dtype)
        mask = torch.ones(N, T, dtype=mask_dtype)
        ref_lp = lp.clone() if ref else None
        norm = torch.tensor(10.0, dtype=torch.float64) if normalizer else None
        if G:
            out = L._forward(lp, lp.clone(), mask, ref_lp, norm, cfg, rewards=torch.zeros(N), group_size=G,
                             anchor=torch.tensor(0.5, dtype=torch.float64) if anchor else None)
            adv, weights = out[1], None
        else:
            adv = torch.zeros(N, T, dtype=f32) if token_adv else torch.zeros(N)
            weights = torch.ones(N, T, dtype=f32) if is_weights else None
            out = L._forward(lp, lp.clone(), mask, ref_lp, norm, cfg, advantages=adv, rollout_is_weights=weights)
        rows, denom = out[5], out[6]
        L._backward(torch.ones(()), lp, lp.clone(), adv, mask, ref_lp, weights, rows, denom, cfg)

    k3_dual = dict(kl_coef=0.1, clip_ratio_c=3.0)
    return [
        # the fused whole-batch loss (advantages from contiguous groups)
        ("fused-grpo-bf16-T4096-ref-k3-dual", lambda: run(LossConfig.grpo(**k3_dual), 16, 4096, bf16, G=8, ref=True)),
        ("fused-gspo-bf16-T1024-plain", lambda: run(LossConfig.gspo(), 16, 1024, bf16, G=8, anchor=False)),
        ("fused-dapo-fp32-T300-ref-k1-norm-batchstd", lambda: run(
            LossConfig.dapo(kl_coef=0.1, kl_estimator="k1", adv_norm="batch_std"), 16, 300, f32, G=4,
            mask_dtype=f32, ref=True, normalizer=True)),
        ("fused-drgrpo-fp16-T16-ref-k2", lambda: run(LossConfig.dr_grpo(kl_coef=0.05, kl_estimator="k2",
                                                                        std_unbiased=False), 32, 16, f16, G=16,
                                                     ref=True)),
        ("fused-grpo-fp32-T64-ref-nokl-klratio", lambda: run(LossConfig.grpo(kl_ratio_weighted=True), 16, 64, f32,
                                                             G=2, ref=True)),
        ("fused-gspo-fp32-T128-ref-k3-dual-norm", lambda: run(LossConfig.gspo(loss_agg="token-mean", **k3_dual), 16,
                                                              128, f32, G=8, ref=True, normalizer=True)),
        ("fused-dapo-bf16-T2048-seqsum", lambda: run(LossConfig.dapo(loss_agg="seq-mean-token-sum"), 16, 2048, bf16,
                                                     G=8)),
        # the policy loss on precomputed advantages
        ("policy-grpo-bf16-T4096-rowadv-is-klratio-dual", lambda: run(
            LossConfig.grpo(kl_ratio_weighted=True, rollout_is_threshold=2.0, **k3_dual), 16, 4096, bf16, ref=True,
            is_weights=True)),
        ("policy-grpo-bf16-T4096-tokenadv-is-klratio-dual", lambda: run(
            LossConfig.grpo(kl_ratio_weighted=True, rollout_is_threshold=2.0, **k3_dual), 16, 4096, bf16,
            token_adv=True, ref=True, is_weights=True)),
        ("policy-gspo-fp32-T256-tokenadv-is-klratio", lambda: run(
            LossConfig.gspo(kl_coef=0.1, kl_estimator="k1", kl_ratio_weighted=True), 16, 256, f32, token_adv=True,
            ref=True, is_weights=True)),
        ("policy-gspo-bf16-T1024-rowadv-is-k2", lambda: run(
            LossConfig.gspo(kl_coef=0.1, kl_estimator="k2", rollout_is_threshold=2.0), 16, 1024, bf16, ref=True,
            is_weights=True)),
        ("policy-dapo-fp16-T16-tokenadv", lambda: run(LossConfig.dapo(), 32, 16, f16, token_adv=True)),
        ("policy-drgrpo-fp32-T512-rowadv-norm", lambda: run(LossConfig.dr_grpo(), 16, 512, f32, normalizer=True)),
    ]


def _advantage_cases():
    """(name, thunk) pairs that run the advantage launchers."""
    import torch

    from hadw_kernels.config import LossConfig
    from hadw_kernels.ops import triton_advantages as A

    anchor = torch.tensor(0.5, dtype=torch.float64)
    ids = torch.arange(64) % 5
    return [
        ("adv-contiguous-group-std", lambda: A.compute_advantages(torch.zeros(64), 8, anchor, LossConfig.grpo())),
        ("adv-ids-batch-std", lambda: A.compute_advantages(torch.zeros(64), None, anchor,
                                                           LossConfig.grpo(adv_norm="batch_std", std_unbiased=False),
                                                           group_ids=ids)),
        ("adv-ids-none-plain", lambda: A.compute_advantages(torch.zeros(64, dtype=torch.bool), None, None,
                                                            LossConfig.dr_grpo(), group_ids=ids)),
    ]


CASE_MODULES = {"hadw_kernels.ops.triton_loss": _loss_cases, "hadw_kernels.ops.triton_advantages": _advantage_cases}
"""Launcher module -> its cases. A new launcher module adds its own entry; its kernels are then compiled and
checked like the others."""
KERNEL_MODULES = ("hadw_kernels.ops._triton_loss_kernels", "hadw_kernels.ops._triton_advantage_kernels")
"""Every @triton.jit entry kernel (a name ending in _kernel) of these modules must be compiled by some case."""
SWITCH_VALUES = {"KL_EST": {1, 2, 3}, "ADV_SOURCE": {0, 1, 2}, "ADV_NORM": {0, 1, 2}, "KL_AT": {9, 14}}
"""Integer switches and the values the cases must give them (bool switches: both values)."""


def _record_launches(thunk) -> list[tuple]:
    """Run `thunk` with every @triton.jit entry kernel (a name ending in _kernel) of the launcher and kernel modules
    replaced by a recorder (a launcher may import a kernel by name or reach it through its module); return the
    launches as (kernel, bound arguments, launch options)."""
    import importlib

    import triton

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                names = set(self.kernel.arg_names)
                options = {k: v for k, v in kwargs.items() if k not in names}
                call = {k: v for k, v in kwargs.items() if k in names}
                bound = inspect.signature(self.kernel.fn).bind(*args, **call).arguments
                launches.append((self.kernel, dict(bound), options))

            return launch

    originals = []
    for module in map(importlib.import_module, (*CASE_MODULES, *KERNEL_MODULES)):
        originals += [(module, name, obj) for name, obj in vars(module).items()
                      if name.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction)]
    try:
        for module, name, kernel in originals:
            setattr(module, name, Recorder(kernel))
        thunk()
    finally:
        for module, name, kernel in originals:
            setattr(module, name, kernel)
    return launches


def _specialisation(kernel, bound: dict, options: dict) -> tuple[dict, dict, dict]:
    from triton.runtime.jit import mangle_type

    signature, constexprs = {}, {}
    for p in kernel.params:
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value.value if hasattr(value, "value") else value
        else:
            signature[p.name] = mangle_type(value)
    return signature, constexprs, {k: options[k] for k in sorted(options)}


_PTXAS = re.compile(r"Used (\d+) registers.*?(\d+) bytes spill stores, (\d+) bytes spill loads", re.S)
_PTXAS_SPILLS_FIRST = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


def _ptxas_report(log: str) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) from ptxas -v's report of one kernel."""
    m = _PTXAS.search(log)
    if m:
        return int(m.group(1)), int(m.group(2)) + int(m.group(3))
    m = _PTXAS_SPILLS_FIRST.search(log)
    if m:
        return int(m.group(3)), int(m.group(1)) + int(m.group(2))
    raise RuntimeError(f"no register report in ptxas's log:\n{log[-2000:]}")


def compile_all(arch: int = ARCH) -> list[dict]:
    """Record every case's launches, compile each distinct specialisation for sm_`arch` down to a cubin."""

    import triton
    from triton.backends.compiler import GPUTarget

    seen: dict[str, dict] = {}
    for cases in CASE_MODULES.values():
        for case, thunk in cases():
            for kernel, bound, options in _record_launches(thunk):
                signature, constexprs, opts = _specialisation(kernel, bound, options)
                key = json.dumps([kernel.__name__, signature, constexprs, opts], sort_keys=True, default=str)
                if key not in seen:
                    seen[key] = dict(kernel=kernel.__name__, case=case, signature=signature, constexprs=constexprs,
                                     options=opts, _fn=kernel)
    results = []
    for entry in seen.values():
        fn = entry.pop("_fn")
        src = triton.compiler.ASTSource(fn=fn, signature=entry["signature"], constexprs=entry["constexprs"])
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v's report, printed per compile
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=entry["options"])
        regs, spills = _ptxas_report(log.getvalue())
        results.append(dict(entry, regs=regs, spill_bytes=spills, cubin_bytes=len(compiled.asm["cubin"])))
    return results


def _main() -> None:
    import triton

    results = compile_all()
    print(f"triton {triton.__version__}, sm_{ARCH}: {len(results)} kernel specialisations compiled")
    for r in results:
        switches = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["constexprs"].items())
        print(f"{r['kernel']:<24} warps={r['options'].get('num_warps', 4)} regs={r['regs']:<3} "
              f"spill={r['spill_bytes']} [{r['case']}] {switches}")
    print(MARKER + json.dumps(results, default=str))


# -- the test (pytest process: TRITON_INTERPRET=1 there, so the compile runs in its own process) -----------------------
def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    with tempfile.TemporaryDirectory() as cache:  # an empty cache: every kernel really goes through ptxas
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache, "TRITON_DUMP_PTXAS_LOG": "1"}
        proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER))
    results = json.loads(line[len(MARKER):])

    import importlib

    import triton

    def is_constexpr(param):
        return param.annotation is triton.language.constexpr or param.annotation in ("tl.constexpr", "constexpr")

    # every entry kernel of the kernel modules is compiled ...
    kernels = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        kernels.update({k: getattr(v, "fn", v) for k, v in vars(module).items() if k.endswith("_kernel")})
    assert kernels and set(kernels) <= {r["kernel"] for r in results}, set(kernels)
    # ... with every value of each switch (bool switches both ways, integer ones all of SWITCH_VALUES) ...
    for name, fn in kernels.items():
        compiled = [r["constexprs"] for r in results if r["kernel"] == name]
        for param in filter(is_constexpr, inspect.signature(fn).parameters.values()):
            values = {c[param.name] for c in compiled}
            if param.name in SWITCH_VALUES:
                assert values == SWITCH_VALUES[param.name], (name, param.name, values)
            elif any(isinstance(v, bool) for v in values):
                assert values == {True, False}, (name, param.name, values)
    # ... for each input dtype, and without spilling more than a few bytes.
    fwd_types = {r["signature"]["logp_ptr"] for r in results if r["kernel"] == "_loss_fwd_kernel"}
    assert fwd_types == {"*fp32", "*bf16", "*fp16"}, fwd_types
    spilled = [(r["kernel"], r["case"], r["regs"], r["spill_bytes"]) for r in results
               if r["spill_bytes"] > MAX_SPILL_BYTES]
    assert not spilled, spilled
    assert all(r["cubin_bytes"] > 0 for r in results)


if __name__ == "__main__":
    _main()
