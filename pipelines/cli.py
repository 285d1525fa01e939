"""The ``upsr`` command: one subcommand per job, each also runnable as ``python -m pipelines.<job>``."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from pipelines.errors import UserError, interrupt_on_sigterm
from upsr.typed_config import ConfigError

# subcommand -> (module under pipelines/ defining add_arguments(parser) and run(args), summary).
# Only the chosen job's module is imported, so `upsr --help` does not load torch and Ray.
JOBS = {
    "synth": ("synth", "synthesise LR/HR training pairs from HR photographs into Parquet (Ray Data)"),
    "synth-verify": ("synth_verify", "re-generate sampled rows of a dataset and check they match"),
    "demo": ("demo", "run the project end to end on embedded defaults (sample photographs, local Ray)"),
    "upscale": ("upscale", "upscale images x4 with a trained UPSR checkpoint"),
    "import-official": ("import_official", "import the authors' released UPSR weights as a checkpoint folder"),
    "train-aux": ("train_aux", "train the auxiliary SR net on a synthesised dataset (Ray Train, MLflow)"),
    "train": ("train", "train UPSR with a frozen aux net on a synthesised dataset (Ray Train, MLflow registry)"),
    "tune": ("tune", "search UPSR's noise weighting and other config keys (Ray Tune over Ray Train, MLflow)"),
    "evaluate": ("evaluate", "batch-evaluate a model on an eval set (Ray Data), per-image metrics to Parquet and MLflow"),
    "promote": ("promote", "move the registry's champion alias to a candidate that beats it on the eval set"),
}

log = logging.getLogger("upsr")


def build_parser(job: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upsr", description=__doc__)
    sub = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, (module_name, summary) in JOBS.items():
        job_parser = sub.add_parser(name, help=summary, description=summary)
        if name == job:
            module = importlib.import_module(f"pipelines.{module_name}")
            module.add_arguments(job_parser)
            job_parser.set_defaults(run=module.run)
    return parser


def run_job(module, argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.<job>``."""
    # Run with -m, the module is named __main__; its spec keeps the dotted name.
    parser = argparse.ArgumentParser(prog=f"python -m {module.__spec__.name}", description=module.__doc__)
    module.add_arguments(parser)
    return _execute(module.run, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(job).parse_args(argv)
    return _execute(args.run, args)


def _execute(run, args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `ray job stop` and process managers send SIGTERM: unwind as for Ctrl-C, so that jobs mark
    # their MLflow runs KILLED instead of leaving them RUNNING.
    previous = signal.getsignal(signal.SIGTERM)
    interrupt_on_sigterm()
    try:
        return run(args) or 0
    except (ConfigError, UserError) as error:
        log.error("%s", error)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted: nothing unfinished was marked finished (a dataset has no manifest yet, a "
                  "training run is KILLED with its checkpoints kept, the registry is unchanged unless a "
                  "promotion had completed); run the command again (synth with --overwrite, train with the "
                  "same --name to resume)")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
