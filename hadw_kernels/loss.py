"""Public entry points: validate, dispatch to a backend, return the reference's outputs.

Two stages, for frameworks that compute advantages once per rollout batch and then train on micro-batches whose rows
they reorder (verl, TRL):
- `hadw_advantages`: HA-DW advantages for a whole rollout batch, groups contiguous (`group_size`) or by `group_ids`
  in any row order; NaN rewards are unscorable.
- `hadw_policy_loss`: the clipped policy loss on precomputed advantages, for any micro-batch, rows in any order.
And the fused whole-batch path `hadw_loss` (= stage 1 then stage 2 on the same rows, exactly), `loss_normalizer`
(the global denominator when a batch is split), `truncated_is_weights`, and the module `HADWLoss`.

Backends:
- "torch": the eager reference (`hadw_kernels.reference`).
- "compiled": `torch.compile` of the same reference (CPU: C++ codegen; at 1M tokens fwd+bwd 5.5-6.9x faster than
  the eager reference and 3.3-4.5x faster than a plain eager implementation, bench/RESULTS.md; ~8 MB peak memory).
- "triton": the fused Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
- "native": the fused C++ CPU kernel (`hadw_kernels.ops.cpu_loss`; forward and gradient in one pass; bench/RESULTS.md
  has its speed), built by `pip install -e .` where a C++ compiler is present.
- "auto" (default): Triton for CUDA tensors when triton imports; on CPU the native kernel, or where it is not built
  the compiled reference (with one warning saying how to build the kernel), falling back to eager (with one
  warning) where compilation fails. HADW_KERNELS_NO_COMPILE=1 turns compilation off.
float64 inputs (the tests' ground truth, not a training dtype) never go to a kernel: "auto", "triton" and "native"
run the eager reference for them.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import nn

from hadw_kernels.anchor import DifficultyAnchor
from hadw_kernels.config import LossConfig
from hadw_kernels.reference import (
    Advantages,
    LossOutput,
    compute_advantages,
    compute_dtype,
    loss_terms,
    policy_loss_terms,
)
from hadw_kernels.reference import truncated_is_weights as _truncated_is_weights
from hadw_kernels.validation import (
    BACKENDS,
    AnchorLike,
    check_backend,
    check_config,
    check_group_size,
    check_rewards,
    check_token_inputs,
    compiling,
    nonfinite_suspects,
    raise_nonfinite,
    resolve_anchor,
    resolve_normalizer,
)

ADVANTAGE_BACKENDS = ("auto", "torch", "triton")


# -- what every backend computes: the reference's outputs and the NaN/Inf suspects of its inputs --------------------
def _loss_and_checks(logprobs, old_logprobs, rewards, mask, group_size, anchor, config, ref_logprobs, normalizer):
    """((loss, advantages, phi, metrics), suspects [3] for logprobs, old_logprobs, ref_logprobs)."""
    out = loss_terms(logprobs, old_logprobs, rewards, mask, group_size, anchor, config, ref_logprobs, normalizer)
    return out, nonfinite_suspects(mask, logprobs, old_logprobs, ref_logprobs)


def _policy_and_checks(logprobs, old_logprobs, advantages, mask, config, ref_logprobs, rollout_is_weights, normalizer):
    """((loss, metrics), suspects [5] for logprobs, old_logprobs, ref_logprobs, advantages, rollout_is_weights)."""
    out = policy_loss_terms(logprobs, old_logprobs, advantages, mask, config, ref_logprobs, rollout_is_weights,
                            normalizer)
    return out, nonfinite_suspects(mask, logprobs, old_logprobs, ref_logprobs, advantages, rollout_is_weights)


# op name -> (the reference, the Triton module under hadw_kernels.ops, the name of the same function there)
_OPS = {
    "loss": (_loss_and_checks, "triton_loss", "loss_terms_with_checks"),
    "policy_loss": (_policy_and_checks, "triton_loss", "policy_loss_terms_with_checks"),
    "advantages": (compute_advantages, "triton_advantages", "compute_advantages"),
}


# -- backends -----------------------------------------------------------------------------------------------------
@functools.cache
def _compiled(op: str):
    return torch.compile(_OPS[op][0], dynamic=None)


_COMPILE_FAILED: list[str] = []


def _compile_disabled() -> bool:
    return os.environ.get("HADW_KERNELS_NO_COMPILE", "0") not in ("", "0")


@functools.cache
def _triton_fn(op: str):
    """The kernel entry point of `op`, or None where triton (or that kernel) is not available."""
    try:
        from hadw_kernels.ops import triton_advantages, triton_loss
    except ImportError:
        return None
    module = {"triton_loss": triton_loss, "triton_advantages": triton_advantages}[_OPS[op][1]]
    return getattr(module, _OPS[op][2], None)


def _run_triton(op: str, args: tuple):
    fn = _triton_fn(op)
    if fn is None:
        raise RuntimeError(f"backend='triton' needs the Triton kernel module and triton itself (pip install "
                           f"'hadw-kernels[triton]'); no Triton kernel for {op!r} could be loaded")
    return fn(*args)


# op name -> the name of the same function in hadw_kernels.ops.cpu_loss (the native CPU kernel)
_NATIVE_OPS = {"loss": "loss_terms_with_checks", "policy_loss": "policy_loss_terms_with_checks"}
_NATIVE_WARNED: list[str] = []


@functools.cache
def _native_fn(op: str):
    """The native CPU kernel's entry point of `op`, or None where the kernel is not built (or has no such op)."""
    from hadw_kernels.ops import cpu_loss

    return getattr(cpu_loss, _NATIVE_OPS[op]) if op in _NATIVE_OPS and cpu_loss.unavailable_reason() is None else None


