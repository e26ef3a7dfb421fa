"""The native CPU HA-DW loss: the loader of the C++ core (hadw_kernels/csrc) and its torch custom ops.

Layers:
- the core, `hadw_kernels/_hadw_cpu*.so` (built by `pip install -e .` / `pip install`, see setup.py): plain C++
  with a C interface (csrc/hadw_cpu.h), forward and gradient in one pass over the tokens, loaded with ctypes;
- `_views` / `_loss_cfg` / `_adv_cfg`: the one place where tensors and a `LossConfig` become the core's arguments;
- the custom ops `hadw_kernels::native_loss` (advantages + policy loss, the fused whole batch) and
  `hadw_kernels::native_policy_loss` (precomputed advantages), each with a fake implementation and an autograd
  formula that only saves and restores, so `torch.compile` traces callers without graph breaks; eager callers get
  the same implementations through a plain autograd.Function (`_Eager`), without the custom ops' dispatch cost;
- `loss_terms_with_checks` / `policy_loss_terms_with_checks`: what `hadw_kernels.loss` calls for backend="native",
  returning exactly what the reference path returns.

The forward writes the final gradient (fp32 [N, T], dL/dlogp for an upstream gradient of 1) while it reads the
inputs; the eager backward hands that buffer to autograd (scaled in place by an upstream gradient other than 1;
converted for bf16 / fp16 inputs), so the inputs are read once and nothing [N, T] but the gradient is written. A
second backward through a retained graph recomputes the gradient from the saved inputs. float64 inputs never come
here (`hadw_kernels.loss` sends them to the reference). `HADW_KERNELS_NATIVE_LIB=/path/to/lib` loads another build
of the core (CMake's, in CTest).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import re
from pathlib import Path

import torch

from hadw_kernels.config import LossConfig
from hadw_kernels.ops._config_json import config_from_json, config_to_json
from hadw_kernels.reference import active_anchor, metric_names

ABI_VERSION = 3
OP_VERSION = 2
"""Passed to the custom ops, so that it is part of every graph a caller's torch.compile traces through them:
torch's compile caches key on the graph, not on the ops' Python autograd, and reused code traced against the
previous outputs of these ops (seen here after a change). Bump it whenever the ops' outputs or autograd change."""
LIB_ENV = "HADW_KERNELS_NATIVE_LIB"
BUILD_HINT = ("build it with a C++ compiler present (g++ or clang++): `pip install -e .` (or `pip install .`) "
              "again, or `python setup.py build_ext --inplace` in a source checkout")

_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.bool: 4, torch.uint8: 4,
           torch.int8: 5, torch.int16: 6, torch.int32: 7, torch.int64: 8}
_AGG = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3}
_KL_EST = {"k1": 1, "k2": 2, "k3": 3}
_ADV_NORM = {"group_std": 0, "batch_std": 1, "none": 2}
# The core's NaN/Inf counts at valid positions, in the order of hadw_kernels.loss's suspects.
_NONFINITE = ("logprobs", "old_logprobs", "ref_logprobs", "advantages", "rollout_is_weights")


class _View(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride_n", ctypes.c_int64), ("stride_t", ctypes.c_int64),
                ("dtype", ctypes.c_int32), ("_pad", ctypes.c_int32)]


class _LossCfg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in (
        "seq_ratio", "loss_agg", "dual_clip", "kl_estimator", "kl_in_loss", "kl_ratio_weighted", "is_truncate",
        "adv_per_row", "has_normalizer", "_pad")] + [(name, ctypes.c_float) for name in (
            "ratio_lo", "ratio_hi", "clip_c", "kl_coef", "log_ratio_clamp", "is_threshold", "norm_len", "_pad2")] + [
        ("normalizer", ctypes.c_double)]


