"""`hadw-train`: run a recipe, list recipes, or compare runs.

    hadw-train --recipe tiny-arith --output-dir runs/tiny            # the main job
    hadw-train --recipe tiny-arith --output-dir runs/tiny --resume   # continue from the latest checkpoint
    torchrun --nproc-per-node 8 --max-restarts 3 -m hadw_trainer --backend zero3 \
        --recipe qwen3-4b-base-grpo-hadw --output-dir runs/q4 --set ...  # 8 GPUs (docs/distributed.md)
    hadw-train --recipe qwen3-4b-base-grpo-hadw --output-dir runs/q4 \\
        --set model.path=/models/Qwen3-4B-Base --set task.path=data/math_train.jsonl
    hadw-train compare runs/grpo_s* runs/hadw_s* --out runs/compare.png
    hadw-train recipes                                                # list recipes
    hadw-train show --recipe tiny-arith [--set ...]                   # print the resolved config
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hadw_trainer.config import PARALLEL_BACKENDS, ConfigError, JobConfig, apply_overrides, valid_keys
from hadw_trainer.recipes import RECIPES, get_recipe


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hadw-train", description="GRPO / DAPO / GSPO +- HA-DW RL training.",
                                epilog="Other commands: 'hadw-train recipes', 'hadw-train show --recipe NAME', "
                                       "'hadw-train compare DIR ... [--out FILE]'.")
    p.add_argument("--recipe", default="tiny-arith", help="recipe name (see 'hadw-train recipes'); default tiny-arith")
    p.add_argument("--output-dir", required=True, help="where metrics, eval, plots and checkpoints go")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint (automatic "
                   "after a torchrun --max-restarts restart)")
    p.add_argument("--backend", choices=PARALLEL_BACKENDS, help="override parallel.backend: how the policy is spread "
                   "over the ranks torchrun starts (docs/distributed.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set algo.loss.lambda_scale=1.5 optim.lr=1e-4")
    return p


def build_config(args: argparse.Namespace) -> JobConfig:
    cfg = get_recipe(args.recipe)
    overrides = [item for group in args.overrides for item in group]
    if getattr(args, "max_steps", None) is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"train.seed={args.seed}")
    if getattr(args, "backend", None) is not None:
        overrides.append(f"parallel.backend={args.backend}")
    return apply_overrides(cfg, overrides)


def _compare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hadw-train compare", description="Plot runs side by side (mean and min-max "
                                "over runs that share a label, e.g. seeds).")
    p.add_argument("runs", nargs="+", help="run output directories")
    p.add_argument("--labels", nargs="+", help="one label per run (default: loss preset +HA-DW from config.json, "
                   "plus the learning rate where runs of one preset differ in it)")
    p.add_argument("--out", default="compare.png", help="plot file (default compare.png)")
    p.add_argument("--mode", help="eval mode to compare: greedy or avg@k (default: avg@k when present)")
    args = p.parse_args(argv)
    from hadw_trainer.observe.plots import compare

    runs = [r for r in args.runs if os.path.isdir(r)]
    for r in args.runs:
        if not os.path.isdir(r):
            print(f"compare: skipping {r} (not a directory)", file=sys.stderr)
    if args.labels and len(runs) != len(args.runs):
        raise ConfigError("compare: --labels needs every argument to be a run directory")
    table = compare(runs, args.out, args.labels, args.mode)
    print(table)
    print(f"plot: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if argv and argv[0] == "compare":
            return _compare(argv[1:])
        if argv and argv[0] == "recipes":
            for name in sorted(RECIPES):
                print(name)
            return 0
        if argv and argv[0] == "keys":
            print("\n".join(valid_keys()))
            return 0
        if argv and argv[0] == "show":
            p = _run_parser()
            p.set_defaults(output_dir="-")
            for a in p._actions:
                if a.dest == "output_dir":
                    a.required = False
            cfg = build_config(p.parse_args(argv[1:]))
            print(json.dumps(cfg.validate().to_dict(), indent=1))
            return 0
        args = _run_parser().parse_args(argv)
        cfg = build_config(args)
        from hadw_trainer.loop import train

        train(cfg, args.output_dir, resume=args.resume)
        return 0
    except ConfigError as e:
        print(f"hadw-train: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"hadw-train: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from hadw_trainer.parallel.checkpoint import CheckpointError

        if isinstance(e, CheckpointError):
            print(f"hadw-train: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
