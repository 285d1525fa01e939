"""What the jobs raise for the user, and how they turn a stop signal into one they can handle.

The lowest module of ``pipelines``: every job imports it, it imports nothing of the project.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input the user can fix (a path, a flag, a dataset); printed without a traceback."""


def last_line(text: str) -> str:
    """The last non-blank line of an error's text (a traceback's or a chained error's conclusion)."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else str(text)


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


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then raise KeyboardInterrupt: for a step that
    must not be cut in half (an MLflow run created but its id not yet in hand)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt(f"signal {received[0]}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (``ray job stop``, a process manager) raise KeyboardInterrupt in the main thread,
    as Ctrl-C does, so that a job unwinds and marks its MLflow run instead of vanishing.

    ``ray.init`` installs its own SIGTERM handler (``sys.exit``); the jobs call this again after it.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
