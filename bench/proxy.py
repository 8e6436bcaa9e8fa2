"""Proxy overhead: latency added when a request enters a node that does not hold the model.

One scenario starts a two-node cluster (real ``aivailable up`` processes on 127.0.0.1 and 127.0.0.2, one
simulated GPU each, ``--join``, one model with ``max_replicas = 1``), finds the node holding the model from
``/api/cluster``, and sends the same request three ways, interleaved (the order rotates every round, after a
warm-up), each over its own kept-alive ``http.client`` connection:

- ``socket``: straight to the holder's worker on its unix socket (``<holder state>/run/*.sock``): the floor;
- ``holder``: to the holder node's API (validate, route, proxy to the local worker);
- ``peer``: to the other node's API, which proxies to the holder node's API (one more HTTP hop).

Reported per path: p50/p90/p99/mean/max of end-to-end latency (request sent -> whole body read) and of time
to response headers. ``added`` = peer - holder (the cost of entering at a non-holding node; target: <= 1 ms
at p50); ``node overhead`` = holder - socket (validation + routing + the node -> worker hop). Both are given
as a difference of percentiles and as the median of per-round paired differences (more robust to drift).

Scenarios: the fast stub upstream (``AIVAILABLE_WORKER_MODULE=bench.stub_worker``, no model time), not
streamed and streamed, at concurrency 1 and (threads, each interleaving the three paths) 8; the same stub
answering after ``--slow-ms`` (90 ms, about the real model's time here) of idle waiting, so every process on
the path has gone to sleep before the answer comes back, as with a real model; then the real Gemma 3 270M
model (llama.cpp on the CPU, greedy, small ``max_tokens``) at concurrency 1. The target is judged on the
first (stub, not streamed, concurrency 1); the others say how the hop behaves off that best case.

    python bench/proxy.py [--n 500] [--n-real 30] [--concurrency 1,8] [--slow-ms 90] [--skip-real]

About 2-4 minutes on 2 idle cores. The box must be otherwise quiet: the real-model scenario on a CPU shared
with other llama.cpp processes measures their scheduling, not the proxy (each scenario records the load
average it started under). Prints a markdown table and writes bench/results/proxy.json (settings,
machine, load average before/after, every scenario's statistics and raw samples).
Every process it starts is in its own process group and is killed in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.harness import TwoNodes, loadavg, pct  # noqa: E402

MODEL = "bench"
PATHS = ("socket", "holder", "peer")
ADDED_TARGET_MS = 1.0
PROMPT = "Say hi."


# -- clients -------------------------------------------------------------------------------------------------
class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("worker", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class Client:
    """One kept-alive connection; `post` returns (total_s, headers_s) and checks the answer."""

    def __init__(self, name: str, make, expect_replica: str | None):
        self.name, self.make, self.expect_replica = name, make, expect_replica
        self.conn = make()
        self.reconnects = 0

    def post(self, path: str, body: bytes, stream: bool) -> tuple[float, float]:
        hdrs = {"Content-Type": "application/json", "Connection": "keep-alive"}
        for attempt in (0, 1):
            try:
                t0 = time.perf_counter()
                self.conn.request("POST", path, body=body, headers=hdrs)
                resp = self.conn.getresponse()
                t1 = time.perf_counter()
                data = resp.read()
                t2 = time.perf_counter()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if attempt:
                    raise
                self.conn.close()  # a server-side keep-alive timeout: reconnect once, not counted as a sample
                self.conn = self.make()
                self.reconnects += 1
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}: {data[:300]!r}")
        if stream and not data.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"{self.name}: stream did not end with [DONE]: {data[-200:]!r}")
        if self.expect_replica is not None:
            rep = resp.getheader("X-AIvailable-Replica", "")
            if not rep.startswith(self.expect_replica + "/"):
                raise RuntimeError(f"{self.name}: served by {rep!r}, expected {self.expect_replica}")
        return t2 - t0, t1 - t0

    def close(self) -> None:
        self.conn.close()


def make_clients(c: TwoNodes, timeout: float) -> dict[str, Client]:
    sock = c.worker_socket()
    h, p = c.holder, c.peer
    return {
        "socket": Client("socket", lambda: UnixHTTPConnection(sock, timeout), None),
        "holder": Client("holder", lambda: http.client.HTTPConnection(h.host, h.port, timeout=timeout),
                         c.holder_id),
        "peer": Client("peer", lambda: http.client.HTTPConnection(p.host, p.port, timeout=timeout),
                       c.holder_id),
    }


# -- measurement ---------------------------------------------------------------------------------------------
def summarize(xs: list[float]) -> dict:
    ms = [x * 1000 for x in xs]
    return {"n": len(ms), "p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99),
            "mean": statistics.fmean(ms), "max": max(ms), "min": min(ms)}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def busy_ticks() -> int:
    """Busy clock ticks of the whole machine (all CPUs) so far."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    return sum(vals[:8]) - vals[3] - vals[4]  # minus idle and iowait


