"""`coconut-data`: command line for the data package (``python -m coconut_kernels.data.cli``).

``coconut-data prosqa --n N --seed S [--size prosqa|small] [--render text|edges] --out FILE`` writes N
ProsQA-style records in the official JSON format; the same seed, size and render always write the same file.
"""
from __future__ import annotations

import argparse
import sys

from .._cli import run_cli
from .prosqa import CHAINS, RENDERS, SIZES, generate_dataset
from .records import save_records


def main(argv: list[str] | None = None) -> int:
    """A user error (e.g. an unwritable --out) prints ``coconut-data: error: ...`` and returns 2 (the
    traceback only with ``--debug``)."""
    return run_cli("coconut-data", _main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coconut-data", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prosqa", help="generate ProsQA-style problems (official JSON format)")
    p.add_argument("--n", type=int, required=True, help="number of problems")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", choices=sorted(SIZES), default="prosqa",
                   help="graph size: prosqa (the published split's shape, default) or small (shorter, for CPU runs)")
    p.add_argument("--render", choices=RENDERS, default="text",
                   help="text (the published sentences, default) or edges (compact 'X Y' pairs, node-name steps)")
    p.add_argument("--chain", choices=CHAINS, default="forward",
                   help="forward (the published steps, default) or backward (edges render: both candidates walked "
                        "back to the people at once; README)")
    p.add_argument("--out", required=True, help="output JSON file")
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error("--n must be >= 0")
    if args.chain == "backward" and args.render != "edges":
        parser.error("--chain backward needs --render edges")
    records = generate_dataset(args.n, seed=args.seed, size=args.size, render=args.render, chain=args.chain)
    save_records(records, args.out)
    print(f"wrote {len(records)} problems to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
