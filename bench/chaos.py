"""Chaos: a 5-node loopback cluster serving the real small model while nodes and workers fail.

Five ``aivailable up`` processes on 127.0.0.1-5 (one simulated GPU each, the test profile's timers),
two models backed by the Gemma 3 270M GGUF (``max_replicas = 2``), closed-loop clients of the official
``openai`` client through random nodes (half streaming, short ``max_tokens``; see bench/chaos_client.py
for the retry policy and how every failure is classified). Every 10-30 s (seeded) one fault:

- ``kill9``: SIGKILL a node and its workers (a machine that dies);
- ``stop``: SIGSTOP a node and its workers for 5-20 s, then SIGCONT (a machine that hangs);
- ``restart``: start a dead node again with its state directory;
- ``kill_worker``: SIGKILL one worker process of a live node;
- ``kill_leader``: SIGKILL the coordinator.

Faults never leave fewer than a majority of nodes responsive (a dead node is restarted instead). The
harness polls every node's ``/api/cluster`` twice a second: terms must never go backwards on a node,
across restarts too. After each fault it measures the time to the first successful request for a model
the victim served (``first_ok_s``) and until the cluster view shows every model ready on live nodes again
with the victim in its expected state (``restored_s``). At the end every node stops with SIGTERM, and
its state directory must still hold its node id and a persisted term >= every term it reported.

    python bench/chaos.py                 # 10 minutes (under flock /tmp/aiv-bench.lock on shared boxes)
    python bench/chaos.py --ci            # 60 s
    python bench/chaos.py --duration 40 --nodes 3 --gap 8,15 --out /tmp/chaos.json

``--schedule harsh`` (root only) runs each node in its own network namespace (bench/netsplit.py: routed
veths; a partition is a set of ``ip rule ... blackhole`` rules between the two sides, so clients still
reach both halves, as through a load balancer) and adds two faults that may leave a minority (faults are
no longer limited to a responsive majority):

- ``kill_majority``: SIGKILL a majority at once (3 of 5), chosen to include every holder of one model
  (a power strip, a room's breaker); the dead are restarted one per later fault;
- ``partition``: cut node-to-node traffic between a random minority and the rest for 10-30 s, then heal.

With ``--balancer`` each request enters through a node that passed its last ``/health`` check (polled
every 0.5 s, as a load balancer would); with ``--official-retries`` each request is one call of the plain
official client on one node with its default 2 retries (no redispatch to another node). The report adds
``no_replica_s``: per model, the longest window in which no live node had a ready replica of it.

    python bench/chaos.py --schedule harsh --balancer --label harsh   # bench/results/chaos.harsh.json

Prints a table and writes bench/results/chaos.json. Targets: >= 99.9 % of requests succeed, 0 failures
of class ``other``, no client hung past its timeout, no lost state directory, no term going backwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.chaos_client import CLASSES, Clients  # noqa: E402
from bench.harness import NodeProc, free_port, get_json, start_node  # noqa: E402
from bench.netsplit import RoutedNet  # noqa: E402

SECRET = "bench-chaos-secret-0123456789abcdef"
MODELS = ("alpha", "beta")
BRING_UP_S = 120  # a healthy start takes ~10 s even on 2 cores; under pytest-timeout (300 s) so the cause is printed
POLL_S = 0.5
KINDS = ("kill9", "stop", "restart", "kill_worker", "kill_leader")
HARSH_KINDS = ("kill9", "stop", "restart", "kill_leader", "kill_majority", "partition")
HEALTH_POLL_S = 0.5
TARGET_SUCCESS = 0.999


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (the node's workers), from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{d}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


@dataclass
class Fault:
    kind: str
    node: str
    t: float
    detail: str = ""
    affected: list[str] = field(default_factory=list)
    first_ok_s: float | None = None
    restored_s: float | None = None


class Harness:
    def __init__(self, args: argparse.Namespace, model_path: Path, tmp: Path, net: RoutedNet | None = None):
        self.args, self.tmp, self.net = args, tmp, net
        self.rng = random.Random(args.seed)
        self.ids = [f"n{i}" for i in range(1, args.nodes + 1)]
        if net is None:
            self.hosts = {n: f"127.0.0.{i}" for i, n in enumerate(self.ids, 1)}
            self.ports = {n: free_port(self.hosts[n]) for n in self.ids}
        else:  # one namespace per node: every node has its own address and port space
            self.hosts = {n: net.address(i) for i, n in enumerate(self.ids, 1)}
            self.ports = dict.fromkeys(self.ids, 8000)
        self.partitioned: tuple[list[str], list[str]] | None = None
        self.healthy: set[str] = set()
        self.cfg = tmp / "models.toml"
        self.cfg.write_text("".join(f'[[models]]\nname = "{m}"\npath = "{model_path}"\nctx = 512\n'
                                    f"parallel = 2\nmax_replicas = 2\n\n" for m in MODELS))
        self.procs: dict[str, NodeProc] = {}
        self.dead: set[str] = set()
        self.stopped: set[str] = set()
        self.faults: list[Fault] = []
        self.views: list[tuple[float, str, dict]] = []  # (t, observer, /api/cluster) of responsive nodes
        self.terms: dict[str, int] = {}
        self.term_violations: list[str] = []
        self.node_ids: dict[str, str] = {}
        self._poll_stop = threading.Event()
        self._lock = threading.Lock()
        self.t0 = time.monotonic()

    # -- nodes -----------------------------------------------------------------------------------
    def start(self, node: str) -> NodeProc:
        i = self.ids.index(node) + 1
        args = ["--config", str(self.cfg), "--simulate-gpu", f"card{i}:2000", "--cluster-secret", SECRET,
                "--node-id", node]
        peers = [p for p in self.ids if p != node and p not in self.dead and (p in self.procs or p == "n1")]
        for p in peers[:2]:
            args += ["--join", f"{self.hosts[p]}:{self.ports[p]}"]
        prefix = self.net.prefix(i) if self.net is not None else ()
        n = start_node(self.tmp, *args, host=self.hosts[node], port=self.ports[node], name=node, prefix=prefix)
        self.procs[node] = n
        self.dead.discard(node)
        return n

    def responsive(self) -> list[str]:
        return [n for n in self.ids if n not in self.dead and n not in self.stopped]

    def bring_up(self) -> None:
        for n in self.ids:
            self.start(n)
        for n in self.procs.values():
            n.wait_healthy(120)
        deadline = time.monotonic() + BRING_UP_S
        v: dict = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                v = get_json(self.procs["n1"].url + "/api/cluster", 3)
                if self._healthy(v, set(self.ids)):
                    return
            time.sleep(1)
        summary = {"leader": v.get("leader"), "nodes": {n["id"]: n["state"] for n in v.get("nodes", [])},
                   "models": {m["name"]: (m["state"], m.get("reason")) for m in v.get("models", [])}}
        tails = "\n".join(f"--- {k}\n{p.log()[-1500:]}" for k, p in self.procs.items())
        raise TimeoutError(
            f"cluster did not come up with every model ready within {BRING_UP_S} s: {summary}\n{tails}"
        )

    @staticmethod
    def _healthy(view: dict, alive: set[str]) -> bool:
        """Every model ready on nodes in ``alive``, which is exactly the set the view shows alive."""
        shown = {n["id"] for n in view["nodes"] if n["state"] == "alive"}
        if shown != alive or view.get("leader") is None:
            return False
        for m in view["models"]:
            ready = {r["node"] for r in m["replicas"] if r["state"] == "ready"}
            if m["name"] in MODELS and not (ready and ready <= alive):
                return False
        return {m["name"] for m in view["models"]} >= set(MODELS)

    # -- observation ----------------------------------------------------------------------------
    def poll(self) -> None:
        while not self._poll_stop.is_set():
            for node in self.responsive():
                n = self.procs.get(node)
                if n is None:
                    continue
                try:
                    v = get_json(n.url + "/api/cluster", 1.0)
                except (OSError, ValueError):
                    continue
                t = time.monotonic() - self.t0
                v = {"node_id": v["node_id"], "term": v["term"], "leader": v.get("leader"),
                     "nodes": [{"id": x["id"], "state": x["state"]} for x in v["nodes"]],
                     "models": [{"name": m["name"], "replicas": [{"node": r["node"], "state": r["state"]}
                                                                 for r in m["replicas"]]} for m in v["models"]]}
                with self._lock:
                    self.views.append((t, node, v))
                    self.node_ids.setdefault(node, v["node_id"])
                    if v["node_id"] != self.node_ids[node]:
                        self.term_violations.append(f"{node} came back as {v['node_id']}")
                    before = self.terms.get(node, 0)
                    if v["term"] < before:
                        self.term_violations.append(f"t={t:.1f} {node} reported term {v['term']} < {before}")
                    self.terms[node] = max(before, v["term"])
            self._poll_stop.wait(POLL_S)

    def poll_health(self) -> None:
        """What a load balancer sees: the nodes whose /health answered ok within a second, every 0.5 s."""
        while not self._poll_stop.is_set():
            ok = set()
            for node in self.ids:
                n = self.procs.get(node)
                if n is None or node in self.dead:
                    continue
                with contextlib.suppress(OSError, ValueError, KeyError):
                    if get_json(n.url + "/health", 1.0)["status"] == "ok":
                        ok.add(node)
            self.healthy = ok
            self._poll_stop.wait(HEALTH_POLL_S)

    def latest_view(self) -> dict | None:
        with self._lock:
            for _, node, v in reversed(self.views):
                if node in self.responsive():
                    return v
        return None

    # -- faults ---------------------------------------------------------------------------------
    def choose(self) -> str:
        majority = len(self.ids) // 2 + 1
        if self.args.schedule == "harsh":
            if len(self.dead) >= majority or (self.dead and len(self.responsive()) <= 1):
                return "restart"
            kinds = [k for k in HARSH_KINDS
                     if (k != "restart" or self.dead)
                     and (k != "kill_majority" or not self.dead)
                     and (k != "partition" or self.partitioned is None)
                     and (k in ("restart", "partition", "kill_majority") or len(self.responsive()) > 2)]
            return self.rng.choice(kinds)
        can_lose = len(self.responsive()) > majority
        kinds = [k for k in KINDS if (k != "restart" or self.dead) and (k in ("restart", "kill_worker") or can_lose)]
        if self.dead and not can_lose:
            return "restart"
        return self.rng.choice(kinds)

    def inject(self) -> Fault:
        kind = self.choose()
        now = time.monotonic() - self.t0
        view = self.latest_view() or {}
        held = {n: sorted({m["name"] for m in view.get("models", []) for r in m["replicas"] if r["node"] == n})
                for n in self.ids}
        if kind == "restart":
            node = self.rng.choice(sorted(self.dead))
            self.start(node)
            return Fault(kind, node, now, affected=[])
        if kind == "kill_majority":
            return self.kill_majority(view, held, now)
        if kind == "partition":
            return self.partition(now)
        live = self.responsive()
        if kind == "kill_leader":
            node = view.get("leader") if view.get("leader") in live else self.rng.choice(live)
        elif kind == "kill_worker":
            with_workers = [n for n in live if children(self.procs[n].proc.pid)]
            if not with_workers:
                kind, node = "kill9", self.rng.choice(live)
            else:
                node = self.rng.choice(with_workers)
        else:
            node = self.rng.choice(live)
        proc = self.procs[node].proc
        if kind == "kill_worker":
            workers = children(proc.pid)
            w = self.rng.choice(workers)
            cmd = Path(f"/proc/{w}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            model = next((m for m in MODELS if f'"model": "{m}"' in cmd or f'"model":"{m}"' in cmd), "")
            signal_all([w], signal.SIGKILL)
            return Fault(kind, node, now, detail=f"worker pid {w} {model}".strip(),
                         affected=[model] if model else held[node])
        if kind in ("kill9", "kill_leader"):
            workers = children(proc.pid)
            signal_all([proc.pid], signal.SIGKILL)
            signal_all(workers, signal.SIGKILL)
            proc.wait(10)
            self.dead.add(node)
            return Fault(kind, node, now, detail=f"leader={view.get('leader')}", affected=held[node])
        pids = [proc.pid, *children(proc.pid)]
        length = self.rng.uniform(5.0, 20.0)
        signal_all(pids, signal.SIGSTOP)
        self.stopped.add(node)

        def cont() -> None:
            signal_all(pids, signal.SIGCONT)
            self.stopped.discard(node)

        threading.Timer(length, cont).start()
        return Fault(kind, node, now, detail=f"{length:.1f} s", affected=held[node])

    def kill_majority(self, view: dict, held: dict[str, list[str]], now: float) -> Fault:
        """SIGKILL a majority at once, including every holder of one model if they fit in it."""
        size = len(self.ids) // 2 + 1
        holders = {m["name"]: sorted({r["node"] for r in m["replicas"]} & set(self.ids))
                   for m in view.get("models", [])}
        fitting = [hs for hs in holders.values() if 0 < len(hs) <= size]
        victims = list(self.rng.choice(fitting)) if fitting else []
        rest = [n for n in self.ids if n not in victims]
        self.rng.shuffle(rest)
        victims = sorted(victims + rest[:size - len(victims)])
        pids = []
        for n in victims:
            proc = self.procs[n].proc
            pids += [proc.pid, *children(proc.pid)]
        signal_all(pids, signal.SIGKILL)  # all at once: one power strip
        for n in victims:
            self.procs[n].proc.wait(10)
            self.dead.add(n)
            self.stopped.discard(n)
        affected = sorted({m for n in victims for m in held[n]})
        return Fault("kill_majority", ",".join(victims), now, detail=f"leader={view.get('leader')}",
                     affected=affected)

    def partition(self, now: float) -> Fault:
        """Cut node-to-node traffic between a random minority and the rest for 10-30 s."""
        assert self.net is not None
        ids = list(self.ids)
        self.rng.shuffle(ids)
        small, big = sorted(ids[:len(ids) // 2]), sorted(ids[len(ids) // 2:])
        length = self.rng.uniform(10.0, 30.0)
        index = {n: i for i, n in enumerate(self.ids, 1)}
        self.net.split([index[n] for n in small], [index[n] for n in big])
        self.partitioned = (small, big)

        def heal() -> None:
            self.net.heal()
            self.partitioned = None

        threading.Timer(length, heal).start()
        return Fault("partition", ",".join(small) + "|" + ",".join(big), now, detail=f"{length:.1f} s")

    def expected_alive(self) -> set[str]:
        return set(self.ids) - self.dead

    # -- run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        args = self.args
        t_up = time.monotonic()
        self.bring_up()
        setup_s = time.monotonic() - t_up
        self.t0 = time.monotonic()
        poller = threading.Thread(target=self.poll, daemon=True)
        poller.start()
        health = threading.Thread(target=self.poll_health, daemon=True)
        health.start()
        clients = Clients({n: p.url for n, p in self.procs.items()}, list(MODELS), args.clients, args.seed,
                          args.timeout, args.max_tokens, failover=args.failover,
                          healthy=(lambda: self.healthy) if args.balancer else None,
                          official_retries=args.official_retries)
        clients.start()
        gap = args.gap
        next_fault = self.rng.uniform(*gap)
        end = args.duration
        while (t := time.monotonic() - self.t0) < end:
            if t >= next_fault:
                f = self.inject()
                self.faults.append(f)
                print(f"  t={f.t:6.1f}s {f.kind:11s} {f.node} {f.detail}", flush=True)
                next_fault = t + self.rng.uniform(*gap)
            time.sleep(0.1)
        hung = clients.stop(join_s=args.timeout * 3 + 10)
        time.sleep(0.5)
        self._poll_stop.set()
        poller.join(5)
        health.join(5)
        if self.net is not None:
            self.net.heal()
            self.partitioned = None
        for n in list(self.stopped):
            signal_all([self.procs[n].proc.pid, *children(self.procs[n].proc.pid)], signal.SIGCONT)
        self.recovery(clients)
        exits, state = self.shutdown()
        return self.report(clients, hung, exits, state, setup_s)

    def recovery(self, clients: Clients) -> None:
        """first_ok_s and restored_s of each fault, from the requests and the polled views."""
        oks = sorted((a.t1 - self.t0, a.model) for r in clients.requests for a in r.attempts
                     if a.outcome == "ok")
        for f in self.faults:
            want = set(f.affected) or set(MODELS)
            f.first_ok_s = next((round(t - f.t, 2) for t, m in oks if t >= f.t and m in want), None)
            resume = f.t + (float(f.detail.split()[0]) if f.kind in ("stop", "partition") else 0.0)
            for t, _node, v in self.views:  # whole again: with the nodes dead at that time (faults overlap)
                if t >= resume and self._healthy(v, set(self.ids) - self.dead_at(t)):
                    f.restored_s = round(t - f.t, 2)
                    break

    def dead_at(self, t: float) -> set[str]:
        """Nodes killed and not restarted at run time ``t``."""
        dead: set[str] = set()
        for f in self.faults:
            if f.t > t:
                break
            if f.kind in ("kill9", "kill_leader", "kill_majority"):
                dead.update(f.node.split(","))
            elif f.kind == "restart":
                dead.discard(f.node)
        return dead

    def no_replica_windows(self) -> dict[str, float]:
        """Per model, the longest stretch of run time with no polled view showing a ready replica of it on a
        node that was alive then (views come every 0.5 s from each responsive node)."""
        end = self.args.duration
        out: dict[str, float] = {}
        for m in MODELS:
            seen = sorted(t for t, _obs, v in self.views for mv in v["models"] if mv["name"] == m
                          for r in mv["replicas"] if r["state"] == "ready" and r["node"] not in self.dead_at(t))
            marks = [0.0, *seen, end]
            out[m] = round(max(b - a for a, b in zip(marks, marks[1:], strict=False)), 1)
        return out

    def shutdown(self) -> tuple[dict[str, int | None], dict[str, dict]]:
        exits: dict[str, int | None] = {}
        for n in self.ids:
            p = self.procs.get(n)
            if p is not None and n not in self.dead:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGTERM)
        for n in self.ids:
            p = self.procs.get(n)
            if p is None or n in self.dead:
                exits[n] = None
                continue
            try:
                exits[n] = p.proc.wait(120)
            except Exception:  # noqa: BLE001
                p.kill_group()
                exits[n] = None
        return exits, {n: self.check_state(n) for n in self.ids}

    def check_state(self, node: str) -> dict:
        """The node's state directory after the run: node id and persisted term intact."""
        from aivailable.gossip.state_store import StateStore

        state = self.tmp / f"{node}-state"
        out: dict[str, Any] = {"dir": state.is_dir(), "node_id": None, "persisted_term": None,
                               "max_reported_term": self.terms.get(node, 0)}
        with contextlib.suppress(OSError):
            out["node_id"] = (state / "node_id").read_text().strip() or None
        if (state / "cluster").is_dir():
            store = StateStore(state / "cluster")
            hs = store.hard_state
            out["persisted_term"] = hs.term if hs is not None else None
            store.close()
        out["ok"] = bool(out["dir"] and out["persisted_term"] is not None
                         and out["persisted_term"] >= out["max_reported_term"]
                         and out["node_id"] in (None, node))
        return out

    def attribute_drops(self, attempts: list) -> int:
        """Reclassify a dropped connection to a node that was killed during the attempt (see chaos_client)."""
        kills = [(f.t + self.t0, node) for f in self.faults if f.kind in ("kill9", "kill_leader", "kill_majority")
                 for node in f.node.split(",")]
        n = 0
        for a in attempts:
            # A connection made just after the signal can still be accepted by the kernel, then reset as
            # the process dies: count kills up to 0.5 s before the attempt too.
            if a.outcome != "other" or not any(a.t0 - 0.5 <= t <= a.t1 + 0.5 and node == a.node
                                               for t, node in kills):
                continue
            a.outcome = "broken_mid_stream" if a.started else "refused_before_start"
            a.detail = f"entry node {a.node} killed: {a.detail}"
            n += 1
        return n

    def report(self, clients: Clients, hung: list[str], exits: dict, state: dict, setup_s: float) -> dict:
        reqs = clients.requests
        attempts = [a for r in reqs for a in r.attempts]
        dropped = self.attribute_drops(attempts)
        for r in reqs:
            r.ok = r.attempts[-1].outcome == "ok"
        ok = sum(r.ok for r in reqs)
        failed = Counter(r.attempts[-1].outcome for r in reqs if not r.ok)
        att_failed = Counter(a.outcome for a in attempts if a.outcome != "ok")
        examples: dict[str, list[str]] = {}
        for a in attempts:
            if a.outcome != "ok" and len(examples.setdefault(a.outcome, [])) < 5:
                examples[a.outcome].append(f"t={a.t0 - self.t0:.1f} {a.node} {a.model} "
                                           f"{'stream' if a.stream else 'plain'}: {a.detail}")
        lat = sorted(r.t1 - r.t0 for r in reqs if r.ok)
        rate = ok / len(reqs) if reqs else 0.0
        # Requests whose entry node was killed under them: no node can answer those cleanly.
        mine = [r for r in reqs if not any(a.detail.startswith("entry node") for a in r.attempts)]
        rate_cluster = sum(r.ok for r in mine) / len(mine) if mine else 0.0
        out = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()
                         if k not in ("out", "label")},
            "machine": harness.machine(),
            "setup_s": round(setup_s, 1),
            "requests": len(reqs), "successes": ok, "success_rate": round(rate, 5),
            "success_rate_without_entry_node_kills": round(rate_cluster, 5),
            "by_mode": {mode: {"requests": len(rs), "successes": sum(r.ok for r in rs)}
                        for mode, rs in (("plain", [r for r in reqs if not r.stream]),
                                         ("stream", [r for r in reqs if r.stream]))},
            "failed_requests": {c: failed.get(c, 0) for c in CLASSES},
            "failover_client": clients.failover_stats or None,
            "attempts": len(attempts),
            "dropped_by_killed_entry_node": dropped,
            "failed_attempts": {c: att_failed.get(c, 0) for c in CLASSES},
            "examples": examples,
            "failed_request_examples": [
                [f"t={a.t0 - self.t0:.1f}-{a.t1 - self.t0:.1f} via {a.node} {a.outcome}: {a.detail}" for a in r.attempts]
                for r in reqs if not r.ok][:12],
            "latency_s": {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "max": lat[-1] if lat else None},
            "no_replica_s": self.no_replica_windows(),
            "faults": [asdict(f) for f in self.faults],
            "hung_clients": hung,
            "term_violations": self.term_violations,
            "exit_codes": exits,
            "state": state,
        }
        out["targets"] = {
            "success_rate": rate >= TARGET_SUCCESS,
            "no_unclassified": failed.get("other", 0) == 0 and att_failed.get("other", 0) == 0,
            "no_hang": not hung,
            "state_kept": all(s["ok"] for s in state.values()) and not self.term_violations,
            "clean_exits": all(c in (0, None) for c in exits.values()),
        }
        return out


