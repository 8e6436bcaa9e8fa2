"""How the manager starts one worker process: the `Spawn` seam of engine/manager.py.

A spawn takes the worker's spec (its unix socket is `spec.socket`) and environment and returns the started
process. The manager then speaks the worker protocol to it: the first stdout line is the `{"event": "ready"}`
report (or why it failed), stderr is logged, the HTTP API listens on `spec.socket`, and the worker exits on
SIGTERM or when its stdin closes. The process must lead its own process group (`start_new_session=True`):
the manager kills the whole group.

The default, `ModuleSpawn`, runs `python -m MODULE SPEC_JSON`; MODULE defaults to aivailable.engine.worker,
or to `AIVAILABLE_WORKER_MODULE` where set (benchmarks run nodes whose workers are bench/stub_worker.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aivailable.engine.spec import WorkerSpec

WORKER_MODULE = "aivailable.engine.worker"
WORKER_MODULE_ENV = "AIVAILABLE_WORKER_MODULE"
"""Environment variable naming the module the default spawn runs (read when the spawn is made)."""


class Spawn(Protocol):
    async def __call__(self, spec: WorkerSpec, env: Mapping[str, str]) -> asyncio.subprocess.Process:
        """Start the worker for `spec` with environment `env` (stdin, stdout and stderr piped)."""
        ...


async def start_worker(argv: list[str], spec: WorkerSpec, env: Mapping[str, str], *,
                       cwd: str | None = None) -> asyncio.subprocess.Process:
    """Run `argv + [spec as JSON]` the way the manager needs: pipes, own session."""
    return await asyncio.create_subprocess_exec(
        *argv, spec.model_dump_json(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=dict(env), cwd=cwd, start_new_session=True)


@dataclass(frozen=True)
class ModuleSpawn:
    """Runs `python -m MODULE SPEC_JSON` with this interpreter."""

    module: str = field(default_factory=lambda: os.environ.get(WORKER_MODULE_ENV, WORKER_MODULE))
    cwd: str | None = None
    """Working directory of the worker (None: this process's)."""

    async def __call__(self, spec: WorkerSpec, env: Mapping[str, str]) -> asyncio.subprocess.Process:
        return await start_worker([sys.executable, "-m", self.module], spec, env, cwd=self.cwd)
