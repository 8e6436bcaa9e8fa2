"""Failover: time from ``kill -9`` of the node holding a model to detection and to serving again elsewhere.

Each run starts a fresh three-node cluster (real ``aivailable up`` processes on 127.0.0.1-3, one simulated
GPU each, ``--join`` the first, one model with ``max_replicas = 1``), served by the stub worker
(``AIVAILABLE_WORKER_MODULE=bench.stub_worker``: no model time, so what is measured is the cluster's own
reaction; a real model adds its load time to (ii)). A fresh cluster per run keeps runs independent (no
restart history, no backoff, no leftover suspicion); it costs a few seconds of startup per run.

Once all three nodes see each other alive and agree on the one ready replica, the benchmark checks that
every survivor-to-be answers through it, then SIGKILLs the holder's whole machine at t0: the node's process
group and its worker (which runs in its own session). From t0 it polls every survivor every 50 ms, in
parallel threads:

- ``GET /api/cluster``: (i) detection = the first survivor whose view shows the victim not ``alive``
  (``suspect`` or ``dead``); also when a view first shows it ``dead``, when every survivor does, and when a
  view first shows the model ready on a survivor;
- ``POST /v1/chat/completions`` for the model: (ii) serving again = the first 200 answered by a replica on a
  survivor (header ``X-AIvailable-Replica``); also when every survivor answers.

Reported over the runs: p50/p99/max of each. Target: detection (i) <= 3 s at p99 with the LAN profile (the
default: ``AIVAILABLE_PROFILE`` unset, "lan"); ``--profile local`` uses the test timings.

    python bench/failover.py [--runs 10] [--profile lan|local] [--run-timeout 60]

About 2-3 minutes for 10 runs on 2 cores. Prints a markdown table and writes bench/results/failover.json
(settings, machine, every run's timeline and statistics). Every process it starts is in its own process
group and is killed in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.harness import NodeProc, ours, pct, start_joined, wait_for  # noqa: E402

MODEL = "bench"
SECRET = "bench-failover-secret-0123456789abcdef"
POLL_S = 0.05
DETECT_TARGET_P99_S = 3.0
IDS = ("n1", "n2", "n3")


def http_json(host: str, port: int, path: str, timeout: float) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise OSError(f"HTTP {r.status}")
        return json.loads(data)
    finally:
        conn.close()


def ready_replicas(view: dict) -> list[dict]:
    return [r for m in view["models"] if m["name"] == MODEL for r in m["replicas"] if r["state"] == "ready"]


def node_state(view: dict, node_id: str) -> str | None:
    return next((n["state"] for n in view["nodes"] if n["id"] == node_id), None)


class ThreeNodes:
    def __init__(self, tmp: Path, model_path: Path, env: dict[str, str], vram: dict[int, int]):
        self.tmp, self.env, self.vram = tmp, env, vram
        self.cfg = tmp / "models.toml"
        self.cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{model_path}"\nctx = 512\n'
                            "max_replicas = 1\n")
        self.nodes: dict[str, NodeProc] = {}
        self.worker_pids: set[int] = set()

    def start(self, timeout: float) -> dict:
        self.nodes = start_joined(self.tmp, self.cfg, SECRET, {i: f"card{i}:{self.vram[i]}" for i in (1, 2, 3)},
                                  self.env)

        def settled():
            views = {k: http_json(n.host, n.port, "/api/cluster", 2) for k, n in self.nodes.items()}
            for v in views.values():
                self.worker_pids |= {r["pid"] for r in ready_replicas(v) if r.get("pid")}
            ok = all({x["id"] for x in v["nodes"] if x["state"] == "alive"} == set(IDS)
                     for v in views.values())
            reps = [tuple(r["node"] for r in ready_replicas(v)) for v in views.values()]
            leaders = {v["leader"] for v in views.values()}
            if ok and all(len(r) == 1 for r in reps) and len(set(reps)) == 1 and len(leaders) == 1 \
                    and None not in leaders:
                return views
            return None

        return wait_for(settled, timeout, "three nodes alive, one leader, the model ready in every view")

    def kill_machine(self, node_id: str, worker_pids: list[int]) -> None:
        """SIGKILL the node's process group and its workers (own sessions): the machine is gone."""
        n = self.nodes[node_id]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(n.proc.pid, signal.SIGKILL)
        for pid in worker_pids:
            if ours(pid, str(self.tmp)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)  # the worker leads its own session/group

    def stop(self) -> None:
        for n in self.nodes.values():  # gather worker pids once more (a re-placed replica is new)
            if n.proc.poll() is None:
                with contextlib.suppress(Exception):
                    v = http_json(n.host, n.port, "/api/cluster", 2)
                    self.worker_pids |= {r["pid"] for m in v["models"] for r in m["replicas"] if r.get("pid")}
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                n.stop(timeout=10)
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                n.kill_group()
        for pid in self.worker_pids:
            if ours(pid, str(self.tmp)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


class Poller:
    """Polls one survivor from t0: its view of the victim and whether it serves the model."""

    def __init__(self, node: NodeProc, victim: str, t0_ref: list[float], stop: threading.Event,
                 deadline: float):
        self.node, self.victim, self.t0_ref, self.stop, self.deadline = node, victim, t0_ref, stop, deadline
        self.t_not_alive: float | None = None
        self.t_dead: float | None = None
        self.t_replaced_view: float | None = None
        self.t_served: float | None = None
        self.served_by: str | None = None
        self.states: list[tuple[float, str]] = []
        self.answers: dict[str, int] = {}
        self.view_errors = 0
        self.new_leader: str | None = None

    def _elapsed(self) -> float:
        return time.monotonic() - self.t0_ref[0]

    def watch_view(self) -> None:
        last = None
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            tick = time.monotonic()
            try:
                v = http_json(self.node.host, self.node.port, "/api/cluster", 2)
            except (OSError, ValueError, http.client.HTTPException):
                self.view_errors += 1
            else:
                t = self._elapsed()
                st = node_state(v, self.victim) or "absent"
                if st != last:
                    self.states.append((round(t, 3), st))
                    last = st
                if st != "alive" and self.t_not_alive is None:
                    self.t_not_alive = t
                if st in ("dead", "left", "absent") and self.t_dead is None:
                    self.t_dead = t
                if self.t_replaced_view is None and any(r["node"] != self.victim for r in ready_replicas(v)):
                    self.t_replaced_view = t
                    self.new_leader = v.get("leader")
                if self.t_dead is not None and self.t_replaced_view is not None:
                    return
            self.stop.wait(max(0.0, POLL_S - (time.monotonic() - tick)))

    def watch_serving(self) -> None:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 2}).encode()
        conn = http.client.HTTPConnection(self.node.host, self.node.port, timeout=5)
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                tick = time.monotonic()
                try:
                    conn.request("POST", "/v1/chat/completions", body=body,
                                 headers={"Content-Type": "application/json"})
                    r = conn.getresponse()
                    r.read()
                    key = str(r.status)
                    rep = r.getheader("X-AIvailable-Replica", "")
                    if r.status == 200 and rep and not rep.startswith(self.victim + "/"):
                        self.t_served, self.served_by = self._elapsed(), rep
                        self.answers[key] = self.answers.get(key, 0) + 1
                        return
                except (OSError, http.client.HTTPException) as exc:
                    key = type(exc).__name__
                    conn.close()
                    conn = http.client.HTTPConnection(self.node.host, self.node.port, timeout=5)
                self.answers[key] = self.answers.get(key, 0) + 1
                self.stop.wait(max(0.0, POLL_S - (time.monotonic() - tick)))
        finally:
            conn.close()


