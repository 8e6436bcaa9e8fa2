"""Where the node's time to first token goes: timestamps from inside the worker lined up with the client's.

Starts a real node whose processes are patched at start-up (a ``sitecustomize.py`` written to a temp dir and put
on PYTHONPATH; no project file is changed): the node records when its handler starts and when it sends the
request on; the worker runs in one of two modes:

- ``stub``: no model is loaded and nothing is computed; generation (on a thread of its own) sleeps
  --prefill-ms, then emits one token every --interval-ms without using the CPU: the pure software path (node
  and worker HTTP, validation, proxy, thread hand-offs, SSE relay) on an idle CPU;
- ``trace``: the real model; the hand-off to generation is wrapped to record when it happens and when each
  text delta is emitted (nothing else changes);
- ``trace-nice:N`` (with --engine-nice N): the same, with the batching engine's thread (and so the llama.cpp
  threads it starts) at nice N, so the worker's event loop, the node and the client preempt them at once.

``time.perf_counter`` is CLOCK_MONOTONIC, shared by all processes of a machine, so the worker's timestamps and
the client's line up. Per streamed request (POST /v1/completions over a kept-alive ``http.client`` connection):

- front: client sends -> the worker hands the request to generation (``Runner.submit``, the batching engine;
  ``Runner.generate`` on older workers), split into to_node (client request, TCP, the node's
  HTTP parsing and middlewares), node_handler (validation, re-serialization, replica choice), node_to_worker
  (aiohttp client request, unix socket, the worker's HTTP parsing up to its handler), worker_to_prep
  (worker: body, validation, queue, hand-off to its pool thread), prep (prompt tokenization there) and
  prep_to_gen (back to the event loop, which then submits);
- compute: that hand-off -> the first emit (engine thread wake-up, llama.cpp prefill and first token; stub:
  the sleep);
- deliver_first / deliver_rest: an emit -> the client has that chunk, for the first and (median over a
  request) later tokens, split into emit_to_loop (generating thread -> the worker's event loop builds the SSE
  chunk) and loop_to_client (worker write, unix socket, node relay, TCP, client parse);
- deliver_rest_max: the slowest later token of a request.

    python bench/stub_upstream.py [--mode stub|trace|both] [--engine-nice 5] [--reps 20] [--max-tokens 32]

About 1-3 minutes on 2 idle cores (a request is measured again if another process used the CPU meanwhile).
Prints a table (median / p90 of each part) and writes bench/results/engine_overhead.json (settings, machine,
every request's parts).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PATCH_ENV = "AIV_BENCH_PATCH"
TRACE_ENV = "AIV_BENCH_TRACE_FILE"
KEYS = ("ttft_ms", "front_ms", "to_node_ms", "node_handler_ms", "node_to_worker_ms", "worker_to_prep_ms", "prep_ms",
        "prep_to_gen_ms", "compute_ms", "deliver_first_ms", "emit_to_loop_first_ms", "loop_to_client_first_ms",
        "deliver_rest_ms", "emit_to_loop_rest_ms", "deliver_rest_max_ms")
SITECUSTOMIZE = f"""
import os, sys
if os.environ.get({PATCH_ENV!r}):
    if "aivailable.engine.worker" in sys.orig_argv:
        sys.path.insert(0, {str(REPO)!r})
        from bench.stub_upstream import install
        install(os.environ[{PATCH_ENV!r}])
    elif "aivailable" in sys.orig_argv and "up" in sys.orig_argv:
        sys.path.insert(0, {str(REPO)!r})
        from bench.stub_upstream import install_node
        install_node()
