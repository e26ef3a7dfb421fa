"""The benchmark harness, independent of the op under test: providers, timing, bytes and memory, the table and the
JSON report. An op (e.g. `bench.hadw_loss_bench`) is a module with:

- `NAME` (str), `DEFAULT_SHAPES` ({device type: shape}), `PROVIDERS` (names, in table order), `BASELINES` (the
  providers others are compared with: "x <baseline>" columns);
- `make_inputs(shape, dtype, device, **options)`: one batch, built once and shared by every provider, mode and by the
  speed and memory runs;
- `providers()` -> {name: `Provider`}; `leaves(inp, provider)` -> the tensors whose gradient that provider produces;
- `bytes_moved(inp, mode, provider)`: what a perfect fused implementation reads and writes;
- `describe(inp)` -> a JSON-ready dict (its "summary" string heads the table).

`run_device(op, inp, ...)` times every provider x mode on one device, the providers taking turns rep by rep.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Provider:
    name: str
    run: Callable[[Any], torch.Tensor]  # one call on the op's inputs -> 0-d result (graph attached)
    available: Callable[[torch.device], str | None]  # None if it can run on this device, else why not
    compiles: bool = False  # first call includes compilation (reported separately)


def always(_device) -> str | None:
    return None


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
    """The callable one rep times, and the untimed set-up before it, for one provider and mode. `leaves` are the
    tensors whose gradient the provider produces (cleared before every rep)."""

    def __init__(self, provider: Provider, inp: Any, mode: str, leaves: list[torch.Tensor]):
        self.provider, self.inp, self.mode, self.leaves = provider, inp, mode, leaves
        self._out: torch.Tensor | None = None

    def setup(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None
        if self.mode == "bwd":
            # A fresh forward per rep, untimed: compiled backwards donate their buffers, so retain_graph=True
            # (one forward, many backwards) is not allowed there.
            self._out = None
            self._out = self.provider.run(self.inp)
        _sync(self.leaves[0].device)  # the untimed work is finished before any timer starts

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
        for leaf in self.leaves:
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
    max_ms: float | None = None  # the slowest rep: a stall (a descheduled thread) shows here, not in the median
    cpu_ms: float | None = None  # median process CPU time per rep (CPU devices)
    cpu_times_ms: list[float] = field(default_factory=list)  # per rep: a wall time far above it is a preemption
    bytes: int | None = None
    gbps: float | None = None
    pct_copy_bw: float | None = None
    speedup: dict[str, float] = field(default_factory=dict)  # {baseline provider: its time / this time}
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


def run_device(op, inp: Any, device: torch.device, modes: list[str], provider_names: list[str], reps: int,
               warmup: int, memory: bool = True, log: Callable[[str], None] = print) -> dict:
    """Benchmark every provider x mode of `op` on `inp` (on `device`); returns the JSON-ready report."""
    all_providers = op.providers()
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
        first = ModeRunner(prov, inp, "full", op.leaves(inp, name))
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
        runners = {name: ModeRunner(prov, inp, mode, op.leaves(inp, name)) for name, (prov, _) in ready.items()}
        times = time_interleaved(runners, device, reps, warmup)
        for name, runner in runners.items():
            runner.close()
            wall = [w for w, _ in times[name]]
            cpu = [c for _, c in times[name] if c is not None]
            row = Row(name, mode, time_ms=statistics.median(wall) * 1e3, times_ms=[x * 1e3 for x in wall],
                      max_ms=max(wall) * 1e3, cpu_ms=statistics.median(cpu) * 1e3 if cpu else None,
                      cpu_times_ms=[x * 1e3 for x in cpu],
                      bytes=op.bytes_moved(inp, mode, name), first_call_s=ready[name][1])
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
        for base in op.BASELINES:
            b = by.get((base, r.mode))
            if b is not None and b.time_ms is not None:
                r.speedup[base] = b.time_ms / r.time_ms
        full = by.get((r.provider, "full"))
        if all_providers[r.provider].compiles and full is not None and full.time_ms is not None:
            r.compile_s = max(0.0, r.first_call_s - full.time_ms / 1e3)
    return {
        "op": op.NAME,
        **op.describe(inp),
        "device": device_name(device),
        "device_type": device.type,
        "baselines": list(op.BASELINES),
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
    head = (f"{rep['device']} | {rep['summary']} | copy bandwidth {rep['copy_bandwidth_GBps']:.1f} GB/s | median of "
            f"{rep['reps']} reps | load {rep['loadavg_before']} -> {rep['loadavg_after']}")
    short = {"reference": "ref"}
    cols = ("provider", "mode", "time ms", "max ms", "cpu ms", "MB moved", "GB/s", "% copy",
            *(f"x {short.get(b, b)}" for b in rep["baselines"]), "peak MB", "note")
    lines, skipped = [], {}
    for r in rep["rows"]:
        if r["skipped"]:
            skipped.setdefault(r["provider"], r["skipped"])
            continue
        note = ""
        if r["compile_s"] is not None and r["mode"] == "full":
            note = f"first call {r['first_call_s']:.1f} s, compile ~{r['compile_s']:.1f} s (excluded)"
        elif r["mode"] == "full":
            note = f"first call {r['first_call_s'] * 1e3:.0f} ms"
        lines.append((
            r["provider"], r["mode"], _fmt(r["time_ms"], ".2f"), _fmt(r["max_ms"], ".2f"), _fmt(r["cpu_ms"], ".2f"),
            _fmt(r["bytes"] and r["bytes"] / 1e6, ".1f"),
            _fmt(r["gbps"], ".2f"), _fmt(r["pct_copy_bw"], ".1f"),
            *(_fmt(r["speedup"].get(b), ".2f") for b in rep["baselines"]),
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
        "benchmark": ",".join(sorted({d.get("op", "?") for d in devices})),
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