def _run_native(op: str, device: torch.device, args: tuple):
    fn = _native_fn(op)
    if fn is None or device.type != "cpu":
        from hadw_kernels.ops import cpu_loss

        why = f"runs on CPU tensors, got {device}" if fn is not None else cpu_loss.unavailable_reason()
        raise RuntimeError(f"backend='native': {why}" + ("" if fn is not None else f"; {cpu_loss.BUILD_HINT}"))
    return fn(*args)


def _warn_no_native(op: str) -> None:
    if op in _NATIVE_OPS and not _NATIVE_WARNED:
        from hadw_kernels.ops import cpu_loss

        _NATIVE_WARNED.append(op)
        warnings.warn(f"hadw_kernels: {cpu_loss.unavailable_reason()}, so backend='auto' runs torch.compile of the "
                      f"reference on CPU (several times slower, and a compile per new shape). For the fast path, "
                      f"{cpu_loss.BUILD_HINT}.", RuntimeWarning, stacklevel=4)


def _resolve(op: str, backend: str, device: torch.device, fp64: bool) -> str:
    """The concrete backend that runs `op`: 'torch' | 'compiled' | 'triton' | 'native'. The one place where 'auto',
    float64 and a caller's torch.compile are decided."""
    if backend == "torch" or (fp64 and backend in ("triton", "native")):
        return "torch"
    if backend in ("triton", "native"):
        return backend
    if backend == "auto" and not fp64:
        if device.type == "cuda" and _triton_fn(op) is not None:
            return "triton"
        if device.type == "cpu" and _native_fn(op) is not None:
            return "native"
    if backend == "auto" and device.type == "cuda" and _triton_fn(op) is not None:
        return "torch"  # float64 on CUDA: the eager reference
    if compiling():  # inside a caller's torch.compile: its compiler handles the reference
        return "torch"
    if backend == "auto":
        if device.type == "cpu" and not fp64:
            _warn_no_native(op)
        if _compile_disabled() or _COMPILE_FAILED:
            return "torch"
    return "compiled"


def _dispatch(op: str, backend: str, device: torch.device, fp64: bool, args: tuple):
    chosen = _resolve(op, backend, device, fp64)
    reference = _OPS[op][0]
    if chosen == "torch":
        return reference(*args)
    if chosen == "triton":
        return _run_triton(op, args)
    if chosen == "native":
        return _run_native(op, device, args)
    if backend == "compiled":
        return _compiled(op)(*args)
    try:  # auto: a compiler failure falls back to the (identical) eager reference, once and for all
        return _compiled(op)(*args)
    except Exception as e:  # noqa: BLE001
        _COMPILE_FAILED.append(repr(e))
        warnings.warn(f"hadw_kernels: torch.compile failed ({type(e).__name__}: {e}); using the eager reference from "
                      f"now on. Set HADW_KERNELS_NO_COMPILE=1 to skip the attempt.", RuntimeWarning, stacklevel=4)
        return reference(*args)


