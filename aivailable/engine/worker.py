"""Worker process: one model on its GPU(s), served as OpenAI endpoints on a unix socket.

Started by engine.manager as `python -m aivailable.engine.worker SPEC_JSON` with the backend's
visible-devices variable already set. Protocol with the manager: after loading, the worker prints
one JSON line on stdout, `{"event": "ready", ...}` or `{"event": "failed", "reason": ...}` (then
exits 3); everything else goes to stderr. Requests are admitted FIFO to `parallel` slots, with a
bounded queue (429 + Retry-After when full); admitted ones generate together in the runner's
BatchEngine (continuous batching), and a client that disconnects stops its generation at the next step.
"""

from __future__ import annotations

# llama.cpp is loaded before anything else in this process. aiohttp pulls in frozenlist, a C++
# extension, so libstdc++ was already loaded when libllama came in; with a CUDA build (CUDA 13, H100)
# libllama's iostream calls then bound to the libstdc++ code linked into libggml-cuda, and every load
# crashed (SIGSEGV in llama_model::print_info; bench/gpu_diag.py found it, bench/README.md has more).
import contextlib

with contextlib.suppress(ImportError):  # Runner.load() then says why the model cannot load
    import llama_cpp  # noqa: F401

import asyncio
import collections
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from aivailable.engine.answer import Answer
from aivailable.engine.chatplan import plan_chat
from aivailable.engine.latency import LatencyRecorder
from aivailable.engine.runner import GenParams, LoadError, Runner
from aivailable.engine.spec import WorkerSpec
from aivailable.errors import InvalidRequest, QueueFullError
from aivailable.wire.errors import openai_errors, read_json
from aivailable.wire.responses import ChatShape, CompletionShape, embeddings_body, sse
from aivailable.wire.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse_request

log = logging.getLogger("aivailable.worker")
EXIT_LOAD_FAILED = 3
MAX_BODY_BYTES = 96 << 20
"""Bodies come only from the node, which applies its own max_body_bytes; images make them large."""


class FifoGate:
    """Admits requests in arrival order to `slots` concurrent runs; at most `max_waiting` wait."""

    def __init__(self, slots: int, max_waiting: int):
        self.slots, self.max_waiting = slots, max_waiting
        self.active = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.mean_duration_s = 2.0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.active < self.slots and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_waiting:
            wait = self.mean_duration_s * (len(self._waiters) + 1) / self.slots
            raise QueueFullError(
                f"model queue is full ({len(self._waiters)} waiting, {self.active} running); retry later",
                retry_after=wait)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut in self._waiters:
                self._waiters.remove(fut)
            elif fut.done() and not fut.cancelled():
                self.release()  # we were handed a slot but left: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                return
        self.active -= 1

    def record(self, duration_s: float) -> None:
        self.mean_duration_s = 0.8 * self.mean_duration_s + 0.2 * duration_s


