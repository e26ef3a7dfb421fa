"""The lab's outputs: the JSON of a study, its markdown tables, and the plots (matplotlib, Agg, imported on use).

Files written by `write_outputs(result, out)`:
- lab_results.json: the study, the environment (time, load average), the pilot, every arm's per-seed metrics, mean
  curves and paired statistics vs GRPO, and the matched-step contrasts;
- lab_table.md: the paired differences vs GRPO as markdown tables (points, 95% CI, Holm-adjusted tests);
- lab_curves.png, lab_curves_hard.png: mean true accuracy over steps (all prompts / the initially hard third);
- lab_forest.png, lab_forest_hard.png: the paired AUC differences vs GRPO with their 95% CIs, every arm and setting;
- lab_step_multiplier.png: kappa(p) of each arm over GRPO's (`lab_arms.expected_step`): how an arm shares the
  expected step between hard and easy prompts, for anchors 0.3 / 0.5 / 0.7 (theory, no runs).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from hadw_kernels.theory.lab_arms import Arm, expected_step

CURVE_ARMS = ("grpo", "grpo_lr1.3", "grpo_lr2", "hadw_window_l1", "hadw_window_l1.3", "hadw_renorm", "oracle",
              "rectified")
"""The arms drawn in the learning-curve plots (all arms are in the JSON, the tables and the forest plots)."""
SIGNIFICANCE = 0.05
STEP_ARMS = (Arm("hadw λ=1", anchor="fixed"), Arm("hadw λ=1.3", anchor="fixed", lambda_scale=1.3),
             Arm("loo", baseline="loo"), Arm("oracle", baseline="oracle"), Arm("rectified", baseline="rectified"))
"""The arms of the kappa(p) plot and table (for a fixed anchor C, every anchor mode gives the same kappa)."""
STEP_P = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.98)


def _clean(x):
    """JSON-ready: numpy scalars to Python, NaN / inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    return x


def _blocks(result: dict) -> list[tuple[str, str, list[str]]]:
    """(family, optimizer, [setting keys by G]) for every family x optimizer of the result."""
    out: dict[tuple[str, str], list[str]] = {}
    for key, s in result["settings"].items():
        out.setdefault((s["setting"]["family"], s["setting"]["optimizer"]), []).append(key)
    return [(f, o, sorted(keys, key=lambda k: result["settings"][k]["setting"]["G"])) for (f, o), keys in out.items()]


def _cell(p: dict, scale: float, digits: int = 2) -> str:
    star = "*" if p["p_wilcoxon_holm"] < SIGNIFICANCE and p["p_t_holm"] < SIGNIFICANCE else ""
    return (f"{scale * p['mean']:+.{digits}f} [{scale * p['ci_low']:+.{digits}f}, {scale * p['ci_high']:+.{digits}f}]"
            f"{star}")


def markdown_tables(result: dict, metric: str = "auc") -> str:
    """One markdown table per family x optimizer: arm rows, G columns, cells 'mean [95% CI]' of metric(arm) -
    metric(GRPO) (points for accuracies, steps for steps_to_target); * = Holm-adjusted p < 0.05 in both tests."""
    scale = 1.0 if metric == "steps_to_target" else 100.0
    unit = "steps" if metric == "steps_to_target" else "points"
    lines = []
    for family, optimizer, keys in _blocks(result):
        settings = [result["settings"][k] for k in keys]
        lines.append(f"**{family} / {optimizer}** — {metric} vs GRPO ({unit})")
        lines.append("")
        lines.append("| arm | " + " | ".join(f"G = {s['setting']['G']}" for s in settings) + " |")
        lines.append("|---|" + "---|" * len(settings))
        grpo = [s["arms"]["grpo"] for s in settings]
        lines.append("| grpo (level; lr) | " + " | ".join(
            f"{scale * g['mean'][metric]:.{1 if scale == 1 else 2}f}; lr {s['lr']:g}" for g, s in
            zip(grpo, settings, strict=True)) + " |")
        for name in settings[0]["arms"]:
            if name == "grpo":
                continue
            lines.append(f"| {name} | " + " | ".join(_cell(s["arms"][name]["paired"][metric], scale)
                                                     for s in settings) + " |")
        lines.append("")
    return "\n".join(lines)


