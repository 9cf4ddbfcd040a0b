"""Plan per-expert precision from expert statistics under a memory budget.

    python -m sglang.srt.enhanced.tools.plan_precision --stats expert_stats.json --model M \\
        --budget 20GiB [--int4 DIR] [--fp8 DIR] [--bf16 DIR] [--keep 'PATTERN=PRECISION' ...] \\
        [--strategy optimal|random|uniform] [--seed 0] -o plan.yaml

``--stats`` is the tracker's JSON export (``/expert_stats/export?format=json`` or
``export_expert_activation_stats("x.json")``). ``--bf16`` defaults to ``--model``. The
budget counts every weight as stored (what packed serving keeps in memory); weights other
than routed experts take their ``--keep`` rule's precision, else bf16. Prints a table
(bytes per precision, expected error against uniform cheapest and a random choice of the
same budget) and writes the config to ``-o`` (``-`` for standard output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sglang.srt.enhanced.config import Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.precision_planner import (
    STRATEGIES,
    PrecisionPlanner,
    parse_keep,
    tokens_from_stats,
)
from sglang.srt.enhanced.tools.quantize import parse_size


def read_stats(path: Path) -> dict:
    """The tracker's JSON export at ``path``."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EnhancedError(f"cannot read expert statistics: {e}", culprit=str(path)) from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sglang.srt.enhanced.tools.plan_precision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stats", type=Path, required=True, help="the tracker's JSON export")
    parser.add_argument("--model", type=Path, required=True, help="the unquantized model folder")
    parser.add_argument("--budget", required=True, help="bytes for all weights as stored, e.g. 20GiB")
    parser.add_argument("--int4", type=Path, help="GPTQ checkpoint folder")
    parser.add_argument("--fp8", type=Path, help="FP8 checkpoint folder")
    parser.add_argument("--bf16", type=Path, help="unquantized checkpoint folder (default: --model)")
    parser.add_argument("--keep", action="append", default=[], metavar="PATTERN=PRECISION",
                        help="precision of non-expert weights matching PATTERN (repeatable)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="optimal")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    parser.add_argument("-o", "--output", required=True, help="config file to write, or - for stdout")
    args = parser.parse_args(argv)
    try:
        folders = {p: f for p, f in ((Precision.INT4, args.int4), (Precision.FP8, args.fp8),
                                     (Precision.BF16, args.bf16 or args.model)) if f is not None}
        budget = parse_size(args.budget, culprit="--budget")
        tokens = tokens_from_stats(read_stats(args.stats))
        planner = PrecisionPlanner(args.model, folders, keep=parse_keep(args.keep))
        plan = planner.plan(tokens, budget, strategy=args.strategy, seed=args.seed)
    except EnhancedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.report(), file=sys.stderr if args.output == "-" else sys.stdout)
    if args.output == "-":
        sys.stdout.write(plan.to_yaml())
    else:
        Path(args.output).write_text(plan.to_yaml())
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
