"""The `hadw_loss` op for the benchmark harness (`bench.harness`): inputs, the naive baseline, providers, bytes.

Providers (each returns the 0-d loss of one call; `Provider.available` says why one cannot run here):

- `naive`: the eager PyTorch a user writes from the paper's pseudo-code, vectorised the way verl's and TRL's own
  code is (group stats on an [P, G] view, one elementwise expression per line, verl's `agg_loss`). The baseline.
- `naive_compiled`: `torch.compile(naive)`, what a user gets by compiling that code (a yardstick for `compiled`).
- `reference`: `hadw_loss(..., backend="torch")`, the package's eager reference (it computes every metric and the
  finiteness checks on top of the loss, so it does more than `naive`).
- `compiled`: `hadw_loss(..., backend="compiled")`, torch.compile of the reference (the CPU fallback of "auto").
- `native`: `hadw_loss(..., backend="native")`, the fused C++ CPU kernel (the default CPU path where it is built).
- `triton`: `hadw_loss(..., backend="triton")`, the fused kernel (CUDA only; the interpreter is not timed).
- `liger`: Liger-Kernel's `triton_grpo_loss` (CUDA, where `liger_kernel` installs). It reads logits [N, T+1, V] and
  does a log-softmax over V, takes precomputed advantages (no group statistics, no HA-DW) and returns a per-token
  loss: its bytes are counted from its own tensors, so compare its GB/s and memory, not its time, with ours.

Modes: `fwd` (forward with autograd recording), `bwd` (backward only, of a forward recorded before each rep, untimed),
`full` (forward + backward). Bytes are what a perfect fused implementation must read and write: fwd reads
logprobs, old_logprobs, mask, rewards (and ref_logprobs) and writes advantages, phi and the scalars; bwd reads
the same per-token inputs again (recompute) and writes the gradient; full = fwd + bwd (two passes, as autograd
splits them).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.harness import DTYPES, MODES, Provider, always
from hadw_kernels import LossConfig, hadw_loss

NAME = "hadw_loss"
PROVIDERS = ("naive", "naive_compiled", "reference", "compiled", "native", "triton", "liger")
BASELINES = ("naive", "reference", "compiled")
MASKS = {"bool": torch.bool, "float": torch.float32}
# ~1M tokens on CPU (the size for the naive comparison: ~20-30 ms per eager fwd+bwd on 2 cores), 16.8M on
# a GPU (the kernel's targets are set at >= 16M tokens).
DEFAULT_SHAPES = {"cpu": (2048, 512, 8), "cuda": (16384, 1024, 8)}
__all__ = ["DTYPES", "MODES", "NAME", "make_inputs", "providers", "leaves", "bytes_moved", "describe"]


# -- inputs -------------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """One batch, built once and shared by every provider, mode, and by the speed and memory runs."""

    logprobs: torch.Tensor  # [N, T] leaf, requires grad
    old_logprobs: torch.Tensor  # [N, T]
    rewards: torch.Tensor  # [N] fp32, 0/1
    mask: torch.Tensor  # [N, T] bool or float 0/1 (verl's and TRL's), a prefix of random length >= 1 per row
    group_size: int
    anchor: float
    config: LossConfig
    preset: str
    ref_logprobs: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # per-provider inputs built lazily (liger's logits)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.logprobs.shape, self.group_size)


def make_inputs(n: int, t: int, g: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                preset: str = "grpo", kl: bool = False, mask: str = "bool", seed: int = 0) -> Inputs:
    """Realistic RL batch: response lengths uniform in [1, T], old policy a small perturbation of the new one (so
    a few percent of tokens are clipped), binary rewards with a per-prompt success rate, anchor 0.4. `mask`:
    "bool" or "float" (the dtype of the [N, T] mask)."""
    if n % g:
        raise ValueError(f"N={n} is not divisible by G={g}")
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=gen) * 3.0
    old = logp + 0.1 * torch.randn(n, t, generator=gen)
    p = torch.rand(n // g, 1, generator=gen).expand(-1, g).reshape(-1)
    rewards = (torch.rand(n, generator=gen) < p).float()
    lengths = torch.randint(1, t + 1, (n, 1), generator=gen)
    valid = torch.arange(t)[None, :] < lengths
    ref = (logp + 0.05 * torch.randn(n, t, generator=gen)) if kl else None
    config = LossConfig.preset(preset, **({"kl_coef": 0.01} if kl else {}))
    dev = torch.device(device)
    inp = Inputs(
        logprobs=logp.to(dev, dtype).requires_grad_(True),
        old_logprobs=old.to(dev, dtype),
        rewards=rewards.to(dev),
        mask=valid.to(dev, MASKS[mask]),
        group_size=g,
        anchor=0.4,
        config=config,
        preset=preset,
        ref_logprobs=None if ref is None else ref.to(dev, dtype),
    )
    return inp


# -- the naive baseline -------------------------------------------------------------------------------------------
def naive_hadw_loss(logprobs, old_logprobs, rewards, mask, group_size, anchor, cfg: LossConfig, ref_logprobs=None):
    """HA-DW + GRPO/DAPO/GSPO loss as written from the paper's pseudo-code in the style of verl / TRL: eager,
    vectorised, no fusion. Returns (loss, metrics). Supports every preset; no normalizer (one call = one batch).
    """
    logprobs = logprobs.float()
    old_logprobs = old_logprobs.float()
    mask = mask.float()

    # Group-relative advantage (paper eq. 3; verl compute_grpo_outcome_advantage, vectorised).
    scores = rewards.float().view(-1, group_size)
    mean = scores.mean(dim=1, keepdim=True)
    adv = scores - mean
    if cfg.adv_norm == "group_std":
        adv = adv / (scores.std(dim=1, keepdim=True, correction=int(cfg.std_unbiased)) + cfg.std_eps)
    # HA-DW (paper eqs. 13-16): Phi = lambda * exp(D * M), D = -sgn(A) sgn(p_hat - C), M = |p_hat - C|.
    if cfg.hadw:
        diff = mean - anchor
        phi = cfg.lambda_scale * torch.exp(-torch.sign(adv) * torch.sign(diff) * diff.abs())
        adv = adv * phi
    adv = adv.view(-1, 1)

    # Clipped surrogate (verl compute_policy_loss_vanilla / TRL _compute_loss).
    log_ratio = logprobs - old_logprobs
    if cfg.ratio_level == "sequence":  # GSPO: length-normalised sequence log-ratio
        log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)).expand_as(logprobs)
    log_ratio = torch.clamp(log_ratio, min=-cfg.log_ratio_clamp, max=cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    if cfg.clip_ratio_c is not None:
        pg_losses = torch.where(adv < 0, torch.minimum(pg_losses, -adv * cfg.clip_ratio_c), pg_losses)
    if ref_logprobs is not None and cfg.kl_coef:
        delta = torch.clamp(ref_logprobs.float() - logprobs, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
        pg_losses = pg_losses + cfg.kl_coef * (torch.exp(delta) - delta - 1)  # k3

    # verl agg_loss.
    if cfg.loss_agg == "token-mean":
        loss = (pg_losses * mask).sum() / mask.sum()
    elif cfg.loss_agg == "seq-mean-token-mean":
        loss = ((pg_losses * mask).sum(-1) / mask.sum(-1)).mean()
    elif cfg.loss_agg == "seq-mean-token-sum":
        loss = (pg_losses * mask).sum(-1).mean()
    else:  # seq-mean-token-sum-norm
        loss = (pg_losses * mask).sum() / (mask.shape[0] * (cfg.norm_len or mask.shape[1]))

    with torch.no_grad():  # the metrics verl logs
        n = mask.sum()
        metrics = {
            "clipfrac": ((pg_losses2 > pg_losses1).float() * mask).sum() / n,
            "approx_kl": (-log_ratio * mask).sum() / n,
        }
    return loss, metrics


# -- providers ----------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "CUDA only (the CPU interpreter is not timed)"
    if _interpreting():
        return "TRITON_INTERPRET=1 is set: set TRITON_INTERPRET=0 to time the compiled kernel"
    try:
        importlib.import_module("triton")
        importlib.import_module("hadw_kernels.ops.triton_loss")
    except ImportError as e:
        return f"not importable ({e})"
    return None


def _native_available(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "CPU only"
    from hadw_kernels.ops import cpu_loss

    return cpu_loss.unavailable_reason()


def _liger_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "CUDA only"
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: F401
    except ImportError as e:
        return f"liger_kernel not installed ({e})"
    return None


def _library(backend: str) -> Callable[[Inputs], torch.Tensor]:
    def run(inp: Inputs) -> torch.Tensor:
        return hadw_loss(inp.logprobs, inp.old_logprobs, inp.rewards, inp.mask, inp.group_size, anchor=inp.anchor,
                         config=inp.config, ref_logprobs=inp.ref_logprobs, backend=backend).loss

    return run


def _naive(inp: Inputs) -> torch.Tensor:
    return naive_hadw_loss(inp.logprobs, inp.old_logprobs, inp.rewards, inp.mask, inp.group_size, inp.anchor,
                           inp.config, inp.ref_logprobs)[0]


LIGER_VOCAB = 128  # Liger reads logits [N, T+1, V]; a small V keeps it near our work (see liger_inputs).


def liger_inputs(inp: Inputs, vocab: int = LIGER_VOCAB) -> dict:
    """Random logits [N, T+1, V] and token ids (Liger computes the log-probs itself, so they differ from
    `inp.logprobs`), the same old log-probs and mask, and the HA-DW advantages computed once outside (Liger takes
    advantages as an input). Built once, cached on `inp.extra`."""
    if "liger" not in inp.extra:
        from hadw_kernels import hadw_advantages

        n, t = inp.logprobs.shape
        gen = torch.Generator(device=inp.logprobs.device).manual_seed(1)
        logits = torch.randn(n, t + 1, vocab, device=inp.logprobs.device, generator=gen)
        ids = torch.randint(0, vocab, (n, t), device=inp.logprobs.device, generator=gen)
        adv = hadw_advantages(inp.rewards, inp.group_size, anchor=inp.anchor, config=inp.config).advantages
        inp.extra["liger"] = dict(logits=logits.to(inp.logprobs.dtype).requires_grad_(True), ids=ids,
                                  adv=adv.float(), old=inp.old_logprobs.float(), mask=inp.mask.int())
    return inp.extra["liger"]


def _liger(inp: Inputs) -> torch.Tensor:
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    li = liger_inputs(inp)
    cfg = inp.config
    kwargs = dict(logits=li["logits"], old_logp=li["old"], ref_logp=None, completion_ids=li["ids"],
                  advantages=li["adv"], completion_mask=li["mask"], temperature=1.0, beta=0.0,
                  eps_low=cfg.clip_low, eps_high=cfg.clip_high, inplace=False)
    if "reduce" in inspect.signature(triton_grpo_loss).parameters:  # newer Liger: reduction inside, grpo = ours
        kwargs.update(loss_type="grpo", reduce=True)
    out = triton_grpo_loss(**kwargs)
    per_token = out[0] if isinstance(out, tuple) else out
    if per_token.dim() == 0:
        return per_token
    m = li["mask"].to(per_token.dtype)  # older Liger returns the per-token loss: seq-mean-token-mean, as grpo
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


@functools.lru_cache(maxsize=1)
def _naive_compiled_fn():
    return torch.compile(naive_hadw_loss)


def _naive_compiled(inp: Inputs) -> torch.Tensor:
    return _naive_compiled_fn()(inp.logprobs, inp.old_logprobs, inp.rewards, inp.mask, inp.group_size, inp.anchor,
                                inp.config, inp.ref_logprobs)[0]


def providers() -> dict[str, Provider]:
    return {
        "naive": Provider("naive", _naive, always),
        "naive_compiled": Provider("naive_compiled", _naive_compiled, always, compiles=True),
        "reference": Provider("reference", _library("torch"), always),
        "compiled": Provider("compiled", _library("compiled"), always, compiles=True),
        "native": Provider("native", _library("native"), _native_available),
        "triton": Provider("triton", _library("triton"), _triton_available, compiles=True),
        "liger": Provider("liger", _liger, _liger_available, compiles=True),
    }


# -- bytes --------------------------------------------------------------------------------------------------------
def bytes_moved(inp: Inputs, mode: str, provider: str = "reference") -> int:
    """Bytes a perfect fused implementation reads and writes (counted from the tensors, see module docstring)."""
    n, t = inp.logprobs.shape
    if provider == "liger":
        li = liger_inputs(inp)
        logits = li["logits"].numel() * li["logits"].element_size()
        per_tok = li["ids"].numel() * li["ids"].element_size() + inp.mask.numel() * 4 + li["old"].numel() * 4
        fwd = logits + per_tok + n * 4 + n * t * 4  # + per-token loss out (+ LSE, same size)
        bwd = logits + per_tok + n * 4 + n * t * 4 + logits  # read logits, LSE, grad_out; write dlogits
        return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]
    tok_in = inp.logprobs.element_size() + inp.old_logprobs.element_size() + inp.mask.element_size()
    if inp.ref_logprobs is not None:
        tok_in += inp.ref_logprobs.element_size()
    fwd = n * t * tok_in + n * inp.rewards.element_size() + 2 * n * 4  # advantages + phi out
    bwd = n * t * tok_in + n * 4 + n * t * inp.logprobs.element_size()  # advantages in, gradient out
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def leaves(inp: Inputs, provider: str) -> list[torch.Tensor]:
    """The tensors whose gradient `provider` produces: Liger differentiates its own logits."""
    return [liger_inputs(inp)["logits"]] if provider == "liger" else [inp.logprobs]


def describe(inp: Inputs) -> dict:
    """The batch as JSON fields, and the one-line summary heading its table."""
    n, t, g = inp.shape
    dtype = str(inp.logprobs.dtype).removeprefix("torch.")
    mask = str(inp.mask.dtype).removeprefix("torch.")
    kl = inp.ref_logprobs is not None
    return {
        "shape": {"N": n, "T": t, "G": g, "tokens": n * t},
        "dtype": dtype,
        "mask_dtype": mask,
        "preset": inp.preset,
        "kl": kl,
        "summary": f"N={n} T={t} G={g} ({n * t / 1e6:.2f}M tokens) {dtype} preset={inp.preset}{' +kl' if kl else ''} "
                   f"mask={mask}",
    }