# -- public API ---------------------------------------------------------------------------------------------------
def hadw_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    anchor: AnchorLike = None,
    config: LossConfig | None = None,
    ref_logprobs: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
) -> LossOutput:
    """HA-DW reweighted clipped policy loss (GRPO / DAPO / GSPO / Dr. GRPO) for a whole batch of groups, with its
    metrics: `hadw_advantages` and `hadw_policy_loss` fused into one call, exactly equal to the two stages.

    Args:
        logprobs: [N, T] response-token log-probs under the policy being trained (requires grad), any float dtype.
        old_logprobs: [N, T] log-probs under the sampling (behaviour) policy; not differentiated.
        rewards: [N] scalar rewards (binary or any real; NaN = unscorable), N = P * group_size, each prompt's rows
            contiguous. For groups in any order or of unequal size use the two stages.
        mask: [N, T] bool / int / float, nonzero on response tokens. Rows with no valid token contribute nothing
            and are not counted as sequences.
        group_size: G >= 2 responses per prompt.
        anchor: the prior C_t^- for this batch: a float, a `DifficultyAnchor` (its `.value`; never updated here),
            or None (Phi = 1). Ignored when `config.hadw` is False.
        config: `LossConfig` (default `LossConfig.grpo()`).
        ref_logprobs: [N, T] reference-policy log-probs; enables the `kl` metric and, with config.kl_coef > 0,
            the KL penalty.
        normalizer: the global denominator when a batch is split into micro-batches or over ranks: the total
            valid-token count for token-mean, the total count of non-empty rows for seq-mean-* (see
            `loss_normalizer`). The micro-batch losses then sum to the whole-batch loss exactly. No collective
            runs inside the loss.
        backend: 'auto' | 'torch' | 'compiled' | 'triton' | 'native' (module docstring).

    Returns:
        `LossOutput`: loss (0-d fp32, fp64 for fp64 inputs), advantages [N], phi [N], metrics (detached 0-d).

    Example:
        >>> cfg = LossConfig.grpo()
        >>> prior = anchor.step(rewards)              # once per rollout batch
        >>> out = hadw_loss(logp, old_logp, rewards, mask, group_size=8, anchor=prior, config=cfg)
        >>> out.loss.backward()
    """
    config = check_config(config)
    check_backend(backend)
    group_size = check_group_size(group_size)
    named = dict(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask, rewards=rewards, ref_logprobs=ref_logprobs)
    check_token_inputs(named, float_names=("logprobs", "old_logprobs", "ref_logprobs"))
    check_rewards(rewards, group_size, logprobs.shape[0])
    device = logprobs.device
    args = (logprobs, old_logprobs, rewards, mask, group_size, resolve_anchor(anchor, config, device), config,
            ref_logprobs, resolve_normalizer(normalizer, device))
    fp64 = compute_dtype(logprobs, old_logprobs, ref_logprobs) == torch.float64
    (loss, advantages, phi, metrics), suspects = _dispatch("loss", backend, device, fp64, args)
    raise_nonfinite(suspects, mask, dict(logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs))
    return LossOutput(loss=loss, advantages=advantages, phi=phi, metrics=metrics)


