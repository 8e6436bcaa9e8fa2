"""WorkerManager(spawn=...): the manager starts workers through the spawn it is given (real processes)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from aivailable.engine.manager import Assignment, ManagerConfig, WorkerHandle, WorkerManager
from aivailable.engine.spawn import WORKER_MODULE, ModuleSpawn, start_worker
from aivailable.engine.spec import WorkerSpec

REPO = Path(__file__).resolve().parent.parent
CFG = ManagerConfig(backoff_initial_s=30.0, backoff_max_s=30.0, load_timeout_s=60.0, stop_grace_s=5.0)
"""A long backoff: a failed start stays failed while the test looks at it."""


def assignment(name: str = "stub") -> Assignment:
    return Assignment(model=name, path="/nonexistent/stub.gguf", device_ids=("sim0",), n_ctx=256)


async def settled(mgr: WorkerManager, key: str, timeout_s: float = 60.0) -> WorkerHandle:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h = mgr.workers[key]
        if h.state in ("ready", "failed"):
            return h
        await asyncio.sleep(0.1)
    raise AssertionError(f"{key} neither ready nor failed within {timeout_s} s: {mgr.workers[key].view()}")


def test_a_custom_spawn_starts_the_worker(tmp_path):
    """The stub worker (bench/stub_worker.py), started by the test's spawn, answers through the manager."""
    started: list[WorkerSpec] = []

    async def spawn(spec: WorkerSpec, env: Mapping[str, str]) -> asyncio.subprocess.Process:
        started.append(spec)
        return await ModuleSpawn("bench.stub_worker", cwd=str(REPO))(spec, env)

    async def scenario() -> tuple[WorkerHandle, dict, bytes]:
        mgr = WorkerManager(CFG, socket_dir=str(tmp_path), n_threads=1, spawn=spawn)
        a = assignment()
        try:
            await mgr.reconcile([a])
            h = await settled(mgr, a.key)
            assert h.state == "ready", h.view()
            cmdline = Path(f"/proc/{h.pid}/cmdline").read_bytes()
            async with h.session.post("http://worker/v1/chat/completions",
                                      json={"model": "stub", "messages": [{"role": "user", "content": "hi"}]}) as r:
                body = await r.json()
            return h, body, cmdline
        finally:
            await mgr.close()

    h, body, cmdline = asyncio.run(scenario())
    assert [s.model for s in started] == ["stub"] and started[0].socket == h.socket
    assert b"bench.stub_worker" in cmdline and WORKER_MODULE.encode() not in cmdline
    assert body["choices"][0]["message"]["content"] == "Hello from the stub."


def test_a_spawn_that_fails_or_exits_leaves_a_failed_replica_with_its_reason(tmp_path):
    async def missing(spec: WorkerSpec, env: Mapping[str, str]) -> asyncio.subprocess.Process:
        return await start_worker([str(tmp_path / "no-such-interpreter")], spec, env)

    async def exits(spec: WorkerSpec, env: Mapping[str, str]) -> asyncio.subprocess.Process:
        return await start_worker([sys.executable, "-c", "import sys; print('dying', file=sys.stderr); sys.exit(3)"],
                                  spec, env)

    async def scenario(spawn) -> dict:
        mgr = WorkerManager(CFG, socket_dir=str(tmp_path), n_threads=1, spawn=spawn)
        a = assignment()
        try:
            await mgr.reconcile([a])
            return (await settled(mgr, a.key)).view()  # as it was: closing the manager marks it stopped
        finally:
            await mgr.close()

    v = asyncio.run(scenario(missing))
    assert v["state"] == "failed" and v["pid"] is None and "cannot start the worker process" in v["reason"], v
    v = asyncio.run(scenario(exits))
    assert v["state"] == "failed" and "exited with code 3 while loading" in v["reason"] and "dying" in v["reason"], v


def test_the_default_spawn_runs_the_worker_module_or_the_one_the_environment_names(monkeypatch):
    monkeypatch.delenv("AIVAILABLE_WORKER_MODULE", raising=False)
    assert ModuleSpawn().module == WORKER_MODULE == "aivailable.engine.worker"
    monkeypatch.setenv("AIVAILABLE_WORKER_MODULE", "bench.stub_worker")
    assert ModuleSpawn().module == "bench.stub_worker"
    assert ModuleSpawn("x.y").module == "x.y"
