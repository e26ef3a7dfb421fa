"""The lab's statistics: per-seed metrics from the accuracy curves, and paired differences between arms.

Seeds are paired (same prompts, schedule and sampling uniforms in every arm), so an arm is compared with GRPO
through the per-seed differences d_s = metric(arm, s) - metric(GRPO, s): their mean, a 95% t-interval, the paired
t-test and the Wilcoxon signed-rank test, and Holm's step-down adjustment over a family of comparisons.
scipy is imported on first use (the `theory` extra).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from hadw_kernels.theory._util import require_scipy
from hadw_kernels.theory.lab_run import RunCurves

METRICS = ("auc", "final", "auc_hard", "final_hard", "auc_easy", "final_easy", "steps_to_target")
"""auc: mean true accuracy over the T + 1 evaluation points (the normalised area under the curve); final: after the
last step; *_hard / *_easy: the same over the initially hardest / easiest third of the prompts; steps_to_target:
the first step at which the mean accuracy reaches a0 + target * (1 - a0) (a0 = the seed's initial accuracy),
T + 1 where never reached (censored)."""
ACCURACY_METRICS = METRICS[:-1]
"""The metrics in accuracy units (reported in points, x 100)."""


def run_metrics(curves: RunCurves, target: float = 0.5) -> dict[str, np.ndarray]:
    """Every metric of `METRICS` per seed ([S] arrays), plus 'reached' ([S] bool: the target was reached)."""
    if not (0.0 < target < 1.0):
        raise ValueError(f"run_metrics: target must be in (0, 1), got {target!r}")
    acc = curves.acc
    goal = acc[:, :1] + target * (1.0 - acc[:, :1])
    hit = acc >= goal
    reached = hit.any(1)
    steps = np.where(reached, hit.argmax(1), acc.shape[1]).astype(np.float64)
    return {
        "auc": acc.mean(1), "final": acc[:, -1],
        "auc_hard": curves.hard.mean(1), "final_hard": curves.hard[:, -1],
        "auc_easy": curves.easy.mean(1), "final_easy": curves.easy[:, -1],
        "steps_to_target": steps, "reached": reached,
    }


@dataclass(frozen=True)
class Paired:
    """Paired differences d = arm - base over n seeds."""

    n: int
    mean: float
    """mean of d."""
    sd: float
    """sample std of d (n - 1)."""
    ci_low: float
    """lower end of the 95% t-interval of the mean."""
    ci_high: float
    """upper end."""
    p_t: float
    """two-sided paired t-test."""
    p_wilcoxon: float
    """two-sided Wilcoxon signed-rank test (zero differences dropped; 1.0 when every d is 0)."""
    wins: int
    """seeds with d > 0."""
    losses: int
    """seeds with d < 0."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def paired_difference(arm: np.ndarray, base: np.ndarray, confidence: float = 0.95) -> Paired:
    """Paired comparison of two [S] per-seed metric arrays (same seeds, same order)."""
    arm, base = np.asarray(arm, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if arm.shape != base.shape or arm.ndim != 1 or arm.size < 2:
        raise ValueError(f"paired_difference: need two [S] arrays with S >= 2, got {arm.shape} and {base.shape}")
    stats = require_scipy().stats
    d = arm - base
    n = d.size
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    if sd == 0.0:  # every seed differs by the same amount (often exactly 0: the arm equals the base)
        p = 1.0 if mean == 0.0 else 0.0
        return Paired(n, mean, 0.0, mean, mean, p, 1.0 if mean == 0.0 else p, wins, losses)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * sd / math.sqrt(n)
    p_t = float(stats.ttest_1samp(d, 0.0).pvalue)
    p_w = float(stats.wilcoxon(d[d != 0.0]).pvalue) if (d != 0.0).sum() >= 1 else 1.0
    return Paired(n, mean, sd, mean - half, mean + half, p_t, p_w, wins, losses)


def holm(pvalues: list[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), same order as the input."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted
