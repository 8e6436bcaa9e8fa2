"""Through any node vs straight to the worker: a concurrency sweep on the real model, and the nodes' memory.

Both parts start a two-node cluster (bench/proxy.py's ``TwoNodes``: real ``aivailable up`` processes on
127.0.0.1 and 127.0.0.2, one simulated GPU each, one model with ``max_replicas = 1``) and enter it at the node
that does **not** hold the model, so every request takes the longest path a client can get: entering node ->
holder node -> worker.

**sweep**: the Gemma 3 270M model (llama.cpp on the CPU; ``--parallel`` slots, default 8, ``--ctx`` total) and
1, 2, 4, 8, 16, 32 concurrent streams, each a closed loop of ``--requests`` streamed greedy ``/v1/completions``
(bench/engine_sweep.py's ``run_level``: a thread per stream, a fresh connection per request), sent in turns
(order alternating per level) to

- ``node``: the entering node's API;
- ``worker``: the holder's worker, straight on its unix socket (``<state>/run/*.sock``): the floor.

Per level and path: aggregate tokens/s, TTFT p50/p99 (request sent -> first text chunk), per-stream decode
tokens/s and failed streams; then node/worker ratios. Every request's prompt is unique and the two paths' prompts
differ from the first token, so neither reuses the other's KV cache in the shared worker. Streams beyond ``--parallel`` wait in the worker's queue
on both paths alike.

**memory**: resident set (``VmRSS``; the peak is the kernel's ``VmHWM``) of the entering node, the holder
node and, separately, their children (the holder's worker), sampled every 50 ms:

- idle: the cluster settled, no requests, for 3 s (median of the samples);
- 64 streams: bench/loadgen.py holds ``--streams`` (default 64) streamed chat completions open at once
  through the entering node, against the stub worker (bench/stub_worker.py with a pause before each chunk,
  so every stream stays open for seconds and all 64 are in flight together); maximum of the samples;
- after: 5 s after the load, what stayed resident.

The sweep also records the same idle figures with the real model loaded (its worker's RSS).

    python bench/anynode.py [--part sweep|memory|both] [--levels 1,2,4,8,16,32] [--requests 2]
                            [--max-tokens 32] [--parallel 8] [--ctx 4096] [--streams 64]

About 3-6 minutes on 2 cores (the sweep dominates). Writes bench/results/anynode.json and prints tables.
Every process it starts is in its own process group and is killed in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.engine import SAMPLING, CpuWatch, descendants, prompt_for  # noqa: E402
from bench.engine_sweep import sweep  # noqa: E402
from bench.harness import TwoNodes, loadavg  # noqa: E402
from bench.proxy import MODEL  # noqa: E402

LEVELS = (1, 2, 4, 8, 16, 32)


# -- memory --------------------------------------------------------------------------------------------------
def rss_mib(pid: int) -> float:
    """Resident set of one process in MiB (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler:
    """Samples, every `interval` s on a thread, the RSS of each node process and of its children (summed)."""

    def __init__(self, nodes: dict[str, int], interval: float = 0.05):
        self.nodes, self.interval = nodes, interval
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._children: dict[str, list[int]] = {}

    def sample(self) -> dict[str, float]:
        row: dict[str, float] = {}
        for name, pid in self.nodes.items():
            row[name] = rss_mib(pid)
            row[name + "_children"] = sum(rss_mib(c) for c in self._children.get(name, []))
        return row

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._children = {name: descendants(pid)[1:] for name, pid in self.nodes.items()}
        self.samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return self.samples

    def measure(self, seconds: float, how: str) -> dict[str, float]:
        """Sample for `seconds`; per series the median (`how`="median") or the maximum."""
        self.start()
        time.sleep(seconds)
        return summarize(self.stop(), how)


def summarize(samples: list[dict[str, float]], how: str) -> dict[str, float]:
    if not samples:
        return {}
    f = statistics.median if how == "median" else max
    return {k: round(f([s[k] for s in samples]), 1) for k in samples[0]}


def node_pids(c: TwoNodes) -> dict[str, int]:
    return {"entering_node": c.peer.proc.pid, "holder_node": c.holder.proc.pid}


def memory_part(model_path: Path, tmp_root: Path, streams: int, chunk_ms: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="memory-", dir=tmp_root))
    env = {"AIVAILABLE_PROFILE": "lan", "AIVAILABLE_LOG_LEVEL": "WARNING",
           "AIVAILABLE_WORKER_MODULE": "bench.stub_worker", "AIVAILABLE_STUB_CHUNK_MS": f"{chunk_ms:g}"}
    c = TwoNodes(tmp, model_path, env, max_queue=max(64, streams))
    try:
        c.start()
        time.sleep(2.0)
        sampler = RssSampler(node_pids(c))
        idle = sampler.measure(3.0, "median")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                "stream": True}
        cmd = [sys.executable, "-m", "bench.loadgen", "run", "--url", c.peer.url + "/v1/chat/completions",
               "--body", json.dumps(body), "--concurrency", str(streams), "--requests", str(2 * streams),
               "--warmup", "1", "--timeout", "120"]
        sampler.start()
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
        wall = time.monotonic() - t0
        load = summarize(sampler.stop(), "max")
        if out.returncode != 0:
            raise RuntimeError(f"load generator failed: {out.stderr[-1500:]}")
        gen = json.loads(out.stdout)
        gen.pop("raw_ms", None)
        time.sleep(5.0)
        after = sampler.measure(2.0, "median")
        return {"streams": streams, "chunk_ms": chunk_ms, "idle_mib": idle, "under_load_max_mib": load,
                "after_load_mib": after, "load_wall_s": round(wall, 1),
                "streams_ok": gen["ok"], "stream_errors": gen["errors"], "error_samples": gen["error_samples"],
                "stream_latency_ms": gen["latency_ms"]}
    finally:
        c.stop()


