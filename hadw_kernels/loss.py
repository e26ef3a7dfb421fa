"""Public entry points: `hadw_loss` (validate, dispatch), `hadw_advantages`, `loss_normalizer`, `HADWLoss`.

Backends:
- "torch": the eager reference (`hadw_kernels.reference`).
- "compiled": `torch.compile` of the same reference (CPU: C++ codegen; at 1M tokens fwd+bwd 5.5-6.9x faster than
  the eager reference and 3.3-4.5x faster than a plain eager implementation, bench/RESULTS.md; ~8 MB peak memory).
- "triton": the fused Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
- "auto" (default): Triton for CUDA tensors when triton imports, else the compiled reference, falling back to
  eager (with one warning) where compilation fails. HADW_KERNELS_NO_COMPILE=1 turns compilation off.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any

import torch
from torch import nn

from hadw_kernels.anchor import DifficultyAnchor
from hadw_kernels.config import LossConfig
from hadw_kernels.reference import Advantages, LossOutput, compute_advantages, compute_dtype, loss_terms

BACKENDS = ("auto", "torch", "compiled", "triton")
_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

AnchorLike = float | int | torch.Tensor | DifficultyAnchor | None


# -- validation ---------------------------------------------------------------------------------------------------
def _check_group_size(group_size: Any) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group-relative advantage needs at least two responses per "
                         f"prompt), got {group_size}")
    return group_size


def _check_rewards(rewards: Any, group_size: int, n_rows: int | None = None) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if n_rows is not None and rewards.shape[0] != n_rows:
        raise ValueError(f"rewards has {rewards.shape[0]} entries but logprobs has {n_rows} rows; expected rewards [N]")
    if rewards.numel() == 0:
        raise ValueError("empty batch: rewards has no entries")
    if not (rewards.dtype.is_floating_point or rewards.dtype in _INT_DTYPES):
        raise ValueError(f"rewards must be real numbers, got dtype {rewards.dtype}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"N = {rewards.shape[0]} rows is not divisible by group_size = {group_size}; rows of each "
                         f"prompt's group must be contiguous and complete")
    if rewards.dtype.is_floating_point and not _compiling():
        bad = int((~torch.isfinite(rewards)).sum())
        if bad:
            raise ValueError(f"rewards has {bad} non-finite value(s) (NaN or Inf) out of {rewards.numel()}")
    return rewards


def _compiling() -> bool:
    """True while torch.compile traces a caller: data-dependent checks (which read values back to Python) are
    skipped there so that the caller compiles without graph breaks; shape, dtype and device checks remain."""
    return torch.compiler.is_compiling()


def _scalar(value: Any, name: str, device: torch.device, kind: str, positive: bool) -> torch.Tensor:
    """A validated scalar as a 0-d float64 tensor on `device` (a tensor, so that torch.compile does not recompile
    for every new value). Under torch.compile a tensor's value is not read back, so only its size is checked."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if _compiling():
            return value.detach().reshape(()).to(device=device, dtype=torch.float64)
        value = float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be {'a finite number > 0' if positive else 'finite'}, got {value}")
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _resolve_anchor(anchor: AnchorLike, device: torch.device) -> torch.Tensor | None:
    """The prior C_t^- as a 0-d float64 tensor, or None."""
    if anchor is None:
        return None
    if isinstance(anchor, DifficultyAnchor):
        if anchor.value is None:
            raise ValueError("anchor: the DifficultyAnchor has no prior yet; call anchor.step(batch_rewards) first")
        anchor = anchor.value
    return _scalar(anchor, "anchor", device, "a float, a DifficultyAnchor or None", positive=False)


def _resolve_normalizer(normalizer: Any, device: torch.device) -> torch.Tensor | None:
    if normalizer is None:
        return None
    return _scalar(normalizer, "normalizer", device, "a positive number or None", positive=True)


def _check_inputs(logprobs, old_logprobs, rewards, mask, group_size, ref_logprobs) -> None:
    named = {"logprobs": logprobs, "old_logprobs": old_logprobs, "mask": mask, "rewards": rewards}
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D [N, T], got shape {tuple(logprobs.shape)}")
    if logprobs.shape[0] == 0 or logprobs.shape[1] == 0:
        raise ValueError(f"empty batch: logprobs has shape {tuple(logprobs.shape)}; need N >= 1 rows and T >= 1 tokens")
    for name in ("old_logprobs", "mask", "ref_logprobs"):
        t = named.get(name)
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but logprobs has {tuple(logprobs.shape)}; "
                             f"they must match [N, T]")
    for name in ("logprobs", "old_logprobs", "ref_logprobs"):
        t = named.get(name)
        if t is not None and not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (mask.dtype.is_floating_point or mask.dtype in _INT_DTYPES):
        raise ValueError(f"mask must be bool, integer or float, got dtype {mask.dtype}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        placed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {placed}")
    _check_rewards(rewards, group_size, logprobs.shape[0])


