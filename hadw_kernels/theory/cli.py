"""`hadw-theory`: print (and with --out DIR, plot) the bias theory for your own G, anchor and λ.

    hadw-theory tables [--out DIR]                      the paper's Tables 4-6 next to ours (both readings)
    hadw-theory bias --G 8 [--out DIR]                  E[p̂|S] - p and P(under/over-estimate) over p
    hadw-theory hadw --G 8 --anchor 0.5 [--out DIR]     where HA-DW's λ moves E[ÂΦ|S] toward A, where it overshoots
    hadw-theory anchor [--out DIR]                      window vs ema vs fixed anchors on a drifting accuracy
    hadw-theory lab [--quick] [--out DIR]               paired-seed policy-gradient study: when does HA-DW help?

Plots are PNG files written with matplotlib's Agg backend (matplotlib is only imported when --out is given).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from hadw_kernels.theory.binomial import advantage_bias, nondegenerate_prob, overestimate_prob, underestimate_prob
from hadw_kernels.theory.corollary import paper_tables
from hadw_kernels.theory.hadw import hadw_expected_advantage
from hadw_kernels.theory.simulate import DEFAULT_ANCHORS, drifting_accuracy, simulate_anchor

PLOT_GS = (2, 4, 8, 16, 32)  # the curves drawn next to the requested G, so the plot shows the trend in G


def _pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is in the dev environment
        raise SystemExit("hadw-theory: plotting needs matplotlib; install the extra: "
                         "pip install 'hadw-kernels[theory]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str, name: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clear()
    print(f"wrote {path}")
    return path


# -- tables --------------------------------------------------------------------------------------------------------
def cmd_tables(args: argparse.Namespace) -> int:
    rows = paper_tables()
    print("P(p̂ > p | S) for p uniform on [lo, hi] (Corollary 1; Table 6 is (G/2)∫_0^{2/G}, the mean over [0, 2/G])")
    print(f"{'table':>5} {'G':>3} {'interval':>14} {'paper':>9} {'average':>11} {'avg-paper':>10} {'conditional':>11}")
    for r in rows:
        print(f"{r.table:>5} {r.G:>3} {f'[{r.p_lo:.3g}, {r.p_hi:.3g}]':>14} {r.paper:>9.6f} {r.average:>11.8f} "
              f"{r.error:>+10.2e} {r.conditional:>11.8f}")
    worst = max(abs(r.error) for r in rows)
    print(f"max |average - paper| = {worst:.2e}: the paper's tables use the 'average' reading "
          f"(mean over p of the conditional probability); the literal conditional probability is smaller.")
    if args.out:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4))
        p = np.linspace(0.0, 1.0, 2001)[1:-1]
        for G in (2, 4, 6, 8, 16):
            # A step-like curve: it jumps at every p = j/G, so it is drawn point by point, not smoothed.
            ax.plot(p, underestimate_prob(p, G), lw=1.2, label=f"G={G}")
        ax.set_xlabel("p (success probability)")
        ax.set_ylabel("P(p̂ > p | S)")
        ax.set_title("Chance that the group baseline overshoots p (advantage underestimated)")
        ax.axvline(0.5, color="grey", lw=0.6, ls=":")
        ax.legend()
        _save(fig, args.out, "theory_underestimate_prob.png")
    return 0


# -- bias ----------------------------------------------------------------------------------------------------------
def cmd_bias(args: argparse.Namespace) -> int:
    grid = np.array([0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    for G in args.G:
        print(f"G = {G}: E[p̂|S] - p = A - E[Â|S] (Lemma 2), P(S), and P(p̂ > p | S), P(p̂ < p | S) (Theorem 2, eps=0)")
        print(f"{'p':>6} {'bias':>10} {'P(S)':>9} {'P(under)':>9} {'P(over)':>9}")
        for p, b, ps, under, over in zip(grid, advantage_bias(grid, G), nondegenerate_prob(grid, G),
                                         underestimate_prob(grid, G), overestimate_prob(grid, G), strict=True):
            print(f"{p:>6.2f} {b:>+10.5f} {ps:>9.5f} {under:>9.5f} {over:>9.5f}")
        print()
    if args.out:
        plt = _pyplot()
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        p = np.linspace(0.0, 1.0, 401)
        for G in sorted(set(PLOT_GS) | set(args.G)):
            style = dict(lw=2.2) if G in args.G else dict(lw=1.0, alpha=0.8)
            ax.plot(p, advantage_bias(p, G), label=f"G={G}", **style)
            ax2.plot(p, nondegenerate_prob(p, G), label=f"G={G}", **style)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xlabel("p")
        ax.set_ylabel("E[p̂ | S] - p  =  A - E[Â | S]")
        ax.set_title("Group-mean bias (Lemma 2); > 0: hard prompts under-credited", fontsize=10)
        ax.legend()
        ax2.set_xlabel("p")
        ax2.set_ylabel("P(S)")
        ax2.set_title("Probability that a group is non-degenerate", fontsize=10)
        _save(fig, args.out, "theory_bias.png")
    return 0


# -- hadw ----------------------------------------------------------------------------------------------------------
def _anchor_for(anchor: str, p: float) -> float:
    return p if anchor == "p" else float(anchor)


def hadw_grid(G: int, anchor: str, ps: np.ndarray, lambdas: np.ndarray, adv_norm: str) -> dict[str, np.ndarray]:
    """log10(|E[ÂΦ] - A| / |E[Â] - A|) on the grid [len(lambdas), len(ps)] per outcome (< 0: HA-DW helps)."""
    out = {name: np.empty((len(lambdas), len(ps))) for name in ("correct", "wrong", "pooled")}
    for j, p in enumerate(ps):
        res = hadw_expected_advantage(float(p), G, _anchor_for(anchor, float(p)), 1.0, adv_norm)
        for row in res.rows():
            plain = abs(row.plain_error)
            # Φ is linear in λ, so one enumeration serves every λ of the grid.
            err = np.abs(lambdas * row.unit - row.true_advantage)
            with np.errstate(divide="ignore"):
                out[row.outcome][:, j] = np.log10(np.maximum(err, 1e-300) / max(plain, 1e-300))
    return out


def cmd_hadw(args: argparse.Namespace) -> int:
    G, lam = args.G, args.lambda_scale
    where = "anchor C = p (the prompt's own accuracy)" if args.anchor == "p" else f"anchor C = {float(args.anchor)}"
    print(f"G = {G}, {where}, λ = {lam}, adv_norm = {args.adv_norm}. Per outcome of a response, conditional on S:")
    print("  err = E[·] - A; 'helps' if |E[ÂΦ] - A| < |E[Â] - A|; λ-range: every λ that helps (Theorem 3, exact);")
    print("  λ* makes E[ÂΦ] = A. A λ above the range over-corrects.")
    print(f"{'p':>5} {'outcome':>8} {'P':>6} {'A':>8} {'E[Â]':>8} {'E[ÂΦ]':>8} {'err':>8} {'err Φ':>8} "
          f"{'helps':>5}  {'λ-range':>16} {'λ*':>6}")
    ps = np.round(np.arange(0.05, 0.951, 0.05), 2)
    helped = {"correct": 0, "wrong": 0, "pooled": 0}
    for p in ps:
        res = hadw_expected_advantage(float(p), G, _anchor_for(args.anchor, float(p)), lam, args.adv_norm)
        for row in res.rows():
            rng = row.lambda_range
            rtxt = "none" if rng is None else f"({rng[0]:.3f}, {rng[1]:.3f})"
            lstar = "-" if math.isnan(row.lambda_exact) else f"{row.lambda_exact:.3f}"
            helped[row.outcome] += row.improves
            helps = "yes" if row.improves else "no"
            print(f"{p:>5.2f} {row.outcome:>8} {row.prob:>6.3f} {row.true_advantage:>+8.4f} {row.plain:>+8.4f} "
                  f"{row.hadw:>+8.4f} {row.plain_error:>+8.4f} {row.hadw_error:>+8.4f} {helps:>5}  {rtxt:>16} "
                  f"{lstar:>6}")
    print("HA-DW helps at λ = {}: correct {}/{n}, wrong {}/{n}, pooled {}/{n} of the p above".format(
        lam, helped["correct"], helped["wrong"], helped["pooled"], n=len(ps)))
    if args.out:
        plt = _pyplot()
        p_fine = np.linspace(0.005, 0.995, 100)  # avoids p = 1/2, where the pooled plain error is exactly 0
        lambdas = np.linspace(0.5, 2.0, 151)
        grid = hadw_grid(G, args.anchor, p_fine, lambdas, args.adv_norm)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
        for ax, (name, z) in zip(axes, grid.items(), strict=True):
            im = ax.pcolormesh(p_fine, lambdas, np.clip(z, -1.5, 1.5), cmap="RdBu_r", vmin=-1.5, vmax=1.5,
                               shading="auto")
            ax.contour(p_fine, lambdas, z, levels=[0.0], colors="k", linewidths=1.0)
            ax.axhline(lam, color="k", ls="--", lw=0.8)
            ax.set_title(f"{name}: log10 |E[ÂΦ]-A| / |E[Â]-A|")
            ax.set_xlabel("p")
        axes[0].set_ylabel("λ")
        fig.colorbar(im, ax=axes, shrink=0.85, label="< 0 (blue): HA-DW closer to A")
        fig.suptitle(f"G={G}, {where}, adv_norm={args.adv_norm}; black line: break-even, dashed: λ={lam}")
        anchor_tag = "p" if args.anchor == "p" else f"{float(args.anchor):g}"
        _save(fig, args.out, f"theory_hadw_G{G}_anchor{anchor_tag}.png")
    return 0


# -- anchor --------------------------------------------------------------------------------------------------------
def cmd_anchor(args: argparse.Namespace) -> int:
    acc = drifting_accuracy(args.steps, args.start, args.end, args.shape)
    anchors = dict(DEFAULT_ANCHORS)
    if args.eta:
        anchors = {k: v for k, v in anchors.items() if v["mode"] != "ema"}
        anchors.update({f"ema (eta={e:g})": dict(mode="ema", eta=e) for e in args.eta})
    y, traces = simulate_anchor(acc, anchors, G=args.G, prompts=args.prompts, seed=args.seed)
    print(f"{args.steps} steps, accuracy {args.start} -> {args.end} ({args.shape}), batches of {args.prompts} x "
          f"{args.G}, seed {args.seed}. C_t^- at a few steps, RMS error vs the true accuracy, and η_t ('ema'):")
    marks = sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    print(f"{'anchor':>16} " + " ".join(f"{'t=' + str(t):>8}" for t in marks) + f" {'RMS err':>8} {'last η_t':>10}")
    print(f"{'true accuracy':>16} " + " ".join(f"{acc[t]:>8.4f}" for t in marks))
    for name, tr in traces.items():
        last_eta = "-" if np.isnan(tr.eta_t[-1]) else f"{tr.eta_t[-1]:.3g}"
        print(f"{name:>16} " + " ".join(f"{tr.prior[t]:>8.4f}" for t in marks)
              + f" {tr.tracking_error(acc):>8.4f} {last_eta:>10}")
    if args.out:
        plt = _pyplot()
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[2, 1])
        t = np.arange(args.steps)
        ax.plot(t, acc, color="k", lw=2.0, label="true accuracy")
        ax.plot(t, y, color="grey", lw=0.5, alpha=0.6, label="batch accuracy y_t")
        for i, (name, tr) in enumerate(traces.items()):
            color = f"C{i}"  # the same colour for an anchor in both panels
            ax.plot(t, tr.prior, lw=1.3, color=color, label=f"{name}  C_t^-")
            if not np.all(np.isnan(tr.eta_t)):
                ax2.semilogy(t, np.maximum(tr.eta_t, 1e-12), lw=1.0, color=color, label=name)
        ax.set_ylabel("accuracy / anchor")
        ax.set_title("Difficulty anchor tracking a drifting accuracy (the real DifficultyAnchor)")
        ax.legend(fontsize=8)
        ax2.set_ylabel("η_t (ema), floored at 1e-12")
        ax2.set_xlabel("training step t")
        ax2.legend(fontsize=8)
        _save(fig, args.out, "theory_anchor.png")
    return 0


# -- lab ------------------------------------------------------------------------------------------------------------
def cmd_lab(args: argparse.Namespace) -> int:
    import dataclasses

    from hadw_kernels.theory.lab import QUICK, Study, run_study
    from hadw_kernels.theory.lab_report import summary_text, write_outputs

    study = QUICK if args.quick else Study()
    overrides = dict(seeds=args.seeds, steps=args.steps, groups=tuple(args.G) if args.G else None,
                     families=tuple(args.families) if args.families else None,
                     optimizers=tuple(args.optimizers) if args.optimizers else None,
                     adv_norm=args.adv_norm, lr_rule=args.lr_rule)
    study = dataclasses.replace(study, **{k: v for k, v in overrides.items() if v is not None})
    result = run_study(study, jobs=args.jobs)
    print(summary_text(result))
    if args.out:
        for path in write_outputs(result, args.out):
            print(f"wrote {path}")
    return 0


# -- entry point ---------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"G must be an int >= 2, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value


def _anchor_arg(text: str) -> str:
    if text == "p":
        return text
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"anchor must be a number in [0, 1] or 'p', got {text!r}") from err
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"anchor must be in [0, 1], got {text}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hadw-theory", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tables", help="the paper's Tables 4-6 next to this module's values")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("bias", help="the group-mean bias and the under/over-estimation probabilities over p")
    p.add_argument("--G", type=_positive_int, nargs="+", default=[8], help="group size(s) to print (default 8)")
    p.set_defaults(func=cmd_bias)

    p = sub.add_parser("hadw", help="where HA-DW's weight moves the expected advantage toward the true one")
    p.add_argument("--G", type=_positive_int, default=8, help="group size (default 8)")
    p.add_argument("--anchor", type=_anchor_arg, default="0.5",
                   help="the anchor C in [0, 1], or 'p' for the prompt's own accuracy (default 0.5)")
    p.add_argument("--lambda-scale", "--lambda", dest="lambda_scale", type=float, default=1.3,
                   help="λ (default 1.3, the paper's best)")
    p.add_argument("--adv-norm", choices=("none", "group_std"), default="none",
                   help="'none' (Â = r - p̂, the paper's theory) or 'group_std' (default none)")
    p.set_defaults(func=cmd_hadw)

    p = sub.add_parser("anchor", help="window vs ema vs fixed anchors following a drifting accuracy")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--start", type=float, default=0.2, help="accuracy at step 0 (default 0.2)")
    p.add_argument("--end", type=float, default=0.7, help="accuracy at the last step (default 0.7)")
    p.add_argument("--shape", choices=("sigmoid", "linear", "step"), default="sigmoid")
    p.add_argument("--eta", type=float, nargs="+", help="ema base rates to compare (default 0.1 and 10)")
    p.add_argument("--G", type=_positive_int, default=8)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_anchor)

    p = sub.add_parser("lab", help="paired-seed policy-gradient study of GRPO vs HA-DW and other estimators")
    p.add_argument("--quick", action="store_true", help="a smoke run: G = 8, SGD, 6 seeds, 60 steps (< 1 min)")
    p.add_argument("--seeds", type=_count, help="reported seeds per arm, >= 2 (default 24; quick 6)")
    p.add_argument("--steps", type=_count, help="optimizer steps per run (default 200; quick 60)")
    p.add_argument("--G", type=_positive_int, nargs="+", help="group sizes (default 4 8 16; quick 8)")
    p.add_argument("--families", nargs="+", choices=("tabular", "shared"), help="policy families (default both)")
    p.add_argument("--optimizers", nargs="+", choices=("sgd", "adam"), help="optimizers (default both; quick sgd)")
    p.add_argument("--adv-norm", choices=("group_std", "none"), help="advantage normalisation (default group_std)")
    p.add_argument("--lr-rule", choices=("best", "midway"),
                   help="how the pilot picks GRPO's rate: best AUC (default) or the mid-way rate")
    p.add_argument("--jobs", type=_count, help="worker processes (default: the CPU count)")
    p.set_defaults(func=cmd_lab)

    for sp in sub.choices.values():
        sp.add_argument("--out", metavar="DIR", help="write PNG plots into DIR (created if missing)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 on success, 2 on a bad argument)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "hadw" and not (math.isfinite(args.lambda_scale) and args.lambda_scale > 0):
        parser.error(f"--lambda-scale must be a finite number > 0, got {args.lambda_scale}")
    try:
        return args.func(args)
    except ValueError as err:  # a bad value deep in the theory functions: report it like an argparse error
        print(f"hadw-theory {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
