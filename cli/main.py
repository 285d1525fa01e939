"""The ``upsr`` command: one subcommand per job.

Every job of ``pipelines`` also runs as ``python -m pipelines.<job>``; the searches of ``tune``
run through here (``upsr tune``, ``upsr tune-report``), since they need the root config's
``tune`` section.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from importlib import metadata
from pathlib import Path

from pipelines.entry import add_log_level, execute

# Lines Ray's own actors print over and over that mean nothing to a user of this project, kept
# out of the console (they stay in Ray's log files, /tmp/ray/session_latest/logs; --verbose
# shows them). Ray Train's placement-group cleaner asks the State API, which a local instance
# without the dashboard does not serve, every second of a run: 151 of the demo's 314 lines were
# that warning. The rest are Ray Data's per-epoch plans on the workers' split coordinators,
# Ray Train's reports and set-up, and MLflow's system-metrics monitor starting and stopping
# (92 of the demo's 178 remaining lines); the jobs log their own progress and checkpoints.
HARMLESS_RAY_LINES = "|".join([
    "Failed to query Ray Train Controller actor state",
    r"Starting execution of Dataset", r"Execution plan of Dataset", r"Dataset \S+ execution finished",
    "Progress bars disabled", "Checkpoint successfully created", "Reporting training result",
    "Wrapping provided model", "Setting up process group", "Requesting resources",
    r"[Ss]tart(ed)? training worker group", "mlflow.system_metrics.system_metrics_monitor",
    r"world_rank=\d+, local_rank=\d+", "has constructor arguments in the object store",
])

# subcommand -> (module defining add_arguments(parser) and run(args), summary). Only the chosen
# job's module is imported, so `upsr --help` does not load torch and Ray.
JOBS = {
    "synth": ("pipelines.synth", "synthesise LR/HR training pairs from HR photographs into Parquet (Ray Data)"),
    "synth-verify": ("pipelines.synth_verify", "re-generate sampled rows of a dataset and check they match"),
    "demo": ("pipelines.demo", "run the project end to end on embedded defaults (sample photographs, local Ray)"),
    "upscale": ("pipelines.upscale", "upscale images x4 with a trained UPSR checkpoint"),
    "import-official": ("pipelines.import_official",
                        "import the authors' released UPSR weights as a checkpoint folder"),
    "train-aux": ("pipelines.train_aux", "train the auxiliary SR net on a synthesised dataset (Ray Train, MLflow)"),
    "train": ("pipelines.train",
              "train UPSR with a frozen aux net on a synthesised dataset (Ray Train, MLflow registry)"),
    "tune": ("cli.tune", "search UPSR's noise weighting and other config keys (Ray Tune over Ray Train, MLflow)"),
    "tune-report": ("cli.tune_report", "write the Markdown report (table and bar plot) of a search from MLflow"),
    "evaluate": ("pipelines.evaluate",
                 "batch-evaluate a model on an eval set (Ray Data), per-image metrics to Parquet and MLflow"),
    "promote": ("pipelines.promote", "move the registry's champion alias to a candidate that beats it on the eval set"),
}


def version() -> str:
    """This package's version and the pins that decide what it computes, read without importing them."""
    pins = ", ".join(f"{name} {metadata.version(name)}" for name in ("ray", "torch", "mlflow"))
    return f"upsr-ray {metadata.version('upsr-ray')} ({pins})"


def build_parser(job: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upsr", description=__doc__)
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, (module_name, summary) in JOBS.items():
        if name == job:
            module = importlib.import_module(module_name)
            job_parser = sub.add_parser(name, help=summary, description=module.__doc__ or summary,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
            add_log_level(job_parser)
            module.add_arguments(job_parser)
            job_parser.set_defaults(run=module.run, load_config=getattr(module, "load_config", None))
        else:
            sub.add_parser(name, help=summary, description=summary)
    return parser


def quiet_libraries() -> None:
    """Keep the libraries' routine output out of the console (--verbose brings it back); read
    when Ray, Ray Data and MLflow are imported (with the job's module), hence set before."""
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", HARMLESS_RAY_LINES)
    # Ray Data's per-dataset plan/start/finish lines on this process: to ray-data.log only.
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    # MLflow's INFO lines (database set-up, model validation) and artifact-download bars; the
    # jobs log what they register and where.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def quiet_ray_warnings() -> None:
    """After the job's imports: importing Ray puts its own filter for its deprecation warnings
    first, so ours must come later."""
    # Raised inside Ray Train's own data set-up on every run; nothing of ours to change.
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet = "--verbose" not in argv
    if quiet:
        quiet_libraries()
    job = next((a for a in argv if a in JOBS), None)
    args = build_parser(job).parse_args(argv)
    if quiet:
        quiet_ray_warnings()
    return execute(args.run, args, args.load_config)


if __name__ == "__main__":
    sys.exit(main())
