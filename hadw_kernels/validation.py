"""Input validation shared by every public entry point: each check raises a `ValueError` (or `TypeError`) that names
the tensor and the problem. Data-dependent checks (which read values back to Python) step aside while torch.compile
traces a caller, so that it compiles without graph breaks; shape, dtype and device checks remain."""

from __future__ import annotations

import math
from typing import Any

import torch

from hadw_kernels.anchor import DifficultyAnchor
from hadw_kernels.config import LossConfig
from hadw_kernels.reference import active_anchor

BACKENDS = ("auto", "torch", "compiled", "triton", "native")
INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

AnchorLike = float | int | torch.Tensor | DifficultyAnchor | None


def compiling() -> bool:
    """True while torch.compile traces a caller (see the module docstring)."""
    return torch.compiler.is_compiling()


def check_config(config: Any) -> LossConfig:
    config = LossConfig() if config is None else config
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
    return config


def check_backend(backend: Any, choices: tuple[str, ...] = BACKENDS) -> str:
    if backend not in choices:
        raise ValueError(f"backend={backend!r} is not valid; choose one of {', '.join(map(repr, choices))}")
    return backend


def check_group_size(group_size: Any) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group-relative advantage needs at least two responses per "
                         f"prompt), got {group_size}")
    return group_size


