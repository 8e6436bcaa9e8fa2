"""Deterministic in-process cluster simulator: every node's production NodeCore on a virtual clock.

Each :class:`~aivailable.gossip.simnode.SimNode` drives :class:`~aivailable.gossip.node_core.NodeCore`
exactly as the transport does (persist the Ready, send, report each send's outcome back), so founding,
seed waits, placement delivery and mDNS candidates run here as in production. One seed fixes everything: the network's drops,
delays and duplicates, the fault schedule (crashes with restarts that keep only persisted state,
partitions, isolations, heals), the start-up scenario (``SimConfig.bootstrap``) and every core's random
source. Iteration order never depends on ``PYTHONHASHSEED``. A tiny stand-in coordinator publishes a
placement through a pluggable ``place_fn`` (the real solver lives in ``aivailable.placement``).

Checks over a run (see :mod:`aivailable.gossip.simcheck`): one leader per term, leaders only in a
majority component, one vote per term across restarts, no placement applied from a stale term, one
founder for a rooted start-up, true acks, membership convergence after the final heal, facts
convergence, one agreed leader whose voters are every up node, and its latest placement everywhere.

    python -m aivailable.gossip.sim --seeds 1000 --nodes 5      # campaign: figures + failing seeds
    python -m aivailable.gossip.sim --seed 42 --nodes 5 -v      # replay one seed with a trace
    python -m aivailable.gossip.sim --seed 7 --nodes 5 --bootstrap split -v   # a start-up scenario
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from aivailable.gossip import envelope
from aivailable.gossip.election import ElectionConfig
from aivailable.gossip.membership_types import MembershipConfig
from aivailable.gossip.node_core import NodeCoreConfig
from aivailable.gossip.simcheck import Checker, percentile
from aivailable.gossip.simnet import Network, Tracked, trivial_place
from aivailable.gossip.simnode import SimNode
from aivailable.gossip.simserve import ServingCheck

__all__ = ["Network", "Sim", "SimConfig", "campaign", "detection_trial", "run_seed", "trivial_place"]

PlaceFn = Callable[[Mapping[str, dict[str, Any]], list[str], dict[str, Any]], dict[str, Any]]
DEMAND = ["gemma-3-270m", "llama-3.2-1b", "qwen2.5-7b"]


@dataclass
class SimConfig:
    nodes: int = 5
    duration: float = 60.0  # fault phase, simulated seconds
    settle: float = 30.0  # after the final heal and restarts: must converge within this
    tick: float = 0.05  # driver tick period
    faults: bool = True
    mean_fault_gap: float = 6.0
    election: bool = True
    wire: bool = False  # seal + open every message through the real envelope codec
    membership_cfg: MembershipConfig = field(default_factory=MembershipConfig.lan)
    # removal_timeout shortened from lan()'s 30 s so a 60-s run exercises removals and takeovers
    election_cfg: ElectionConfig = field(
        default_factory=lambda: replace(ElectionConfig.lan(), removal_timeout=10.0)
    )
    publish_interval: float = 1.0
    facts_interval: float = 5.0  # each node re-publishes changed facts this often (random phase)
    demand: list[str] = field(default_factory=lambda: list(DEMAND))
    place_fn: PlaceFn = trivial_place
    warm_start: bool = False  # every node starts knowing every other (large-scale benches)
    network: tuple[float, float, float] | None = None  # (drop, dup, max delay s); None: drawn from the seed
    # the node core's own timers (bootstrap, seed wait, placement re-sends, mDNS candidates): lan()
    core_cfg: NodeCoreConfig = field(default_factory=NodeCoreConfig.lan)
    send_timeout: float = 1.0  # a send that got no answer is reported failed this long after it left
    # Cluster start-up, as operators do it: None, every node starts at 0 as a voter of one cluster (no
    # founding); else every node starts brand-new with its --join seeds, at its own time, by a scenario:
    # "rooted" (one node without seeds, the others join it and maybe each other; it may start up to
    # root_late s after them: the e3a5284 case), "late_root" (it starts after seed_wait: two clusters form
    # and must merge), "split" (two rooted groups cut apart until after seed_wait, one naming the other's
    # root: both found, then merge), "mesh" (random seeds, connected), or "random" (one of these per seed).
    bootstrap: str | None = None
    root_late: float = 15.0
    # Autonomous serving (aivailable/autonomy.py through gossip/simserve.py): every node is asked for every
    # model of `demand`; a node without a coordinator serves what nobody it reaches serves.
    autonomy: bool = True
    # "random" faults; "majority": at 5 s, crash a majority at once until 45 s (no coordinator anywhere);
    # "cascade": the same majority one after another, 12 s apart (dead voters may be removed in between)
    schedule: str = "random"


class Sim:
    def __init__(self, seed: int, cfg: SimConfig, verbose: bool = False):
        self.seed, self.cfg, self.verbose = seed, cfg, verbose
        self.rng = random.Random(seed)
        drop, dup, max_delay = (
            self.rng.uniform(0.0, 0.05),
            self.rng.uniform(0.0, 0.02),
            self.rng.uniform(0.002, 0.03),
        )
        if cfg.network is not None:
            drop, dup, max_delay = cfg.network
        self.net = Network(random.Random(self.rng.random()), drop, dup, (0.0005, max_delay))
        self.now = 0.0
        self.facts_until = cfg.duration + cfg.settle / 2  # facts stop changing so convergence is checkable
        self._heap: list[tuple[float, int, int, str, str, Any]] = []
        self._seq = 0
        self.sent = 0
        self.rejected: dict[str, int] = {}  # envelope rejections by reason (wire mode)
        self.check = Checker(cfg.nodes)
        self.serving = ServingCheck()
        self.ids = [f"n{i:0{len(str(cfg.nodes))}d}" for i in range(cfg.nodes)]
        self.nodes: dict[str, SimNode] = {}
        self.secret, self._replay = b"sim-secret", {n: envelope.ReplayCache() for n in self.ids}
        self.core_cfg = replace(cfg.core_cfg, membership=cfg.membership_cfg, election=cfg.election_cfg)
        if not cfg.election:  # membership only: nobody is a voter and nobody founds a cluster
            self.core_cfg = replace(self.core_cfg, bootstrap_grace=math.inf)
        self.scenario: dict[str, Any] = {}
        self.faults_from = 1.0
        if cfg.bootstrap is not None:
            self._schedule_bootstrap(cfg.bootstrap)
            return
        voters = tuple(self.ids) if cfg.election else ()
        for nid in self.ids:
            self.nodes[nid] = SimNode(self, nid, voters)
        if cfg.warm_start:
            rows = tuple(n.mem.full_state()[0] for n in self.nodes.values())
            for n in self.nodes.values():
                n.mem.seed_members(list(rows), 0.0)
                n.mem.drop_pending()
        else:
            for n in self.nodes.values():
                n.core.join([self.ids[0]] if n.id != self.ids[0] else [], 0.0)
                n.drain()
        for nid in self.ids:
            self._push(self.rng.uniform(0, cfg.tick), 0, nid, "", None)

    def _schedule_bootstrap(self, kind: str) -> None:
        """Brand-new nodes with --join seeds and start times drawn by scenario ``kind`` (see SimConfig)."""
        rng, ids, wait = self.rng, self.ids, self.core_cfg.seed_wait
        if kind == "random":
            kind = rng.choice(("rooted", "rooted", "late_root", "split", "mesh"))
        seeds: dict[str, list[str]] = {}
        heal_at = None
        if kind == "split" and len(ids) >= 2:
            order = ids[:]
            rng.shuffle(order)
            a, b = order[: len(order) // 2], order[len(order) // 2 :]
            for group in (a, b):
                for n in group[1:]:
                    seeds[n] = [group[0]]
            seeds[a[0]], seeds[b[0]] = [], [a[0]]  # b's root also names a's root, unreachable for now
            start = {n: rng.uniform(0.0, 5.0) for n in ids}
            heal_at = max(start.values()) + wait + rng.uniform(5.0, 15.0)
            self.net.partition([a, b], 0.0)
            self.at(heal_at, lambda: self._log_net("heal", None))
        elif kind in ("rooted", "late_root"):
            root = rng.choice(ids)
            for n in ids:
                others = [o for o in ids if o not in (n, root)]
                seeds[n] = [] if n == root else [root, *rng.sample(others, rng.randint(0, len(others)))]
            start = {n: rng.uniform(0.0, 5.0) for n in ids}
            late = rng.uniform(0.0, self.cfg.root_late) if kind == "rooted" else wait + rng.uniform(2.0, 10.0)
            start[root] = max(start.values()) + late
        else:
            order = ids[:]
            rng.shuffle(order)
            for i, n in enumerate(order):  # each joins at least one earlier-listed node: connected
                pool = order[:i] + order[i + 1 :]
                must = [order[rng.randrange(i)]] if i else []
                extra = rng.sample(pool, rng.randint(0, min(2, len(pool))))
                seeds[n] = list(dict.fromkeys(must + extra))
            start = {n: rng.uniform(0.0, 20.0) for n in ids}
        self.scenario = {"kind": kind, "seeds": seeds, "start": start}
        self.check.bootstrap_scenario(kind, start, seeds, wait)
        self.faults_from = max(start.values()) + 15.0 if heal_at is None else heal_at + 10.0
        for n in ids:
            self.at(start[n], lambda n=n: self._boot(n, seeds[n]))

    def _boot(self, node_id: str, seeds: list[str]) -> None:
        self.log(f"start {node_id} --join {','.join(seeds) or '(none)'}")
        node = SimNode(self, node_id, (), seeds)
        self.nodes[node_id] = node
        node.core.join(seeds, self.now)
        node.drain()
        self._push(self.now + self.rng.uniform(0, self.cfg.tick), 0, node_id, "", None)

    # ---- event loop ----------------------------------------------------------------------------------

    def _push(self, at: float, kind: int, dst: str, src: str, msg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, dst, src, msg))

    def send(self, src: str, dst: str | None, msg: Any, ack: Any = None, gen: int = 0) -> None:
        """``msg`` from ``src`` to the node at address ``dst`` (a node id). With ``ack``, the sender hears
        whether it was answered: when it arrives at a running node, else ``send_timeout`` later."""
        self.sent += 1
        if dst is None:
            if ack is not None:
                self._push(self.now, 3, src, "", (gen, ack, False))
            return
        if self.cfg.wire:
            nonce = self.rng.getrandbits(96).to_bytes(12, "big")
            msg = envelope.seal(msg, self.secret, src, self.now, nonce)
        delays = self.net.delays(src, dst)
        for d in delays:
            self._push(self.now + d, 1, dst, src, msg if ack is None else Tracked(msg, ack, gen))
        if ack is not None and not delays:
            self._push(self.now + self.cfg.send_timeout, 3, src, "", (gen, ack, False))

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._push(t, 2, "", "", fn)

    def run_until(self, t_end: float) -> None:
        heap, nodes, tick = self._heap, self.nodes, self.cfg.tick
        while heap and heap[0][0] <= t_end:
            at, _, kind, dst, src, msg = heapq.heappop(heap)
            self.now = at
            if kind == 0:
                node = nodes[dst]
                if node.up:
                    node.tick(at)
                self._push(at + tick, 0, dst, "", None)
            elif kind == 1:
                tracked = msg if isinstance(msg, Tracked) else None
                if tracked is not None:
                    msg = tracked.msg
                node = nodes.get(dst)
                ok = node is not None and node.up
                if ok and self.cfg.wire:
                    try:
                        src, msg = envelope.open(msg, self.secret, at, self._replay[dst])
                    except envelope.EnvelopeError as exc:  # as the transport does: drop and count
                        self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
                        ok = False
                if ok:
                    node.deliver(src, msg)
                if tracked is not None:  # the 2xx answer (or the error) goes back to the sender
                    delay = 0.0 if ok else self.cfg.send_timeout
                    self._push(at + delay, 3, src, "", (tracked.gen, tracked.ack, ok))
            elif kind == 3:
                node = nodes.get(dst)
                if node is not None:
                    node.report(*msg)
            else:
                msg()
        self.now = t_end

    # ---- faults --------------------------------------------------------------------------------------

    def schedule_faults(self) -> None:
        if self.cfg.schedule in ("majority", "cascade"):
            self._schedule_majority_loss(12.0 if self.cfg.schedule == "cascade" else 0.0)
            return
        rng, t = self.rng, self.faults_from
        while True:
            t += rng.expovariate(1 / self.cfg.mean_fault_gap)
            if t >= self.cfg.duration:
                break
            kind = rng.choice(("crash", "crash", "partition", "isolate") if len(self.ids) > 1 else ("crash",))
            length = rng.uniform(2.0, 25.0)
            if kind == "crash":
                node = rng.choice(self.ids)
                self.at(t, lambda node=node: self.crash(node))
                self.at(min(t + length, self.cfg.duration), lambda node=node: self.restart(node))
            elif kind == "partition":
                ids = self.ids[:]
                rng.shuffle(ids)
                cut = rng.randint(1, len(ids) - 1)
                self.at(t, lambda g=[ids[:cut], ids[cut:]]: self._log_net("partition", g))
            else:
                node = rng.choice(self.ids)
                self.at(t, lambda node=node: self._log_net("isolate", node))
            if kind != "crash":
                self.at(min(t + length, self.cfg.duration), lambda: self._log_net("heal", None))
        self.at(self.cfg.duration, self.final_heal)

    def _schedule_majority_loss(self, gap: float) -> None:
        """A majority crashes from 5 s on, `gap` s apart (0: at once, one power strip), and all come back at 45 s."""
        victims = self.rng.sample(self.ids, len(self.ids) // 2 + 1)
        for i, node in enumerate(victims):
            self.at(5.0 + i * gap, lambda node=node: self.crash(node))
            self.at(min(45.0, self.cfg.duration), lambda node=node: self.restart(node))
        self.at(self.cfg.duration, self.final_heal)

    def _log_net(self, what: str, arg: Any) -> None:
        if what == "partition":
            self.net.partition(arg, self.now)
        elif what == "isolate":
            self.net.isolate(arg, self.now)
        else:
            self.net.heal(self.now)
        self.check.net_changed(self.now, partitioned=what != "heal")
        self.serving.changed(self.now)
        self.log(f"net {what} {arg or ''}")

    def crash(self, node: str) -> None:
        if self.nodes[node].up:
            self.nodes[node].crash()
            up = [n.id for n in self.nodes.values() if n.up]
            self.check.crashed(node, self.now, partitioned=bool(self.net.group), up=up)
            self.serving.changed(self.now)
            self.log(f"crash {node}")

    def restart(self, node: str) -> None:
        if not self.nodes[node].up:
            self.log(f"restart {node}")
            self.check.restarted(node)
            self.serving.changed(self.now)
            n = self.nodes[node]
            n.restart(n.seeds if self.cfg.bootstrap is not None else [o for o in self.ids if o != node])

    def add_node(self, node_id: str, seeds: list[str]) -> SimNode:
        """A brand-new node (no persisted state, a non-voter) joins through ``seeds``."""
        node = SimNode(self, node_id, (), seeds)
        self.nodes[node_id] = node
        self.ids.append(node_id)
        self._replay[node_id] = envelope.ReplayCache()
        node.core.join(seeds, self.now)
        node.drain()
        self._push(self.now + self.rng.uniform(0, self.cfg.tick), 0, node_id, "", None)
        return node

    def final_heal(self) -> None:
        self._log_net("heal", None)
        for nid in self.ids:
            self.restart(nid)
        self.check.final_heal_at = self.now

    def log(self, line: str) -> None:
        if self.verbose:
            print(f"{self.now:9.3f} {line}")

    # ---- a whole run ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Fault phase, final heal, settle; sample convergence every 100 ms; return figures + violations."""
        cfg = self.cfg
        if cfg.faults:
            self.schedule_faults()
        else:
            self.at(cfg.duration, self.final_heal)
        step = 0.1
        t = step
        end = cfg.duration + cfg.settle
        while t <= end + 1e-9:
            self.run_until(t)
            self.check.sample(self)
            self.serving.sample(self)
            t = round(t + step, 6)
        # The network still drops messages while settling: just before the end a leader may lose its
        # quorum to a burst of lost acks, or a peer may falsely declare a live node dead, and be put right
        # a moment later (re-election, refutation). Liveness means the cluster gets back to agreement, so
        # allow one election's worth of time for that (reported as extra_settle_s).
        grace = 2 * self.cfg.election_cfg.election_timeout + self.cfg.publish_interval
        while not self.check.settled(self) and t <= end + grace + 1e-9:
            self.run_until(t)
            self.check.extra_settle_s = round(t - end, 3)
            t = round(t + step, 6)
        self.check.finish(self)
        self.serving.finish(self)
        self.check.violations += self.serving.violations
        return {**self.check.report(self), "handbacks_s": self.serving.handbacks_s,
                "leaderless_s": round(self.serving.leaderless_s, 1),
                "autonomous_loads": self.serving.autonomous_loads}