class _AdvCfg(ctypes.Structure):
    _fields_ = [("adv_norm", ctypes.c_int32), ("std_unbiased", ctypes.c_int32), ("has_anchor", ctypes.c_int32),
                ("_pad", ctypes.c_int32), ("std_eps", ctypes.c_float), ("lambda_scale", ctypes.c_float),
                ("anchor", ctypes.c_double)]


# -- the library --------------------------------------------------------------------------------------------------
def _candidates() -> list[Path]:
    if os.environ.get(LIB_ENV):
        return [Path(os.environ[LIB_ENV])]
    package = Path(__file__).resolve().parent.parent
    return [package / f"_hadw_cpu{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(the core, None), or (None, why it is unavailable)."""
    found = [p for p in _candidates() if p.is_file()]
    if not found:
        where = os.environ.get(LIB_ENV) or f"hadw_kernels/_hadw_cpu{importlib.machinery.EXTENSION_SUFFIXES[0]}"
        return None, f"the native CPU kernel is not built ({where} not found)"
    before = _openmp_runtimes()
    try:
        lib = ctypes.CDLL(str(found[0]))
        version = lib.hadw_cpu_abi_version()
    except (OSError, AttributeError) as e:
        return None, f"the native CPU kernel at {found[0]} cannot be loaded ({e})"
    if version != ABI_VERSION:
        return None, f"the native CPU kernel at {found[0]} is stale (ABI {version}, expected {ABI_VERSION})"
    view, i64, i32, f32, fptr = ctypes.POINTER(_View), ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
    lib.hadw_cpu_policy_loss.argtypes = [i64, i64, view, view, view, view, view, view, ctypes.POINTER(_LossCfg),
                                         fptr, fptr, fptr, fptr, fptr, fptr, i32]
    lib.hadw_cpu_advantages.argtypes = [i64, i64, view, ctypes.POINTER(_AdvCfg), fptr, fptr, fptr]
    lib.hadw_cpu_scale_grad.argtypes = [i64, i64, fptr, f32, fptr, i32, i32]
    lib.hadw_cpu_set_tuning.argtypes = [i64, i64]
    lib.hadw_cpu_set_tuning.restype = None
    lib.hadw_cpu_isa.restype = ctypes.c_char_p
    lib.hadw_cpu_set_isa.argtypes = [ctypes.c_char_p]
    lib.hadw_cpu_set_isa.restype = ctypes.c_char_p
    for fn in (lib.hadw_cpu_policy_loss, lib.hadw_cpu_advantages, lib.hadw_cpu_scale_grad):
        fn.restype = ctypes.c_int
    lib.hadw_cpu_threading.argtypes = [ctypes.c_int]
    if before and _openmp_runtimes() - before:
        # This torch runs on another OpenMP runtime than the one the library brought in: two pools would compete
        # for the cores, so the kernel keeps to threads of its own (same results, bit for bit).
        lib.hadw_cpu_threading(0)
    lib.default_threading = lib.hadw_cpu_threading(-1)  # what set_threading_mode(None) restores
    return lib, None


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (libgomp, LLVM's libomp, Intel's libiomp5; empty where
    /proc/self/maps is unreadable)."""
    try:
        with open("/proc/self/maps") as maps:
            files = {line.split(None, 5)[-1].strip() for line in maps if line.count(" ") >= 5}
    except OSError:
        return set()
    return {f for f in files if re.match(r"lib(g|i|)omp[-.\d\w]*\.so", os.path.basename(f))}


_UNAVAILABLE = _load()[1]  # loaded with this module (a few ms), so that the check below is a constant


def unavailable_reason() -> str | None:
    """None where the core loads, else why not (for the fallback warning). A plain read of a module constant, which
    a caller's torch.compile folds (`torch.compiler.assume_constant_result` did the same but imports dynamo, 1.2 s,
    on an eager caller's first call)."""
    return _UNAVAILABLE


def _lib() -> ctypes.CDLL:
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"backend='native': {why}; {BUILD_HINT}")
    return lib


