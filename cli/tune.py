"""Search config keys of UPSR training with Ray Tune (trials are Ray Train runs), tracked in MLflow.

The ``tune`` config section holds the search space (any config key of the model, its
training and validation; named variants that set several keys at once), the search
algorithm (optuna, random, grid), the scheduler (asha, fifo) and the objective, a weighted
sum of validation metrics. The search lives in the ``tune`` package; this is its command,
in the top layer because it reads the root config (``cli.config``).

Exit status: 0 when at least one trial ran to its end or was stopped by the scheduler with a
score (failed trials are logged and listed in the search's MLflow run), 1 when every trial
failed, 2 for a config or input error found before any trial started.
"""

from __future__ import annotations

import argparse
import logging

from cli.config import load as load_config
from pipelines.synth import add_config_arguments
from pipelines.train_aux import default_run_name

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="synthesised dataset (folder or s3:// prefix)")
    parser.add_argument("--aux", required=True,
                        help="aux net, as for `upsr train --aux`: a train-aux checkpoint folder or a weights file")
    add_config_arguments(parser)
    parser.add_argument("--name", help="search name; an existing search of that name under the same storage is "
                                       "resumed (default: a new name from the date and time)")
    parser.add_argument("--report", metavar="PATH",
                        help="after the search, write a Markdown report of its trials grouped by variant (mean "
                             "± std of PSNR, SSIM, LPIPS) to PATH and a bar plot beside it (e.g. docs/ablation.md)")


def run(args: argparse.Namespace) -> int:
    from tune.report import write_report
    from tune.search import search

    root = load_config(args.config, args.set)
    outcome = search(args.data, args.aux, root.jobs(), root.tune, args.name or default_run_name("upsr-tune"))
    if args.report:
        write_report(root.mlflow, outcome.parent_run_id, args.report)
    return 0 if outcome.succeeded else 1
