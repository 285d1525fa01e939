"""Write the Markdown report (table and bar plot) of a ``upsr tune`` search from its MLflow runs.

The trials are grouped by one of the search's variant sets (e.g. the ablation's arms); the
report is written to ``--out`` with the plot beside it and logged to the search's run.
"""

from __future__ import annotations

import argparse

from cli.config import load as load_config
from pipelines.synth import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parent-run", required=True, help="MLflow run id of the search (`upsr tune` logs it)")
    parser.add_argument("--out", required=True, help="Markdown file to write; the plot goes beside it (.png)")
    parser.add_argument("--group-by", help="variant set to group trials by (default: the search's only one)")
    parser.add_argument("--expected-order", metavar="A,B,...",
                        help="the ranking a claim predicts, best first (default: the variant set's expected_order)")
    parser.add_argument("--notes", metavar="FILE",
                        help="Markdown interpretation, written by a person, included under its own heading")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tune.report import write_report

    expected = args.expected_order.split(",") if args.expected_order else None
    write_report(load_config(args.config, args.set).mlflow, args.parent_run, args.out, args.group_by, expected,
                 args.notes)
    return 0