def _nonfinite_suspects(mask: torch.Tensor, *tensors: torch.Tensor | None) -> torch.Tensor:
    """[3] bool, True where the masked sum of a tensor is not finite: it holds NaN/Inf at a valid position (or the
    sum overflowed, which the exact count in `hadw_loss` then clears). One add per element, fused into the loss's
    own pass over the data; an exact isfinite count beside it cost as much as the rest of the compiled loss."""
    m = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=m.device)
    sums = [torch.where(m, t, zero).sum(dim=1).sum().float() if t is not None else zero for t in tensors]
    return ~torch.isfinite(torch.stack(sums))


def _nonfinite_counts(mask: torch.Tensor, *tensors: torch.Tensor | None) -> list[int]:
    """Exact number of NaN/Inf values at valid (masked-in) positions of each tensor; padding may hold anything."""
    m = mask if mask.dtype == torch.bool else mask != 0
    return [int((~torch.isfinite(t) & m).sum()) if t is not None else 0 for t in tensors]


def _terms_and_checks(logprobs, old_logprobs, rewards, mask, group_size, anchor, config, ref_logprobs, normalizer):
    """(loss, advantages, phi, metrics), suspects [3]: what every backend returns (suspects nonzero where
    logprobs / old_logprobs / ref_logprobs may hold NaN/Inf at valid positions)."""
    out = loss_terms(logprobs, old_logprobs, rewards, mask, group_size, anchor, config, ref_logprobs, normalizer)
    return out, _nonfinite_suspects(mask, logprobs, old_logprobs, ref_logprobs)


# -- backends -----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _compiled_fn():
    return torch.compile(_terms_and_checks, dynamic=None)


_COMPILE_FAILED: list[str] = []