def hadw_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    config: LossConfig | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
) -> LossOutput:
    """The clipped policy loss on precomputed advantages, for any micro-batch: no group constraint, rows in any order.

    Use it with `hadw_advantages` computed once per rollout batch (over all ranks' rewards): the sum of the
    micro-batch losses, each given the batch's global `normalizer`, equals `hadw_loss` on the whole batch.

    Args:
        logprobs: [N, T] response-token log-probs under the policy being trained (requires grad), any float dtype.
        old_logprobs: [N, T] log-probs under the policy that sampled; not differentiated.
        advantages: [N] (one per response, e.g. `hadw_advantages(...).advantages[rows]`) or [N, T] (one per token,
            as verl passes them); detached; must be finite on rows / positions with a valid token.
        mask: [N, T] bool / int / float, nonzero on response tokens.
        config: `LossConfig` (default `LossConfig.grpo()`); its advantage fields (adv_norm, hadw, ...) are unused here.
        ref_logprobs: [N, T] reference-policy log-probs: the `kl` metric and, with config.kl_coef > 0, the KL penalty
            (multiplied by the ratio with config.kl_ratio_weighted, TRL's default).
        rollout_is_weights: [N, T] detached importance weights for a rollout engine whose sampling log-probs differ
            from the trainer's (see `truncated_is_weights`); they multiply each token's surrogate, truncated at
            config.rollout_is_threshold.
        normalizer: the global denominator (see `hadw_loss` and `loss_normalizer`).
        backend: 'auto' | 'torch' | 'compiled' | 'triton' | 'native' (module docstring).

    Returns:
        `LossOutput`: loss, advantages (the input, detached), phi None, metrics (`POLICY_METRICS`, plus kl and
        kl_loss with ref_logprobs).

    Example:
        >>> adv = hadw_advantages(rewards, group_ids=uid, anchor=anchor.step(rewards), config=cfg)   # once
        >>> for rows in micro_batches:                                                               # any order
        ...     out = hadw_policy_loss(logp[rows], old[rows], adv.advantages[rows], mask[rows], config=cfg,
        ...                            normalizer=total)
        ...     out.loss.backward()
    """
    config = check_config(config)
    check_backend(backend)
    named = dict(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask, advantages=advantages,
                 ref_logprobs=ref_logprobs, rollout_is_weights=rollout_is_weights)
    check_token_inputs(named, float_names=("logprobs", "old_logprobs", "advantages", "ref_logprobs",
                                           "rollout_is_weights"))
    device = logprobs.device
    args = (logprobs, old_logprobs, advantages, mask, config, ref_logprobs, rollout_is_weights,
            resolve_normalizer(normalizer, device))
    fp64 = compute_dtype(logprobs, old_logprobs, ref_logprobs) == torch.float64
    (loss, metrics), suspects = _dispatch("policy_loss", backend, device, fp64, args)
    raise_nonfinite(suspects, mask, dict(logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                         advantages=advantages, rollout_is_weights=rollout_is_weights))
    return LossOutput(loss=loss, advantages=advantages.detach(), phi=None, metrics=metrics)


def hadw_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    anchor: AnchorLike = None,
    config: LossConfig | None = None,
    *,
    group_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> Advantages:
    """HA-DW reweighted group-relative advantages for a whole rollout batch (a custom advantage estimator).

    Args:
        rewards: [N] rewards; NaN marks an unscorable response (left out of its group's statistics, advantage 0).
        group_size: G >= 2 for contiguous groups of equal size (rows g*G ... g*G+G-1 are prompt g's).
        anchor: prior C_t^- (float, `DifficultyAnchor`, or None for Phi = 1); ignored when config.hadw is False.
        config: uses adv_norm ('group_std' | 'batch_std' | 'none'), std_unbiased, std_eps, hadw, lambda_scale
            (default `LossConfig.grpo()`).
        group_ids: [N] integer group of each row instead of `group_size`: any order, groups of any size (e.g.
            verl's uid or TRL's prompt index mapped to integers). A group with fewer than two scorable responses
            has advantage 0 and counts as degenerate.
        backend: 'auto' | 'torch' | 'triton'.

    Returns:
        `Advantages` with advantages [N] (= raw * phi), raw [N], phi [N], group_mean [P], group_std [P], diff [P],
        degenerate [P], group_index [N], unscorable [N]. float32 (float64 for float64 rewards).

    Example:
        >>> adv = hadw_advantages(torch.tensor([1., 0., 0., 0.]), group_size=4, anchor=0.5)
        >>> adv.phi   # hard group (mean 0.25 < 0.5): the correct answer is amplified, the wrong ones softened
        tensor([1.6692, 1.0124, 1.0124, 1.0124])
        >>> hadw_advantages(torch.tensor([1., 0., 0., 1.]), group_ids=torch.tensor([7, 7, 3, 3])).raw
        tensor([ 0.7071, -0.7071, -0.7071,  0.7071])
    """
    config = check_config(config)
    check_backend(backend, ADVANTAGE_BACKENDS)
    check_rewards(rewards, group_size, group_ids=group_ids)
    prior = resolve_anchor(anchor, config, rewards.device)
    dtype = compute_dtype(rewards if rewards.dtype.is_floating_point else None)
    args = (rewards, group_size, prior, config, dtype, group_ids)
    if backend == "triton" and dtype != torch.float64:
        return _run_triton("advantages", args)
    if backend == "auto" and rewards.device.type == "cuda" and dtype != torch.float64 and _triton_fn("advantages"):
        return _run_triton("advantages", args)
    return compute_advantages(*args)


