"""The advantage-estimator lab: a controlled, paired-seed policy-gradient study of when HA-DW helps.

A study is a grid of settings (policy family x optimizer x G); in each setting plain GRPO's learning rate is tuned
on pilot seeds, then every arm (`lab_arms.standard_arms`) trains on the same reported seeds and is compared with
GRPO seed by seed (`lab_stats`). Runs go to worker processes (spawn, one torch thread each); every run stacks its
seeds in one set of tensors (`lab_run`).

    >>> from hadw_kernels.theory.lab import QUICK, run_study
    >>> result = run_study(QUICK, jobs=2)          # ~half a minute on 2 cores
    >>> result["settings"]["tabular/sgd/G8"]["arms"]["hadw_window_l1.3"]["paired"]["auc"]["mean"]

`hadw-theory lab [--quick] [--out DIR]` runs it from the command line (see `lab_report` for the outputs).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np

from hadw_kernels.theory.lab_arms import Arm, rectified_scale, standard_arms
from hadw_kernels.theory.lab_bandit import Task
from hadw_kernels.theory.lab_run import Setting, run_arm
from hadw_kernels.theory.lab_stats import METRICS, holm, paired_difference, run_metrics

PILOT_SEED_BASE = 10_000
"""Pilot seeds are PILOT_SEED_BASE, PILOT_SEED_BASE + 1, ...; reported seeds are 0, 1, ...: never the same."""
LR_GRIDS = {
    "sgd": (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0),
    "adam": (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12),
}
"""The pilot's learning-rate grids (factor 2 apart). The loss is a mean over the batch's B * G responses, so SGD
needs large rates on these tiny models; Adam's step is ~lr per coordinate whatever the gradient's scale."""
LR_RULES = ("best", "midway")
"""The pilot's rules for picking GRPO's rate (`choose_lr`)."""


@dataclass(frozen=True)
class Study:
    """The grid of settings, the seeds and the arms of one study."""

    groups: tuple[int, ...] = (4, 8, 16)
    families: tuple[str, ...] = ("tabular", "shared")
    optimizers: tuple[str, ...] = ("sgd", "adam")
    seeds: int = 24
    """Reported seeds per arm (0 ... seeds - 1), the same in every arm."""
    pilot_seeds: int = 6
    """Seeds of the learning-rate pilot (PILOT_SEED_BASE + ...), never reported."""
    steps: int = 200
    batch: int = 32
    adv_norm: str = "group_std"
    task: Task = field(default_factory=Task)
    arms: tuple[Arm, ...] = field(default_factory=standard_arms)
    target: float = 0.5
    """steps_to_target: the step at which the mean accuracy first closes this fraction of the gap from a0 to 1."""
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LR_GRIDS))
    lr_rule: str = "best"
    """How the pilot picks GRPO's rate (`choose_lr`): 'best' AUC (mid-way where AUC rises over the whole grid) or
    always 'midway' (a regime where learning spans the horizon)."""

    def __post_init__(self) -> None:
        if self.seeds < 2 or self.pilot_seeds < 1:
            raise ValueError(f"Study: need seeds >= 2 and pilot_seeds >= 1, got {self.seeds}, {self.pilot_seeds}")
        if not self.arms or self.arms[0].name != "grpo" or self.arms[0] != Arm("grpo"):
            raise ValueError("Study: the first arm must be plain GRPO, Arm('grpo'): every difference is taken to it")
        if len({a.name for a in self.arms}) != len(self.arms):
            raise ValueError("Study: arm names must be unique")
        if self.lr_rule not in LR_RULES:
            raise ValueError(f"Study: lr_rule must be one of {LR_RULES}, got {self.lr_rule!r}")
        if PILOT_SEED_BASE < self.seeds:
            raise ValueError(f"Study: at most {PILOT_SEED_BASE} reported seeds (the pilot seeds start there)")

    def settings(self) -> list[Setting]:
        return [Setting(family=f, optimizer=o, group=g, batch=self.batch, steps=self.steps, adv_norm=self.adv_norm,
                        task=self.task)
                for f in self.families for o in self.optimizers for g in self.groups]


QUICK = Study(groups=(8,), families=("tabular", "shared"), optimizers=("sgd",), seeds=6, pilot_seeds=2, steps=60,
              lr_grids={"sgd": (4.0, 16.0, 64.0), "adam": (0.04, 0.16, 0.64)})
"""`hadw-theory lab --quick`: every arm, G = 8, both families, SGD, 6 seeds, 60 steps (a smoke run, not evidence)."""


# -- running ----------------------------------------------------------------------------------------------------------
def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one thread per run: the parallelism is across processes


def _run_task(task: tuple[str, Setting, Arm, tuple[int, ...], float]) -> tuple[str, str, float, dict, float, float]:
    tag, setting, arm, seeds, lr = task
    start, cpu = time.perf_counter(), time.process_time()
    curves = run_arm(setting, arm, seeds, lr)
    return (tag, arm.name, lr, dataclasses.asdict(curves), time.perf_counter() - start,
            time.process_time() - cpu)


class _Runner:
    """Runs tasks in `jobs` spawned worker processes (one pool for the pilot and the study: each worker pays the
    torch import once), or in this process when jobs == 1. Results come back in completion order."""

    def __init__(self, jobs: int) -> None:
        self.pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_init_worker) if jobs > 1 else None
        if self.pool is None:
            _init_worker()

    def map(self, tasks: list, progress) -> list:
        results = map(_run_task, tasks) if self.pool is None else self.pool.imap_unordered(_run_task, tasks)
        out = []
        for r in results:
            out.append(r)
            progress(len(out), len(tasks))
        return out

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def choose_lr(grid: tuple[float, ...], auc: list[float], a0: float, rule: str = "best") -> tuple[float, str]:
    """The pilot's rule. 'best': the grid rate with the best mean AUC of plain GRPO, when that best lies inside the
    grid. Where AUC still rises at the grid's top (no instability limits the step: the tabular family), there is no
    best rate; then, as always with 'midway', the rate whose AUC is closest to the midpoint (a0 + 1) / 2, so the runs
    are mid-way through learning over the horizon and differences between arms stay measurable."""
    if rule not in LR_RULES:
        raise ValueError(f"choose_lr: rule must be one of {LR_RULES}, got {rule!r}")
    best = int(np.argmax(auc))
    if rule == "best" and best < len(grid) - 1:
        return grid[best], "best AUC"
    mid = int(np.argmin([abs(a - (a0 + 1.0) / 2.0) for a in auc]))
    why = "mid-way rate" if rule == "midway" else "AUC rises over the whole grid: mid-way rate"
    return grid[mid], why


def _pilot_choice(setting: Setting, grid: tuple[float, ...], pilot_runs: list, rule: str) -> dict:
    by_lr = {r[2]: np.asarray(r[3]["acc"]) for r in pilot_runs if r[0] == setting.key}
    auc = [float(by_lr[lr].mean()) for lr in grid]
    final = [float(by_lr[lr][:, -1].mean()) for lr in grid]
    a0 = float(by_lr[grid[0]][:, 0].mean())
    lr, why = choose_lr(grid, auc, a0, rule)
    return dict(grid=list(grid), auc=auc, final=final, a0=a0, lr=lr, rule=why)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def run_study(study: Study, jobs: int | None = None, log=print) -> dict:
    """Pilot, runs and paired statistics of a whole study; returns the result as a JSON-ready dict."""
    jobs = jobs or os.cpu_count() or 1
    started, load_start = time.time(), _loadavg()
    settings = study.settings()
    grpo = study.arms[0]
    pilot_seeds = tuple(range(PILOT_SEED_BASE, PILOT_SEED_BASE + study.pilot_seeds))
    seeds = tuple(range(study.seeds))

    def progress(label):
        def report(done, total):
            if done % max(1, total // 10) == 0 or done == total:
                log(f"  {label}: {done}/{total} runs, {time.time() - started:.0f} s")
        return report

    with _Runner(jobs) as runner:
        # 1. learning-rate pilot: plain GRPO on the pilot seeds, every rate of the optimizer's grid
        log(f"pilot: {len(settings)} settings x {max(len(study.lr_grids[s.optimizer]) for s in settings)} rates, "
            f"{len(pilot_seeds)} seeds")
        tasks = [(s.key, s, grpo, pilot_seeds, lr) for s in settings for lr in study.lr_grids[s.optimizer]]
        pilot_runs = runner.map(tasks, progress("pilot"))
        pilot = {s.key: _pilot_choice(s, study.lr_grids[s.optimizer], pilot_runs, study.lr_rule) for s in settings}
        for key, p in pilot.items():
            log(f"  {key}: lr = {p['lr']:g} ({p['rule']})")
        pilot_done = time.time()

        # 2. every arm on the reported seeds; the slow (per-seed anchor) arms first, for a balanced pool
        log(f"study: {len(settings)} settings x {len(study.arms)} arms, {len(seeds)} seeds")
        tasks = [(s.key, s, arm, seeds, pilot[s.key]["lr"])
                 for arm in sorted(study.arms, key=lambda a: a.anchor is None) for s in settings]
        runs = runner.map(tasks, progress("study"))
    by_key = {(r[0], r[1]): (r[2], r[3], r[4]) for r in runs}

    result_settings = {}
    for s in settings:
        result_settings[s.key] = _analyse(study, s, by_key, pilot[s.key])
    finished = time.time()
    return dict(
        study=_study_dict(study),
        environment=dict(python=platform.python_version(), torch=_torch_version(), cpu_count=os.cpu_count(),
                         jobs=jobs, load_average_start=load_start, load_average_end=_loadavg(),
                         seconds_pilot=round(pilot_done - started, 1), seconds_total=round(finished - started, 1),
                         run_seconds=round(sum(r[4] for r in runs + pilot_runs), 1),
                         cpu_seconds=round(sum(r[5] for r in runs + pilot_runs), 1)),
        rectified={str(g): _rectified_dict(g) for g in study.groups},
        pilot=pilot,
        settings=result_settings,
    )


# -- analysis ---------------------------------------------------------------------------------------------------------
CONTRASTS_LAMBDA = (1.3, 1.5)
"""HA-DW at λ is also compared with GRPO at lr x λ: under SGD λ multiplies the whole step."""


def _analyse(study: Study, setting: Setting, by_key: dict, pilot: dict) -> dict:
    from hadw_kernels.theory.lab_run import RunCurves

    metrics, arms_out = {}, {}
    for arm in study.arms:
        lr, curves, secs = by_key[(setting.key, arm.name)]
        curves = RunCurves(**{k: np.asarray(v) for k, v in curves.items()})
        metrics[arm.name] = run_metrics(curves, study.target)
        arms_out[arm.name] = dict(
            lr=lr * arm.lr_mult, seconds=round(secs, 2),
            mean={m: float(np.mean(metrics[arm.name][m])) for m in METRICS},
            reached=float(np.mean(metrics[arm.name]["reached"])),
            per_seed={m: metrics[arm.name][m].tolist() for m in METRICS},
            curve=dict(acc=curves.acc.mean(0).tolist(), hard=curves.hard.mean(0).tolist(),
                       easy=curves.easy.mean(0).tolist()),
            adv_abs=float(np.mean(curves.adv_abs)), degenerate=float(np.mean(curves.degenerate)),
            anchor=None if np.all(np.isnan(curves.anchor)) else curves.anchor.tolist(),
        )
    base = metrics["grpo"]
    others = [a.name for a in study.arms[1:]]
    for name in others:
        arms_out[name]["paired"] = {m: paired_difference(metrics[name][m], base[m]).to_dict() for m in METRICS}
    # Holm over the arms, per metric: each metric's family is "every arm vs GRPO" in this setting
    for m in METRICS:
        for key in ("p_t", "p_wilcoxon"):
            adj = holm([arms_out[n]["paired"][m][key] for n in others])
            for n, p in zip(others, adj, strict=True):
                arms_out[n]["paired"][m][key + "_holm"] = float(p)
    contrasts = {}
    for arm in study.arms:
        if arm.anchor is None or arm.renormalize or arm.lambda_scale not in CONTRASTS_LAMBDA:
            continue
        ref = f"grpo_lr{arm.lambda_scale:g}"
        if ref in metrics:
            contrasts[f"{arm.name} - {ref}"] = {m: paired_difference(metrics[arm.name][m], metrics[ref][m]).to_dict()
                                               for m in METRICS}
    if "oracle" in metrics and "loo" in metrics:  # the true p against the unbiased baseline of the same step size
        contrasts["oracle - loo"] = {m: paired_difference(metrics["oracle"][m], metrics["loo"][m]).to_dict()
                                     for m in METRICS}
    return dict(setting=dict(family=setting.family, optimizer=setting.optimizer, G=setting.group,
                             batch=setting.batch, steps=setting.steps, adv_norm=setting.adv_norm),
                lr=pilot["lr"], arms=arms_out, contrasts=contrasts)


def _rectified_dict(G: int) -> dict:
    c, eps, eps_delta = rectified_scale(G)
    return dict(c=c.tolist(), eps=eps.tolist(), eps_delta=eps_delta,
                baseline=[float(ci * k / G) for k, ci in enumerate(c)])


def _study_dict(study: Study) -> dict:
    d = dataclasses.asdict(study)
    d["arms"] = [dataclasses.asdict(a) for a in study.arms]
    d["lr_grids"] = {k: list(v) for k, v in study.lr_grids.items()}
    return d


def _torch_version() -> str:
    import torch

    return torch.__version__