def detection_trial(seed: int, cfg: SimConfig) -> tuple[float | None, float | None]:
    """One failure in a healthy cluster: crash a random node after 10-12 s of calm. Returns seconds
    until the first node, and until every node, declares it dead."""
    sim = Sim(seed, replace(cfg, faults=False, election=False, bootstrap=None))
    t = sim.rng.uniform(10.0, 12.0)
    sim.run_until(t)
    victim = sim.rng.choice(sim.ids)
    sim.crash(victim)
    sim.run_until(t + 10.0)
    crash = sim.check.crashes[victim]
    return crash.first, crash.all


def run_seed(seed: int, cfg: SimConfig, verbose: bool = False) -> dict[str, Any]:
    """The fault run of ``seed``, plus a single-failure detection trial when there are >= 2 nodes."""
    result = Sim(seed, cfg, verbose).run()
    first = every = None
    if cfg.nodes >= 2:
        first, every = detection_trial(seed, cfg)
    result["single_first"], result["single_all"] = first, every
    return result


def _run_many(args: tuple[list[int], SimConfig]) -> list[dict[str, Any]]:
    seeds, cfg = args
    return [run_seed(s, cfg) for s in seeds]


def campaign(seeds: list[int], cfg: SimConfig, jobs: int = 1) -> list[dict[str, Any]]:
    if jobs <= 1:
        return [run_seed(s, cfg) for s in seeds]
    chunks = [seeds[i::jobs] for i in range(jobs)]
    with ProcessPoolExecutor(jobs) as pool:
        results = [r for part in pool.map(_run_many, [(c, cfg) for c in chunks]) for r in part]
    return sorted(results, key=lambda r: r["seed"])


