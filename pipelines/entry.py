"""Running one job: ``python -m pipelines.<job>`` and the ``upsr`` command both go through here.

Exit codes: 0 done, 1 the job ran but something failed (the job says what), 2 a usage error
(a path, a flag, a config key), 130 interrupted (Ctrl-C, ``ray job stop``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from pipelines.errors import UserError, caused_by_interrupt, interrupt_on_sigterm
from upsr.config_loader import ConfigError

log = logging.getLogger("upsr")


def progress_bar(total: int, description: str, unit: str, iterable=None):
    """A tqdm bar on stderr (over ``iterable`` if given): live on a terminal; elsewhere (``ray
    job logs``, CI, a pipe) each redraw is a new line, so at most one every 30 s."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, unit=unit,
                mininterval=0.1 if sys.stderr.isatty() else 30)


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="how much the job logs (default INFO; DEBUG adds the libraries' detail)")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray Data's progress bars and the warnings Ray repeats that are known to "
                             "be harmless (upsr command only; kept out of the console by default)")


def run_job(module, argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.<job>``."""
    # Run with -m, the module is named __main__; its spec keeps the dotted name.
    parser = argparse.ArgumentParser(prog=f"python -m {module.__spec__.name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_log_level(parser)
    module.add_arguments(parser)
    return execute(module.run, parser.parse_args(argv))


def execute(run, args, load_config=None) -> int:
    """Run a job: logging set up, ``--print-config``, user errors and interrupts turned into exit codes.

    ``load_config(paths, overrides)`` reads the job's config for ``--print-config`` (default: the
    jobs' ``pipelines.config.load``).
    """
    logging.basicConfig(level=getattr(args, "log_level", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `ray job stop` and process managers send SIGTERM: unwind as for Ctrl-C, so that jobs mark
    # their MLflow runs KILLED instead of leaving them RUNNING.
    previous = signal.getsignal(signal.SIGTERM)
    interrupt_on_sigterm()
    if getattr(args, "verbose", False) and isinstance(getattr(args, "set", None), list):
        args.set.append("ray.data_progress_bars=true")
    try:
        if getattr(args, "print_config", False):
            from pipelines import config as config_module

            load = load_config or config_module.load
            sys.stdout.write(config_module.to_yaml(load(args.config, args.set)))
            return 0
        return run(args) or 0
    except (ConfigError, UserError) as error:
        log.error("%s", error)
        return 2
    except BaseException as error:
        if not caused_by_interrupt(error):
            raise
        # Library threads the interrupt cut off (Ray Data's listing pool, for one) may fail as the
        # process exits: expected now, so not printed as tracebacks after the message below.
        threading.excepthook = lambda hook: log.debug("a thread ended by the interrupt: %r", hook.exc_value)
        log.error("interrupted: nothing unfinished was marked finished (a dataset has no manifest yet, a "
                  "training run is KILLED with its checkpoints kept, the registry is unchanged unless a "
                  "promotion had completed); run the command again (synth with --overwrite, train with the "
                  "same --name to resume)")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