def isa() -> str:
    """The instruction set the core runs with here: 'avx512', 'avx2' or 'default'."""
    return _lib().hadw_cpu_isa().decode()


def set_isa(name: str | None = None) -> str:
    """Tests and comparisons: run the 'default' (no AVX) or 'avx2' code, or the best here (None); returns the one in
    use (the best below `name` where this CPU lacks it)."""
    return _lib().hadw_cpu_set_isa(name.encode() if name else None).decode()


def threading_mode() -> str:
    """The threads the core runs on: 'openmp' (the OpenMP runtime torch's own ops run on) or 'own' (helper threads
    of its own: a build without OpenMP, or a torch on another OpenMP runtime)."""
    return "openmp" if _lib().hadw_cpu_threading(-1) else "own"


def set_threading_mode(name: str | None = None) -> str:
    """Tests and comparisons: 'own' threads, or 'openmp' where built with it (None: back to the loader's choice);
    returns the one in use."""
    if name not in (None, "own", "openmp"):
        raise ValueError(f"threading must be 'own' or 'openmp', got {name!r}")
    lib = _lib()
    lib.hadw_cpu_threading(lib.default_threading if name is None else int(name == "openmp"))
    return threading_mode()


def set_tuning(chunk_tokens: int = 0, min_tokens_per_thread: int = 0) -> None:
    """Tests: tokens per work chunk and the fewest tokens per thread before a second one starts (0 = default)."""
    _lib().hadw_cpu_set_tuning(chunk_tokens, min_tokens_per_thread)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"hadw_kernels native {what}: the core rejected its arguments (code {rc})")


# -- tensors and the config as the core's arguments ---------------------------------------------------------------
def _view(t: torch.Tensor | None) -> _View:
    if t is None:
        return _View(None, 0, 0, 0, 0)
    if t.device.type != "cpu":
        raise ValueError(f"backend='native' runs on CPU tensors, got a tensor on {t.device}")
    stride_t = t.stride(1) if t.dim() == 2 else 0
    return _View(t.data_ptr(), t.stride(0), stride_t, _DTYPES[t.dtype], 0)


def _loss_cfg(config: LossConfig, *, has_ref: bool, adv_per_row: bool, normalizer: torch.Tensor | None,
              T: int) -> _LossCfg:
    norm_len = config.norm_len if config.norm_len is not None else T
    return _LossCfg(
        seq_ratio=int(config.ratio_level == "sequence"), loss_agg=_AGG[config.loss_agg],
        dual_clip=int(config.clip_ratio_c is not None), kl_estimator=_KL_EST[config.kl_estimator] if has_ref else 0,
        kl_in_loss=int(has_ref and config.kl_coef != 0.0), kl_ratio_weighted=int(config.kl_ratio_weighted),
        is_truncate=int(config.rollout_is_threshold is not None), adv_per_row=int(adv_per_row),
        has_normalizer=int(normalizer is not None),
        # bounds computed in double, then rounded, as torch does with a Python scalar
        ratio_lo=1.0 - config.clip_low, ratio_hi=1.0 + config.clip_high, clip_c=float(config.clip_ratio_c or 0.0),
        kl_coef=config.kl_coef, log_ratio_clamp=config.log_ratio_clamp,
        is_threshold=float(config.rollout_is_threshold or 0.0), norm_len=float(norm_len),
        normalizer=float(normalizer) if normalizer is not None else 0.0)


