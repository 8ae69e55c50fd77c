"""Console output of the driver: rich tables at full width, progress bars that degrade to plain lines.

In a terminal rich sizes everything to the window. Elsewhere (a ``ray job logs`` file, CI, a pipe) rich
would assume 80 columns and cut table cells ("repre…"); :func:`console` gives such output a wide virtual
width, so tables keep every character, and :func:`progress` prints one plain line per finished step
instead of redrawing a bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
WIDE = 1000  # columns of non-terminal output: tables are as wide as their content, never cut


def console(file=None):
    """A rich Console on ``file`` (stdout): the terminal's width in a terminal, :data:`WIDE` elsewhere."""
    from rich.console import Console

    stream = file or sys.stdout
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return Console(file=stream, width=None if tty else WIDE, soft_wrap=not tty)


def progress(items: Iterable[T], what: str, total: int | None = None, file=None) -> Iterator[T]:
    """Yield ``items``; in a terminal a rich progress bar labelled ``what``, elsewhere one line per item
    done (``[pcl-ray] <what>: 2/5 done (3.1s)``)."""
    stream = file or sys.stdout
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    if getattr(stream, "isatty", lambda: False)():
        from rich.progress import Progress

        with Progress(console=console(stream), transient=False) as bar:
            task = bar.add_task(what, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    start = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        print(f"[pcl-ray] {what}: {i}/{total} done ({time.monotonic() - start:.1f}s)", file=stream, flush=True)
