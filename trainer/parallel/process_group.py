"""The process group and the few collectives the trainer runs, written for several processes from the start.

Under `torchrun` (WORLD_SIZE > 1) `init()` starts a process group (gloo on CPU, nccl on CUDA). Each rank keeps
its own slice of every global batch. What crosses ranks, and why:
- `all_gather_rows`: each rank's rewards (and levels) once per step, so the anchor's y_t and the group-relative
  advantages are computed from the whole batch, identically on every rank;
- `all_reduce_sum`: the loss normaliser of each mini-batch, and the step's metrics (one call per step);
- `sum_gradients`: backend `single` sums gradients over ranks after the micro-batch loop (every rank's loss is
  already divided by the global normaliser, so the sum is the whole batch's gradient). The DDP / FSDP2 / ZeRO
  backends (`hadw_trainer.parallel.backends`) reduce gradients themselves, also as a SUM.
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


def init(timeout_s: int = 600) -> bool:
    """Start the process group when launched by torchrun; returns True when one is running. A collective that
    waits longer than `timeout_s` raises (naming the operation) instead of hanging."""
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    timeout = timedelta(seconds=timeout_s)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        # After a torchrun restart the agent's store still holds the previous attempt's keys (e.g. rank 0's old
        # gloo address): a rank reading one before it is rewritten connects to a dead port ("Connection refused"
        # in connectFullMesh, seen here one restart in two). A per-attempt prefix keeps the attempts apart.
        store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=timeout)
        tdist.init_process_group(backend=backend, store=tdist.PrefixStore(f"hadw_trainer/attempt_{restart}", store),
                                 rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                 timeout=timeout)
        return True
    tdist.init_process_group(backend=backend, timeout=timeout)
    return True


def shutdown() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        tdist.barrier()


def device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op: tdist.ReduceOp) -> torch.Tensor:
    if not is_initialized() or world_size() == 1:
        return t
    out = t.to(device(), copy=True)  # NCCL reduces CUDA tensors only; the result comes back where t was
    tdist.all_reduce(out, op=op)
    return out.to(t.device)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """[world * n, ...]: every rank's [n, ...] tensor, rank 0's rows first (`t` itself on one process). Every rank
    must pass the same shape."""
    if not is_initialized() or world_size() == 1:
        return t
    local = t.to(device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    tdist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; identity on one process)."""
    return _all_reduce(t, tdist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, tdist.ReduceOp.MAX)


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