def contrast_tables(result: dict, metric: str = "auc") -> str:
    """HA-DW at λ minus GRPO at lr x λ (same step multiplier under SGD), per family x optimizer."""
    scale = 1.0 if metric == "steps_to_target" else 100.0
    lines = []
    for family, optimizer, keys in _blocks(result):
        settings = [result["settings"][k] for k in keys]
        names = list(settings[0]["contrasts"])
        if not names:
            continue
        lines.append(f"**{family} / {optimizer}** — {metric}, HA-DW at λ minus GRPO at lr × λ")
        lines.append("")
        lines.append("| contrast | " + " | ".join(f"G = {s['setting']['G']}" for s in settings) + " |")
        lines.append("|---|" + "---|" * len(settings))
        for name in names:
            cells = []
            for s in settings:
                p = s["contrasts"][name][metric]
                sig = "*" if p["p_t"] < SIGNIFICANCE and p["p_wilcoxon"] < SIGNIFICANCE else ""
                cells.append(f"{scale * p['mean']:+.2f} [{scale * p['ci_low']:+.2f}, {scale * p['ci_high']:+.2f}]{sig}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def pilot_table(result: dict) -> str:
    """The learning-rate pilot: mean AUC of plain GRPO per rate, and the rate chosen."""
    lines = ["| setting | chosen lr | rule | AUC over the grid (rate: AUC, points) |", "|---|---|---|---|"]
    for key, p in result["pilot"].items():
        grid = ", ".join(f"{lr:g}: {100 * a:.1f}" for lr, a in zip(p["grid"], p["auc"], strict=True))
        lines.append(f"| {key} | {p['lr']:g} | {p['rule']} | {grid} |")
    return "\n".join(lines)


def step_multiplier_table(G: int = 8, anchors: tuple[float, ...] = (0.3, 0.5), adv_norm: str = "group_std") -> str:
    """kappa_arm(p) / kappa_GRPO(p) at the `STEP_P` success probabilities: > 1 = the arm's expected step on a prompt
    of that difficulty is larger than GRPO's."""
    p = np.asarray(STEP_P)
    grpo = expected_step(Arm("grpo"), p, G, adv_norm=adv_norm)
    cols = [(f"{a.name}, C = {c:g}", expected_step(a, p, G, anchor=c, adv_norm=adv_norm) / grpo)
            for a in STEP_ARMS[:2] for c in anchors] + [(a.name, expected_step(a, p, G, adv_norm=adv_norm) / grpo)
                                                         for a in STEP_ARMS[2:]]
    lines = [f"kappa(p) / kappa_GRPO(p), G = {G}, adv_norm = {adv_norm} (GRPO's kappa in the last column)", "",
             "| p | " + " | ".join(name for name, _ in cols) + " | GRPO kappa |",
             "|---|" + "---|" * (len(cols) + 1)]
    for i, pi in enumerate(p):
        lines.append(f"| {pi:g} | " + " | ".join(f"{v[i]:.3f}" for _, v in cols) + f" | {grpo[i]:.3f} |")
    return "\n".join(lines)


def summary_text(result: dict) -> str:
    """What the CLI prints: the environment, the pilot's choices and the AUC / hard-third tables."""
    env = result["environment"]
    head = (f"lab: {len(result['settings'])} settings x {len(result['study']['arms'])} arms x "
            f"{result['study']['seeds']} seeds, {result['study']['steps']} steps; {env['seconds_total']:.0f} s wall "
            f"({env['seconds_pilot']:.0f} s pilot) on {env['jobs']} processes, {env['cpu_seconds']:.0f} CPU-s in the "
            f"runs; load average {env['load_average_start']} -> {env['load_average_end']}")
    return "\n\n".join([head, pilot_table(result), markdown_tables(result, "auc"),
                        markdown_tables(result, "auc_hard"), contrast_tables(result, "auc")])


def write_outputs(result: dict, out: str) -> list[str]:
    """Write the JSON, the markdown tables and the plots into `out` (created); returns the paths."""
    os.makedirs(out, exist_ok=True)
    paths = []
    path = os.path.join(out, "lab_results.json")
    with open(path, "w") as fh:
        json.dump(_clean(result), fh, indent=1, allow_nan=False)
    paths.append(path)
    path = os.path.join(out, "lab_table.md")
    G = 8 if 8 in result["study"]["groups"] else result["study"]["groups"][0]
    with open(path, "w") as fh:
        fh.write("# Lab results: paired differences vs GRPO\n\n" + summary_text(result) + "\n\n"
                 + "\n\n".join(markdown_tables(result, m) for m in ("final", "final_hard", "auc_easy",
                                                                      "steps_to_target"))
                 + "\n\n" + step_multiplier_table(G, adv_norm=result["study"]["adv_norm"]) + "\n")
    paths.append(path)
    paths += plot_curves(result, out) + plot_forest(result, out) + plot_step_multiplier(result, out)
    return paths


# -- plots ------------------------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is in the dev environment
        raise SystemExit("hadw-theory lab: plotting needs matplotlib; install the extra: "
                         "pip install 'hadw-kernels[theory]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(result: dict, out: str) -> list[str]:
    """Mean true accuracy over steps of `CURVE_ARMS`, one panel per setting (rows: family / optimizer, columns: G)."""
    plt = _pyplot()
    blocks = _blocks(result)
    paths = []
    for which, fname in (("acc", "lab_curves.png"), ("hard", "lab_curves_hard.png")):
        ncol = max(len(k) for _, _, k in blocks)
        fig, axes = plt.subplots(len(blocks), ncol, figsize=(4.2 * ncol, 3.0 * len(blocks)), squeeze=False)
        for r, (family, optimizer, keys) in enumerate(blocks):
            for c, key in enumerate(keys):
                ax, s = axes[r][c], result["settings"][key]
                for name in CURVE_ARMS:
                    if name in s["arms"]:
                        ax.plot(100 * np.asarray(s["arms"][name]["curve"][which]), lw=1.1, label=name,
                                ls="--" if name.startswith("grpo_lr") else "-")
                ax.set_title(f"{family} / {optimizer} / G = {s['setting']['G']} (lr {s['lr']:g})", fontsize=9)
                ax.set_xlabel("step", fontsize=8)
                ax.set_ylabel("true accuracy, %" + (" (hard third)" if which == "hard" else ""), fontsize=8)
                ax.tick_params(labelsize=7)
            for c in range(len(keys), ncol):
                axes[r][c].axis("off")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_forest(result: dict, out: str) -> list[str]:
    """Paired AUC differences vs GRPO with 95% CIs: one panel per family / optimizer, every arm, one marker per G."""
    plt = _pyplot()
    blocks = _blocks(result)
    paths = []
    for metric, fname in (("auc", "lab_forest.png"), ("auc_hard", "lab_forest_hard.png")):
        fig, axes = plt.subplots(1, len(blocks), figsize=(4.6 * len(blocks), 6.5), squeeze=False, sharey=True)
        for i, (family, optimizer, keys) in enumerate(blocks):
            ax = axes[0][i]
            names = [n for n in result["settings"][keys[0]]["arms"] if n != "grpo"]
            y = np.arange(len(names))[::-1]
            for j, key in enumerate(keys):
                s = result["settings"][key]
                off = (j - (len(keys) - 1) / 2) * 0.22
                mean = np.array([100 * s["arms"][n]["paired"][metric]["mean"] for n in names])
                lo = np.array([100 * s["arms"][n]["paired"][metric]["ci_low"] for n in names])
                hi = np.array([100 * s["arms"][n]["paired"][metric]["ci_high"] for n in names])
                ax.errorbar(mean, y + off, xerr=[mean - lo, hi - mean], fmt="o", ms=3, lw=1, capsize=2,
                            label=f"G = {s['setting']['G']}")
            ax.axvline(0.0, color="k", lw=0.7)
            ax.set_yticks(y)
            ax.set_yticklabels(names, fontsize=8)
            ax.set_title(f"{family} / {optimizer}", fontsize=10)
            ax.set_xlabel(f"{'AUC' if metric == 'auc' else 'hard-third AUC'} minus GRPO's, points (95% CI)",
                          fontsize=8)
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(axis="x", lw=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_step_multiplier(result: dict, out: str) -> list[str]:
    """kappa_arm(p) / kappa_GRPO(p) over p for `STEP_ARMS`, one panel per anchor C (0.3, 0.5, 0.7), at G = 8 (or the
    study's first G) and the study's adv_norm."""
    plt = _pyplot()
    G = 8 if 8 in result["study"]["groups"] else result["study"]["groups"][0]
    adv_norm = result["study"]["adv_norm"]
    p = np.linspace(0.01, 0.99, 197)
    grpo = expected_step(Arm("grpo"), p, G, adv_norm=adv_norm)
    anchors = (0.3, 0.5, 0.7)
    fig, axes = plt.subplots(1, len(anchors), figsize=(4.2 * len(anchors), 3.4), sharey=True)
    for ax, c in zip(axes, anchors, strict=True):
        for arm in STEP_ARMS:
            ax.plot(p, expected_step(arm, p, G, anchor=c, adv_norm=adv_norm) / grpo, lw=1.2, label=arm.name)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.axvline(c, color="grey", lw=0.6, ls=":")
        ax.set_title(f"anchor C = {c:g}, G = {G} ({adv_norm})", fontsize=9)
        ax.set_xlabel("success probability p of the prompt", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("expected step on the prompt / GRPO's", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "lab_step_multiplier.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
