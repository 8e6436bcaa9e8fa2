"""Stub worker for benchmarks: the real worker (aivailable/engine/worker.py) with no model behind it.

Run by the node's manager as ``python -m bench.stub_worker SPEC_JSON`` (cwd = the repository root) when
``AIVAILABLE_WORKER_MODULE=bench.stub_worker`` is set. It is ``aivailable.engine.worker.main`` with a fake
Runner, ``StubRunner``: the worker's own HTTP app (request parsing, answers, streaming, ``/health``), its
``{"event": "ready", ...}`` line and its exit on stdin EOF or SIGTERM/SIGINT, so the worker protocol is
defined once. The runner never opens the GGUF: every prompt is ``PROMPT_TOKENS`` tokens, every answer the
fixed ``TEXT_PARTS`` (one emitted piece each, fewer when max_tokens says so, finish "length"), every
embedding ``EMBEDDING_DIM`` zeros. Unlike a real worker it admits every request at once (no slots to wait
for). So benchmarks measure the node (routing, proxying, gossip, failover) without model time.

Optional environment: ``AIVAILABLE_STUB_DELAY_MS`` sleeps that long before the first piece (default 0);
``AIVAILABLE_STUB_CHUNK_MS`` sleeps that long before each piece (default 0; with it, long-lived streams);
``AIVAILABLE_STUB_LOAD_S`` sleeps that long before announcing ready (default 0).

Measured against the hand-written stub it replaced (same box, loaded): the process starts about 0.3-0.4 s
later (it imports the worker's request schemas and runner) and answers through the worker's request
validation and its tokenizing thread; figures that include a stub worker's start (failover.py's
"replaced"/"serving") or its per-request time (the "direct" rows of frontend.py and proxy.py) are not
comparable one to one with results recorded before this change.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from types import SimpleNamespace

if __name__ == "__main__":  # a stub worker process: no llama.cpp to load (worker.py's early import is skipped)
    sys.modules.setdefault("llama_cpp", None)

from aivailable.engine import worker  # noqa: E402
from aivailable.engine.runner import GenParams, GenResult  # noqa: E402
from aivailable.engine.spec import WorkerSpec  # noqa: E402
from aivailable.engine.tools import ToolFormat  # noqa: E402

TEXT_PARTS = ("Hello", " from", " the", " stub.")
"""The fixed answer; one emitted piece (one SSE delta chunk when streamed) per part."""
PROMPT_TOKENS = 8
EMBEDDING_DIM = 8
STUB_SLOTS = 1 << 20
"""Requests the stub runs at once: all of them, as a model-less worker can."""


def _env_s(name: str, scale: float = 1.0) -> float:
    return float(os.environ.get(name, "0") or 0) * scale


class StubRunner:
    """The parts of engine.runner.Runner that the worker uses, with no model: fixed tokens and answers."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.engine = None  # no KV cache to report in /health
        self.projector = None
        self.projector_mib = 0.0
        self.tool_format = ToolFormat.GENERIC
        self.template = SimpleNamespace(source="stub")
        self.load_report = None
        self.delay_s = _env_s("AIVAILABLE_STUB_DELAY_MS", 1e-3)
        self.chunk_s = _env_s("AIVAILABLE_STUB_CHUNK_MS", 1e-3)
        self._tasks: set[asyncio.Task] = set()

    def load(self) -> None:
        load_s = _env_s("AIVAILABLE_STUB_LOAD_S")
        if load_s > 0:
            time.sleep(load_s)
        self.load_report = SimpleNamespace(gpu_mib=0.0, host_mib=0.0, offloaded_layers=None, total_layers=None,
                                           kv_total_mib=None)

    def close(self) -> None:
        pass

    @property
    def n_ctx_seq(self) -> int:
        return self.spec.n_ctx // max(1, self.spec.parallel)

    def chat_prompt(self, plan, *, continue_final: bool = False, cancelled=lambda: False):
        return [0] * PROMPT_TOKENS, [], None

    def text_prompt(self, prompt: str) -> list[int]:
        return [0] * PROMPT_TOKENS

    def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        return [[0.0] * EMBEDDING_DIM for _ in inputs], len(inputs)

    def submit(self, tokens: list[int], params: GenParams, cancel: threading.Event,
               emit: Callable[..., None], media: dict | None = None) -> Future:
        """Called on the worker's event loop: emits at once, or with a delay set from a task on that loop."""
        fut: Future = Future()
        limit = params.max_tokens
        parts = TEXT_PARTS[:max(1, min(limit, len(TEXT_PARTS)))] if limit is not None else TEXT_PARTS
        if not self.delay_s and not self.chunk_s:
            t0 = time.perf_counter()
            for p in parts:
                emit(p)
            fut.set_result(self._result(len(tokens), parts, t0, t0, time.perf_counter()))
            return fut
        task = asyncio.get_running_loop().create_task(self._slow(fut, len(tokens), parts, cancel, emit))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    async def _slow(self, fut: Future, n_prompt: int, parts: tuple[str, ...], cancel: threading.Event,
                    emit: Callable[..., None]) -> None:
        t0 = time.perf_counter()
        first = None
        sent: list[str] = []
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            for p in parts:
                if cancel.is_set():
                    break
                if self.chunk_s:
                    await asyncio.sleep(self.chunk_s)
                emit(p)
                sent.append(p)
                first = first or time.perf_counter()
            fut.set_result(self._result(n_prompt, tuple(sent), t0, first or time.perf_counter(),
                                        time.perf_counter(), cancel.is_set()))
        except BaseException as exc:  # noqa: BLE001 - the worker waits on the future; never leave it pending
            fut.set_exception(exc)

    @staticmethod
    def _result(n_prompt: int, parts: tuple[str, ...], t0: float, first: float, end: float,
                cancelled: bool = False) -> GenResult:
        finish = "cancelled" if cancelled else "length" if len(parts) < len(TEXT_PARTS) else "stop"
        return GenResult(prompt_tokens=n_prompt, completion_tokens=len(parts), finish_reason=finish,
                         ttft_s=first - t0, duration_s=end - t0, first_token_s=first - t0)


class StubWorker(worker.Worker):
    """The real worker's app; it admits every request at once (STUB_SLOTS) instead of `spec.parallel`."""

    def __init__(self, spec: WorkerSpec, runner):
        super().__init__(spec, runner)
        self.gate = worker.FifoGate(STUB_SLOTS, spec.max_queue)


def main(argv: list[str] | None = None) -> int:
    return worker.main(argv, runner_factory=StubRunner, worker_factory=StubWorker, name="stub-worker")


if __name__ == "__main__":
    sys.exit(main())
