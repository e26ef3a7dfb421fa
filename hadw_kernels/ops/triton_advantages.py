"""HA-DW advantages with Triton, for a whole rollout batch: groups contiguous (`group_size`) or by `group_ids` in any
row order and of any size, NaN rewards unscorable, per-group / whole-batch / no scaling.

Layers (kernels in `_triton_advantage_kernels`):
- `group_layout`: where each group's rows are (torch ops: `torch.unique` for the ids, as the reference does, so that
  `group_index` is the same tensor; a stable argsort for the rows of each group);
- `_launch`: allocation and the launches (`_batch_std_kernel` first for adv_norm="batch_std", then
  `_group_advantages_kernel`); `batch_std_denominator` is also used by the fused loss;
- `group_advantages` (`torch.ops.hadw_kernels.group_advantages`): the custom op (no autograd: advantages are
  detached), with a fake implementation so `torch.compile` traces a caller;
- `compute_advantages`: what `hadw_kernels.hadw_advantages(backend="triton")` (and "auto" on CUDA) calls; same
  signature and result as `hadw_kernels.reference.compute_advantages`.
float64 rewards never reach a kernel (hadw_kernels.loss computes them with the reference).
"""

from __future__ import annotations

import torch
import triton

from hadw_kernels.config import LossConfig
from hadw_kernels.ops import _triton_advantage_kernels as K
from hadw_kernels.ops._config_json import config_from_json, config_to_json
from hadw_kernels.ops._triton_runtime import alloc, fix_interpreter, interpreting
from hadw_kernels.reference import Advantages, active_anchor

fix_interpreter()


def _rewards_arg(rewards: torch.Tensor) -> torch.Tensor:
    rewards = rewards.detach().contiguous()
    return rewards.view(torch.uint8) if rewards.dtype == torch.bool else rewards