def check_serving(node: NodeProc, holder: str) -> None:
    conn = http.client.HTTPConnection(node.host, node.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"model": MODEL,
                                      "messages": [{"role": "user", "content": "hi"}]}).encode())
        r = conn.getresponse()
        r.read()
        rep = r.getheader("X-AIvailable-Replica", "")
        if r.status != 200 or not rep.startswith(holder + "/"):
            raise RuntimeError(f"{node.url} answered {r.status} via {rep!r} before the kill")
    finally:
        conn.close()


def one_run(idx: int, model_path: Path, env: dict[str, str], tmp_root: Path, run_timeout: float,
            startup_timeout: float, steer: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"run{idx}-", dir=tmp_root))
    # Placement is best fit: on odd runs n2's smaller card attracts the model, so the victim is (usually) not
    # the coordinator (n1 founds the cluster and usually leads); on even runs all cards are equal (n1 holds).
    vram = {1: 2000, 2: 1800 if steer and idx % 2 else 2000, 3: 2000}
    c = ThreeNodes(tmp, model_path, env, vram)
    t_start = time.monotonic()
    try:
        views = c.start(startup_timeout)
        startup = time.monotonic() - t_start
        v = views["n1"]
        rep = ready_replicas(v)[0]
        victim, leader = rep["node"], v["leader"]
        victim_workers = [r["pid"] for vv in views.values() for r in ready_replicas(vv)
                          if r["node"] == victim and r.get("pid")]
        survivors = [n for k, n in c.nodes.items() if k != victim]
        for s in survivors:
            check_serving(s, victim)
        stop = threading.Event()
        t0_ref = [0.0]
        deadline = time.monotonic() + run_timeout + 1
        pollers = [Poller(s, victim, t0_ref, stop, deadline) for s in survivors]
        threads = [threading.Thread(target=fn, daemon=True)
                   for p in pollers for fn in (p.watch_view, p.watch_serving)]
        t0_ref[0] = time.monotonic()
        c.kill_machine(victim, sorted(set(victim_workers)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.1, deadline + 5 - time.monotonic()))
        stop.set()

        def first(attr: str) -> float | None:
            xs = [getattr(p, attr) for p in pollers if getattr(p, attr) is not None]
            return min(xs) if xs else None

        def every(attr: str) -> float | None:
            xs = [getattr(p, attr) for p in pollers]
            return max(xs) if all(x is not None for x in xs) else None

        res = {"run": idx, "startup_s": round(startup, 2), "vram_mib": vram, "victim": victim,
               "leader_before": leader, "victim_was_leader": victim == leader,
               "detect_s": first("t_not_alive"), "dead_s": first("t_dead"), "dead_all_s": every("t_dead"),
               "replaced_view_s": first("t_replaced_view"), "serving_s": first("t_served"),
               "serving_all_s": every("t_served"),
               "served_by": sorted({p.served_by for p in pollers if p.served_by}),
               "new_leader": next((p.new_leader for p in pollers if p.new_leader), None),
               "per_survivor": {p.node.host: {"states": p.states, "answers": p.answers,
                                              "view_errors": p.view_errors,
                                              "not_alive_s": p.t_not_alive, "dead_s": p.t_dead,
                                              "served_s": p.t_served} for p in pollers}}
        for k in ("detect_s", "dead_s", "dead_all_s", "replaced_view_s", "serving_s", "serving_all_s"):
            if res[k] is not None:
                res[k] = round(res[k], 3)
        return res
    except BaseException:
        for k, n in c.nodes.items():
            with contextlib.suppress(Exception):
                print(f"--- {k} log tail ---\n{n.log()[-1500:]}", file=sys.stderr)
        raise
    finally:
        c.stop()


