"""The Triton policy losses: the fused whole-batch HA-DW loss (`hadw_loss`) and the loss on precomputed advantages
(`hadw_policy_loss`), as torch custom ops with their launchers.

Layers (kernels in `_triton_loss_kernels`; both losses run the same three kernels, told apart by ADV_SOURCE):
- `_switches` / `_scalars`: the one place where a `LossConfig` becomes constexpr switches and fp32 scalars;
- `_forward` / `_backward`: launchers that own allocation, grid and launch settings: the forward is two launches
  (the fused pass writing per-program partial sums, then a one-program finalize kernel reducing them in float64 to
  the loss and the metrics; the fused loss with adv_norm="batch_std" first runs the one-program batch-std kernel of
  `triton_advantages`), the backward one;
- the custom ops `hadw_kernels::fused_loss`, `hadw_kernels::policy_loss` and their shared backward
  `hadw_kernels::loss_backward`, with fake implementations and autograd that only saves and restores, so
  `torch.compile` traces callers without graph breaks;
- `loss_terms_with_checks` / `policy_loss_terms_with_checks`: what `hadw_kernels.loss` calls for backend="triton";
  they return exactly what the reference path returns.

float64 inputs never reach the kernels: `hadw_kernels.loss` computes them with the reference (float64 is the tests'
ground-truth dtype, not a training dtype, and the kernels' scalars are fp32 by design); a float64 call here raises.
Kernels run in the Triton interpreter on CPU tensors when TRITON_INTERPRET=1 (that is how CI tests them).
"""

from __future__ import annotations

import functools

import torch
import triton

from hadw_kernels.config import LossConfig
from hadw_kernels.ops._config_json import config_from_json, config_to_json
from hadw_kernels.ops._triton_advantage_kernels import ADV_NORMS
from hadw_kernels.ops._triton_loss_kernels import (
    ADV_GROUPS,
    ADV_ROW,
    ADV_TOKEN,
    NONFINITE_INPUTS,
    NUM_SLOTS,
    _loss_bwd_kernel,
    _loss_finalize_kernel,
    _loss_fwd_kernel,
)
from hadw_kernels.ops._triton_runtime import alloc, fix_interpreter, interpreting
from hadw_kernels.ops.triton_advantages import batch_std_denominator
from hadw_kernels.reference import active_anchor, compute_dtype, metric_names

_KL_EST = {"k1": 1, "k2": 2, "k3": 3}
_FWD_SWITCHES = ("ADV_SOURCE", "SEQ_RATIO", "ROW_MEAN", "ADV_NORM", "STD_UNBIASED", "HADW", "DUAL_CLIP", "HAS_REF",
                 "KL_IN_LOSS", "KL_EST", "KL_RATIO", "HAS_IS", "IS_TRUNC")
_BWD_SWITCHES = ("SEQ_RATIO", "ROW_MEAN", "ADV_TOKEN", "DUAL_CLIP", "KL_IN_LOSS", "KL_EST", "KL_RATIO", "HAS_IS",
                 "IS_TRUNC")

fix_interpreter()  # triton 3.6's interpreter cannot run a loop with a runtime bound under numpy >= 2.4


# -- the one place where the config becomes kernel switches and scalars --------------------------------------------
@functools.lru_cache(maxsize=256)
def _switches(config: LossConfig, *, has_ref: bool, has_anchor: bool, adv_source: int, has_is: bool) -> dict:
    """Every variant of the loss as a constexpr switch of the kernels. HA-DW is on exactly when an anchor is given
    (`hadw_kernels.reference.active_anchor` decides that, once, before the call)."""
    return dict(
        ADV_SOURCE=adv_source,
        ADV_TOKEN=adv_source == ADV_TOKEN,
        SEQ_RATIO=config.ratio_level == "sequence",
        ROW_MEAN=config.loss_agg == "seq-mean-token-mean",
        ADV_NORM=ADV_NORMS[config.adv_norm],
        STD_UNBIASED=config.std_unbiased,
        HADW=has_anchor,
        DUAL_CLIP=config.clip_ratio_c is not None,
        HAS_REF=has_ref,
        KL_IN_LOSS=has_ref and config.kl_coef != 0.0,
        KL_EST=_KL_EST[config.kl_estimator],
        KL_RATIO=has_ref and config.kl_ratio_weighted,
        HAS_IS=has_is,
        IS_TRUNC=has_is and config.rollout_is_threshold is not None,
    )


