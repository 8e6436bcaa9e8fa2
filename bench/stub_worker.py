"""Stub worker for benchmarks: the worker protocol of aivailable/engine/worker.py with no model behind it.

Run by the node's manager as ``python -m bench.stub_worker SPEC_JSON`` (cwd = the repository root) when
``AIVAILABLE_WORKER_MODULE=bench.stub_worker`` is set. It never opens the GGUF: it prints the same
``{"event": "ready", ...}`` line on stdout, serves ``/health``, ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings`` on the spec's unix socket, answering at once with a fixed
small OpenAI-shaped body (built by aivailable.wire.responses, as the real worker's are), or, with
``"stream": true``, a few SSE chunks and ``data: [DONE]``. It exits on stdin EOF (the node died) or
SIGTERM/SIGINT, like the real worker. So benchmarks measure the node (routing, proxying, gossip,
failover) without model time.

Optional environment: ``AIVAILABLE_STUB_DELAY_MS`` sleeps that long before answering (default 0);
``AIVAILABLE_STUB_CHUNK_MS`` sleeps that long before each streamed chunk (default 0: long-lived streams);
``AIVAILABLE_STUB_LOAD_S`` sleeps that long before announcing ready (default 0).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from aiohttp import web

from aivailable.engine.spec import WorkerSpec
from aivailable.errors import InvalidRequest
from aivailable.wire.errors import openai_errors, read_json
from aivailable.wire.responses import ChatShape, CompletionShape, embeddings_body, sse, usage

log = logging.getLogger("aivailable.stub_worker")

TEXT_PARTS = ("Hello", " from", " the", " stub.")
"""The fixed answer; one SSE delta chunk per part when streamed."""
PROMPT_TOKENS = 8
EMBEDDING_DIM = 8


class StubWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.delay_s = float(os.environ.get("AIVAILABLE_STUB_DELAY_MS", "0") or 0) / 1000.0
        self.chunk_s = float(os.environ.get("AIVAILABLE_STUB_CHUNK_MS", "0") or 0) / 1000.0
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0,
                      "prompt_tokens": 0, "completion_tokens": 0, "busy_s": 0.0}
        self.active = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[openai_errors], client_max_size=8 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({
            "state": "ready", "model": self.spec.model, "pid": os.getpid(), "active": self.active,
            "queued": 0, "slots": self.spec.parallel, "tokens_per_s": 0.0, "stub": True, **self.stats})

    async def _body(self, request: web.Request) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        return body

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._answer(request, body, ChatShape(str(body.get("model", self.spec.model))))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._answer(request, body, CompletionShape(str(body.get("model", self.spec.model))))

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        inputs = body.get("input", "")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        vectors = [[0.0] * EMBEDDING_DIM for _ in inputs]
        self.stats["requests"] += 1
        self.stats["completed"] += 1
        return web.json_response(embeddings_body(str(body.get("model", self.spec.model)), vectors,
                                                 len(inputs), str(body.get("encoding_format", "float"))))

    async def _answer(self, request: web.Request, body: dict, shape: ChatShape) -> web.StreamResponse:
        self.stats["requests"] += 1
        self.active += 1
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            limit = body.get("max_completion_tokens") or body.get("max_tokens") or len(TEXT_PARTS)
            parts = TEXT_PARTS[:max(1, min(int(limit), len(TEXT_PARTS)))]
            finish = "length" if len(parts) < len(TEXT_PARTS) else "stop"
            use = usage(PROMPT_TOKENS, len(parts))
            if body.get("stream"):
                resp = await self._stream(request, body, shape, parts, finish, use, self.chunk_s)
            else:
                resp = web.json_response(shape.full("".join(parts), finish, use))
            self.stats["completed"] += 1
            self.stats["prompt_tokens"] += PROMPT_TOKENS
            self.stats["completion_tokens"] += len(parts)
            return resp
        finally:
            self.active -= 1

    @staticmethod
    async def _stream(request: web.Request, body: dict, shape: ChatShape, parts: tuple[str, ...], finish: str,
                      use: dict, chunk_s: float = 0.0) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
        chunks = [c for c in (shape.first_chunk(),) if c is not None]
        chunks += [shape.delta_chunk(p) for p in parts]
        chunks.append(shape.finish_chunk(finish))
        for c in chunks:
            if include_usage:
                c["usage"] = None
            if chunk_s:
                await asyncio.sleep(chunk_s)
            await resp.write(sse(c))
        if include_usage:
            await resp.write(sse(shape.usage_chunk(use)))
        await resp.write(sse("[DONE]"))
        await resp.write_eof()
        return resp


def _announce(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _serve(worker: StubWorker) -> None:
    runner = web.AppRunner(worker.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    sock = worker.spec.socket
    if os.path.exists(sock):
        os.unlink(sock)
    site = web.UnixSite(runner, sock)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Exit with the node: if our parent dies, stdin hits EOF.
    loop.add_reader(sys.stdin.fileno(), lambda: (sys.stdin.buffer.read1(65536) or stop.set()))
    _announce({"event": "ready", "pid": os.getpid(), "socket": sock, "gpu_mib": 0.0, "host_mib": 0.0,
               "offloaded_layers": None, "total_layers": None, "chat_template": "stub"})
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("AIVAILABLE_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s stub-worker[{os.getpid()}] %(levelname)s %(message)s")
    spec = WorkerSpec.model_validate_json(argv[0])
    load_s = float(os.environ.get("AIVAILABLE_STUB_LOAD_S", "0") or 0)
    if load_s > 0:
        import time

        time.sleep(load_s)
    log.info("stub worker for %s on %s (no model loaded)", spec.model, spec.socket)
    asyncio.run(_serve(StubWorker(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
