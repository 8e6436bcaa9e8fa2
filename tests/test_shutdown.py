"""aivailable/shutdown.py: every stop step runs even when one fails, in order, and failures are named."""

from __future__ import annotations

import asyncio
import logging

import pytest

from aivailable.shutdown import run_steps


def test_a_failing_step_does_not_skip_the_rest(caplog):
    ran: list[str] = []

    async def workers() -> None:
        await asyncio.sleep(0)
        ran.append("workers")

    def files() -> None:
        ran.append("files")
        raise OSError("disk gone")

    steps = [("tasks", lambda: ran.append("tasks")), ("the file service", files), ("the workers", workers)]
    with caplog.at_level(logging.ERROR):
        failed = asyncio.run(run_steps(steps, logging.getLogger("t")))
    assert ran == ["tasks", "files", "workers"]
    assert failed == ["the file service"]
    assert "the file service failed (OSError: disk gone)" in caplog.text


def test_every_step_failing_is_reported_in_order():
    def boom() -> None:
        raise RuntimeError("x")

    async def aboom() -> None:
        raise ValueError("y")

    assert asyncio.run(run_steps([("a", boom), ("b", aboom), ("c", lambda: None)], logging.getLogger("t"))) == ["a", "b"]


def test_cancellation_is_not_swallowed():
    async def cancelled() -> None:
        raise asyncio.CancelledError

    ran: list[str] = []
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run_steps([("a", cancelled), ("b", lambda: ran.append("b"))], logging.getLogger("t")))
    assert ran == []