# -- sweep ---------------------------------------------------------------------------------------------------
def ratios(figs: dict[str, dict[int, dict]]) -> dict[int, dict]:
    out = {}
    for level, a in figs["node"].items():
        b = figs["worker"][level]

        def ratio(k: str, a=a, b=b) -> float | None:
            return round(a[k] / b[k], 3) if a.get(k) and b.get(k) else None

        def added(k: str, a=a, b=b) -> float | None:
            return round(a[k] - b[k], 2) if a.get(k) is not None and b.get(k) is not None else None

        out[level] = {"aggregate_tps_ratio": ratio("aggregate_tps"), "ttft_p50_added_ms": added("ttft_ms_p50"),
                      "ttft_p99_added_ms": added("ttft_ms_p99")}
    return out


def sweep_table(figs: dict[str, dict[int, dict]], rat: dict[int, dict]) -> str:
    def f(v, d=1):
        return "-" if v is None else f"{v:.{d}f}"

    rows = ["| streams | node tok/s | worker tok/s | ratio | node TTFT p50 / p99 ms | worker TTFT p50 / p99 ms | "
            "TTFT added p50 / p99 ms | failed streams (node / worker) |",
            "|---|---|---|---|---|---|---|---|"]
    for level, a in figs["node"].items():
        b, q = figs["worker"][level], rat[level]
        rows.append(f"| {level} | {f(a['aggregate_tps'])} | {f(b['aggregate_tps'])} | {f(q['aggregate_tps_ratio'], 3)} | "
                    f"{f(a['ttft_ms_p50'])} / {f(a['ttft_ms_p99'])} | {f(b['ttft_ms_p50'])} / {f(b['ttft_ms_p99'])} | "
                    f"{f(q['ttft_p50_added_ms'])} / {f(q['ttft_p99_added_ms'])} | "
                    f"{a['failed_streams']} / {b['failed_streams']} |")
    return "\n".join(rows)