def proc_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def run_scenario(c: TwoNodes, *, name: str, body: dict, stream: bool, n: int, concurrency: int, warmup: int,
                 timeout: float, max_foreign: float | None = None) -> dict:
    """n rounds per path in all (split over `concurrency` threads); each round sends one request per path.

    With `max_foreign` (concurrency 1 only): a round during which processes other than this benchmark's
    used more than that many CPUs on average is thrown away and run again (up to 2n times in all), so a
    shared machine's other work does not end up in slow requests' numbers."""
    path = "/v1/chat/completions"
    raw = json.dumps({**body, "stream": stream}, separators=(",", ":")).encode()
    per_thread = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    results: list[list[dict]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    start = threading.Barrier(concurrency)
    reconnects = [0] * concurrency
    guard = max_foreign is not None and concurrency == 1
    own = [os.getpid(), c.peer.proc.pid, c.holder.proc.pid, c.worker_pid()]
    hz = os.sysconf("SC_CLK_TCK")
    discarded: list[float] = []

    def worker(ti: int) -> None:
        clients = make_clients(c, timeout)
        try:
            for _ in range(warmup):
                for pth in PATHS:
                    clients[pth].post(path, raw, stream)
            start.wait(timeout)
            r = 0
            while len(results[ti]) < per_thread[ti]:
                order = PATHS[(r + ti) % 3:] + PATHS[:(r + ti) % 3]
                row: dict = {"round": r, "thread": ti, "order": "".join(p[0] for p in order)}
                r += 1
                if guard:
                    b0, o0, w0 = busy_ticks(), proc_ticks(own), time.monotonic()
                for pth in order:
                    total, hdr = clients[pth].post(path, raw, stream)
                    row[pth] = total
                    row[pth + "_hdr"] = hdr
                if guard:
                    others = busy_ticks() - b0 - (proc_ticks(own) - o0)
                    foreign = others / hz / max(1e-6, time.monotonic() - w0)
                    row["foreign_cpus"] = round(foreign, 3)
                    if foreign > max_foreign and len(discarded) < 2 * n:
                        discarded.append(round(foreign, 3))
                        continue
                results[ti].append(row)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                start.abort()
        finally:
            reconnects[ti] = sum(cl.reconnects for cl in clients.values())
            for cl in clients.values():
                cl.close()

    # CPU per request of each process on the path: the entering (peer) node sees 1 request per round, the
    # holder node 2 (its own path's and the peer's), the worker 3; background work (gossip, health checks)
    # is measured idle for a second first and subtracted.
    procs = {"peer_node": c.peer.proc.pid, "holder_node": c.holder.proc.pid, "worker": c.worker_pid()}
    idle0 = {k: cpu_s(p) for k, p in procs.items()}
    time.sleep(1.0)
    idle_rate = {k: cpu_s(p) - idle0[k] for k, p in procs.items()}
    cpu0 = {k: cpu_s(p) for k, p in procs.items()}
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    budget = timeout * (n + warmup * concurrency) * 3
    for t in threads:
        t.join(max(1.0, budget - (time.monotonic() - t0)))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"scenario {name} did not finish within {budget:.0f}s")
    if errors:
        raise errors[0]
    rows = [r for rs in results for r in rs]
    wall = time.monotonic() - t0
    per_path = len(rows) + len(discarded) + warmup * concurrency
    handled = {"peer_node": per_path, "holder_node": 2 * per_path, "worker": 3 * per_path}
    cpu_ms: dict | None = {k: round(max(0.0, cpu_s(p) - cpu0[k] - idle_rate[k] * wall) * 1000 / handled[k], 3)
                           for k, p in procs.items()}
    if wall / per_path > 0.05:
        cpu_ms = None  # slow rounds: background work (gossip, health checks) swamps the per-request CPU
    out: dict = {"name": name, "stream": stream, "concurrency": concurrency, "rounds": len(rows),
                 "wall_s": round(wall, 2), "reconnects": sum(reconnects), "cpu_ms_per_request": cpu_ms,
                 "max_foreign_cpus": max_foreign if guard else None, "discarded_rounds": len(discarded),
                 "discarded_foreign_cpus": discarded}
    for pth in PATHS:
        out[pth] = summarize([r[pth] for r in rows])
        out[pth + "_headers"] = summarize([r[pth + "_hdr"] for r in rows])
    paired_added = [(r["peer"] - r["holder"]) for r in rows]
    paired_node = [(r["holder"] - r["socket"]) for r in rows]
    out["added_ms"] = {"p50_diff": out["peer"]["p50"] - out["holder"]["p50"],
                       "p99_diff": out["peer"]["p99"] - out["holder"]["p99"],
                       "paired_median": statistics.median(paired_added) * 1000,
                       "paired_mean": statistics.fmean(paired_added) * 1000}
    out["node_overhead_ms"] = {"p50_diff": out["holder"]["p50"] - out["socket"]["p50"],
                               "p99_diff": out["holder"]["p99"] - out["socket"]["p99"],
                               "paired_median": statistics.median(paired_node) * 1000,
                               "paired_mean": statistics.fmean(paired_node) * 1000}
    out["raw_ms"] = {pth: [round(r[pth] * 1000, 4) for r in rows] for pth in PATHS}
    return out