METRICS = [("detect_s", "(i) detection: first survivor sees victim not alive"),
           ("dead_s", "first survivor sees victim dead"),
           ("dead_all_s", "every survivor sees victim dead"),
           ("replaced_view_s", "a view shows the model ready on a survivor"),
           ("serving_s", "(ii) serving again: first survivor answers"),
           ("serving_all_s", "every survivor answers")]


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def run_one_logged(i: int, args, env: dict[str, str], tmp_root: Path, runs: list[dict],
                   failures: list[str]) -> None:
    """One run; its row is printed, a run that could not start is recorded and the rest go on."""
    try:
        r = one_run(i, args.model_path, env, tmp_root, args.run_timeout, args.startup_timeout,
                    not args.no_steer)
    except Exception as exc:
        failures.append(f"run {i}: {type(exc).__name__}: {str(exc)[:300]}")
        print(f"| {i} | failed: {type(exc).__name__}: {str(exc)[:120]} |", flush=True)
        return
    runs.append(r)
    print(f"| {i} | {r['victim']} | {'yes' if r['victim_was_leader'] else 'no'} | {fmt(r['detect_s'])} | "
          f"{fmt(r['dead_s'])} | {fmt(r['dead_all_s'])} | {fmt(r['replaced_view_s'])} | "
          f"{fmt(r['serving_s'])} | {fmt(r['serving_all_s'])} | {', '.join(r['served_by'])} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--profile", choices=("lan", "local"), default="lan",
                    help="gossip/election timings (default lan, as with AIVAILABLE_PROFILE unset)")
    ap.add_argument("--run-timeout", type=float, default=60.0, help="seconds allowed after the kill, per run")
    ap.add_argument("--startup-timeout", type=float, default=90.0)
    ap.add_argument("--no-steer", action="store_true", help="equal cards every run (the founder n1, usually "
                    "the coordinator, then holds the model every time); default: odd runs steer it to n2")
    ap.add_argument("--model-path", type=Path, default=None, help="any GGUF (the stub never loads it; the "
                    "node reads its metadata for the VRAM estimate); default: the demo Gemma 3 270M")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the nodes' state directories and logs")
    harness.add_output_args(ap, "failover")
    args = ap.parse_args(argv)

    tmp_root = Path(tempfile.mkdtemp(prefix="aiv-failover-bench-"))
    if args.model_path is None:
        args.model_path = harness.demo_model()
    env = {"AIVAILABLE_WORKER_MODULE": "bench.stub_worker", "AIVAILABLE_LOG_LEVEL": "INFO"}
    if args.profile == "lan":
        env["AIVAILABLE_PROFILE"] = "lan"  # the node's default; start_node would otherwise set "local"
    else:
        env["AIVAILABLE_PROFILE"] = "local"
    t_all = time.monotonic()
    runs: list[dict] = []
    failures: list[str] = []
    print("| run | victim | was leader | detect s | dead s | dead (all) s | replaced (view) s | serving s | "
          "serving (all) s | served by |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    try:
        for i in range(args.runs):
            run_one_logged(i, args, env, tmp_root, runs, failures)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp_root, ignore_errors=True)

    stats = {}
    for key, _label in METRICS:
        xs = [r[key] for r in runs]
        ok = [x for x in xs if x is not None]
        stats[key] = {"n": len(ok), "missing": len(xs) - len(ok), "p50": pct(ok, 50), "p99": pct(ok, 99),
                      "max": max(ok) if ok else None, "min": min(ok) if ok else None}
    for sub, pick in (("victim_leader", True), ("victim_not_leader", False)):
        sel = [r for r in runs if r["victim_was_leader"] is pick]
        stats[sub] = {"runs": len(sel)}
        for k in ("detect_s", "dead_s", "serving_s", "serving_all_s"):
            xs = [r[k] for r in sel if r[k] is not None]
            stats[sub][k] = {"p50": pct(xs, 50), "max": max(xs, default=None)}
    p99 = stats["detect_s"]["p99"]
    target_met = p99 is not None and p99 <= DETECT_TARGET_P99_S and stats["detect_s"]["missing"] == 0
    print(f"\nFailover over {len(runs)} runs (profile {args.profile}, stub worker, "
          f"poll {POLL_S * 1000:.0f} ms):\n")
    print("| metric | p50 s | p99 s | max s | missing |\n|---|---|---|---|---|")
    for key, label in METRICS:
        s = stats[key]
        print(f"| {label} | {fmt(s['p50'])} | {fmt(s['p99'])} | {fmt(s['max'])} | {s['missing']} |")
    print("\n| victim | runs | detect p50 / max s | dead p50 / max s | serving p50 / max s |\n"
          "|---|---|---|---|---|")
    groups = (("victim_leader", "holder was the coordinator"), ("victim_not_leader", "holder was not"))
    for sub, label in groups:
        g = stats[sub]
        cells = [f"{fmt(g[k]['p50'])} / {fmt(g[k]['max'])}" for k in ("detect_s", "dead_s", "serving_s")]
        print(f"| {label} | {g['runs']} | " + " | ".join(cells) + " |")
    print(f"\ndetection p99 {fmt(p99)} s (target <= {DETECT_TARGET_P99_S} s, {args.profile} profile): "
          f"{'met' if target_met else 'MISSED'}")
    out = {"benchmark": "failover", "profile": args.profile, "worker": "bench.stub_worker", "poll_s": POLL_S,
           "target_detect_p99_s": DETECT_TARGET_P99_S, "target_met": target_met,
           "method": "fresh 3-node cluster per run; SIGKILL of the holder's process group and worker; "
                     "times from the kill, polled every 50 ms on every survivor",
           "machine": harness.machine(loadavg_end=list(os.getloadavg())),
           "settings": {"runs": args.runs, "steer": not args.no_steer, "run_timeout_s": args.run_timeout,
                        "model_path": str(args.model_path)},
           "wall_s": round(time.monotonic() - t_all, 1), "stats": stats, "failures": failures, "runs": runs}
    print(f"wrote {harness.write_results('failover', out, args=args)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