class Worker:
    """The aiohttp side of a worker: admission, streaming, cancellation; the Runner does the work."""

    def __init__(self, spec: WorkerSpec, runner: Runner):
        self.spec, self.runner = spec, runner
        self.gate = FifoGate(spec.parallel, spec.max_queue)
        # Tokenizing and embeddings, in admission order; generation runs on the BatchEngine's thread.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0,
                      "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0, "busy_s": 0.0}
        self.last_tps = 0.0
        self.latency = LatencyRecorder()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[openai_errors], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({
            "state": "ready", "model": self.spec.model, "pid": os.getpid(),
            "active": self.gate.active, "queued": self.gate.waiting, "slots": self.spec.parallel,
            "tokens_per_s": round(self.last_tps, 2), **self.stats, **self.latency.report(), **self._kv(),
        })

    def _kv(self) -> dict:
        engine = self.runner.engine
        if engine is None:  # an embedding model keeps no KV between requests
            return {}
        return {"kv_cells_used": engine.kv_cells_used(), "kv_cells_total": engine.n_ctx}

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req = parse_request("chat", await read_json(request))
        assert isinstance(req, ChatCompletionRequest)
        images = req.images()
        if images and self.runner.projector is None:
            raise InvalidRequest(f"model {self.spec.model!r} does not accept images (it has no multimodal "
                                 "projector)", param=images[0])
        plan = plan_chat(req, self.runner.tool_format)
        params = self.spec.sampling.fill(self._params(req, self.spec.token_limit(req.token_limit())))
        params.grammar = plan.grammar
        cont = req.continue_final_message
        if cont and plan.grammar is not None:
            params.grammar_prefix = req.messages[-1].text()
        params.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        answer = Answer(ChatShape(req.model), req.n or 1, plan.tool_format, plan.tool_names,
                        logprobs=bool(req.logprobs))
        return await self._generate(
            request, req, answer, params,
            lambda cancelled: self.runner.chat_prompt(plan, continue_final=cont, cancelled=cancelled))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_request("completions", await read_json(request))
        assert isinstance(req, CompletionRequest)
        params = self.spec.sampling.fill(self._params(req, self.spec.token_limit(req.max_tokens)))
        params.logprobs = req.logprobs
        params.prompt_logprobs = bool(req.echo and req.logprobs is not None)
        params.prompt_param = "prompt"
        prompt = req.prompt
        assert isinstance(prompt, str)
        answer = Answer(CompletionShape(req.model), req.n or 1, None, set(), logprobs=req.logprobs is not None,
                        legacy_logprobs=True, echo=prompt if req.echo else None)
        return await self._generate(request, req, answer, params,
                                    lambda cancelled: (self.runner.text_prompt(prompt), [], None))

    async def embeddings(self, request: web.Request) -> web.Response:
        req = parse_request("embeddings", await read_json(request))
        assert isinstance(req, EmbeddingRequest)
        await self.gate.acquire()
        try:
            inputs = req.input
            assert isinstance(inputs, list)
            vectors, n_tokens = await self._run(self.runner.embed, inputs)
        finally:
            self.gate.release()
        self.stats["requests"] += 1
        self.stats["completed"] += 1
        self.stats["prompt_tokens"] += n_tokens
        return web.json_response(embeddings_body(req.model, vectors, n_tokens, req.encoding_format))

    @staticmethod
    def _params(req, max_tokens: int | None) -> GenParams:
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        return GenParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                         min_p=req.min_p, repeat_penalty=req.repeat_penalty,
                         presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                         stop=list(req.stop or []), seed=req.seed, logit_bias=bias)

    async def _generate(self, request, req, answer: Answer, params: GenParams, prep) -> web.StreamResponse:
        """Tokenize (stopping early if the client leaves), run `answer.n` sequences, send the answer."""
        arrived = time.perf_counter()
        await self.gate.acquire()
        released = False
        n = answer.n
        cancels = [threading.Event() for _ in range(n)]
        self.stats["requests"] += 1
        futs = []
        try:
            tokens, stops, media = await self._run(prep, cancels[0].is_set)
            waited = time.perf_counter() - arrived  # queue and tokenizing: part of what a client waits
            params.stop = params.stop + stops
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            left = [n]

            def done(i: int) -> None:  # on the event loop, after every emit of choice i
                events.put_nowait((i, None, None))
                left[0] -= 1
                if left[0] == 0:
                    self.gate.release()

            for i in range(n):
                p = params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)

                def emit(text: str, logprobs: list | None = None, i: int = i) -> None:  # on the engine's thread
                    loop.call_soon_threadsafe(events.put_nowait, (i, text, logprobs))

                try:
                    fut = self.runner.submit(tokens, p, cancels[i], emit, media)
                except BaseException:
                    if futs:  # the choices already started release the gate when they end
                        left[0], released = len(futs), True
                    raise
                futs.append(fut)
                # The engine may outlive this handler (client gone): release only when all are done.
                fut.add_done_callback(lambda _f, i=i: _call_soon(loop, lambda: done(i)))
            released = True
            jobs = [asyncio.wrap_future(f) for f in futs]
            if req.stream:
                resp = await self._stream(request, req, answer, events, jobs, len(tokens))
            else:
                resp = await self._whole(answer, events, jobs, len(tokens))
            for job in jobs:
                self._account(job.result(), waited)
            return resp
        except BaseException:
            for c in cancels:
                c.set()
            if not isinstance(sys.exc_info()[1], asyncio.CancelledError):
                self.stats["errors"] += 1
            else:
                self.stats["cancelled"] += 1
            raise
        finally:
            if not released:
                self.gate.release()

    @staticmethod
    async def _drain(events: asyncio.Queue, n: int):
        """(choice, text, logprobs) events until every choice has ended; text None marks an end."""
        left = n
        while left:
            ev = await events.get()
            if ev[1] is None:
                left -= 1
            yield ev

    async def _whole(self, answer: Answer, events: asyncio.Queue, jobs, n_prompt: int) -> web.Response:
        async for i, text, lps in self._drain(events, answer.n):
            if text is not None:
                answer.add(i, text, lps)
        results = [await j for j in jobs]
        return web.json_response(answer.body(results, n_prompt))

    async def _stream(self, request, req, answer: Answer, events: asyncio.Queue, jobs,
                      n_prompt: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        include_usage = req.include_usage()

        async def send(chunk: dict) -> None:
            if include_usage:
                chunk["usage"] = None
            await resp.write(sse(chunk))

        for chunk in answer.opening():
            await send(chunk)
        async for i, text, lps in self._drain(events, answer.n):
            if text is None:
                for chunk in answer.closing(i, await jobs[i]):
                    await send(chunk)
            else:
                for chunk in answer.delta(i, text, lps):
                    await send(chunk)
        if include_usage:
            await resp.write(sse(answer.shape.usage_chunk(answer.usage([j.result() for j in jobs], n_prompt))))
        await resp.write(sse("[DONE]"))
        await resp.write_eof()
        return resp

    def _account(self, result, waited_s: float = 0.0) -> None:
        first = result.first_token_s
        self.latency.record(None if first is None else waited_s + first, result.token_gaps)
        s = self.stats
        s["completed"] += 1
        s["prompt_tokens"] += result.prompt_tokens
        s["cached_tokens"] += result.cached_tokens
        s["completion_tokens"] += result.completion_tokens
        s["busy_s"] += result.duration_s
        self.gate.record(result.duration_s)
        gen_s = result.duration_s - result.ttft_s
        if result.completion_tokens > 1 and gen_s > 0:
            self.last_tps = (result.completion_tokens - 1) / gen_s


def _call_soon(loop: asyncio.AbstractEventLoop, fn) -> None:
    """Schedule `fn` on `loop` from another thread; nothing to do once the loop is closed (shutdown)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


def _announce(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _serve(worker: Worker) -> None:
    runner = web.AppRunner(worker.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    if os.path.exists(worker.spec.socket):
        os.unlink(worker.spec.socket)
    site = web.UnixSite(runner, worker.spec.socket)
    await site.start()
    rep = worker.runner.load_report
    gpu_mib, host_mib = (rep.gpu_mib, rep.host_mib) if rep else (None, None)
    if worker.runner.projector_mib and rep:  # on the model's device; simulated: in host memory
        if worker.spec.simulated:
            host_mib = (host_mib or 0) + worker.runner.projector_mib
        else:
            gpu_mib = (gpu_mib or 0) + worker.runner.projector_mib
    _announce({"event": "ready", "pid": os.getpid(), "socket": worker.spec.socket,
               "gpu_mib": gpu_mib, "host_mib": host_mib,
               "offloaded_layers": rep.offloaded_layers if rep else None,
               "total_layers": rep.total_layers if rep else None,
               "kv_mib": rep.kv_total_mib if rep else None,
               "chat_template": worker.runner.template.source if worker.runner.template else None})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Exit with the node: if our parent dies, stdin hits EOF.
    loop.add_reader(sys.stdin.fileno(), lambda: (sys.stdin.buffer.read1(65536) or stop.set()))
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None, runner_factory: Callable[[WorkerSpec], Runner] = Runner,
         worker_factory: Callable[[WorkerSpec, Runner], Worker] = Worker, name: str = "worker") -> int:
    """Load the spec's model and serve it until SIGTERM/SIGINT or stdin EOF. `runner_factory` and
    `worker_factory` make the Runner and the Worker (bench/stub_worker.py passes a runner with no model);
    `name` prefixes the log lines."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("AIVAILABLE_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s {name}[{os.getpid()}] %(levelname)s %(message)s")
    # llama-cpp-python silences fd 2 while it loads; keep a dup so a native crash still leaves a
    # Python traceback in the node's log instead of a bare "exit -11".
    faulthandler.enable(file=os.fdopen(os.dup(2), "w"), all_threads=True)
    spec = WorkerSpec.model_validate_json(argv[0])
    runner = runner_factory(spec)
    t0 = time.monotonic()
    try:
        runner.load()
    except LoadError as exc:
        _announce({"event": "failed", "reason": exc.message})
        return EXIT_LOAD_FAILED
    except Exception as exc:  # a broken file or an unexpected llama.cpp failure: say it plainly
        _announce({"event": "failed", "reason": f"{type(exc).__name__}: {exc}"})
        return EXIT_LOAD_FAILED
    log.info("loaded %s in %.1fs (%d slots of %d tokens)", spec.model, time.monotonic() - t0, spec.parallel,
             runner.n_ctx_seq)
    try:
        asyncio.run(_serve(worker_factory(spec, runner)))
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
