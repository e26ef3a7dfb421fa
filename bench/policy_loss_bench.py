"""Benchmark of `hadw_policy_loss`, the loss on precomputed advantages that the verl and TRL integrations call:
inputs, providers and bytes for `bench.harness` (`python -m bench --op policy_loss`).

Inputs: the batch of `bench.hadw_loss_bench.make_inputs`, its HA-DW advantages [N] computed once outside the timed
region (as a trainer does per rollout batch), and rollout importance weights [N, T] = exp(0.05 * noise) truncated at
2 (verl's TIS), the variant a run with vLLM rollouts uses.

Providers: `reference` (backend="torch", the eager reference), `compiled` (torch.compile of it, the CPU path
without the native kernel), `native` (the C++ CPU kernel, the default CPU path where it is built), `triton` (the
kernel; CUDA only).

Bytes: fwd reads logprobs, old_logprobs, mask, the IS weights (and ref_logprobs) per token and the advantages per
row; bwd reads the same again and writes the gradient; full = fwd + bwd.
"""

from __future__ import annotations

import torch

from bench.hadw_loss_bench import DEFAULT_SHAPES, Inputs, _native_available, _triton_available
from bench.hadw_loss_bench import describe as _describe_batch
from bench.hadw_loss_bench import make_inputs as _make_batch
from bench.harness import Provider, always
from hadw_kernels import hadw_advantages, hadw_policy_loss

NAME = "policy_loss"
PROVIDERS = ("reference", "compiled", "native", "triton")
BASELINES = ("reference", "compiled")
__all__ = ["DEFAULT_SHAPES", "NAME", "make_inputs", "providers", "leaves", "bytes_moved", "describe"]


def make_inputs(n: int, t: int, g: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                preset: str = "grpo", kl: bool = False, mask: str = "bool", seed: int = 0) -> Inputs:
    inp = _make_batch(n, t, g, dtype=dtype, device=device, preset=preset, kl=kl, mask=mask, seed=seed)
    inp.config = inp.config.replace(rollout_is_threshold=2.0)
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(n, t, generator=gen).to(inp.logprobs.device)
    inp.extra["advantages"] = hadw_advantages(inp.rewards, g, anchor=inp.anchor, config=inp.config).advantages
    inp.extra["weights"] = torch.exp(0.05 * noise) * (inp.mask != 0)
    return inp


def _library(backend: str):
    def run(inp: Inputs) -> torch.Tensor:
        return hadw_policy_loss(inp.logprobs, inp.old_logprobs, inp.extra["advantages"], inp.mask, config=inp.config,
                                ref_logprobs=inp.ref_logprobs, rollout_is_weights=inp.extra["weights"],
                                backend=backend).loss

    return run


def providers() -> dict[str, Provider]:
    return {
        "reference": Provider("reference", _library("torch"), always),
        "compiled": Provider("compiled", _library("compiled"), always, compiles=True),
        "native": Provider("native", _library("native"), _native_available),
        "triton": Provider("triton", _library("triton"), _triton_available, compiles=True),
    }


def bytes_moved(inp: Inputs, mode: str, provider: str = "reference") -> int:
    """Bytes a perfect fused implementation reads and writes (module docstring)."""
    n, t = inp.logprobs.shape
    tok_in = (inp.logprobs.element_size() + inp.old_logprobs.element_size() + inp.mask.element_size()
              + inp.extra["weights"].element_size())
    if inp.ref_logprobs is not None:
        tok_in += inp.ref_logprobs.element_size()
    adv = n * inp.extra["advantages"].element_size()
    fwd = n * t * tok_in + adv
    bwd = n * t * tok_in + adv + n * t * inp.logprobs.element_size()
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def leaves(inp: Inputs, provider: str) -> list[torch.Tensor]:
    return [inp.logprobs]


def describe(inp: Inputs) -> dict:
    out = _describe_batch(inp)
    out["summary"] += " +IS weights (TIS 2.0), advantages precomputed [N]"
    return out