def check_rewards(rewards: Any, group_size: int | None, n_rows: int | None = None,
                  group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """rewards [N]: real numbers; NaN means unscorable, +-Inf is an error. Groups from `group_size` (contiguous,
    equal) or `group_ids` ([N] integers, any order); exactly one of the two."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if n_rows is not None and rewards.shape[0] != n_rows:
        raise ValueError(f"rewards has {rewards.shape[0]} entries but logprobs has {n_rows} rows; expected rewards [N]")
    if rewards.numel() == 0:
        raise ValueError("empty batch: rewards has no entries")
    if not (rewards.dtype.is_floating_point or rewards.dtype in INT_DTYPES):
        raise ValueError(f"rewards must be real numbers, got dtype {rewards.dtype}")
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (contiguous groups of equal size) and group_ids "
                         f"([N] group id of each row), got group_size={group_size!r} and "
                         f"group_ids={'None' if group_ids is None else 'a tensor'}")
    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor):
            raise TypeError(f"group_ids must be a torch.Tensor of integers, got {type(group_ids).__name__}")
        if group_ids.dtype == torch.bool or group_ids.dtype.is_floating_point or group_ids.dtype.is_complex:
            raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
        if group_ids.shape != rewards.shape:
            raise ValueError(f"group_ids has shape {tuple(group_ids.shape)} but rewards has {tuple(rewards.shape)}; "
                             f"expected one group id per row, [N]")
        if group_ids.device != rewards.device:
            raise ValueError(f"group_ids is on {group_ids.device} but rewards is on {rewards.device}")
    elif rewards.shape[0] % check_group_size(group_size):
        raise ValueError(f"N = {rewards.shape[0]} rows is not divisible by group_size = {group_size}; rows of each "
                         f"prompt's group must be contiguous and complete (or pass group_ids)")
    if rewards.dtype.is_floating_point and not compiling():
        inf = int(torch.isinf(rewards).sum())
        if inf:
            raise ValueError(f"rewards has {inf} infinite value(s) out of {rewards.numel()} (NaN marks an unscorable "
                             f"response; +-Inf is not a reward)")
    return rewards


def _scalar(value: Any, name: str, device: torch.device, kind: str, positive: bool) -> torch.Tensor:
    """A validated scalar as a 0-d float64 tensor on `device` (a tensor, so that torch.compile does not recompile
    for every new value). Under torch.compile a tensor's value is not read back, so only its size is checked."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if compiling():
            return value.detach().reshape(()).to(device=device, dtype=torch.float64)
        value = float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be {'a finite number > 0' if positive else 'finite'}, got {value}")
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def resolve_anchor(anchor: AnchorLike, config: LossConfig, device: torch.device) -> torch.Tensor | None:
    """The prior C_t^- as a 0-d float64 tensor, or None where there is none or HA-DW is off (`active_anchor`)."""
    anchor = active_anchor(anchor, config)
    if anchor is None:
        return None
    if isinstance(anchor, DifficultyAnchor):
        if anchor.value is None:
            raise ValueError("anchor: the DifficultyAnchor has no prior yet; call anchor.step(batch_rewards) first")
        anchor = anchor.value
    return _scalar(anchor, "anchor", device, "a float, a DifficultyAnchor or None", positive=False)


def resolve_normalizer(normalizer: Any, device: torch.device) -> torch.Tensor | None:
    if normalizer is None:
        return None
    return _scalar(normalizer, "normalizer", device, "a positive number or None", positive=True)


def check_token_inputs(named: dict[str, torch.Tensor | None], float_names: tuple[str, ...]) -> None:
    """Tensors [N, T] beside `logprobs`: types, shapes, float dtypes (for `float_names`), the mask's dtype, one
    device. `named` maps names to tensors (None = not given); it must hold logprobs and mask; `advantages` may be
    [N] or [N, T] and `rewards` [N]."""
    named = {k: v for k, v in named.items() if v is not None}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    logprobs, mask = named["logprobs"], named["mask"]
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D [N, T], got shape {tuple(logprobs.shape)}")
    if logprobs.shape[0] == 0 or logprobs.shape[1] == 0:
        raise ValueError(f"empty batch: logprobs has shape {tuple(logprobs.shape)}; need N >= 1 rows and T >= 1 tokens")
    for name, t in named.items():
        if name in ("logprobs", "rewards"):
            continue
        if name == "advantages" and t.dim() == 1:
            if t.shape[0] != logprobs.shape[0]:
                raise ValueError(f"advantages has shape {tuple(t.shape)} but logprobs has {tuple(logprobs.shape)}; "
                                 f"expected [N] (one per row) or [N, T] (one per token)")
            continue
        if t.shape != logprobs.shape:
            expect = "[N] (one per row) or [N, T] (one per token)" if name == "advantages" else "[N, T]"
            raise ValueError(f"{name} has shape {tuple(t.shape)} but logprobs has {tuple(logprobs.shape)}; "
                             f"expected {expect}")
    for name in float_names:
        t = named.get(name)
        if t is not None and not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (mask.dtype.is_floating_point or mask.dtype in INT_DTYPES):
        raise ValueError(f"mask must be bool, integer or float, got dtype {mask.dtype}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        placed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {placed}")


def nonfinite_suspects(mask: torch.Tensor, *tensors: torch.Tensor | None) -> torch.Tensor:
    """[len(tensors)] bool, True where the masked sum of a tensor is not finite: it holds NaN/Inf at a valid position
    (or the sum overflowed, which `raise_nonfinite` then clears with an exact count). One add per element, fused
    into the loss's own pass over the data; an exact isfinite count beside it cost as much as the rest of the
    compiled loss. A [N] tensor (per-row advantages) counts on the rows with at least one valid token."""
    m = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=m.device)
    sums = []
    for t in tensors:
        if t is None:
            sums.append(zero)
        elif t.dim() == 1:
            sums.append(torch.where(m.any(dim=1), t, zero).sum().float())
        else:
            sums.append(torch.where(m, t, zero).sum(dim=1).sum().float())
    return ~torch.isfinite(torch.stack(sums))


def raise_nonfinite(suspects: torch.Tensor, mask: torch.Tensor, named: dict[str, torch.Tensor | None]) -> None:
    """Raise a ValueError naming every tensor of `named` (in the order the suspects were computed) that holds NaN/Inf
    at valid (mask=1) positions; padding may hold anything. Nothing is read back unless a suspect is set."""
    if compiling() or not bool(suspects.any()):
        return
    m = mask if mask.dtype == torch.bool else mask != 0
    bad = {}
    for name, t in named.items():
        if t is None:
            continue
        t = t.detach()
        valid = m.any(dim=1) if t.dim() == 1 else m
        count = int((~torch.isfinite(t) & valid).sum())
        if count:
            bad[name] = count
    if bad:
        raise ValueError("non-finite values at valid (mask=1) positions: "
                         + ", ".join(f"{n}: {b} NaN/Inf" for n, b in bad.items()))
