"""Data-parallel plumbing the loop needs, written for several processes from the start.

Under `torchrun` (WORLD_SIZE > 1) `init()` starts a process group (gloo on CPU, nccl on CUDA). Each rank keeps
its own slice of every global batch; gradients are *summed* over ranks after the micro-batch loop, because every
rank's loss is already divided by the global normaliser (so the sum is the whole batch's gradient, exactly).
`sum_gradients` is what backend `single` uses; `hadw_trainer.parallel` wraps the policy for the DDP / FSDP2 /
ZeRO backends, which reduce gradients themselves (also as a SUM).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init() -> bool:
    """Start the process group when launched by torchrun; returns True when one is running."""
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    tdist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    return True


def shutdown() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; identity on one process)."""
    if not is_initialized() or world_size() == 1:
        return t
    t = t.clone()
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if not is_initialized() or world_size() == 1:
        return t
    t = t.clone()
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def sum_gradients(model: torch.nn.Module) -> None:
    """Sum every parameter's gradient over ranks (one flat all-reduce)."""
    if not is_initialized() or world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_model(model: torch.nn.Module) -> None:
    """Rank 0's weights everywhere (so ranks start identical even if their initialisation differed)."""
    if not is_initialized() or world_size() == 1:
        return
    for p in model.parameters():
        tdist.broadcast(p.data, src=0)