"""


def install_node() -> None:
    """Patch the node process: record when its handler starts and when it sends the request to the replica."""
    import aiohttp

    from aivailable.api import app

    trace_file = os.environ[TRACE_ENV] + ".node"
    cur: dict = {}
    real_inference, real_request = app.inference, aiohttp.ClientSession._request

    async def inference(request):
        cur.clear()
        cur["handler_in"] = time.perf_counter()
        try:
            return await real_inference(request)
        finally:
            with open(trace_file, "a") as f:
                f.write(json.dumps(cur) + "\n")

    def _request(self, method, url, *args, **kwargs):
        cur.setdefault("upstream_post", time.perf_counter())
        return real_request(self, method, url, *args, **kwargs)

    app.inference = inference  # before build_app registers it
    aiohttp.ClientSession._request = _request


def install(mode: str) -> None:
    """Patch this (worker) process; `mode` is "stub:PREFILL_MS:INTERVAL_MS" or "trace".

    Records per request: the worker's handler start (worker_in), prompt preparation on its pool thread
    (prep_start/prep_end), the hand-off to generation (start: Runner.submit, or Runner.generate in a worker
    without the batching engine), each emit on the generating thread, and each SSE chunk built on the
    worker's event loop (sse); the record is written
    when the worker builds the "[DONE]" event, i.e. before the client can see the end of the stream.
    """
    from aivailable.engine import runner as rmod
    from aivailable.wire import errors, responses

    trace_file = os.environ[TRACE_ENV]
    cur: dict = {"sse": []}
    real_sse = responses.sse

    def sse(obj):
        if obj == "[DONE]":
            with open(trace_file, "a") as f:
                f.write(json.dumps(cur) + "\n")
            cur.clear()
            cur["sse"] = []
        else:
            cur["sse"].append(time.perf_counter())
        return real_sse(obj)

    responses.sse = sse  # before engine.worker imports it by name
    real_read_json = errors.read_json

    async def read_json(request):
        cur["worker_in"] = time.perf_counter()  # the worker's handler starts (its HTTP parsing is done)
        return await real_read_json(request)

    errors.read_json = read_json

    real_text_prompt = rmod.Runner.text_prompt

    def text_prompt(self, prompt: str) -> list[int]:
        cur["prep_start"] = time.perf_counter()
        try:
            if mode.startswith("trace"):
                return real_text_prompt(self, prompt)
            return [1] * max(1, len(prompt.split()))
        finally:
            cur["prep_end"] = time.perf_counter()

    rmod.Runner.text_prompt = text_prompt
    if mode.startswith("trace-nice"):  # experiment: the generating threads yield to the event loop
        import threading

        from aivailable.engine import batch

        nice, real_loop = int(mode.split(":")[1]), batch.BatchEngine._loop

        def _loop(self) -> None:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)  # ggml's threads inherit it
            return real_loop(self)

        batch.BatchEngine._loop = _loop
    # The worker hands generation over through Runner.submit (a Future) where it has one (the batching
    # engine), else calls the blocking Runner.generate on its llama thread; patch whichever it uses.
    entry = "submit" if hasattr(rmod.Runner, "submit") else "generate"
    real_entry = getattr(rmod.Runner, entry)

    if mode.startswith("trace"):
        def traced(self, tokens, params, cancel, emit, *media):
            cur["start"], cur["emits"] = time.perf_counter(), []

            def stamped(text: str, logprobs=None) -> None:
                cur["emits"].append(time.perf_counter())
                emit(text, logprobs)

            return real_entry(self, tokens, params, cancel, stamped, *media)

        setattr(rmod.Runner, entry, traced)
        return

    _, prefill_ms, interval_ms = mode.split(":")

    def load(self) -> None:
        self.load_report, self.template, self._llm = None, None, None

    def stub_generate(self, tokens, params, cancel, emit):
        start = cur["start"] = time.perf_counter()
        emits = cur["emits"] = []
        time.sleep(float(prefill_ms) / 1e3)
        n, finish = 0, "length"
        while n < (params.max_tokens or 16):
            if cancel.is_set():
                finish = "cancelled"
                break
            emits.append(time.perf_counter())
            emit(f" tok{n}")
            n += 1
            time.sleep(float(interval_ms) / 1e3)
        return rmod.GenResult(len(tokens), n, finish, emits[0] - start if emits else 0.0,
                              time.perf_counter() - start)

    rmod.Runner.load, rmod.Runner.generate = load, stub_generate
    if entry == "submit":
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stub-engine")

        def submit(self, tokens, params, cancel, emit, media=None):
            return pool.submit(stub_generate, self, tokens, params, cancel, emit)

        rmod.Runner.submit = submit
        rmod.Runner.n_ctx_seq = property(lambda self: self.spec.n_ctx)
        rmod.Runner.close = lambda self: None


def run_mode(mode: str, model_path: Path, reps: int, warmup: int, max_tokens: int, tmp: Path,
             max_foreign: float = 0.05, retries: int = 4) -> dict:
    from bench import harness
    from bench.engine import MODEL, Api, CpuWatch, descendants, prompt_for
    from bench.harness import start_node

    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    trace = tmp / f"trace-{mode.split(':')[0]}.jsonl"
    trace.write_text("")
    node_trace = Path(str(trace) + ".node")
    node_trace.write_text("")
    env = {PATCH_ENV: mode, TRACE_ENV: str(trace),
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    node = start_node(tmp, "--model", f"{MODEL}={model_path}:2048", "--simulate-gpu", "g:4096", env=env,
                      name=f"node-{mode.split(':')[0]}")
    rows: list[dict] = []
    try:
        node.wait_healthy(120)
        node.wait_model(MODEL, timeout=600)
        api = Api(node.host, node.port)
        watch = CpuWatch([os.getpid(), *descendants(node.proc.pid)])
        body_of = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                   "stream_options": {"include_usage": True}}
        i, attempts, sent = 0, 0, 0
        while i < warmup + reps:
            watch.wait_quiet(max_foreign, 20)
            a = watch.snapshot()
            t0, resp = api._post({**body_of, "prompt": prompt_for(i)})
            got: list[float] = []
            while line := resp.readline():
                if line.startswith(b"data: [DONE]"):
                    break
                if line.startswith(b"data: "):
                    now = time.perf_counter()
                    chunk = json.loads(line[6:])
                    if any(c.get("text") for c in chunk.get("choices") or ()):
                        got.append(now)
            resp.read()
            foreign = watch.foreign(a, watch.snapshot())
            lines = trace.read_text().splitlines()
            w = json.loads(lines[-1])
            sent += 1
            deadline = time.monotonic() + 2
            while len(nlines := node_trace.read_text().splitlines()) < sent and time.monotonic() < deadline:
                time.sleep(0.005)  # the node writes its record just after ending the stream
            nd = json.loads(nlines[-1])
            attempts += 1
            if foreign > max_foreign and attempts <= retries:
                continue  # another process took the CPU meanwhile: measure this one again
            i, attempts = i + 1, 0
            if i <= warmup or not got or len(got) != len(w["emits"]) or len(w["sse"]) < len(got):
                continue
            n = len(got)
            emits, sse_t = w["emits"], w["sse"][:n]
            rest = [c - e for c, e in zip(got[1:], emits[1:], strict=True)]
            rows.append({"ttft_ms": (got[0] - t0) * 1e3,
                         "front_ms": (w["start"] - t0) * 1e3,
                         "to_node_ms": (nd["handler_in"] - t0) * 1e3,
                         "node_handler_ms": (nd["upstream_post"] - nd["handler_in"]) * 1e3,
                         "node_to_worker_ms": (w["worker_in"] - nd["upstream_post"]) * 1e3,
                         "worker_to_prep_ms": (w["prep_start"] - w["worker_in"]) * 1e3,
                         "prep_ms": (w["prep_end"] - w["prep_start"]) * 1e3,
                         "prep_to_gen_ms": (w["start"] - w["prep_end"]) * 1e3,
                         "compute_ms": (emits[0] - w["start"]) * 1e3,
                         "deliver_first_ms": (got[0] - emits[0]) * 1e3,
                         "emit_to_loop_first_ms": (sse_t[0] - emits[0]) * 1e3,
                         "loop_to_client_first_ms": (got[0] - sse_t[0]) * 1e3,
                         "deliver_rest_ms": statistics.median(rest) * 1e3 if rest else None,
                         "emit_to_loop_rest_ms": statistics.median(
                             [s - e for s, e in zip(sse_t[1:], emits[1:], strict=True)]) * 1e3 if rest else None,
                         "deliver_rest_max_ms": max(rest) * 1e3 if rest else None,
                         "tokens": n, "foreign_cpu": round(foreign, 4)})
        api.close()
    finally:
        node.stop()
    summary = {}
    for key in KEYS:
        xs = [r[key] for r in rows if r[key] is not None]
        if xs:
            summary[key] = {"median": statistics.median(xs),
                            "p90": harness.pct(xs, 90)}
    return {"mode": mode, "samples": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    from bench import harness

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("stub", "trace", "both"), default="both")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prefill-ms", type=float, default=30.0, help="stub: sleep before the first token")
    ap.add_argument("--interval-ms", type=float, default=20.0, help="stub: sleep between tokens")
    ap.add_argument("--engine-nice", type=int, default=0,
                    help="also trace with the worker's generating threads at this nice value (an experiment)")
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="measure a request again if other processes used more than this fraction of the CPU")
    ap.add_argument("--model-path", type=Path, help="GGUF (default: the demo Gemma 3 270M)")
    harness.add_output_args(ap, "engine_overhead")
    args = ap.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the node this starts is stopped in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="aiv-stub-bench-") as tmp_s:
        tmp = Path(tmp_s)
        model_path = args.model_path or harness.demo_model()
        model_name = model_path.name
        modes = []
        if args.mode in ("stub", "both"):
            modes.append(f"stub:{args.prefill_ms:g}:{args.interval_ms:g}")
        if args.mode in ("trace", "both"):
            modes.append("trace")
            if args.engine_nice:
                modes.append(f"trace-nice:{args.engine_nice}")
        results = [run_mode(m, model_path, args.reps, args.warmup, args.max_tokens, tmp, args.max_foreign) for m in modes]
    print("| ms, median / p90 | " + " | ".join(f"{r['mode']} (n={len(r['samples'])})" for r in results) + " |")
    print("|---" * (len(results) + 1) + "|")
    for k in KEYS:
        cells = [f"{r['summary'][k]['median']:.2f} / {r['summary'][k]['p90']:.2f}" if k in r["summary"] else "-"
                 for r in results]
        print(f"| {k.removesuffix('_ms')} | " + " | ".join(cells) + " |")
    from aivailable.engine.runner import Runner

    out = {"benchmark": "engine_overhead", "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": harness.machine(cpu_count=os.cpu_count(), affinity_cpus=len(os.sched_getaffinity(0)),
                                      loadavg_before=load_before, loadavg_after=os.getloadavg()),
           "settings": {"reps": args.reps, "warmup": args.warmup, "max_tokens": args.max_tokens,
                        "prefill_ms": args.prefill_ms, "interval_ms": args.interval_ms,
                        "engine_nice": args.engine_nice, "max_foreign_cpu": args.max_foreign,
                        "endpoint": "/v1/completions (streamed)", "model": model_name,
                        "worker_generation_entry": "Runner.submit" if hasattr(Runner, "submit")
                        else "Runner.generate"},
           "results": results}
    print(f"wrote {harness.write_results('engine_overhead', out, args=args, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
