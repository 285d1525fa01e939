"""What the jobs raise for the user, and how they turn a stop signal into one they can handle.

The lowest module of ``pipelines``: every job imports it, it imports nothing of the project.
"""

from __future__ import annotations

import signal
import threading


class UserError(Exception):
    """Bad input the user can fix (a path, a flag, a dataset); printed without a traceback."""


def caused_by_interrupt(error: BaseException) -> bool:
    """Whether ``error`` is, or was raised while handling, a KeyboardInterrupt.

    Ctrl-C lands in whichever frame is running; library clean-up code (Ray Data's listing threads,
    for one) can then fail on its own and raise something else that carries the interrupt only as
    its context.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (``ray job stop``, a process manager) raise KeyboardInterrupt in the main thread,
    as Ctrl-C does, so that a job unwinds and marks its MLflow run instead of vanishing.

    ``ray.init`` installs its own SIGTERM handler (``sys.exit``); the jobs call this again after it.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