def _adv_cfg(config: LossConfig, anchor: torch.Tensor | None) -> _AdvCfg:
    anchor = active_anchor(anchor, config)  # None where HA-DW is off: Phi = 1
    return _AdvCfg(adv_norm=_ADV_NORM[config.adv_norm], std_unbiased=int(config.std_unbiased),
                   has_anchor=int(anchor is not None), std_eps=config.std_eps, lambda_scale=config.lambda_scale,
                   anchor=float(anchor) if anchor is not None else 0.0)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _policy(lib, logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, cfg: _LossCfg,
            need_grad: bool, metrics: torch.Tensor, kl_metrics: torch.Tensor | None):
    """Runs the core's policy loss; returns (loss, nonfinite [5], grad [N, T] or [0])."""
    N, T = logprobs.shape
    f32 = dict(dtype=torch.float32)
    loss, denom = torch.empty((), **f32), torch.empty((), **f32)
    nonfinite = torch.empty(len(_NONFINITE), dtype=torch.int64)
    grad = torch.empty((N, T) if need_grad else (0,), **f32)
    rc = lib.hadw_cpu_policy_loss(
        N, T, _view(logprobs), _view(old_logprobs), _view(ref_logprobs), _view(mask), _view(advantages),
        _view(rollout_is_weights), cfg, _ptr(grad) if need_grad else None, _ptr(loss), _ptr(denom), _ptr(metrics),
        _ptr(kl_metrics) if kl_metrics is not None else None, _ptr(nonfinite), torch.get_num_threads())
    _check(rc, "policy loss")
    return loss, nonfinite, grad