def batch_std_denominator(rewards: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """[1] fp32: the std of the batch's scorable rewards (config.std_unbiased) + config.std_eps, one program."""
    out = alloc((1,), torch.float32, rewards.device)
    K._batch_std_kernel[(1,)](_rewards_arg(rewards), out, rewards.shape[0], float(config.std_eps),
                              STD_UNBIASED=config.std_unbiased, BLOCK=16 if interpreting() else 1024, num_warps=4)
    return out


def group_layout(rewards: torch.Tensor, group_size: int | None, group_ids: torch.Tensor | None):
    """(group_index [N] int64, order [N] int64 or None, starts [P + 1] int64 or None, P, largest group size).
    Contiguous groups need neither order nor starts. With group_ids the largest size is read back (one sync, beside
    the one torch.unique makes): it bounds the kernel's loop over a group's rows."""
    n_rows, device = rewards.shape[0], rewards.device
    if group_ids is None:
        return torch.arange(n_rows, device=device) // group_size, None, None, n_rows // group_size, group_size
    distinct, index = torch.unique(group_ids, return_inverse=True)
    counts = torch.bincount(index, minlength=distinct.numel())
    starts = torch.zeros(distinct.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, dim=0, out=starts[1:])
    order = torch.argsort(index, stable=True)
    return index, order, starts, distinct.numel(), int(counts.max())


def _blocks(max_size: int) -> tuple[int, int]:
    """(BLOCK_P groups per program, BLOCK_G rows per chunk). Interpreter: chunks of 4 rows, so that tests of groups
    of 5+ exercise the loop over a group's chunks. GPU: the whole group in one chunk up to 256 rows, ~1024 lanes per
    program (the advantages read N rewards: launch-bound at any real batch size)."""
    if interpreting():
        return 4, min(triton.next_power_of_2(max_size), 4)
    block_g = min(triton.next_power_of_2(max_size), 256)
    return max(1, 1024 // block_g), block_g


def _launch(rewards, order, starts, anchor, group_size: int, n_groups: int, max_size: int, config: LossConfig):
    n_rows, device = rewards.shape[0], rewards.device
    adv, raw, phi = (alloc((n_rows,), torch.float32, device) for _ in range(3))
    mean, std, diff = (alloc((n_groups,), torch.float32, device) for _ in range(3))
    degenerate = alloc((n_groups,), torch.bool, device)
    batch_denom = batch_std_denominator(rewards, config) if config.adv_norm == "batch_std" else mean
    block_p, block_g = _blocks(max_size)
    r = _rewards_arg(rewards)
    contiguous = order is None
    K._group_advantages_kernel[(triton.cdiv(n_groups, block_p),)](
        r, r if contiguous else order, r if contiguous else starts, anchor if anchor is not None else r, batch_denom,
        adv, raw, phi, mean, std, diff, degenerate.view(torch.uint8),
        n_groups, group_size, max_size,
        float(config.std_eps), float(config.lambda_scale),
        CONTIGUOUS=contiguous, ADV_NORM=K.ADV_NORMS[config.adv_norm], STD_UNBIASED=config.std_unbiased,
        HADW=anchor is not None, BLOCK_P=block_p, BLOCK_G=block_g, num_warps=4,
    )
    return adv, raw, phi, mean, std, diff, degenerate


@torch.library.custom_op("hadw_kernels::group_advantages", mutates_args=())
def group_advantages(
    rewards: torch.Tensor,
    order: torch.Tensor | None,
    starts: torch.Tensor | None,
    anchor: torch.Tensor | None,
    group_size: int,
    n_groups: int,
    max_size: int,
    config_json: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, raw, phi) [N] fp32 and (group_mean, group_std, diff) [P] fp32, degenerate [P] bool. Groups:
    contiguous of `group_size` (order / starts None), else rows order[starts[p]:starts[p + 1]] (`group_layout`).
    anchor: 0-d tensor (HA-DW on) or None (Phi = 1)."""
    return _launch(rewards, order, starts, anchor, group_size, n_groups, max_size, config_from_json(config_json))


@group_advantages.register_fake
def _(rewards, order, starts, anchor, group_size, n_groups, max_size, config_json):
    f32 = dict(dtype=torch.float32, device=rewards.device)
    rows = [rewards.new_empty(rewards.shape, **f32) for _ in range(3)]
    groups = [rewards.new_empty((n_groups,), **f32) for _ in range(3)]
    return (*rows, *groups, rewards.new_empty((n_groups,), dtype=torch.bool, device=rewards.device))


def compute_advantages(rewards: torch.Tensor, group_size: int | None, anchor: torch.Tensor | None, config: LossConfig,
                       dtype: torch.dtype | None = None, group_ids: torch.Tensor | None = None) -> Advantages:
    """`hadw_kernels.reference.compute_advantages` on the kernel: same arguments, same `Advantages` (fp32).

    Args:
        rewards: [N] any real dtype; NaN = unscorable.
        group_size: G for contiguous groups, or None with `group_ids` [N] (any integers, any order).
        anchor: 0-d tensor C_t^- or None; ignored when config.hadw is False.
        dtype: must be float32 or None (float64 is the reference's).
    """
    if dtype not in (None, torch.float32):
        raise ValueError(f"the Triton advantages compute in float32, got dtype={dtype} (float64 rewards are computed "
                         f"by the reference: hadw_advantages routes them there)")
    anchor = active_anchor(anchor, config)
    if anchor is not None:
        anchor = torch.as_tensor(anchor, dtype=torch.float64, device=rewards.device).reshape(())
    index, order, starts, n_groups, max_size = group_layout(rewards, group_size, group_ids)
    adv, raw, phi, mean, std, diff, degenerate = group_advantages(
        rewards, order, starts, anchor, group_size or 0, n_groups, max_size, config_to_json(config))
    unscorable = torch.isnan(rewards) if rewards.dtype.is_floating_point else torch.zeros_like(rewards,
                                                                                                dtype=torch.bool)
    return Advantages(advantages=adv, raw=raw, phi=phi, group_mean=mean, group_std=std, diff=diff,
                      degenerate=degenerate, group_index=index, unscorable=unscorable)
