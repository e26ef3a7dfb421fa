"""The fused Triton HA-DW loss: launchers, the `hadw_kernels::fused_loss` torch custom op and its autograd.

Layers (kernels in `_triton_loss_kernels`):
- `_switches` / `_scalars`: the one place where a `LossConfig` becomes constexpr switches and fp32 scalars;
- `_forward` / `_backward`: launchers that own allocation, grid and launch settings: the forward is two launches
  (the fused pass writing per-program partial sums, then a one-program finalize kernel reducing them in float64 to
  the loss and the metrics), the backward one;
- `fused_loss` (`torch.ops.hadw_kernels.fused_loss`): the custom op, with a fake implementation and autograd that
  only saves and restores, so `torch.compile` traces callers without graph breaks;
- `loss_terms_with_checks`: what `hadw_kernels.loss` calls for backend="triton"; returns exactly what the reference
  path returns.

float64 inputs are not run by the kernel: they go to the (float64) reference, since float64 is the ground-truth
dtype of tests rather than a training dtype, and the kernel's scalars are fp32 by design.

Kernels run in the Triton interpreter on CPU tensors when TRITON_INTERPRET=1 (that is how CI tests them).
"""

import dataclasses
import functools
import json

import torch
import triton

from hadw_kernels.config import LossConfig
from hadw_kernels.ops._triton_compat import fix_interpreter, interpreting
from hadw_kernels.ops._triton_loss_kernels import (
    METRIC_NAMES,
    NUM_SLOTS,
    _hadw_bwd_kernel,
    _hadw_finalize_kernel,
    _hadw_fwd_kernel,
)
from hadw_kernels.reference import compute_dtype, loss_terms, metric_names
from hadw_kernels.validation import nonfinite_suspects

POISON_OUTPUTS = False
"""Test switch: allocate every kernel output with NaN (-1 for integers) instead of torch.empty, so an unwritten
element fails loudly."""

_KL_EST = {"k1": 1, "k2": 2, "k3": 3}

fix_interpreter()  # triton 3.6's interpreter cannot run a loop with a runtime bound under numpy >= 2.4


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# -- the one place where the config becomes kernel switches and scalars --------------------------------------------
@functools.lru_cache(maxsize=64)
def _config_from_json(config_json: str) -> LossConfig:
    return LossConfig(**json.loads(config_json))


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(LossConfig))


def _config_to_json(config: LossConfig) -> str:
    """The custom-op schema has no dataclass type, so the config travels as JSON. It is built with plain string
    operations, which dynamo folds to a constant even for a config created inside the traced function (an
    `assume_constant_result` version silently saw the default config there)."""
    parts = []
    for name in _CONFIG_FIELDS:
        value = getattr(config, name)
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value + '"'
        else:
            text = repr(value)
        parts.append('"' + name + '": ' + text)
    return "{" + ", ".join(parts) + "}"


@functools.lru_cache(maxsize=256)
def _switches(config: LossConfig, has_ref: bool, has_anchor: bool) -> dict:
    """Every variant of the loss as a constexpr switch of the kernels."""
    return dict(
        SEQ_RATIO=config.ratio_level == "sequence",
        ROW_MEAN=config.loss_agg == "seq-mean-token-mean",
        ADV_STD=config.adv_norm == "group_std",
        STD_UNBIASED=config.std_unbiased,
        HADW=config.hadw and has_anchor,
        DUAL_CLIP=config.clip_ratio_c is not None,
        HAS_REF=has_ref,
        KL_IN_LOSS=has_ref and config.kl_coef != 0.0,
        KL_EST=_KL_EST[config.kl_estimator],
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
    )