def _scale(grad: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """out = grad * scale, rounded to out's dtype (out may be grad)."""
    N, T = grad.shape
    rc = _lib().hadw_cpu_scale_grad(N, T, _ptr(grad), scale, _ptr(out), _DTYPES[out.dtype], torch.get_num_threads())
    _check(rc, "backward")
    return out


# -- the implementations (shared by the custom ops and the eager path) --------------------------------------------
def _policy_loss_impl(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, normalizer,
                      config: LossConfig, need_grad: bool):
    """`native_policy_loss`'s outputs."""
    lib = _lib()
    has_ref = ref_logprobs is not None
    metrics = torch.empty(len(metric_names(advantages=False, kl=has_ref)), dtype=torch.float32)
    cfg = _loss_cfg(config, has_ref=has_ref, adv_per_row=advantages.dim() == 1, normalizer=normalizer,
                    T=logprobs.shape[1])
    loss, nonfinite, grad = _policy(lib, logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights,
                                    cfg, need_grad, metrics, metrics[-2:] if has_ref else None)
    return loss, metrics, nonfinite, grad


def _loss_impl(logprobs, old_logprobs, rewards, mask, ref_logprobs, anchor, normalizer, group_size: int,
               config: LossConfig, need_grad: bool):
    """`native_loss`'s outputs."""
    lib = _lib()
    N, T = logprobs.shape
    has_ref = ref_logprobs is not None
    names = metric_names(advantages=True, kl=has_ref)
    metrics = torch.empty(len(names), dtype=torch.float32)
    advantages, phi = torch.empty(N, dtype=torch.float32), torch.empty(N, dtype=torch.float32)
    first_adv = names.index("phi_mean")
    rc = lib.hadw_cpu_advantages(N, group_size, _view(rewards), _adv_cfg(config, anchor), _ptr(advantages),
                                 _ptr(phi), _ptr(metrics[first_adv:]))
    _check(rc, "advantages")
    cfg = _loss_cfg(config, has_ref=has_ref, adv_per_row=True, normalizer=normalizer, T=T)
    loss, nonfinite, grad = _policy(lib, logprobs, old_logprobs, advantages, mask, ref_logprobs, None, cfg,
                                    need_grad, metrics, metrics[-2:] if has_ref else None)
    return loss, metrics, nonfinite, advantages, phi, grad


# -- the custom ops (what a caller's torch.compile sees) ------------------------------------------------------------
@torch.library.custom_op("hadw_kernels::native_policy_loss", mutates_args=())
def native_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    rollout_is_weights: torch.Tensor | None,
    normalizer: torch.Tensor | None,
    config_json: str,
    need_grad: bool,
    version: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy loss on precomputed advantages ([N] or [N, T]): (loss, metrics [9 or 11] in
    `metric_names(advantages=False, kl=...)` order, nonfinite [5] int64 (`_NONFINITE` order), grad [N, T] fp32 =
    dL/dlogprobs for an upstream gradient of 1 (saved for the backward; [0] without need_grad)). Differentiable
    w.r.t. logprobs only."""
    return _policy_loss_impl(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, normalizer,
                             config_from_json(config_json), need_grad)


@native_policy_loss.register_fake
def _(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, normalizer, config_json,
      need_grad, version):
    f32 = dict(dtype=torch.float32, device=logprobs.device)
    n_metrics = len(metric_names(advantages=False, kl=ref_logprobs is not None))
    return (logprobs.new_empty((), **f32), logprobs.new_empty((n_metrics,), **f32),
            logprobs.new_empty((len(_NONFINITE),), dtype=torch.int64, device=logprobs.device),
            logprobs.new_empty(logprobs.shape if need_grad else (0,), **f32))


@torch.library.custom_op("hadw_kernels::native_loss", mutates_args=())
def native_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    anchor: torch.Tensor | None,
    normalizer: torch.Tensor | None,
    group_size: int,
    config_json: str,
    need_grad: bool,
    version: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused whole batch: advantages of contiguous groups of `group_size` rows, then the policy loss. Returns
    (loss, metrics [14 or 16] in `metric_names(advantages=True, kl=...)` order, nonfinite [5] int64, advantages [N],
    phi [N], grad (as `native_policy_loss`)). Differentiable w.r.t. logprobs only."""
    return _loss_impl(logprobs, old_logprobs, rewards, mask, ref_logprobs, anchor, normalizer, group_size,
                      config_from_json(config_json), need_grad)


@native_loss.register_fake
def _(logprobs, old_logprobs, rewards, mask, ref_logprobs, anchor, normalizer, group_size, config_json, need_grad,
      version):
    N = logprobs.shape[0]
    f32 = dict(dtype=torch.float32, device=logprobs.device)
    n_metrics = len(metric_names(advantages=True, kl=ref_logprobs is not None))
    return (logprobs.new_empty((), **f32), logprobs.new_empty((n_metrics,), **f32),
            logprobs.new_empty((len(_NONFINITE),), dtype=torch.int64, device=logprobs.device),
            logprobs.new_empty((N,), **f32), logprobs.new_empty((N,), **f32),
            logprobs.new_empty(logprobs.shape if need_grad else (0,), **f32))


@torch.library.custom_op("hadw_kernels::native_loss_backward", mutates_args=())
def native_loss_backward(grad_loss: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dL/dlogprobs [N, T] in `dtype`: the forward's gradient times the upstream gradient, rounded once."""
    if grad.dim() != 2:
        raise RuntimeError("hadw_kernels native loss: backward through a forward run without need_grad")
    return _scale(grad, float(grad_loss), torch.empty(grad.shape, dtype=dtype))


@native_loss_backward.register_fake
def _(grad_loss, grad, dtype):
    return torch.empty(grad.shape, dtype=dtype, device=grad.device)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[-1])  # the gradient
    ctx.dtype = inputs[0].dtype
    # Only the loss is differentiable; without this, autograd would zero-fill a [N, T] gradient for the saved
    # gradient output on every backward (measured: more time than the kernel's own backward).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused_output_grads):
    (grad,) = ctx.saved_tensors
    out = native_loss_backward(grad_loss, grad, ctx.dtype) if ctx.needs_input_grad[0] else None
    return (out,) + (None,) * (len(ctx.needs_input_grad) - 1)


native_policy_loss.register_autograd(_backward, setup_context=_setup_context)
native_loss.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The same ops for eager callers: the same implementations, without torch.library's per-call dispatch (at
    64 x 32: ~0.3 of the ~0.7 ms a call took), and a backward that hands the forward's gradient buffer to autograd
    instead of copying it (at 1M tokens the copy was 8 of ~24 bytes moved per token). The inputs are saved, so a
    second backward through a retained graph recomputes the gradient (and in-place changes to them are caught)."""

    @staticmethod
    def forward(ctx, impl, logprobs, *args):
        output = impl(logprobs, *args)
        ctx.impl, ctx.dtype, ctx.args = impl, logprobs.dtype, args
        ctx.save_for_backward(logprobs, *(a for a in args if isinstance(a, torch.Tensor)))
        ctx.grad = output[-1]  # not saved: the first backward gives it away
        ctx.mark_non_differentiable(*output[1:-1])
        ctx.set_materialize_grads(False)
        return output[:-1]

    @staticmethod
    def backward(ctx, grad_loss, *_unused_output_grads):
        nothing = (None,) * (len(ctx.needs_input_grad) - 2)
        saved = ctx.saved_tensors  # checks that no input was changed in place since the forward
        if not ctx.needs_input_grad[1]:
            return (None, None) + nothing
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward through a retained graph
            it = iter(saved[1:])
            args = [next(it) if isinstance(a, torch.Tensor) else a for a in ctx.args]
            grad = ctx.impl(saved[0], *args)[-1]
        scale = float(grad_loss)
        if ctx.dtype == torch.float32:
            return (None, grad if scale == 1.0 else _scale(grad, scale, grad)) + nothing
        return (None, _scale(grad, scale, torch.empty(grad.shape, dtype=ctx.dtype))) + nothing


# -- what hadw_kernels.loss calls ---------------------------------------------------------------------------------
def _need_grad(logprobs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and logprobs.requires_grad


def loss_terms_with_checks(logprobs, old_logprobs, rewards, mask, group_size, anchor, config, ref_logprobs=None,
                           normalizer=None):
    """Same contract as `hadw_kernels.loss._loss_and_checks`: ((loss, advantages [N], phi [N], metrics), suspects
    [3]); here the suspects are the exact NaN/Inf counts at valid positions of logprobs, old_logprobs and
    ref_logprobs. anchor / normalizer: None or 0-d float64 tensors. Not for float64 inputs."""
    args = (logprobs, old_logprobs, rewards, mask, ref_logprobs, anchor, normalizer, group_size)
    if torch.compiler.is_compiling():
        outs = native_loss(*args, config_to_json(config), _need_grad(logprobs), OP_VERSION)
    else:
        outs = _Eager.apply(_loss_impl, *args, config, _need_grad(logprobs))
    loss, metrics, nonfinite, advantages, phi = outs[:5]
    names = metric_names(advantages=True, kl=ref_logprobs is not None)
    values = metrics.detach().unbind()
    return (loss, advantages.detach(), phi.detach(), dict(zip(names, values, strict=True))), nonfinite[:3]


def policy_loss_terms_with_checks(logprobs, old_logprobs, advantages, mask, config, ref_logprobs=None,
                                  rollout_is_weights=None, normalizer=None):
    """Same contract as `hadw_kernels.loss._policy_and_checks`: ((loss, metrics), suspects [5] for logprobs,
    old_logprobs, ref_logprobs, advantages, rollout_is_weights: exact NaN/Inf counts at valid positions, per row
    for [N] advantages). Not for float64 inputs."""
    args = (logprobs, old_logprobs, advantages.detach(), mask, ref_logprobs, rollout_is_weights, normalizer)
    if torch.compiler.is_compiling():
        outs = native_policy_loss(*args, config_to_json(config), _need_grad(logprobs), OP_VERSION)
    else:
        outs = _Eager.apply(_policy_loss_impl, *args, config, _need_grad(logprobs))
    loss, metrics, nonfinite = outs[:3]
    names = metric_names(advantages=False, kl=ref_logprobs is not None)
    return (loss, dict(zip(names, metrics.detach().unbind(), strict=True))), nonfinite
