"""Data-parallel backends behind one small interface: how the policy is wrapped, how gradients cross ranks, how
the optimizer steps, and each backend's own checkpoint format.

    par = Parallel.build(cfg, model)      # wraps model + AdamW for cfg.parallel.backend (every rank calls it)
    par.zero_grad()
    for i, micro in enumerate(micros):
        with par.accumulating(last=i == len(micros) - 1):
            par.backward(loss_of(par.model, micro))        # loss already divided by the *global* normaliser
    grad_norm = par.step(grad_clip)
    par.sync_rollout()                    # the full-weight module that generates sees the new weights

backend   wrapper                                  gradient reduction               checkpoint (sharded part)
single    none                                     `distributed.sum_gradients`      model.safetensors + optimizer.pt
ddp       torch DistributedDataParallel            DDP buckets, SUM comm hook       model.safetensors + optimizer.pt
fsdp2     torch.distributed.fsdp.fully_shard       reduce-scatter, divide factor 1  dcp/ (torch.distributed.checkpoint)
zero2/3   deepspeed.initialize (ZeRO stage 2 / 3)  DeepSpeed's, loss x world_size   zero/ (engine.save_checkpoint)

What every backend wraps is the `PolicyScorer` around the model (`hadw_trainer.logprobs`): its forward runs the
transformer body and the LM head's from-hidden log-probs / policy loss together, so the head runs inside the
wrapper's forward: DDP's reducer is prepared for its gradients, FSDP2 has the root's parameters (embeddings, head)
unsharded, and ZeRO-3 gathers the head's weight, registered as an external parameter of the scorer, in the forward
and again for the backward. The ZeRO checkpoints therefore hold the scorer's parameter names ("model.<HF name>");
every other format stores the HF model's own names.

Every rank's loss is divided by the normaliser summed over all ranks and micro-batches, so the right cross-rank
reduction is a SUM. DDP and FSDP2 are told so directly (a SUM comm hook; a gradient divide factor of 1);
DeepSpeed always averages over data-parallel ranks, so its backward runs on `loss * world_size` (a power of two
on usual world sizes: exact in floating point). The loss itself runs no collective.

Rollouts (HF `generate`) never run on sharded weights: a different number of decoding steps per rank would
desynchronise FSDP2's / ZeRO-3's parameter all-gathers and hang. For fsdp2 and zero3 a full-weight replica does
the generating and is refreshed from the gathered weights after every optimizer step (`sync_rollout`); the other
backends generate with the training module itself.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch

from hadw_trainer.config import JobConfig
from hadw_trainer.logprobs import PolicyScorer
from hadw_trainer.parallel import process_group as dist

DEEPSPEED_HINT = "parallel.backend=zero2/zero3 needs DeepSpeed: pip install 'hadw-kernels[train]' (deepspeed==0.19.8)"


def _sum_hook(_state, bucket):  # no annotations: DDP checks them; `from __future__` makes strings
    """DDP comm hook: all-reduce SUM (DDP's default divides by world size; our loss is already globally normalised)."""
    fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _import_deepspeed() -> Any:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(DEEPSPEED_HINT) from e
    return deepspeed


class Parallel:
    """The training-side view of the policy for one backend (see the module docstring)."""

    def __init__(self, backend: str, model: torch.nn.Module, module: torch.nn.Module, optimizer: Any,
                 rollout_module: torch.nn.Module) -> None:
        self.backend = backend
        self.model = model
        """What training forwards run through: the `PolicyScorer` of the policy, or its DDP wrapper, FSDP2-sharded
        self or DeepSpeed engine (called as in `hadw_trainer.logprobs`)."""
        self.module = module
        """The underlying transformers model (sharded for fsdp2 / zero3)."""
        self.optimizer = optimizer
        """The optimizer whose `param_groups` the loop sets the learning rate on."""
        self.rollout_module = rollout_module
        """A full-weight model for generation, evaluation and export (a synced replica for fsdp2 / zero3)."""
        self.world = dist.world_size()

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: JobConfig, model: torch.nn.Module) -> Parallel:
        """Wrap `model` (already identical on every rank) and build AdamW for `cfg.parallel.backend`."""
        backend, o = cfg.parallel.backend, cfg.optim
        adam = dict(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        scorer = PolicyScorer(model)
        if backend == "single":
            return cls(backend, scorer, model, torch.optim.AdamW(model.parameters(), **adam), model)
        if backend == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
            ddp = DistributedDataParallel(scorer, device_ids=ids)
            ddp.register_comm_hook(None, _sum_hook)
            return cls(backend, ddp, model, torch.optim.AdamW(ddp.parameters(), **adam), model)
        replica = copy.deepcopy(model) if backend in ("fsdp2", "zero3") else model
        if backend == "fsdp2":
            from torch.distributed.fsdp import FSDPModule, fully_shard

            for layer in model.base_model.layers:  # one all-gather per decoder block; embeddings/head in the root
                fully_shard(layer)
            fully_shard(scorer)  # the root: its forward (body + head) is where the root's parameters are unsharded
            for m in scorer.modules():  # each fully_shard call has its own setting
                if isinstance(m, FSDPModule):
                    m.set_gradient_divide_factor(1.0)  # SUM over ranks (see the module docstring), as a plain
                    m.set_force_sum_reduction_for_comms(True)  # SUM collective: gloo has no PREMUL_SUM / AVG
            return cls(backend, scorer, model, torch.optim.AdamW(model.parameters(), **adam), replica)
        deepspeed = _import_deepspeed()
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        a, world = cfg.algo, dist.world_size()
        micro_rows = a.micro_batch_prompts * cfg.rollout.group_size
        zero: dict[str, Any] = {"stage": 2 if backend == "zero2" else 3}
        if cfg.parallel.offload:
            zero["offload_optimizer"] = {"device": "cpu"}
            if backend == "zero3":
                zero["offload_param"] = {"device": "cpu"}
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_rows,
            "gradient_accumulation_steps": a.mini_batch_prompts // world // a.micro_batch_prompts,
            "gradient_clipping": o.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
            "fp16": {"enabled": cfg.model.dtype == "float16"},
            # torch's AdamW on the (offloaded) fp32 master weights: no DeepSpeed C++ optimizer to build
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
        }
        adamw = torch.optim.AdamW(model.parameters(), **adam)
        engine, optimizer, _, _ = deepspeed.initialize(model=scorer, optimizer=adamw, config=ds_config)
        if backend == "zero3":
            # the scorer's forward reads the head's weight without calling the head (`hadw_kernels` takes the
            # weight): registered, ZeRO-3 gathers it around the scorer's forward and again before its backward
            deepspeed.zero.register_external_parameter(scorer, scorer.head_weight())
        return cls(backend, engine, model, optimizer, replica)

    # -- one optimizer step ---------------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        if self.backend.startswith("zero"):
            self.model.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Context of one micro-batch's forward + backward: DDP communicates only on the last one."""
        if self.backend == "ddp" and not last:
            with self.model.no_sync():
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.backend.startswith("zero"):
            # DeepSpeed averages over ranks: undo it. Its own 1/GAS scaling is off (our normaliser covers the
            # micro-batches); engine.step() only steps the optimizer at the accumulation boundary.
            self.model.backward(loss * self.world, scale_wrt_gas=False)
            self.model.step()
        else:
            loss.backward()

    def step(self, grad_clip: float) -> float:
        """Reduce (single), clip and step; returns the global gradient norm before clipping."""
        if self.backend.startswith("zero"):
            norm = self.model.get_global_grad_norm()  # the step ran at the boundary of backward()
            return float(norm) if norm is not None else float("nan")
        if self.backend == "single":
            dist.sum_gradients(self.module)
        params = [p for p in self.module.parameters() if p.grad is not None]
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        self.optimizer.step()
        return float(norm)

    # -- full weights ---------------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, unsharded, on every rank (a collective for fsdp2 / zero3)."""
        if self.backend == "fsdp2":
            return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
                    for k, v in self.module.state_dict().items()}
        if self.backend == "zero3":
            deepspeed = _import_deepspeed()
            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def sync_rollout(self) -> None:
        """Copy the trained weights into the generation replica (fsdp2 / zero3; a no-op otherwise)."""
        if self.rollout_module is self.module:
            return
        with torch.no_grad():
            self.rollout_module.load_state_dict(self.full_state_dict())

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save(self, path: str) -> list[str]:
        """Write the backend's weights + optimizer state into `path` (collective). Returns the names written."""
        if self.backend == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(self.module, self.optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(path, "dcp"))
            return ["dcp"]
        if self.backend.startswith("zero"):
            self.model.save_checkpoint(path, tag="zero", save_latest=False)
            return ["zero"]
        if dist.is_main():
            from safetensors.torch import save_file

            tensors = {k: v.contiguous().cpu() for k, v in self.full_state_dict().items()}
            seen: dict[int, str] = {}  # tied weights share storage; safetensors wants each stored once
            for k, v in list(tensors.items()):
                ptr = v.untyped_storage().data_ptr()
                if ptr in seen:
                    tensors[k] = v.clone()
                seen.setdefault(ptr, k)
            save_file(tensors, os.path.join(path, "model.safetensors"))
            torch.save(self.optimizer.state_dict(), os.path.join(path, "optimizer.pt"))
        return ["model.safetensors", "optimizer.pt"]

    def load(self, path: str) -> None:
        """Restore what `save` wrote (collective), then refresh the generation replica."""
        if self.backend == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            msd, osd = get_state_dict(self.module, self.optimizer)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=os.path.join(path, "dcp"))
            set_state_dict(self.module, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        elif self.backend.startswith("zero"):
            loaded, _ = self.model.load_checkpoint(path, tag="zero", load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
            if loaded is None:
                from hadw_trainer.parallel.checkpoint import CheckpointError

                raise CheckpointError(f"DeepSpeed could not load {path}/zero")
        else:
            from hadw_trainer.parallel.checkpoint import load_weights

            load_weights(path, self.module)
            self.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
        self.sync_rollout()