def _blocks(N: int, T: int, G: int = 1) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, num_warps). Interpreter: 16 rows per program keep the tests fast (~5 ms per program).
    GPU: tiles of 4 elements per thread and as few rows as T allows. ptxas -v (sm_90a, the heaviest forward: token
    ratio + KL + dual clip) reports 95 registers at 1 x 1024 and 2 x 256 rows x tokens, 119 at 4 x 128, 187 at
    8 x 64 and 16 x 16, no spills; the first guess (4 x 1024 on 8 warps, 16 elements per thread) used 242-255 and
    spilled. Register counts only: the sizes are not yet timed on a GPU."""
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


# -- launchers ----------------------------------------------------------------------------------------------------
def _forward(logprobs, old_logprobs, rewards, mask, ref_logprobs, anchor, normalizer, group_size: int,
             config: LossConfig):
    """Run the forward kernel and reduce its partials. Returns (loss, advantages, phi, metrics [16], nonfinite [3],
    rows [2, N] = (w_i, GSPO d pg_i / d log s_i), denom), all fp32 except nonfinite (int64)."""
    N, T = logprobs.shape
    device = logprobs.device
    has_ref = ref_logprobs is not None
    sw = _switches(config, has_ref, anchor is not None)
    block_r, block_t, num_warps = _blocks(N, T, group_size)
    n_prog = min(triton.cdiv(N, block_r), _max_programs(device))
    advantages = _alloc((N,), torch.float32, device)
    phi = _alloc((N,), torch.float32, device)
    rows = _alloc((2, N), torch.float32, device)
    partial = _alloc((n_prog, NUM_SLOTS), torch.float64, device)
    rewards = rewards.contiguous()
    rewards = rewards.view(torch.uint8) if rewards.dtype == torch.bool else rewards
    mask = _mask_arg(mask)
    ref = ref_logprobs if has_ref else logprobs
    _hadw_fwd_kernel[(n_prog,)](
        logprobs, old_logprobs, ref, mask, rewards, anchor if anchor is not None else rewards,
        advantages, phi, rows[0], rows[1], partial,
        N, T, group_size,
        logprobs.stride(0), logprobs.stride(1), old_logprobs.stride(0), old_logprobs.stride(1),
        ref.stride(0), ref.stride(1), mask.stride(0), mask.stride(1),
        **_scalars(config), **sw,
        BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_G=triton.next_power_of_2(group_size),
        BLOCK_S=triton.next_power_of_2(NUM_SLOTS), NUM_SLOTS=NUM_SLOTS, num_warps=num_warps,
    )

    loss = _alloc((), torch.float32, device)
    denom = _alloc((), torch.float32, device)
    metrics = _alloc((len(METRIC_NAMES),), torch.float32, device)
    nonfinite = _alloc((3,), torch.int64, device)
    _hadw_finalize_kernel[(1,)](
        partial, normalizer if normalizer is not None else partial, loss, metrics, nonfinite, denom,
        n_prog, N,
        float(config.norm_len if config.norm_len is not None else T),
        TOKEN_MEAN=config.loss_agg == "token-mean", SUM_NORM=config.loss_agg == "seq-mean-token-sum-norm",
        HAS_NORMALIZER=normalizer is not None, HAS_REF=has_ref,
        BLOCK_P=16 if interpreting() else 128, BLOCK_S=triton.next_power_of_2(NUM_SLOTS), NUM_SLOTS=NUM_SLOTS,
    )
    return loss, advantages, phi, metrics, nonfinite, rows, denom


def _backward(grad_loss, logprobs, old_logprobs, mask, ref_logprobs, advantages, rows, denom, config: LossConfig):
    """dL/dlogp [N, T] in logprobs' dtype, one launch."""
    N, T = logprobs.shape
    sw = _switches(config, ref_logprobs is not None, False)
    block_r, block_t, num_warps = _blocks(N, T)
    grad = _alloc((N, T), logprobs.dtype, logprobs.device)
    mask = _mask_arg(mask)
    ref = ref_logprobs if ref_logprobs is not None else logprobs
    sc = _scalars(config)
    _hadw_bwd_kernel[(triton.cdiv(N, block_r),)](
        grad, logprobs, old_logprobs, ref, mask, advantages, rows[0], rows[1], grad_loss, denom,
        N, T,
        grad.stride(0), grad.stride(1), logprobs.stride(0), logprobs.stride(1),
        old_logprobs.stride(0), old_logprobs.stride(1), ref.stride(0), ref.stride(1), mask.stride(0), mask.stride(1),
        sc["ratio_lo"], sc["ratio_hi"], sc["clip_c"], sc["kl_coef"], sc["log_ratio_clamp"],
        SEQ_RATIO=sw["SEQ_RATIO"], ROW_MEAN=sw["ROW_MEAN"], DUAL_CLIP=sw["DUAL_CLIP"], KL_IN_LOSS=sw["KL_IN_LOSS"],
        KL_EST=sw["KL_EST"], GRAD_BF16=grad.dtype == torch.bfloat16,
        BLOCK_R=block_r, BLOCK_T=block_t, num_warps=num_warps,
    )
    return grad