def _pct(xs: list[float], q: float) -> float | None:
    v = harness.pct(xs, q, method="floor")
    return None if v is None else round(v, 2)


def table(r: dict) -> str:
    lines = [
        f"requests {r['requests']}  successes {r['successes']}  success rate {100 * r['success_rate']:.2f} %  "
        f"(target {100 * TARGET_SUCCESS:.1f} %); without requests whose entry node was killed under them "
        f"{100 * r['success_rate_without_entry_node_kills']:.2f} %",
        "failed requests: " + ", ".join(f"{k} {v}" for k, v in r["failed_requests"].items()),
        *([f"failover client: {r['failover_client']}"] if r.get("failover_client") else []),
        f"attempts {r['attempts']}; failed attempts (retried on another node where the client may): "
        + ", ".join(f"{k} {v}" for k, v in r["failed_attempts"].items()),
        f"latency p50 {r['latency_s']['p50']} s  p99 {r['latency_s']['p99']} s  max {r['latency_s']['max']} s",
        "longest time with no ready replica: " + ", ".join(f"{m} {s} s" for m, s in r["no_replica_s"].items()),
        "",
        f"{'t (s)':>7}  {'fault':11s} {'node':4s}  {'first ok (s)':>12}  {'restored (s)':>12}  detail",
    ]
    for f in r["faults"]:
        lines.append(f"{f['t']:7.1f}  {f['kind']:11s} {f['node']:4s}  {_s(f['first_ok_s']):>12}  "
                     f"{_s(f['restored_s']):>12}  {f['detail']}")
    lines += ["", f"hung clients: {r['hung_clients'] or 'none'}; term violations: {r['term_violations'] or 'none'}; "
              f"exit codes: {r['exit_codes']}",
              "state dirs: " + ", ".join(f"{n} {'ok' if s['ok'] else 'LOST'} (term {s['persisted_term']})"
                                         for n, s in r["state"].items()),
              "targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in r["targets"].items())]
    return "\n".join(lines)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load and faults (default 600)")
    p.add_argument("--ci", action="store_true", help="a 60-second run")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--gap", default="10,30", help="seconds between faults: MIN,MAX (default 10,30)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0, help="client read timeout, seconds")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=8)
    p.add_argument("--model-path", dest="model_path", type=Path, help="GGUF (default: the bundled demo model)")
    harness.add_output_args(p, "chaos")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (node logs)")
    p.add_argument("--failover-client", dest="failover", action="store_true",
                   help="clients are the official openai client made by aivailable.client over every node "
                        "(fails over and continues streams cut by their node's death); default: the plain "
                        "official client, one node per request")
    p.add_argument("--schedule", choices=("standard", "harsh"), default="standard",
                   help="harsh: majority kills and partitions, nodes in network namespaces (root only)")
    p.add_argument("--balancer", action="store_true",
                   help="each request enters through a node that passed its last /health check")
    p.add_argument("--official-retries", dest="official_retries", action="store_true",
                   help="each request is one call of the plain official client (default 2 retries) on one node")
    args = p.parse_args(argv)
    if args.ci:
        args.duration = 60.0
    try:
        lo, hi = (float(x) for x in args.gap.split(","))
        if not 0 < lo <= hi:
            raise ValueError
    except ValueError:
        p.error("--gap: give MIN,MAX seconds with 0 < MIN <= MAX, e.g. 10,30")
    args.gap = (lo, hi)
    if args.nodes < 1:
        p.error("--nodes: at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="aiv-chaos-"))
    model = args.model_path
    if model is None:
        model = harness.demo_model()
    net = RoutedNet(args.nodes).__enter__() if args.schedule == "harsh" else None
    h = Harness(args, model, tmp, net)
    try:
        print(f"chaos: {args.nodes} nodes, {args.clients} clients, {args.duration:.0f} s, faults every "
              f"{lo:g}-{hi:g} s, seed {args.seed}; logs in {tmp}", flush=True)
        r = h.run()
    finally:
        for n in h.procs.values():
            with contextlib.suppress(Exception):
                signal_all(children(n.proc.pid), signal.SIGKILL)
                n.kill_group()
        if net is not None:
            net.__exit__(None, None, None)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(r))
    print(f"wrote {harness.write_results('chaos', r, out=args.out, label=args.label)}")
    return 0 if all(r["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