def replay_command(seed: int, args: argparse.Namespace) -> str:
    extra = "" if args.duration == 60.0 else f" --duration {args.duration}"
    extra += " --wire" if args.wire else ""
    extra += f" --bootstrap {args.bootstrap}" if args.bootstrap else ""
    extra += f" --schedule {args.schedule}" if args.schedule != "random" else ""
    return f"python -m aivailable.gossip.sim --seed {seed} --nodes {args.nodes}{extra} -v"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=100, help="campaign: run seeds start..start+N-1")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--seed", type=int, help="replay one seed")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--wire", action="store_true", help="seal/open every message")
    p.add_argument("--bootstrap", choices=("random", "rooted", "late_root", "split", "mesh"),
                   help="start brand-new nodes with --join seeds by this scenario (SimConfig.bootstrap)")
    p.add_argument("--schedule", choices=("random", "majority", "cascade"), default="random",
                   help="fault schedule: random crashes/partitions, a majority crashed at once until 45 s, or "
                        "the same majority one after another (12 s apart)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    cfg = SimConfig(nodes=args.nodes, duration=args.duration, wire=args.wire, bootstrap=args.bootstrap,
                    schedule=args.schedule)
    if args.seed is not None:
        r = run_seed(args.seed, cfg, verbose=args.verbose)
        print({k: v for k, v in r.items() if k != "violations"})
        for v in r["violations"]:
            print(f"VIOLATION seed {args.seed}: {v}")
        return 1 if r["violations"] else 0
    t0 = time.perf_counter()
    results = campaign(list(range(args.start, args.start + args.seeds)), cfg, args.jobs)
    wall = time.perf_counter() - t0
    for r in results:
        if r["violations"]:
            print(f"FAIL seed {r['seed']}: {r['violations'][0]}\n  replay: {replay_command(r['seed'], args)}")
    f = summarize(results)
    sim_s = f"{cfg.duration:.0f}+{cfg.settle:.0f} s simulated"
    print(f"seeds run            {f['seeds']}  ({args.nodes} nodes, {sim_s}, {wall:.1f} s wall)")
    print(f"violations           {f['violations']} in {f['failed_seeds']} seeds")
    conv = f"p50 {f['converge_p50']:.2f} s  p99 {f['converge_p99']:.2f} s  max {f['converge_max']:.2f} s"
    print(f"converge after heal  {conv}")
    print(
        f"detect 1 failure     p50 {f['detect_p50']:.2f} s  p99 {f['detect_p99']:.2f} s"
        f"  (first node; every node p99 {f['detect_all_p99']:.2f} s)"
    )
    print(
        f"detect under faults  p50 {f['detect_faults_p50']:.2f} s  p99 {f['detect_faults_p99']:.2f} s"
        f"  (n={f['detect_faults_n']}; crashes during cascades, Lifeguard slows probes)"
    )
    print(f"leaders elected      {f['leaders']}  takeovers {f['takeovers']}", end="")
    print(f"  split-brain terms {f['split_brain_terms']}")
    print(f"false dead verdicts  {f['false_deads']}")
    print(f"msgs / node / s      {f['msgs_per_node_s']:.1f}")
    print(f"autonomous replicas  {f['autonomous_loads']} loaded; all gone once the cluster is whole again: p50 "
          f"{f['autonomous_gone_p50']:.1f} s  max {f['autonomous_gone_max']:.1f} s (n={f['handbacks']})")
    return 1 if f["failed_seeds"] else 0


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Campaign figures from per-seed results."""
    conv = [r["converge_s"] for r in results if r["converge_s"] is not None]
    single = [r["single_first"] for r in results if r["single_first"] is not None]
    faults = [d for r in results for d in r["detect_first"]]
    gone = [h for r in results for h in r.get("handbacks_s", ())]
    return {
        "autonomous_loads": sum(r.get("autonomous_loads", 0) for r in results),
        "autonomous_gone_p50": percentile(gone, 50),
        "autonomous_gone_max": max(gone, default=0.0),
        "handbacks": len(gone),
        "seeds": len(results),
        "violations": sum(len(r["violations"]) for r in results),
        "failed_seeds": sum(1 for r in results if r["violations"]),
        "converge_p50": percentile(conv, 50),
        "converge_p99": percentile(conv, 99),
        "converge_max": max(conv, default=0.0),
        "detect_p50": percentile(single, 50),
        "detect_p99": percentile(single, 99),
        "detect_all_p99": percentile([r["single_all"] for r in results if r["single_all"] is not None], 99),
        "detect_faults_p50": percentile(faults, 50),
        "detect_faults_p99": percentile(faults, 99),
        "detect_faults_n": len(faults),
        "leaders": sum(r["leaders"] for r in results),
        "takeovers": sum(r["takeovers"] for r in results),
        "split_brain_terms": sum(r["split_brain_terms"] for r in results),
        "false_deads": sum(r["false_deads"] for r in results),
        "msgs_per_node_s": statistics.fmean(r["msgs_per_node_s"] for r in results) if results else 0.0,
    }


if __name__ == "__main__":
    sys.exit(main())
