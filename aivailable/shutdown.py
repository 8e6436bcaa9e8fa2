"""Stopping a node's parts in order, so that one failing step cannot skip the rest.

A node stops its parts in dependency order (hand-over, background tasks, cluster membership, file service,
HTTP server, transport, workers, cache). If one step raised and the others were skipped, a failing file
service would leave llama.cpp workers running and VRAM held after the node exits. `run_steps` runs every
step, logs each failure with the step's name and returns the names that failed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence

Step = tuple[str, Callable[[], Awaitable[object] | object]]


async def run_steps(steps: Sequence[Step], log: logging.Logger) -> list[str]:
    """Run each (name, callable) in order, awaiting what returns an awaitable; an exception from one step is
    logged with its name and the next step runs. Cancellation still propagates. Returns the failed names."""
    failed: list[str] = []
    for name, step in steps:
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # noqa: BLE001 - logged, and the remaining steps still run
            failed.append(name)
            log.error("stopping: %s failed (%s: %s); going on with the remaining steps", name,
                      type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
    return failed
