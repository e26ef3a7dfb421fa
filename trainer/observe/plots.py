"""Plots of one run (OUTPUT/plots/) and side-by-side comparisons of several runs (`hadw-train compare`).

Runs are grouped by label: the recipe name plus whether HA-DW was on, read from each run's config.json, unless
labels are given. Each group shows its mean over runs (seeds), the standard deviation and the min-max spread; runs
of different labels that share a seed (`train.seed`) are paired, and the table gives each label's per-seed
difference to the first label.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_run(run_dir: str) -> dict[str, Any]:
    """{'metrics': [...], 'eval': {...} or None, 'config': {...} or None} of a run directory."""
    metrics = []
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(mpath):
        with open(mpath) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    out: dict[str, Any] = {"metrics": metrics, "eval": None, "config": None, "dir": run_dir}
    for key, name in (("eval", "eval.json"), ("config", "config.json")):
        p = os.path.join(run_dir, name)
        if os.path.exists(p):
            with open(p) as f:
                out[key] = json.load(f)
    if not metrics and out["eval"] is None:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl or eval.json (is this a hadw-train output dir?)")
    return out


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def _levels(run: dict[str, Any], mode: str) -> list[str]:
    ev = run["eval"]
    return [k for k in ev["final"][mode]] if ev and mode in ev["final"] else []


def plot_run(run_dir: str) -> list[str]:
    """OUTPUT/plots/reward.png and accuracy_by_level.png; returns the written paths."""
    plt = _plt()
    run = read_run(run_dir)
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    m = run["metrics"]
    if m:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        steps = [r["step"] for r in m]
        k = max(1, len(m) // 20)
        ax1.plot(steps, _smooth([r["reward_mean"] for r in m], k), label="reward (batch mean)", color="k")
        ax1.plot(steps, [r["anchor_prior"] for r in m], label="anchor C_t (prior)", color="tab:red", ls="--")
        ax1.set_xlabel("RL step")
        ax1.set_title("training reward")
        ax1.legend()
        for lv in sorted({k for r in m for k in r.get("reward_by_level", {})}):
            xs = [(r["step"], r["reward_by_level"][lv]) for r in m if lv in r.get("reward_by_level", {})]
            ax2.plot([x for x, _ in xs], _smooth([y for _, y in xs], k), label=lv.replace("level_", "L"))
        ax2.set_xlabel("RL step")
        ax2.set_title(f"training reward by level (moving mean of {k})")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "reward.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    ev = run["eval"]
    if ev and ev.get("history"):
        modes = [x for x in ev["final"] if x not in ("step", "n")]
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            hist = [h for h in ev["history"] if mode in h]
            for lv in _levels(run, mode):
                ax.plot([h["step"] for h in hist], [h[mode][lv] for h in hist], marker="o", ms=3,
                        label=lv.replace("level_", "L"), lw=2.5 if lv == "overall" else 1.2)
            ax.set_xlabel("RL step")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"held-out accuracy ({mode})")
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "accuracy_by_level.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def default_label(run: dict[str, Any]) -> str:
    """The loss preset, +HA-DW when it was on (from the run's config.json), else the directory name."""
    cfg = run["config"] or {}
    algo = cfg.get("algo", {})
    if not algo:
        return os.path.basename(os.path.normpath(run["dir"]))
    name = str(algo.get("preset", "?")).upper().replace("DR_GRPO", "Dr.GRPO")
    return f"{name}+HA-DW" if algo.get("loss", {}).get("hadw", True) else name  # the library's default: on


def _lr(run: dict[str, Any]) -> Any:
    return ((run["config"] or {}).get("optim") or {}).get("lr")


def group_runs(runs: list[dict[str, Any]], labels: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Runs by label, in order of first appearance: the given labels, else `default_label`, with the learning rate
    appended where runs of one default label differ in it (e.g. GRPO at lr x1.3 as its own arm)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    if labels is not None:
        for label, run in zip(labels, runs, strict=True):
            groups[label].append(run)
        return groups
    lrs: dict[str, set] = defaultdict(set)
    for run in runs:
        lrs[default_label(run)].add(_lr(run))
    for run in runs:
        label, lr = default_label(run), _lr(run)
        groups[f"{label}, lr {lr:g}" if len(lrs[label]) > 1 and isinstance(lr, float | int) else label].append(run)
    return groups


def _seed(run: dict[str, Any]) -> Any:
    return ((run["config"] or {}).get("train") or {}).get("seed")


def _ms(xs: list[float], sign: str = "+") -> str:
    """mean ± sample standard deviation (± 0 for one value)."""
    return f"{statistics.fmean(xs):{sign}.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def summary(groups: dict[str, list[dict]], mode: str, levels: list[str]) -> list[str]:
    """The comparison as text: per label the base and final accuracy per level (mean ± sd [min, max] over its runs),
    the gain (final - base, overall) and the mean fraction of degenerate groups per step; then, for every label
    after the first, its per-seed differences to the first label on the seeds both have (paired runs)."""
    columns: dict[str, dict[str, list[float]]] = {}  # label -> row name -> one value per run
    for label, grp in groups.items():
        grp = [r for r in grp if r["eval"]]
        if not grp:
            continue
        col = {"base": [r["eval"]["base"][mode]["overall"] for r in grp]}
        col.update({lv.replace("level_", "L"): [r["eval"]["final"][mode][lv] for r in grp] for lv in levels})
        col["gain"] = [r["eval"]["final"][mode]["overall"] - r["eval"]["base"][mode]["overall"] for r in grp]
        col["degenerate"] = [statistics.fmean(m["degenerate_group_frac"] for m in r["metrics"])
                             for r in grp if r["metrics"]]
        columns[f"{label} (n={len(grp)})"] = col
    lines = [f"{mode} held-out accuracy: base model and after RL, mean ± sd [min, max] over runs; gain = final - "
             "base (overall); degenerate = mean fraction of all-equal groups per step",
             f"{'':>10} | " + " | ".join(f"{name:>27}" for name in columns)]
    for row in ["base", *(lv.replace("level_", "L") for lv in levels), "gain", "degenerate"]:
        cells = [f"{_ms(col[row], '')} [{min(col[row]):.3f},{max(col[row]):.3f}]" if col.get(row) else "-"
                 for col in columns.values()]
        lines.append(f"{row:>10} | " + " | ".join(f"{c:>27}" for c in cells))
    ends = sorted({r["eval"]["final"].get("step") for grp in groups.values() for r in grp if r["eval"]} - {None})
    if len(ends) > 1:
        lines.append(f"note: the runs end at different steps {ends} (unfinished runs?)")
    labels = list(groups)
    if len(labels) < 2:
        return lines
    first = [r for r in groups[labels[0]] if r["eval"]]
    ref = {_seed(r): r for r in first}
    paired: dict[str, list[list[float]]] = {}  # column -> per level, one difference per shared seed
    by_seed = []
    for label in labels[1:]:
        runs = [r for r in groups[label] if r["eval"]]
        seeds = [_seed(r) for r in runs]
        if len(set(seeds)) != len(seeds) or len(ref) != len(first):
            lines.append(f"{label} - {labels[0]}: not paired (a label has two runs with the same seed)")
            continue
        pairs = [(r, ref[_seed(r)]) for r in runs if _seed(r) in ref and _seed(r) is not None]
        if not pairs:
            lines.append(f"{label} - {labels[0]}: no shared seeds to pair")
            continue
        name = f"{label} - {labels[0]} ({len(pairs)} pairs)"
        paired[name] = [[a["eval"]["final"][mode][lv] - b["eval"]["final"][mode][lv] for a, b in pairs]
                        for lv in levels]
        if "overall" in levels:
            by_seed.append(f"{name}, overall by seed: " + ", ".join(
                f"{_seed(a)}: {d:+.3f}" for (a, _), d in zip(pairs, paired[name][levels.index("overall")],
                                                              strict=True)))
    if paired:
        lines.append("paired by seed: mean ± sd of the per-seed differences of the final accuracy")
        lines.append(f"{'':>10} | " + " | ".join(f"{name:>27}" for name in paired))
        for k, lv in enumerate(levels):
            lines.append(f"{lv.replace('level_', 'L'):>10} | " + " | ".join(f"{_ms(d[k]):>27}"
                                                                             for d in paired.values()))
        lines += by_seed
    return lines


def compare(run_dirs: list[str], out: str, labels: list[str] | None = None, mode: str | None = None) -> str:
    """Plot runs side by side: final accuracy per level (mean and min-max over runs of a label) and the overall
    accuracy curve. Returns the text of `summary` (the same numbers, their sd and the paired differences)."""
    plt = _plt()
    runs = [read_run(d) for d in run_dirs]
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"--labels has {len(labels)} names for {len(runs)} runs")
    with_eval = [r for r in runs if r["eval"]]
    if not with_eval:
        raise ValueError("none of the runs has an eval.json to compare")
    # a run stopped before its first evaluation has nothing to compare: left out, as `summary` leaves it out
    groups = {label: grp for label, grp in ((label, [r for r in grp if r["eval"]])
                                            for label, grp in group_runs(runs, labels).items()) if grp}
    if mode is None:
        avg = [x for x in with_eval[0]["eval"]["final"] if x.startswith("avg@")]
        mode = avg[0] if avg else "greedy"
    levels = _levels(with_eval[0], mode)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.3))
    width = 0.8 / max(1, len(groups))
    lines = summary(groups, mode, levels)
    for gi, (label, grp) in enumerate(groups.items()):
        finals = [[r["eval"]["final"][mode][lv] for lv in levels] for r in grp]
        means = [sum(c) / len(c) for c in zip(*finals, strict=True)]
        lo = [min(c) for c in zip(*finals, strict=True)]
        hi = [max(c) for c in zip(*finals, strict=True)]
        xs = [i + gi * width for i in range(len(levels))]
        ax1.bar(xs, means, width, label=f"{label} (n={len(grp)})",
                yerr=[[m - a for m, a in zip(means, lo, strict=True)], [b - m for m, b in zip(means, hi, strict=True)]],
                capsize=3)
        curves = [[(h["step"], h[mode]["overall"]) for h in r["eval"]["history"] if mode in h] for r in grp]
        steps = [s for s, _ in curves[0]]
        ys = [[c[i][1] for c in curves if i < len(c)] for i in range(len(steps))]
        ax2.plot(steps, [sum(y) / len(y) for y in ys], marker="o", ms=3, label=label)
        ax2.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2)
    ax1.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(levels))],
                   [lv.replace("level_", "L") for lv in levels])
    ax1.set_ylim(0, 1.05)
    ax1.set_title(f"final held-out accuracy ({mode}); bars: mean, whiskers: min-max")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("RL step")
    ax2.set_title(f"overall held-out accuracy ({mode}); band: min-max")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return "\n".join(lines)
