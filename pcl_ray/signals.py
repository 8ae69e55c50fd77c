"""SIGTERM handling for the command line: stop like Ctrl-C so runs are closed as KILLED, not left RUNNING."""

from __future__ import annotations

import signal
import threading


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread (``ray.init`` installs its own handler,
    so callers set this again after starting Ray)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
