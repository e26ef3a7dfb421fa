"""Run outputs: the step's metrics reduced over ranks in one all-reduce (`StepSums`), and on rank 0 metrics.jsonl
(one object per RL step), eval.json, TensorBoard events, console lines and a progress bar. Other ranks get a
logger that does nothing."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from hadw_trainer.parallel import process_group as dist

# Keys whose values depend on wall-clock time: everything else in metrics.jsonl is reproducible exactly.
TIMING_KEYS = ("time_s", "step_time_s", "tokens_per_s", "rollout_time_s", "update_time_s")


class StepSums:
    """Per-rank contributions to the step's metrics, reduced over ranks by one all-reduce.

    Each `add(name, value, weight)` adds to a numerator and a denominator; `reduce()` returns, for each name,
    (sum of values over calls and ranks) / (sum of weights). So a token mean is `add(mean * n, n)`, a total over
    ranks `add(x, 1 / world)`, and a value already equal on every rank `add(x / world, 1 / world)`.
    """

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}

    def add(self, name: str, value: float, weight: float = 1.0) -> None:
        acc = self._sums.setdefault(name, [0.0, 0.0])
        acc[0] += float(value)
        acc[1] += float(weight)

    def reduce(self) -> dict[str, float]:
        """{name: reduced value} (NaN where every weight was 0); the same on every rank. A collective: every rank
        must call it with the same names."""
        names = sorted(self._sums)
        flat = dist.all_reduce_sum(torch.tensor([self._sums[k] for k in names], dtype=torch.float64).reshape(-1, 2))
        return {k: (num / den if den else float("nan")) for k, (num, den) in zip(names, flat.tolist(), strict=True)}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[key] = float(v)
    return out


class RunLogger:
    """Writes OUTPUT/metrics.jsonl, OUTPUT/eval.json and OUTPUT/tb/ (when tensorboard imports)."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool, progress: bool, total: int,
                 start: int = 0, log_every: int = 1, console_only: bool = False) -> None:
        self.output_dir, self.enabled, self.log_every = output_dir, enabled, log_every
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        self.bar = None
        self.t0 = time.time()
        if not enabled or console_only:
            return
        if start == 0 and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)
        elif start > 0:
            self._truncate(start)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tb"), purge_step=start + 1 if start else None)
            except ImportError:
                self.tb = None
        if progress and sys.stdout.isatty():
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.bar = Progress(TextColumn("RL"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                    TextColumn("{task.description}"))
                self.bar.start()
                self.task = self.bar.add_task("", total=total, completed=start)
            except ImportError:
                self.bar = None

    def _truncate(self, last_step: int) -> None:
        """On resume, drop lines written after the checkpoint (a crash may have left later steps)."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
        with open(self.metrics_path, "w") as f:
            f.writelines(keep)

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            print(msg, flush=True)

    def log_step(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        if self.tb is not None:
            for k, v in _flatten(metrics).items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)
        desc = (f"reward {metrics['reward_mean']:.3f} anchor {metrics['anchor_prior']:.3f} "
                f"phi {metrics.get('phi_mean', 1.0):.2f} loss {metrics['loss']:+.4f}")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=desc)
        elif step % self.log_every == 0:
            print(f"step {step:5d} | {desc} | clipfrac {metrics.get('clipfrac', 0):.3f} "
                  f"| kl {metrics.get('approx_kl', 0):.2e} | {metrics['tokens_per_s']:.0f} tok/s", flush=True)

    def log_eval(self, step: int, result: dict[str, Any], history: list[dict]) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in _flatten({m: result[m] for m in result if m != "n"}).items():
                self.tb.add_scalar(f"eval/{k}", v, step)
        final = dict(history[-1])
        payload = {"step": step, "final": final, "base": history[0], "history": history}
        tmp = os.path.join(self.output_dir, "eval.json.tmp")
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, os.path.join(self.output_dir, "eval.json"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
