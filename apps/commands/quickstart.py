"""``rfi quickstart``: the main job end to end (:func:`apps.quickstart.run_quickstart`).

Example:
    rfi quickstart --out runs/quickstart            # minutes on a CPU (timings: docs/benchmarks.md)
    rfi quickstart --out /tmp/qs --budget tiny      # a smoke test of a few seconds
"""

from __future__ import annotations

import argparse
from pathlib import Path

from apps.quickstart import DEFAULT_CONFIG, run_quickstart
from inversion.evaluate import format_table


def register_quickstart(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rfi quickstart``."""
    parser.add_argument("--out", help="output folder (default: out of the config)")
    parser.add_argument(
        "--budget",
        help="a budget of the config: default (8-26 min on 2 idle CPU cores, "
        "by machine), small (about 40 %% of that), tiny (a smoke test)",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="quickstart YAML (default: %(default)s)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="quickstart config overrides, e.g. eval.num=50 device=cpu"
    )
    parser.add_argument("--force", action="store_true", help="retrain even if cached runs exist")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train (or reuse), evaluate, write the report; print the table and where the report is."""
    report = run_quickstart(args.out, args.config, args.budget, tuple(args.overrides), args.force)
    print(format_table(report["evaluation"]))
    print(report["evaluation"]["lpips"])
    print(f"report: {Path(report['out']) / 'report.md'} ({report['seconds']['total'] / 60:.1f} min)")
    return 0