@functools.lru_cache(maxsize=64)
def _scalars(config: LossConfig) -> dict:
    """The float hyperparameters, handed to the kernels as fp32 (bounds computed in double first, as torch does)."""
    return dict(
        ratio_lo=1.0 - config.clip_low,
        ratio_hi=1.0 + config.clip_high,
        clip_c=float(config.clip_ratio_c or 0.0),
        std_eps=float(config.std_eps),
        lambda_scale=float(config.lambda_scale),
        kl_coef=float(config.kl_coef),
        log_ratio_clamp=float(config.log_ratio_clamp),
        is_threshold=float(config.rollout_is_threshold or 0.0),
    )


def _blocks(N: int, T: int, G: int = 1) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, num_warps). Interpreter: 16 rows per program keep the tests fast (~5 ms per program).
    GPU: tiles of 4 elements per thread and as few rows as T allows. Registers (ptxas of triton 3.7.1, sm_90a, as
    tests/test_triton_aot.py prints them for every launched variant): the forward at 1 x 1024 on 8 warps uses 43-80,
    and in its heaviest variants (KL + dual clip, per-token advantages + IS weights) ptxas spills 24-64 bytes rather
    than use more (maxnreg=128 gives 100-107 registers and no spill, at half the occupancy; triton 3.6.0 spills
    16-44 bytes in other variants); 4 x 128 and 8 x 64 use up to 180, 16 x 16 on 2 warps 190; the backward 28-88,
    none spilled. The first guess (4 x 1024 on 8 warps, 16
    elements per thread) used 242-255 registers and spilled. Register counts only: not yet timed on a GPU."""
    if interpreting():
        return 16, min(triton.next_power_of_2(T), 64), 1
    block_t = min(max(triton.next_power_of_2(T), 16), 1024)
    block_r = max(1, min(16, 512 // block_t, 8192 // triton.next_power_of_2(G)))
    return block_r, block_t, max(1, min(8, block_r * block_t // 128))


@functools.lru_cache(maxsize=16)
def _max_programs(device: torch.device) -> int:
    """Bound on the forward grid (its programs loop over row blocks), which bounds the partials the one-program
    finalize kernel reads: 8 per SM on a GPU; 2 in the interpreter, so that small test shapes exercise the loop."""
    if interpreting() or device.type != "cuda":
        return 2
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _strides(t: torch.Tensor | None) -> tuple[int, int]:
    """(row, token) strides of an [N, T] tensor; (row, 0) for an [N] one; (0, 0) for an absent one."""
    if t is None:
        return 0, 0
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (t.stride(0), 0)


# -- launchers ----------------------------------------------------------------------------------------------------
def _forward(logprobs, old_logprobs, mask, ref_logprobs, normalizer, config: LossConfig, *, advantages=None,
             rollout_is_weights=None, rewards=None, anchor=None, group_size: int = 1):
    """Run the forward kernel and reduce its partials. The fused loss passes rewards (contiguous groups of
    group_size) and anchor; the policy loss passes advantages [N] or [N, T] and rollout_is_weights. Returns (loss,
    advantages [N] and phi [N] (fused; else None), metrics [metric_names(fused, kl=True)], nonfinite [5] int64 in
    NONFINITE_INPUTS order, rows [3, N], denom), fp32 except nonfinite."""
    N, T = logprobs.shape
    device = logprobs.device
    fused = rewards is not None
    adv_source = ADV_GROUPS if fused else (ADV_TOKEN if advantages.dim() == 2 else ADV_ROW)
    sw = _switches(config, has_ref=ref_logprobs is not None, has_anchor=anchor is not None, adv_source=adv_source,
                   has_is=rollout_is_weights is not None)
    block_r, block_t, num_warps = _blocks(N, T, group_size)
    n_prog = min(triton.cdiv(N, block_r), _max_programs(device))
    rows = alloc((3, N), torch.float32, device)
    partial = alloc((n_prog, NUM_SLOTS), torch.float64, device)
    adv_out = phi_out = batch_denom = rows  # placeholders for pointers a variant does not read or write
    if fused:
        adv_out, phi_out = alloc((N,), torch.float32, device), alloc((N,), torch.float32, device)
        rewards = rewards.contiguous()
        rewards = rewards.view(torch.uint8) if rewards.dtype == torch.bool else rewards
        if config.adv_norm == "batch_std":
            batch_denom = batch_std_denominator(rewards, config)
    mask = _mask_arg(mask)
    ref = ref_logprobs if ref_logprobs is not None else logprobs
    adv_in = advantages if advantages is not None else rows
    isw = rollout_is_weights if rollout_is_weights is not None else logprobs
    _loss_fwd_kernel[(n_prog,)](
        logprobs, old_logprobs, ref, mask, adv_in, isw, rewards if fused else rows,
        anchor if anchor is not None else rows, batch_denom, adv_out, phi_out, rows, partial,
        N, T, group_size,
        *_strides(logprobs), *_strides(old_logprobs), *_strides(ref), *_strides(mask), *_strides(advantages),
        *_strides(rollout_is_weights),
        **_scalars(config), **{k: sw[k] for k in _FWD_SWITCHES},
        BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_G=triton.next_power_of_2(group_size),
        BLOCK_S=triton.next_power_of_2(NUM_SLOTS), NUM_SLOTS=NUM_SLOTS, num_warps=num_warps,
    )

    loss = alloc((), torch.float32, device)
    denom = alloc((), torch.float32, device)
    metrics = alloc((len(metric_names(advantages=fused, kl=True)),), torch.float32, device)
    nonfinite = alloc((len(NONFINITE_INPUTS),), torch.int64, device)
    _loss_finalize_kernel[(1,)](
        partial, normalizer if normalizer is not None else partial, loss, metrics, nonfinite, denom,
        n_prog, N,
        float(config.norm_len if config.norm_len is not None else T),
        TOKEN_MEAN=config.loss_agg == "token-mean", SUM_NORM=config.loss_agg == "seq-mean-token-sum-norm",
        HAS_NORMALIZER=normalizer is not None, HAS_REF=sw["HAS_REF"], ADV_METRICS=fused,
        KL_AT=len(metric_names(advantages=fused, kl=False)),
        BLOCK_P=16 if interpreting() else 128, BLOCK_S=triton.next_power_of_2(NUM_SLOTS), NUM_SLOTS=NUM_SLOTS,
        NUM_NONFINITE=len(NONFINITE_INPUTS),
    )
    return loss, (adv_out if fused else None), (phi_out if fused else None), metrics, nonfinite, rows, denom


def _backward(grad_loss, logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, rows, denom,
              config: LossConfig):
    """dL/dlogp [N, T] in logprobs' dtype, one launch. advantages: [N] (the fused loss's output, or the policy loss's
    input) or [N, T]."""
    N, T = logprobs.shape
    sw = _switches(config, has_ref=ref_logprobs is not None, has_anchor=False,
                   adv_source=ADV_TOKEN if advantages.dim() == 2 else ADV_ROW,
                   has_is=rollout_is_weights is not None)
    block_r, block_t, num_warps = _blocks(N, T)
    grad = alloc((N, T), logprobs.dtype, logprobs.device)
    mask = _mask_arg(mask)
    ref = ref_logprobs if ref_logprobs is not None else logprobs
    isw = rollout_is_weights if rollout_is_weights is not None else logprobs
    sc = _scalars(config)
    _loss_bwd_kernel[(triton.cdiv(N, block_r),)](
        grad, logprobs, old_logprobs, ref, mask, advantages, isw, rows, grad_loss, denom,
        N, T,
        *_strides(grad), *_strides(logprobs), *_strides(old_logprobs), *_strides(ref), *_strides(mask),
        *_strides(advantages), *_strides(rollout_is_weights),
        sc["ratio_lo"], sc["ratio_hi"], sc["clip_c"], sc["kl_coef"], sc["log_ratio_clamp"], sc["is_threshold"],
        **{k: sw[k] for k in _BWD_SWITCHES}, GRAD_BF16=grad.dtype == torch.bfloat16,
        BLOCK_R=block_r, BLOCK_T=block_t, num_warps=num_warps,
    )
    return grad


# -- the custom ops -----------------------------------------------------------------------------------------------
Tensors5 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Tensors7 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("hadw_kernels::fused_loss", mutates_args=())
def fused_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    anchor: torch.Tensor | None,
    normalizer: torch.Tensor | None,
    group_size: int,
    config_json: str,
) -> Tensors7:
    """The fused whole-batch HA-DW loss as a torch op: (loss, advantages [N], phi [N], metrics [16] in
    `metric_names(advantages=True, kl=True)` order, nonfinite [5] int64, rows [3, N] and denom (both saved for
    backward)). Differentiable w.r.t. logprobs only. anchor (HA-DW on: the prior C_t^-) / normalizer: 0-d tensors on
    the device or None; config_json: `config_to_json(config)`."""
    return _forward(logprobs, old_logprobs, mask, ref_logprobs, normalizer, config_from_json(config_json),
                    rewards=rewards, anchor=anchor, group_size=group_size)


@fused_loss.register_fake
def _(logprobs, old_logprobs, rewards, mask, ref_logprobs, anchor, normalizer, group_size, config_json):
    N = logprobs.shape[0]
    f32 = dict(dtype=torch.float32, device=logprobs.device)
    return (logprobs.new_empty((), **f32), logprobs.new_empty((N,), **f32), logprobs.new_empty((N,), **f32),
            logprobs.new_empty((len(metric_names(advantages=True, kl=True)),), **f32),
            logprobs.new_empty((len(NONFINITE_INPUTS),), dtype=torch.int64, device=logprobs.device),
            logprobs.new_empty((3, N), **f32), logprobs.new_empty((), **f32))


@torch.library.custom_op("hadw_kernels::policy_loss", mutates_args=())
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    rollout_is_weights: torch.Tensor | None,
    normalizer: torch.Tensor | None,
    config_json: str,
) -> Tensors5:
    """The policy loss on precomputed advantages ([N] or [N, T]) as a torch op: (loss, metrics [11] in
    `metric_names(advantages=False, kl=True)` order, nonfinite [5] int64, rows [3, N], denom). Differentiable
    w.r.t. logprobs only."""
    loss, _, _, metrics, nonfinite, rows, denom = _forward(
        logprobs, old_logprobs, mask, ref_logprobs, normalizer, config_from_json(config_json), advantages=advantages,
        rollout_is_weights=rollout_is_weights)
    return loss, metrics, nonfinite, rows, denom


@policy_loss.register_fake
def _(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, normalizer, config_json):
    N = logprobs.shape[0]
    f32 = dict(dtype=torch.float32, device=logprobs.device)
    return (logprobs.new_empty((), **f32), logprobs.new_empty((len(metric_names(advantages=False, kl=True)),), **f32),
            logprobs.new_empty((len(NONFINITE_INPUTS),), dtype=torch.int64, device=logprobs.device),
            logprobs.new_empty((3, N), **f32), logprobs.new_empty((), **f32))


@torch.library.custom_op("hadw_kernels::loss_backward", mutates_args=())
def loss_backward(
    grad_loss: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    rollout_is_weights: torch.Tensor | None,
    rows: torch.Tensor,
    denom: torch.Tensor,
    config_json: str,
) -> torch.Tensor:
    """dL/dlogprobs [N, T] (logprobs' dtype) of either loss, given the upstream gradient and what its forward saved."""
    return _backward(grad_loss, logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, rows,
                     denom, config_from_json(config_json))


@loss_backward.register_fake
def _(grad_loss, logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, rows, denom,
      config_json):
    return logprobs.new_empty(logprobs.shape)


def _save(ctx, logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, rows, denom, config_json):
    ctx.save_for_backward(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, rows, denom)
    ctx.config_json = config_json


def _grad(ctx, grad_loss):
    if not ctx.needs_input_grad[0]:
        return None
    return loss_backward(grad_loss, *ctx.saved_tensors, ctx.config_json)


def _setup_fused(ctx, inputs, output):
    logprobs, old_logprobs, _, mask, ref_logprobs, _, _, _, config_json = inputs
    _, advantages, _, _, _, rows, denom = output
    _save(ctx, logprobs, old_logprobs, advantages, mask, ref_logprobs, None, rows, denom, config_json)


def _backward_fused(ctx, grad_loss, *_unused_output_grads):
    return _grad(ctx, grad_loss), None, None, None, None, None, None, None, None


def _setup_policy(ctx, inputs, output):
    logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, _, config_json = inputs
    _, _, _, rows, denom = output
    _save(ctx, logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_is_weights, rows, denom, config_json)


def _backward_policy(ctx, grad_loss, *_unused_output_grads):
    return _grad(ctx, grad_loss), None, None, None, None, None, None, None


fused_loss.register_autograd(_backward_fused, setup_context=_setup_fused)
policy_loss.register_autograd(_backward_policy, setup_context=_setup_policy)


# -- what hadw_kernels.loss calls ---------------------------------------------------------------------------------
def _check_not_float64(*tensors) -> None:
    if compute_dtype(*tensors) == torch.float64:
        raise ValueError("the Triton kernels compute in float32; float64 inputs are computed by the reference "
                         "(hadw_kernels.loss routes them there)")


def _metrics(values: torch.Tensor, *, fused: bool, kl: bool) -> dict[str, torch.Tensor]:
    return dict(zip(metric_names(advantages=fused, kl=kl), values.detach().unbind(), strict=False))


def loss_terms_with_checks(logprobs, old_logprobs, rewards, mask, group_size, anchor, config, ref_logprobs=None,
                           normalizer=None):
    """The fused whole-batch loss; contract of `hadw_kernels.loss._loss_and_checks`: ((loss, advantages [N], phi [N],
    metrics), suspects [3]). Here the suspects are the exact int64 NaN/Inf counts at valid positions of logprobs,
    old_logprobs and ref_logprobs, counted in the kernel's own pass (nonzero = suspect). anchor / normalizer: None or
    0-d float64 tensors on the device."""
    _check_not_float64(logprobs, old_logprobs, ref_logprobs)
    loss, advantages, phi, metrics, nonfinite, _, _ = fused_loss(
        logprobs, old_logprobs, rewards, mask, ref_logprobs, active_anchor(anchor, config), normalizer, group_size,
        config_to_json(config))
    metrics = _metrics(metrics, fused=True, kl=ref_logprobs is not None)
    return (loss, advantages.detach(), phi.detach(), metrics), nonfinite[:3]


def policy_loss_terms_with_checks(logprobs, old_logprobs, advantages, mask, config, ref_logprobs=None,
                                  rollout_is_weights=None, normalizer=None):
    """The policy loss on precomputed advantages; contract of `hadw_kernels.loss._policy_and_checks`: ((loss,
    metrics), suspects [5] = exact NaN/Inf counts at valid positions of logprobs, old_logprobs, ref_logprobs,
    advantages, rollout_is_weights). advantages: [N] or [N, T]; normalizer: None or a 0-d float64 tensor."""
    _check_not_float64(logprobs, old_logprobs, ref_logprobs)
    loss, metrics, nonfinite, _, _ = policy_loss(
        logprobs, old_logprobs, advantages.detach(), mask, ref_logprobs,
        None if rollout_is_weights is None else rollout_is_weights.detach(), normalizer, config_to_json(config))
    return (loss, _metrics(metrics, fused=False, kl=ref_logprobs is not None)), nonfinite