# -- the custom op ------------------------------------------------------------------------------------------------
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused HA-DW loss as a torch op: (loss, advantages [N], phi [N], metrics [16] in `METRIC_NAMES` order,
    nonfinite [3] int64, rows [2, N] and denom (both saved for backward)). Differentiable w.r.t. logprobs only.
    anchor / normalizer: 0-d tensors on the device or None; config_json: `_config_to_json(config)`."""
    return _forward(logprobs, old_logprobs, rewards, mask, ref_logprobs, anchor, normalizer, group_size,
                    _config_from_json(config_json))


@fused_loss.register_fake
def _(logprobs, old_logprobs, rewards, mask, ref_logprobs, anchor, normalizer, group_size, config_json):
    N = logprobs.shape[0]
    f32 = dict(dtype=torch.float32, device=logprobs.device)
    return (logprobs.new_empty((), **f32), logprobs.new_empty((N,), **f32), logprobs.new_empty((N,), **f32),
            logprobs.new_empty((len(METRIC_NAMES),), **f32),
            logprobs.new_empty((3,), dtype=torch.int64, device=logprobs.device),
            logprobs.new_empty((2, N), **f32), logprobs.new_empty((), **f32))


@torch.library.custom_op("hadw_kernels::fused_loss_backward", mutates_args=())
def fused_loss_backward(
    grad_loss: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    denom: torch.Tensor,
    config_json: str,
) -> torch.Tensor:
    """dL/dlogprobs [N, T] (logprobs' dtype) given the upstream gradient of the loss and what the forward saved."""
    return _backward(grad_loss, logprobs, old_logprobs, mask, ref_logprobs, advantages, rows, denom,
                     _config_from_json(config_json))


@fused_loss_backward.register_fake
def _(grad_loss, logprobs, old_logprobs, mask, ref_logprobs, advantages, rows, denom, config_json):
    return torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)


def _setup_context(ctx, inputs, output):
    logprobs, old_logprobs, _, mask, ref_logprobs, _, _, _, config_json = inputs
    _, advantages, _, _, _, rows, denom = output
    ctx.save_for_backward(logprobs, old_logprobs, mask, ref_logprobs, advantages, rows, denom)
    ctx.config_json = config_json


def _backward_autograd(ctx, grad_loss, *_unused_output_grads):
    logprobs, old_logprobs, mask, ref_logprobs, advantages, rows, denom = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = fused_loss_backward(grad_loss, logprobs, old_logprobs, mask, ref_logprobs, advantages, rows, denom,
                                   ctx.config_json)
    return grad, None, None, None, None, None, None, None, None


fused_loss.register_autograd(_backward_autograd, setup_context=_setup_context)


# -- what hadw_kernels.loss calls ---------------------------------------------------------------------------------
def loss_terms_with_checks(logprobs, old_logprobs, rewards, mask, group_size, anchor, config, ref_logprobs=None,
                           normalizer=None):
    """Same contract as `hadw_kernels.loss._loss_and_checks`: ((loss, advantages [N], phi [N], metrics), suspects
    [3]). Here the suspects are the exact int64 NaN/Inf counts at valid positions of logprobs, old_logprobs and
    ref_logprobs, counted in the kernel's own pass (nonzero = suspect). anchor / normalizer: None or 0-d float64
    tensors on the device. float64 inputs are computed by the reference (module docstring).
    """
    if compute_dtype(logprobs, old_logprobs, ref_logprobs) == torch.float64:
        out = loss_terms(logprobs, old_logprobs, rewards, mask, group_size, anchor, config, ref_logprobs, normalizer)
        return out, nonfinite_suspects(mask, logprobs, old_logprobs, ref_logprobs)
    loss, advantages, phi, metrics, nonfinite, _, _ = fused_loss(
        logprobs, old_logprobs, rewards, mask, ref_logprobs, anchor, normalizer, group_size, _config_to_json(config))
    names = METRIC_NAMES if ref_logprobs is not None else METRIC_NAMES[:-2]
    values = dict(zip(names, metrics.detach().unbind(), strict=False))
    ordered = {k: values[k] for k in metric_names(advantages=True, kl=ref_logprobs is not None)}
    return (loss, advantages.detach(), phi.detach(), ordered), nonfinite
