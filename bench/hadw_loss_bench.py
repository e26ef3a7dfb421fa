"""Benchmark of `hadw_loss`: inputs, providers, timing, bytes moved, peak memory, and the table / JSON report.

Providers (each returns the 0-d loss of one call; `Provider.available` says why one cannot run here):

- `naive`: the eager PyTorch a user writes from the paper's pseudo-code, vectorised the way verl's and TRL's own
  code is (group stats on an [P, G] view, one elementwise expression per line, verl's `agg_loss`). The baseline.
- `naive_compiled`: `torch.compile(naive)`, what a user gets by compiling that code (a yardstick for `compiled`).
- `reference`: `hadw_loss(..., backend="torch")`, the package's eager reference (it computes every metric and the
  finiteness checks on top of the loss, so it does more than `naive`).
- `compiled`: `hadw_loss(..., backend="compiled")`, torch.compile of the reference (the default CPU path).
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

import contextlib
import ctypes
import functools
import gc
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hadw_kernels import LossConfig, hadw_loss

MODES = ("fwd", "bwd", "full")
PROVIDERS = ("naive", "naive_compiled", "reference", "compiled", "triton", "liger")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# ~1M tokens on CPU (the size for the naive comparison: ~20-30 ms per eager fwd+bwd on 2 cores), 16.8M on
# a GPU (the kernel's targets are set at >= 16M tokens).
DEFAULT_SHAPES = {"cpu": (2048, 512, 8), "cuda": (16384, 1024, 8)}
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- inputs -------------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """One batch, built once and shared by every provider, mode, and by the speed and memory runs."""

    logprobs: torch.Tensor  # [N, T] leaf, requires grad
    old_logprobs: torch.Tensor  # [N, T]
    rewards: torch.Tensor  # [N] fp32, 0/1
    mask: torch.Tensor  # [N, T] bool, a prefix of random length >= 1 per row
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
                preset: str = "grpo", kl: bool = False, seed: int = 0) -> Inputs:
    """Realistic RL batch: response lengths uniform in [1, T], old policy a small perturbation of the new one (so
    a few percent of tokens are clipped), binary rewards with a per-prompt success rate, anchor 0.4."""
    if n % g:
        raise ValueError(f"N={n} is not divisible by G={g}")
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=gen) * 3.0
    old = logp + 0.1 * torch.randn(n, t, generator=gen)
    p = torch.rand(n // g, 1, generator=gen).expand(-1, g).reshape(-1)
    rewards = (torch.rand(n, generator=gen) < p).float()
    lengths = torch.randint(1, t + 1, (n, 1), generator=gen)
    mask = torch.arange(t)[None, :] < lengths
    ref = (logp + 0.05 * torch.randn(n, t, generator=gen)) if kl else None
    config = LossConfig.preset(preset, **({"kl_coef": 0.01} if kl else {}))
    dev = torch.device(device)
    inp = Inputs(
        logprobs=logp.to(dev, dtype).requires_grad_(True),
        old_logprobs=old.to(dev, dtype),
        rewards=rewards.to(dev),
        mask=mask.to(dev),
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
@dataclass
class Provider:
    name: str
    run: Callable[[Inputs], torch.Tensor]  # one call -> 0-d loss (graph attached)
    available: Callable[[torch.device], str | None]  # None if it can run on this device, else why not
    compiles: bool = False  # first call includes compilation (reported separately)


def _always(_device) -> str | None:
    return None


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
        "naive": Provider("naive", _naive, _always),
        "naive_compiled": Provider("naive_compiled", _naive_compiled, _always, compiles=True),
        "reference": Provider("reference", _library("torch"), _always),
        "compiled": Provider("compiled", _library("compiled"), _always, compiles=True),
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


# -- timing and memory --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def _flush_cache(device: torch.device) -> None:
    if device.type == "cuda":  # as triton.testing.do_bench: every rep starts with cold L2
        if device not in _L2_FLUSH:
            _L2_FLUSH[device] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
        _L2_FLUSH[device].zero_()


class ModeRunner:
    """The callable one rep times, and the untimed set-up before it, for one provider and mode."""

    def __init__(self, provider: Provider, inp: Inputs, mode: str):
        self.provider, self.inp, self.mode = provider, inp, mode
        self._out: torch.Tensor | None = None

    def _leaves(self) -> list[torch.Tensor]:
        if self.provider.name == "liger":
            return [liger_inputs(self.inp)["logits"]]
        return [self.inp.logprobs]

    def setup(self) -> None:
        for leaf in self._leaves():
            leaf.grad = None
        if self.mode == "bwd":
            # A fresh forward per rep, untimed: compiled backwards donate their buffers, so retain_graph=True
            # (one forward, many backwards) is not allowed there.
            self._out = None
            self._out = self.provider.run(self.inp)
        _sync(self.inp.logprobs.device)  # the untimed work is finished before any timer starts

    def __call__(self) -> None:
        if self.mode == "fwd":
            self.provider.run(self.inp)
        elif self.mode == "bwd":
            out, self._out = self._out, None
            out.backward()
        else:
            self.provider.run(self.inp).backward()

    def close(self) -> None:
        self._out = None
        for leaf in self._leaves():
            leaf.grad = None


def time_once(fn: Callable[[], None], device: torch.device) -> tuple[float, float | None]:
    """(wall seconds, process CPU seconds or None on CUDA) for one call of `fn`; on CUDA timed with events after an
    untimed L2 flush. The CPU time is the work done by this process's threads, blind to time spent descheduled,
    so with one torch thread it stays meaningful on a machine shared with other jobs."""
    _flush_cache(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, None
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def time_interleaved(runners: dict[str, ModeRunner], device: torch.device, reps: int, warmup: int
                     ) -> dict[str, list[tuple[float, float | None]]]:
    """`time_once` per rep for each runner, the providers taking turns rep by rep, so that a change in the
    machine's load during the run hits all of them alike and their ratios stay meaningful (the CPUs here are
    shared)."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.setup()
            runner()
    _sync(device)
    times: dict[str, list[tuple[float, float | None]]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, runner in runners.items():
            runner.setup()
            times[name].append(time_once(runner, device))
    return times


def median_wall(samples: list[tuple[float, float | None]]) -> float:
    return statistics.median(w for w, _ in samples)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Bytes/s of a large tensor copy (read + write counted), the practical memory-bandwidth ceiling here."""
    nbytes = nbytes or (256 * 2**20 if device.type == "cpu" else 2 * 2**30)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [time_once(lambda: dst.copy_(src), device) for _ in range(reps)]
    return 2 * nbytes / median_wall(times)


_LIBC: list = []


def _libc():
    """glibc, set up once for the CPU memory runs: every block >= 64 KiB is served by mmap and unmapped on free,
    so the process RSS follows live tensors and its high-water mark (VmHWM, reset through /proc/self/clear_refs)
    is the peak. glibc's default threshold adapts upward after frees and would hide re-used blocks. Called only
    after all timing, since it changes allocation costs. None where this is not glibc."""
    if not _LIBC:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
        except (OSError, AttributeError):
            libc = None
        _LIBC.append(libc)
    return _LIBC[0]


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_memory(runner: ModeRunner, device: torch.device) -> int | None:
    """Peak bytes above the pre-call level for one rep: CUDA max_memory_allocated; CPU the RSS high-water mark
    (see `_libc`); None where neither is available."""
    runner.setup()
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    libc = _libc()
    if libc is None:
        return None
    try:
        libc.malloc_trim(0)  # give back free heap pages left from before, so re-using them shows in the RSS
        base = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        runner()
        return (_status_kb("VmHWM") - base) * 1024
    except (OSError, KeyError):
        return None


# -- one device's table -------------------------------------------------------------------------------------------
@dataclass
class Row:
    provider: str
    mode: str
    time_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    cpu_ms: float | None = None  # median process CPU time per rep (CPU devices)
    bytes: int | None = None
    gbps: float | None = None
    pct_copy_bw: float | None = None
    speedup_vs_naive: float | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_compiled: float | None = None
    peak_mem_bytes: int | None = None
    first_call_s: float | None = None
    compile_s: float | None = None
    skipped: str | None = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def git_commit() -> tuple[str, bool | None]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True)
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None


def loadavg() -> str | None:
    with contextlib.suppress(OSError):
        return open("/proc/loadavg").read().strip()
    return None


def run_device(device: torch.device, shape: tuple[int, int, int], dtype: torch.dtype, preset: str,
               modes: list[str], provider_names: list[str], reps: int, warmup: int, memory: bool = True,
               kl: bool = False, log: Callable[[str], None] = print) -> dict:
    """Benchmark every provider x mode on one device; returns the JSON-ready report for that device."""
    n, t, g = shape
    inp = make_inputs(n, t, g, dtype, device, preset, kl=kl)
    all_providers = providers()
    load_before = loadavg()
    log(f"[{device}] copy bandwidth ...")
    copy_bw = copy_bandwidth(device)
    rows: list[Row] = []
    ready: dict[str, tuple[Provider, float]] = {}
    for name in provider_names:
        prov = all_providers[name]
        why = prov.available(device)
        if why is not None:
            rows += [Row(name, mode, skipped=why) for mode in modes]
            continue
        # First call (fwd + bwd): includes torch.compile / Triton compilation and autotuning; reported apart.
        log(f"[{device}] {name}: first call ...")
        first = ModeRunner(prov, inp, "full")
        first.setup()
        _sync(device)
        t0 = time.perf_counter()
        try:
            first()
        except Exception as e:  # noqa: BLE001 - a provider that fails is reported, the others still run
            rows += [Row(name, mode, skipped=f"failed: {type(e).__name__}: {e}"[:200]) for mode in modes]
            continue
        _sync(device)
        ready[name] = (prov, time.perf_counter() - t0)
        first.close()
    live: list[tuple[Row, ModeRunner]] = []
    for mode in modes:
        log(f"[{device}] {mode}: {', '.join(ready)} x {reps} reps ...")
        runners = {name: ModeRunner(prov, inp, mode) for name, (prov, _) in ready.items()}
        times = time_interleaved(runners, device, reps, warmup)
        for name, runner in runners.items():
            runner.close()
            wall = [w for w, _ in times[name]]
            cpu = [c for _, c in times[name] if c is not None]
            row = Row(name, mode, time_ms=statistics.median(wall) * 1e3, times_ms=[x * 1e3 for x in wall],
                      cpu_ms=statistics.median(cpu) * 1e3 if cpu else None, bytes=bytes_moved(inp, mode, name),
                      first_call_s=ready[name][1])
            row.gbps = row.bytes / (row.time_ms / 1e3) / 1e9
            row.pct_copy_bw = 100.0 * row.bytes / (row.time_ms / 1e3) / copy_bw
            rows.append(row)
            live.append((row, runner))
    if memory:  # after all timing (the CPU measurement changes malloc's behaviour); same inputs
        log(f"[{device}] peak memory ...")
        for row, runner in live:
            row.peak_mem_bytes = peak_memory(runner, device)
            runner.close()
    order = {name: i for i, name in enumerate(provider_names)}
    rows.sort(key=lambda r: (order[r.provider], MODES.index(r.mode)))
    by = {(r.provider, r.mode): r for r in rows}
    for r in rows:
        if r.time_ms is None:
            continue
        for base in ("naive", "reference", "compiled"):
            b = by.get((base, r.mode))
            if b is not None and b.time_ms is not None:
                setattr(r, f"speedup_vs_{base}", b.time_ms / r.time_ms)
        full = by.get((r.provider, "full"))
        if all_providers[r.provider].compiles and full is not None and full.time_ms is not None:
            r.compile_s = max(0.0, r.first_call_s - full.time_ms / 1e3)
    del inp
    gc.collect()
    return {
        "device": device_name(device),
        "device_type": device.type,
        "shape": {"N": n, "T": t, "G": g, "tokens": n * t},
        "dtype": str(dtype).removeprefix("torch."),
        "preset": preset,
        "kl": kl,
        "reps": reps,
        "warmup": warmup,
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "rows": [asdict(r) for r in rows],
    }


def _fmt(x, spec: str, dash: str = "-") -> str:
    return dash if x is None else format(x, spec)


def format_table(rep: dict) -> str:
    s = rep["shape"]
    head = (f"{rep['device']} | N={s['N']} T={s['T']} G={s['G']} ({s['tokens'] / 1e6:.2f}M tokens) {rep['dtype']} "
            f"preset={rep['preset']}{' +kl' if rep['kl'] else ''} | copy bandwidth {rep['copy_bandwidth_GBps']:.1f} "
            f"GB/s | median of {rep['reps']} reps | load {rep['loadavg_before']} -> {rep['loadavg_after']}")
    cols = ("provider", "mode", "time ms", "cpu ms", "MB moved", "GB/s", "% copy", "x naive", "x ref", "x compiled",
            "peak MB", "note")
    lines, skipped = [], {}
    for r in rep["rows"]:
        if r["skipped"]:
            skipped.setdefault(r["provider"], r["skipped"])
            continue
        note = ""
        if r["compile_s"] is not None and r["mode"] == "full":
            note = f"first call {r['first_call_s']:.1f} s, compile ~{r['compile_s']:.1f} s (excluded)"
        lines.append((
            r["provider"], r["mode"], _fmt(r["time_ms"], ".2f"), _fmt(r["cpu_ms"], ".2f"),
            _fmt(r["bytes"] and r["bytes"] / 1e6, ".1f"),
            _fmt(r["gbps"], ".2f"), _fmt(r["pct_copy_bw"], ".1f"), _fmt(r["speedup_vs_naive"], ".2f"),
            _fmt(r["speedup_vs_reference"], ".2f"), _fmt(r["speedup_vs_compiled"], ".2f"),
            _fmt(r["peak_mem_bytes"] and r["peak_mem_bytes"] / 2**20, ".1f"), note,
        ))
    widths = [max(len(c), *(len(x[i]) for x in lines)) for i, c in enumerate(cols)]
    out = [head, "", "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += ["| " + " | ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)) + " |" for line in lines]
    if skipped:
        out += [""] + [f"{name}: skipped, {why}" for name, why in skipped.items()]
    return "\n".join(out)


def report(devices: list[dict]) -> dict:
    commit, dirty = git_commit()
    triton_version = None
    with contextlib.suppress(ImportError):
        import triton

        triton_version = triton.__version__
    return {
        "benchmark": "hadw_loss",
        "commit": commit,
        "dirty": dirty,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "devices": devices,
    }


def write_json(path: str | os.PathLike, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
