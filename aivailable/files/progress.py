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


class LoadBars:
    """One spinner line per model load in progress (llama.cpp reports no fraction), with elapsed time."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=Console(stderr=True), transient=True)
        self._tasks: dict[str, int] = {}
        self._progress.start()

    def update(self, loading: dict[str, str]) -> None:
        """`loading`: replica key -> description of every load running now."""
        for key in set(self._tasks) - set(loading):
            self._progress.remove_task(self._tasks.pop(key))
        for key, text in loading.items():
            if key not in self._tasks:
                self._tasks[key] = self._progress.add_task(text, total=None)

    def close(self) -> None:
        self._progress.stop()