def _compile_disabled() -> bool:
    return os.environ.get("HADW_KERNELS_NO_COMPILE", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    """Whether the kernel module (and so triton) imports."""
    try:
        from hadw_kernels.ops import triton_loss  # noqa: F401
    except ImportError:
        return False
    return True


def _run_triton(*args):
    try:
        from hadw_kernels.ops import triton_loss
    except ImportError as e:
        raise RuntimeError(
            "backend='triton' needs the Triton kernel module and triton itself: pip install 'hadw-kernels[triton]'"
        ) from e
    return triton_loss.loss_terms_with_checks(*args)


def _dispatch(backend: str, device: torch.device, args: tuple):
    if _compiling():  # inside a caller's torch.compile: its compiler handles the reference, the kernel is an op
        use_triton = backend == "triton" or (backend == "auto" and device.type == "cuda" and _triton_available())
        return _run_triton(*args) if use_triton else _terms_and_checks(*args)
    if backend == "torch":
        return _terms_and_checks(*args)
    if backend == "triton":
        return _run_triton(*args)
    if backend == "compiled":
        return _compiled_fn()(*args)
    # auto
    if device.type == "cuda" and _triton_available():
        return _run_triton(*args)
    if _compile_disabled() or _COMPILE_FAILED:
        return _terms_and_checks(*args)
    try:
        return _compiled_fn()(*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the (identical) eager reference
        _COMPILE_FAILED.append(repr(e))
        warnings.warn(f"hadw_loss: torch.compile failed ({type(e).__name__}: {e}); using the eager reference from now "
                      f"on. Set HADW_KERNELS_NO_COMPILE=1 to skip the attempt.", RuntimeWarning, stacklevel=3)
        return _terms_and_checks(*args)


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
    """HA-DW reweighted clipped policy loss (GRPO / DAPO / GSPO / Dr. GRPO), with its metrics.

    Args:
        logprobs: [N, T] response-token log-probs under the policy being trained (requires grad), any float dtype.
        old_logprobs: [N, T] log-probs under the sampling (behaviour) policy; not differentiated.
        rewards: [N] scalar rewards (binary or any real), N = P * group_size, each prompt's rows contiguous.
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
        backend: 'auto' | 'torch' | 'compiled' | 'triton' (module docstring).

    Returns:
        `LossOutput`: loss (0-d fp32, fp64 for fp64 inputs), advantages [N], phi [N], metrics (detached 0-d).

    Example:
        >>> cfg = LossConfig.grpo()
        >>> prior = anchor.step(rewards)              # once per rollout batch
        >>> out = hadw_loss(logp, old_logp, rewards, mask, group_size=8, anchor=prior, config=cfg)
        >>> out.loss.backward()
    """
    config = LossConfig() if config is None else config
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; choose one of {', '.join(map(repr, BACKENDS))}")
    group_size = _check_group_size(group_size)
    _check_inputs(logprobs, old_logprobs, rewards, mask, group_size, ref_logprobs)
    device = logprobs.device
    prior = _resolve_anchor(anchor, device) if config.hadw else None
    norm = _resolve_normalizer(normalizer, device)

    args = (logprobs, old_logprobs, rewards, mask, group_size, prior, config, ref_logprobs, norm)
    (loss, advantages, phi, metrics), suspects = _dispatch(backend, device, args)
    if not _compiling() and bool(suspects.any()):
        bad = _nonfinite_counts(mask, logprobs.detach(), old_logprobs, ref_logprobs)
        if any(bad):
            names = ("logprobs", "old_logprobs", "ref_logprobs")
            raise ValueError("non-finite values at valid (mask=1) positions: "
                             + ", ".join(f"{n}: {b} NaN/Inf" for n, b in zip(names, bad, strict=True) if b))
    return LossOutput(loss=loss, advantages=advantages, phi=phi, metrics=metrics)


def hadw_advantages(
    rewards: torch.Tensor,
    group_size: int,
    anchor: AnchorLike = None,
    config: LossConfig | None = None,
) -> Advantages:
    """HA-DW reweighted group-relative advantages, without the policy loss (e.g. as a custom advantage estimator).

    Args:
        rewards: [N], N = P * group_size, rows of a group contiguous.
        anchor: prior C_t^- (float, `DifficultyAnchor`, or None for Phi = 1).
        config: uses adv_norm, std_unbiased, std_eps, hadw, lambda_scale (default `LossConfig.grpo()`).

    Returns:
        `Advantages` with advantages [N] (= raw * phi), raw [N], phi [N], group_mean [P], group_std [P], diff [P],
        degenerate [P]. float32 (float64 for float64 rewards).

    Example:
        >>> adv = hadw_advantages(torch.tensor([1., 0., 0., 0.]), group_size=4, anchor=0.5)
        >>> adv.phi   # hard group (mean 0.25 < 0.5): the correct answer is amplified, the wrong ones softened
        tensor([1.6692, 1.0124, 1.0124, 1.0124])
    """
    config = LossConfig() if config is None else config
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
    group_size = _check_group_size(group_size)
    _check_rewards(rewards, group_size)
    prior = _resolve_anchor(anchor, rewards.device) if config.hadw else None
    dtype = compute_dtype(rewards if rewards.dtype.is_floating_point else None)
    return compute_advantages(rewards, group_size, prior, config, dtype)


def loss_normalizer(mask: torch.Tensor, config: LossConfig | None = None) -> float:
    """This (micro-)batch's share of the aggregation denominator: its valid-token count for token-mean, else its
    number of rows with at least one valid token. Sum it over micro-batches (and all-reduce over ranks) and pass
    the total as `hadw_loss(..., normalizer=total)`.

    Args:
        mask: [N, T] nonzero on response tokens.
    """
    config = LossConfig() if config is None else config
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
        self.config = LossConfig() if config is None else config
        self.group_size = _check_group_size(group_size)
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not valid; choose one of {', '.join(map(repr, BACKENDS))}")
        self.anchor = anchor
        self.backend = backend

    def forward(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
                anchor: AnchorLike = None, ref_logprobs: torch.Tensor | None = None,
                normalizer: float | torch.Tensor | None = None) -> LossOutput:
        """Same arguments as `hadw_loss`; `anchor` defaults to the module's `DifficultyAnchor`."""
        return hadw_loss(logprobs, old_logprobs, rewards, mask, self.group_size,
                         anchor=self.anchor if anchor is None else anchor, config=self.config,
                         ref_logprobs=ref_logprobs, normalizer=normalizer, backend=self.backend)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, backend={self.backend!r}, config={self.config}"
