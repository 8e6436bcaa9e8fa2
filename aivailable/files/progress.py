"""Terminal progress bars (rich) for hashing, transfers and model loads; silent when stderr is no TTY."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Advance(Protocol):
    def __call__(self, n: int) -> None: ...


def enabled() -> bool:
    return sys.stderr.isatty()


@contextmanager
def bar(description: str, total: int | None, *, show: bool | None = None) -> Iterator[Advance]:
    """A byte progress bar on stderr (rate and ETA); `advance(n)` adds n bytes. No-op without a TTY."""
    if not (enabled() if show is None else show):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)