def truncated_is_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    threshold: float | None = 2.0,
    level: str = "token",
) -> torch.Tensor:
    """[N, T] detached importance weights pi_old / pi_rollout for `hadw_policy_loss(rollout_is_weights=...)`, when
    the rollout engine's sampling log-probs (vLLM, SGLang) differ from the trainer's recomputed ones: token level
    exp(old - rollout), or sequence level exp(sum of the row's log-ratios), truncated from above at `threshold`
    (verl's truncated IS, TIS; None = no truncation); 0 at padding.

    Args:
        old_logprobs: [N, T] the trainer's log-probs of the sampled tokens under the sampling policy's weights.
        rollout_logprobs: [N, T] the rollout engine's log-probs of the same tokens.
        mask: [N, T] nonzero on response tokens.
    """
    check_token_inputs(dict(logprobs=old_logprobs, rollout_logprobs=rollout_logprobs, mask=mask),
                       float_names=("logprobs", "rollout_logprobs"))
    if level not in ("token", "sequence"):
        raise ValueError(f"level={level!r} is not valid; choose 'token' or 'sequence'")
    if threshold is not None and not (isinstance(threshold, (int, float)) and threshold > 0):
        raise ValueError(f"threshold must be a number > 0 or None, got {threshold!r}")
    weights = _truncated_is_weights(old_logprobs, rollout_logprobs, mask, threshold, level)
    raise_nonfinite(nonfinite_suspects(mask, weights), mask, dict(old_logprobs=old_logprobs,
                                                                  rollout_logprobs=rollout_logprobs))
    return weights


def loss_normalizer(mask: torch.Tensor, config: LossConfig | None = None) -> float:
    """This (micro-)batch's share of the aggregation denominator: its valid-token count for token-mean, else its
    number of rows with at least one valid token. Sum it over micro-batches (and all-reduce over ranks) and pass
    the total as `hadw_loss(..., normalizer=total)` or `hadw_policy_loss(..., normalizer=total)`.

    Args:
        mask: [N, T] nonzero on response tokens.
    """
    config = check_config(config)
    m = mask if mask.dtype == torch.bool else mask != 0
    if config.loss_agg == "token-mean":
        return float(m.sum())
    return float((m.sum(dim=1) > 0).sum())


class HADWLoss(nn.Module):
    """`hadw_loss` as a module holding its configuration (and optionally the anchor it reads).

    Example:
        >>> crit = HADWLoss(LossConfig.dapo(), group_size=8, anchor=DifficultyAnchor())
        >>> crit.anchor.step(rewards)
        >>> out = crit(logp, old_logp, rewards, mask)
    """

    def __init__(self, config: LossConfig | None = None, group_size: int = 8, anchor: DifficultyAnchor | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        self.config = check_config(config)
        self.group_size = check_group_size(group_size)
        self.anchor = anchor
        self.backend = check_backend(backend)

    def forward(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
                anchor: AnchorLike = None, ref_logprobs: torch.Tensor | None = None,
                normalizer: float | torch.Tensor | None = None) -> LossOutput:
        """Same arguments as `hadw_loss`; `anchor` defaults to the module's `DifficultyAnchor`."""
        return hadw_loss(logprobs, old_logprobs, rewards, mask, self.group_size,
                         anchor=self.anchor if anchor is None else anchor, config=self.config,
                         ref_logprobs=ref_logprobs, normalizer=normalizer, backend=self.backend)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, backend={self.backend!r}, config={self.config}"


__all__ = ["BACKENDS", "HADWLoss", "hadw_advantages", "hadw_loss", "hadw_policy_loss", "loss_normalizer",
           "truncated_is_weights"]
