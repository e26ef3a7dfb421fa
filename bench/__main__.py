"""`python -m bench`: an op's benchmark table, one per device, and a JSON report (harness: `bench.harness`).

    python -m bench                                   # every available device, default shapes
    python -m bench --devices cpu --shape 2048 512 8 --modes full --providers naive,reference,compiled
    python -m bench --devices cpu --mask float        # verl's and TRL's float mask
    python -m bench --devices cuda --dtype bf16 --json $OUT/bench.json
    python -m bench --op from_hidden --devices cpu --shape 2 512 256 --shape 8 512 256   # N T H, two token counts
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

import torch

from bench.harness import DTYPES, MODES, format_table, report, run_device, write_json

OPS = {"hadw_loss": "bench.hadw_loss_bench", "policy_loss": "bench.policy_loss_bench",
       "from_hidden": "bench.from_hidden_bench"}
"""Op name -> the module implementing it for the harness (see `bench.harness`)."""


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=sorted(OPS), default="hadw_loss", help="the op to benchmark (default hadw_loss)")
    p.add_argument("--devices", type=_csv(("cpu", "cuda")), default=None,
                   help="comma list; default: cpu, plus cuda when available")
    p.add_argument("--shape", type=int, nargs=3, metavar=("N", "T", "G"), default=None, action="append",
                   help="rows, tokens per row, group size (from_hidden: hidden size); repeat for several shapes "
                        "(default per device: the op's DEFAULT_SHAPES)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="logprobs dtype (default fp32)")
    p.add_argument("--preset", choices=("grpo", "dapo", "gspo", "dr_grpo"), default="grpo")
    p.add_argument("--kl", action="store_true", help="add ref_logprobs and kl_coef=0.01 (k3)")
    p.add_argument("--mask", choices=("bool", "float"), default="bool", help="dtype of the [N, T] mask")
    p.add_argument("--modes", type=_csv(MODES), default=None, help="comma list of fwd,bwd,full (default: the op's)")
    p.add_argument("--providers", type=str, default=None,
                   help="comma list (default all of the op's; unavailable ones are listed as skipped)")
    p.add_argument("--reps", type=int, default=None, help="timed reps, median reported (default CPU 7, CUDA 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed reps after the first call (default 2 / 10)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice); on a shared machine 1 is steadier")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--json", metavar="PATH", default=None, help="write the report here")
    args = p.parse_args(argv)
    op = importlib.import_module(OPS[args.op])
    try:
        provider_names = _csv(op.PROVIDERS)(args.providers) if args.providers else list(op.PROVIDERS)
    except argparse.ArgumentTypeError as e:
        p.error(f"--providers: {e}")

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--devices cuda: no CUDA device is visible")
    results = []
    modes = args.modes or list(getattr(op, "MODES", MODES))
    for dev in devices:
        device = torch.device(dev)
        default = op.DEFAULT_SHAPES[dev]  # one shape, or a list of them
        shapes = [tuple(s) for s in args.shape] if args.shape else (
            [default] if isinstance(default[0], int) else list(default))
        reps = args.reps or (7 if dev == "cpu" else 50)
        warmup = args.warmup if args.warmup is not None else (2 if dev == "cpu" else 10)
        for shape in shapes:
            inp = op.make_inputs(*shape, dtype=DTYPES[args.dtype], device=device, preset=args.preset, kl=args.kl,
                                 mask=args.mask)
            rep = run_device(op, inp, device, modes, provider_names, reps, warmup, memory=not args.no_memory,
                             log=lambda s: print(s, file=sys.stderr, flush=True))
            del inp
            gc.collect()
            results.append(rep)
            print(format_table(rep), flush=True)
            if hasattr(op, "format_extra"):  # an op's own summary (e.g. tokens/s and its targets)
                print(flush=True)
                print(op.format_extra(rep), flush=True)
            print(flush=True)
    data = report(results)
    print(f"commit {data['commit']}{' (dirty tree)' if data['dirty'] else ''}, torch {data['torch']}, "
          f"triton {data['triton']}")
    if args.json:
        write_json(args.json, data)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