def sweep_part(model_path: Path, tmp_root: Path, *, levels: tuple[int, ...], requests: int, max_tokens: int,
               parallel: int, ctx: int, max_foreign: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="sweep-", dir=tmp_root))
    env = {"AIVAILABLE_PROFILE": "lan", "AIVAILABLE_LOG_LEVEL": "WARNING"}
    c = TwoNodes(tmp, model_path, env, ctx=ctx, parallel=parallel, max_queue=max(64, 2 * max(levels)))
    try:
        c.start(timeout=600)
        time.sleep(2.0)
        sampler = RssSampler(node_pids(c))
        idle = sampler.measure(3.0, "median")
        servers = {"node": (c.peer.host, c.peer.port), "worker": (c.worker_socket(), 0)}
        # Both paths end at the same worker: prompts that differ from their first token on, so neither path
        # finds the other's prompt in the KV cache (a shared prefix would make whichever runs second faster).
        prompts = {path: [f"{word} {i}: {prompt_for(i)}" for i in range(max(levels) * requests + 8)]
                   for path, word in (("node", "Note"), ("worker", "Memo"))}
        print(f"sweep: entering at {c.peer.host} (holder {c.holder_id}), worker socket {servers['worker'][0]}; "
              f"levels {levels}, parallel {parallel}, ctx {ctx}, {requests} requests per stream, "
              f"max_tokens {max_tokens}", flush=True)
        # A level during which other processes took more than `max_foreign` of the machine is run again on
        # both paths (up to twice; the quietest attempt is kept, its foreign share recorded).
        watch = CpuWatch([os.getpid(), *descendants(c.peer.proc.pid), *descendants(c.holder.proc.pid)])
        sampler.start()
        t0 = time.monotonic()
        figs = sweep(servers, levels=levels, requests=requests, prompts=prompts, max_tokens=max_tokens,
                     sampling=SAMPLING, model=MODEL, watch=watch, max_foreign=max_foreign, retries=2)
        elapsed = time.monotonic() - t0
        load = summarize(sampler.stop(), "max")
    finally:
        c.stop()
    rat = ratios(figs)
    table = sweep_table(figs, rat)
    print(table, flush=True)
    return {"settings": {"levels": list(levels), "parallel": parallel, "ctx_total": ctx, "requests_per_stream": requests,
                         "max_tokens": max_tokens, "temperature": 0, **SAMPLING, "max_foreign_cpu": max_foreign,
                         "endpoint": "/v1/completions (streamed)", "elapsed_s": round(elapsed, 1)},
            "figures": {name: {str(k): v for k, v in f.items()} for name, f in figs.items()},
            "ratios": {str(k): v for k, v in rat.items()}, "table_markdown": table,
            "memory_real_model": {"idle_mib": idle, "sweep_max_mib": load}}


def memory_table(mem: dict) -> str:
    rows = ["| state | entering node | its children | holder node | its children (worker) |", "|---|---|---|---|---|"]
    for label, key in (("idle", "idle_mib"), (f"{mem['streams']} streams (max)", "under_load_max_mib"),
                       ("5 s after", "after_load_mib")):
        m = mem[key]
        rows.append(f"| {label} | {m['entering_node']:.1f} | {m['entering_node_children']:.1f} | "
                    f"{m['holder_node']:.1f} | {m['holder_node_children']:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("sweep", "memory", "both"), default="both")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--requests", type=int, default=2, help="sweep: streamed requests per stream and level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=8, help="sweep: the model's slots")
    ap.add_argument("--ctx", type=int, default=4096, help="sweep: the model's total context")
    ap.add_argument("--max-foreign", type=float, default=0.15,
                    help="sweep: rerun a level when other processes used more than this share of the machine")
    ap.add_argument("--streams", type=int, default=64, help="memory: streams held open at once")
    ap.add_argument("--chunk-ms", type=float, default=500.0, help="memory: stub pause before each chunk")
    ap.add_argument("--model-path", type=Path, help="GGUF (default: the demo Gemma 3 270M)")
    harness.add_output_args(ap, "anynode")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: `finally` stops what we started
    if args.model_path is None:
        args.model_path = harness.demo_model()
    levels = tuple(int(x) for x in args.levels.split(",") if x.strip())
    result: dict = {}
    with contextlib.suppress(ValueError, OSError):  # one part alone keeps the other's last figures
        result = json.loads(harness.output_path(args, "anynode").read_text())
    result.update({"benchmark": "anynode", "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "machine": harness.machine(loadavg_start=loadavg())})
    tmp_root = Path(tempfile.mkdtemp(prefix="aiv-anynode-bench-"))
    try:
        if args.part in ("memory", "both"):
            result["memory"] = memory_part(args.model_path, tmp_root, args.streams, args.chunk_ms)
            print(memory_table(result["memory"]), flush=True)
        if args.part in ("sweep", "both"):
            result["sweep"] = sweep_part(args.model_path, tmp_root, levels=levels, requests=args.requests,
                                         max_tokens=args.max_tokens, parallel=args.parallel, ctx=args.ctx,
                                         max_foreign=args.max_foreign)
    finally:
        result["machine"]["loadavg_end"] = loadavg()
        shutil.rmtree(tmp_root, ignore_errors=True)
        written = harness.write_results("anynode", result, args=args)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
