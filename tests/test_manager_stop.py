"""Stopping workers while they load: nothing is left running, and reconcile never hangs.

A chaos run found nodes whose reconcile hung for good after a placement removed a replica that was
still loading (its supervisor missed the cancellation and restarted an untracked worker)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aivailable.engine.manager import Assignment, ManagerConfig, WorkerManager


def worker_children() -> list[int]:
    """Worker processes started by this test process (children whose command line runs the worker)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"aivailable.engine.worker" in cmd:
            out.append(int(entry))
    return out


def test_stopping_replicas_while_they_load_leaves_no_worker_and_never_hangs(gemma_path, tmp_path):
    async def scenario() -> list[int]:
        mgr = WorkerManager(ManagerConfig(backoff_initial_s=0.2, backoff_max_s=0.5, stop_grace_s=5.0),
                            socket_dir=str(tmp_path), n_threads=1)
        a, b = (Assignment(model=name, path=str(gemma_path), device_ids=("sim0",), n_ctx=256)
                for name in ("alpha", "beta"))
        try:
            for pause in (0.0, 0.3, 1.0, 2.0):  # alpha loading, beta waiting for the load lock
                await mgr.reconcile([a, b])
                await asyncio.sleep(pause)
                await asyncio.wait_for(mgr.reconcile([]), 30)  # bounded: a hang fails here
                assert mgr.workers == {}
            await asyncio.sleep(3)  # a supervisor that missed its stop would have restarted a worker by now
            return worker_children()
        finally:
            await mgr.close()

    assert asyncio.run(scenario()) == []