def scenario_line(s: dict) -> str:
    a, o, cpu = s["added_ms"], s["node_overhead_ms"], s["cpu_ms_per_request"]
    disc = f" (+{s['discarded_rounds']} dropped)" if s.get("discarded_rounds") else ""
    return (f"| {s['name']} | {s['concurrency']} | {s['rounds']}{disc} | "
            f"{s['socket']['p50']:.2f} / {s['socket']['p99']:.2f} | "
            f"{s['holder']['p50']:.2f} / {s['holder']['p99']:.2f} | "
            f"{s['peer']['p50']:.2f} / {s['peer']['p99']:.2f} | "
            f"**{a['p50_diff']:.2f}** / {a['p99_diff']:.2f} ({a['paired_median']:.2f}) | "
            f"{o['p50_diff']:.2f} / {o['p99_diff']:.2f} ({o['paired_median']:.2f}) | "
            + (f"{cpu['peer_node']:.2f} / {cpu['holder_node']:.2f} / {cpu['worker']:.2f} |" if cpu else "- |"))


TABLE_HEAD = ("| scenario | conc | rounds | socket p50/p99 ms | holder p50/p99 ms | peer p50/p99 ms | "
              "added (peer-holder) p50/p99 (paired median) ms | "
              "node overhead (holder-socket) p50/p99 (paired) ms | "
              "CPU ms/request peer node / holder node / worker |\n"
              "|---|---|---|---|---|---|---|---|---|")


