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
MAX_SPILL_BYTES = 64
"""Spill bytes (stores + loads) allowed per kernel. Measured: ptxas spills 8 + 8 bytes in one or two 4-warp variants
of the forward at 80 registers (which ones differs between triton 3.6.0 and 3.7.1), none elsewhere; a block-size
change that pushed a [BLOCK_R, BLOCK_T] tile out of registers would spill far more."""


# -- the launches to compile (runs in a process with TRITON_INTERPRET=0) --------------------------------------------
def _loss_cases():
    """(name, thunk) pairs that run the fused-loss launchers. The kernel switches they must cover are checked by the
    test, not assumed here."""
    import torch

    from hadw_kernels.config import LossConfig
    from hadw_kernels.ops import triton_loss as L

    def batch(N, T, dtype, mask_dtype=torch.bool, with_ref=False):
        lp = torch.zeros(N, T, dtype=dtype)
        mask = torch.ones(N, T, dtype=mask_dtype)
        return lp, lp.clone(), torch.zeros(N), mask, (lp.clone() if with_ref else None)

    def run(cfg, N, T, G, dtype, *, mask_dtype=torch.bool, with_ref=False, anchor=True, normalizer=False):
        lp, old, rewards, mask, ref = batch(N, T, dtype, mask_dtype, with_ref)
        anchor_t = torch.tensor(0.5, dtype=torch.float64) if anchor else None
        norm_t = torch.tensor(10.0, dtype=torch.float64) if normalizer else None
        _, adv, _, _, _, rows, denom = L._forward(lp, old, rewards, mask, ref, anchor_t, norm_t, G, cfg)
        L._backward(torch.ones(()), lp, old, mask, ref, adv, rows, denom, cfg)

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    return [
        ("grpo-bf16-T4096-ref-k3-dual", lambda: run(LossConfig.grpo(kl_coef=0.1, clip_ratio_c=3.0), 16, 4096, 8, bf16,
                                                    with_ref=True)),
        ("gspo-bf16-T1024-plain", lambda: run(LossConfig.gspo(hadw=False), 16, 1024, 8, bf16, anchor=False)),
        ("dapo-fp32-T300-ref-k1-norm", lambda: run(LossConfig.dapo(kl_coef=0.1, kl_estimator="k1"), 16, 300, 4, f32,
                                                   mask_dtype=f32, with_ref=True, normalizer=True)),
        ("drgrpo-fp16-T16-ref-k2", lambda: run(LossConfig.dr_grpo(kl_coef=0.05, kl_estimator="k2",
                                                                  std_unbiased=False), 32, 16, 16, f16,
                                               with_ref=True)),
        ("grpo-fp32-T64-ref-nokl", lambda: run(LossConfig.grpo(), 16, 64, 2, f32, with_ref=True)),
        ("gspo-fp32-T128-ref-k3-dual-norm", lambda: run(LossConfig.gspo(kl_coef=0.1, clip_ratio_c=3.0,
                                                                        loss_agg="token-mean"), 16, 128, 8, f32,
                                                        with_ref=True, normalizer=True)),
        ("dapo-bf16-T2048-seqsum", lambda: run(LossConfig.dapo(loss_agg="seq-mean-token-sum"), 16, 2048, 8, bf16)),
    ]


CASE_MODULES = {"hadw_kernels.ops.triton_loss": _loss_cases}
"""Launcher module -> its cases. A new launcher module adds its own entry; its kernels are then compiled and
checked like the others."""


def _record_launches(module, thunk) -> list[tuple]:
    """Run `thunk` with every @triton.jit kernel global of `module` replaced by a recorder; return the launches as
    (kernel, bound arguments, launch options)."""
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

    originals = {name: obj for name, obj in vars(module).items() if isinstance(obj, triton.runtime.JITFunction)}
    try:
        for name, kernel in originals.items():
            setattr(module, name, Recorder(kernel))
        thunk()
    finally:
        for name, kernel in originals.items():
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
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    seen: dict[str, dict] = {}
    for module_name, cases in CASE_MODULES.items():
        module = importlib.import_module(module_name)
        for case, thunk in cases():
            for kernel, bound, options in _record_launches(module, thunk):
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

    import triton

    from hadw_kernels.ops import _triton_loss_kernels as K

    def is_constexpr(param):
        return param.annotation is triton.language.constexpr or param.annotation in ("tl.constexpr", "constexpr")

    # every entry kernel of the kernel modules is compiled ...
    kernels = {name for name, obj in vars(K).items() if name.endswith("_kernel") and hasattr(obj, "fn")}
    assert kernels and kernels <= {r["kernel"] for r in results}, kernels
    # ... with every value of each switch (bool switches both ways; KL_EST all three estimators) ...
    for name in kernels:
        fn = getattr(K, name)
        fn = getattr(fn, "fn", fn)
        compiled = [r["constexprs"] for r in results if r["kernel"] == name]
        for param in filter(is_constexpr, inspect.signature(fn).parameters.values()):
            values = {c[param.name] for c in compiled}
            if param.name == "KL_EST":
                assert values == {1, 2, 3}, (name, param.name, values)
            elif any(isinstance(v, bool) for v in values):
                assert values == {True, False}, (name, param.name, values)
    # ... for each input dtype, and without spilling more than a few bytes.
    fwd_types = {r["signature"]["logp_ptr"] for r in results if r["kernel"] == "_hadw_fwd_kernel"}
    assert fwd_types == {"*fp32", "*bf16", "*fp16"}, fwd_types
    spilled = [(r["kernel"], r["case"], r["regs"], r["spill_bytes"]) for r in results
               if r["spill_bytes"] > MAX_SPILL_BYTES]
    assert not spilled, spilled
    assert all(r["cubin_bytes"] > 0 for r in results)


if __name__ == "__main__":
    _main()
