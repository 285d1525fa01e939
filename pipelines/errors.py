"""What the jobs raise for the user, and how they turn a stop signal into one they can handle.

The lowest module of ``pipelines``: every job imports it, it imports nothing of the project.
"""

from __future__ import annotations

import signal
import threading


class UserError(Exception):
    """Bad input the user can fix (a path, a flag, a dataset); printed without a traceback."""


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (``ray job stop``, a process manager) raise KeyboardInterrupt in the main thread,
    as Ctrl-C does, so that a job unwinds and marks its MLflow run instead of vanishing.

    ``ray.init`` installs its own SIGTERM handler (``sys.exit``); the jobs call this again after it.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