def run_cluster(kind: str, model_path: Path, env: dict[str, str], scenarios: list[dict], timeout: float,
                tmp_root: Path) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=tmp_root))
    c = TwoNodes(tmp, model_path, env)
    t0 = time.monotonic()
    try:
        c.start()
        info: dict = {"holder": c.holder_id, "peer": next(k for k in c.nodes if k != c.holder_id),
                      "socket": c.worker_socket(), "startup_s": round(time.monotonic() - t0, 1),
                      "scenarios": []}
        print(f"[{kind}] cluster up in {info['startup_s']}s; holder {info['holder']}, entering via "
              f"{info['peer']}; worker socket {info['socket']}", flush=True)
        for sc in scenarios:
            la = loadavg()
            res = run_scenario(c, timeout=timeout, **sc)
            res["loadavg_before"] = la
            info["scenarios"].append(res)
            if len(info["scenarios"]) == 1:
                print(TABLE_HEAD)
            print(scenario_line(res), flush=True)
        return info
    except BaseException:
        for n in c.nodes.values():
            with contextlib.suppress(Exception):
                print(f"--- {n.host} log tail ---\n{n.log()[-2000:]}", file=sys.stderr)
        raise
    finally:
        c.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="rounds per stub scenario (one request per path each)")
    ap.add_argument("--n-real", type=int, default=30, help="rounds for the real model")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--concurrency", default="1,8", help="comma-separated levels for the stub (non-streamed)")
    ap.add_argument("--max-tokens", type=int, default=4, help="max_tokens of the real-model requests")
    ap.add_argument("--slow-ms", type=float, default=90.0, help="stub answer delay of the 'stub +N ms' "
                    "scenario (about the real model's time for these requests; 0 skips it)")
    ap.add_argument("--n-slow", type=int, default=150, help="rounds of the delayed-stub scenario")
    ap.add_argument("--max-foreign", type=float, default=0.3,
                    help="slow scenarios (real model, delayed stub): rerun a round during which other processes "
                    "used more CPUs than this on average (0: keep every round)")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-stub", action="store_true")
    ap.add_argument("--profile", choices=("lan", "local"), default="lan",
                    help="gossip timing profile of the nodes")
    ap.add_argument("--model-path", type=Path, default=None, help="GGUF (default: the demo Gemma 3 270M)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the nodes' state directories and logs")
    harness.add_output_args(ap, "proxy")
    args = ap.parse_args(argv)

    tmp_root = Path(tempfile.mkdtemp(prefix="aiv-proxy-bench-"))
    if args.model_path is None:
        args.model_path = harness.demo_model()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    result: dict = {"benchmark": "proxy", "target_added_p50_ms": ADDED_TARGET_MS,
                    "machine": harness.machine(loadavg_start=loadavg()),
                    "settings": {"n": args.n, "n_real": args.n_real, "warmup": args.warmup,
                                 "concurrency": levels, "slow_ms": args.slow_ms, "n_slow": args.n_slow,
                                 "max_tokens_real": args.max_tokens, "profile": args.profile,
                                 "max_foreign_cpus": args.max_foreign,
                                 "model_path": str(args.model_path)},
                    "runs": {}}
    base_env = {"AIVAILABLE_PROFILE": args.profile, "AIVAILABLE_LOG_LEVEL": "WARNING"}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    guard = args.max_foreign if args.max_foreign > 0 else None
    t_start = time.monotonic()
    try:
        if not args.skip_stub:
            scen = [{"name": "stub", "body": {**chat, "max_tokens": 4}, "stream": False, "n": args.n,
                     "concurrency": 1, "warmup": args.warmup},
                    {"name": "stub stream", "body": {**chat, "max_tokens": 4}, "stream": True, "n": args.n,
                     "concurrency": 1, "warmup": args.warmup}]
            scen += [{"name": "stub", "body": {**chat, "max_tokens": 4}, "stream": False, "n": args.n,
                      "concurrency": k, "warmup": 5} for k in levels if k != 1]
            stub_env = {**base_env, "AIVAILABLE_WORKER_MODULE": "bench.stub_worker"}
            result["runs"]["stub"] = run_cluster("stub", args.model_path, stub_env, scen, timeout=30.0,
                                                 tmp_root=tmp_root)
        if not args.skip_stub and args.slow_ms > 0:
            # The same stub answering after an idle wait, like a model would: each process on the path
            # sleeps meanwhile, so the hop is paid from cold caches and wake-ups, as with real requests.
            scen = [{"name": f"stub +{args.slow_ms:g} ms", "body": {**chat, "max_tokens": 4}, "stream": False,
                     "n": args.n_slow, "concurrency": 1, "warmup": 5, "max_foreign": guard}]
            result["runs"]["stub_slow"] = run_cluster(
                "stub-slow", args.model_path, {**base_env, "AIVAILABLE_WORKER_MODULE": "bench.stub_worker",
                                               "AIVAILABLE_STUB_DELAY_MS": f"{args.slow_ms:g}"},
                scen, timeout=30.0, tmp_root=tmp_root)
        if not args.skip_real:
            body = {**chat, "max_tokens": args.max_tokens, "temperature": 0.0, "seed": 1}
            scen = [{"name": f"gemma max_tokens={args.max_tokens}", "body": body, "stream": False,
                     "n": args.n_real, "concurrency": 1, "warmup": 2, "max_foreign": guard},
                    {"name": f"gemma stream max_tokens={args.max_tokens}", "body": body, "stream": True,
                     "n": args.n_real, "concurrency": 1, "warmup": 1, "max_foreign": guard}]
            result["runs"]["real"] = run_cluster("real", args.model_path, base_env, scen, timeout=120.0,
                                                 tmp_root=tmp_root)
    finally:
        result["machine"]["loadavg_end"] = loadavg()
        result["wall_s"] = round(time.monotonic() - t_start, 1)
        if not args.keep_tmp:
            shutil.rmtree(tmp_root, ignore_errors=True)

    print("\n" + TABLE_HEAD)
    for run in result["runs"].values():
        for s in run["scenarios"]:
            print(scenario_line(s))
    stub1 = next((s for s in result.get("runs", {}).get("stub", {}).get("scenarios", [])
                  if s["concurrency"] == 1 and not s["stream"]), None)
    if stub1 is not None:
        met = stub1["added_ms"]["p50_diff"] <= ADDED_TARGET_MS
        result["target_met"] = met
        print(f"\nadded latency p50 (stub, concurrency 1): {stub1['added_ms']['p50_diff']:.3f} ms "
              f"(target <= {ADDED_TARGET_MS} ms: {'met' if met else 'MISSED'})")
    print(f"wrote {harness.write_results('proxy', result, args=args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
