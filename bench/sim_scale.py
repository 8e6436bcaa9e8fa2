"""1,000 simulated nodes: membership convergence after a join and after a death, and message load.

Runs the real sans-IO membership core (``MembershipConfig.lan()``) for every node in the seeded simulator
(``aivailable.gossip.sim``), warm-started with full membership, facts re-published by every node every
30 s, on a LAN-like network (1% drop, 0.5-5 ms delay). Election is off: at this size the interesting part
is gossip; the election only talks to voters.

Timeline: steady state to t=6 s (message rate measured over 2-6 s); a new node joins through one random
seed at t=6 s; a random node crashes at t=16 s; the run ends once every live node has seen the death, or
at t=40 s.

    python bench/sim_scale.py [--nodes 1000] [--seed 1]

Prints a table and writes bench/results/sim_scale.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aivailable.gossip.membership import MemberChanged  # noqa: E402
from aivailable.gossip.membership_types import MembershipConfig  # noqa: E402
from aivailable.gossip.messages import Status  # noqa: E402
from aivailable.gossip.sim import Sim, SimConfig  # noqa: E402
from bench import harness  # noqa: E402

FACTS_INTERVAL = 30.0  # each node's facts change every 30 s (random phase): ~33 facts updates/s at 1,000


def run(nodes: int, seed: int) -> dict[str, float | int | str | None]:
    cfg = SimConfig(
        nodes=nodes,
        faults=False,
        election=False,
        warm_start=True,
        network=(0.01, 0.0, 0.005),
        settle=0.0,
        facts_interval=FACTS_INTERVAL,
    )
    t_wall = time.perf_counter()
    sim = Sim(seed, cfg)
    join_t, crash_t = 6.0, 16.0
    newcomer, victim = "joiner", sim.rng.choice(sim.ids)
    knows_new: set[str] = set()
    saw_dead: set[str] = set()
    first_dead: list[float] = []
    original = sim.check.member_changed

    def watch(observer: str, ev: MemberChanged, now: float, s: Sim | None = None) -> None:
        original(observer, ev, now, s)
        if ev.node == newcomer and ev.new is Status.ALIVE:
            knows_new.add(observer)
        if ev.node == victim and ev.new is Status.DEAD:
            saw_dead.add(observer)
            if not first_dead:
                first_dead.append(now)

    sim.check.member_changed = watch  # type: ignore[method-assign]
    sim.run_until(2.0)
    sent0 = sim.sent
    sim.run_until(join_t)
    steady_rate = (sim.sent - sent0) / nodes / (join_t - 2.0)
    joiner = sim.add_node(newcomer, [sim.rng.choice(sim.ids)])
    join_done = None
    t = join_t
    while t < crash_t:
        t = round(t + 0.05, 6)
        sim.run_until(t)
        if join_done is None and len(knows_new) >= nodes and joiner.mem.num_live() == nodes + 1:
            join_done = t - join_t
    sim.crash(victim)
    sent1 = sim.sent
    all_dead = None
    while t < 40.0 and all_dead is None:
        t = round(t + 0.05, 6)
        sim.run_until(t)
        if len(saw_dead) >= nodes:  # every live node: the nodes - 1 others and the joiner
            all_dead = t - crash_t
    churn_rate = (sim.sent - sent1) / nodes / max(t - crash_t, 1e-9)
    queue = max(n.mem.pending_updates() for n in sim.nodes.values() if n.up)
    up = [n for n in sim.nodes.values() if n.up]
    observers = up[:: max(1, len(up) // 50)]  # ~50 observers x every node
    current = sum(o.mem.facts(n.id) == n.mem.facts(n.id) for o in observers for n in up)
    return {
        "nodes": nodes,
        "seed": seed,
        "profile": "MembershipConfig.lan()",
        "join_converge_s": _r(join_done),
        "death_first_detect_s": _r(first_dead[0] - crash_t if first_dead else None),
        "death_all_know_s": _r(all_dead),
        "death_spread_s": _r(
            all_dead + crash_t - first_dead[0] if all_dead is not None and first_dead else None
        ),
        "facts_current_pct": round(100 * current / (len(observers) * len(up)), 1),
        "msgs_per_node_s_steady": round(steady_rate, 2),
        "msgs_per_node_s_after_death": round(churn_rate, 2),
        "max_pending_updates": queue,
        "simulated_s": round(t, 2),
        "wall_s": round(time.perf_counter() - t_wall, 1),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="membership at scale in the simulator")
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    harness.add_output_args(p, "sim_scale")
    args = p.parse_args(argv)
    r = run(args.nodes, args.seed)
    lan = MembershipConfig.lan()
    rows = [
        ("nodes", r["nodes"]),
        ("probe / gossip interval", f"{lan.probe_interval} s / {lan.gossip_interval} s x {lan.gossip_nodes}"),
        ("join: all nodes know the newcomer", _s(r["join_converge_s"])),
        ("death: first node declares it dead", _s(r["death_first_detect_s"])),
        ("death: every node knows", _s(r["death_all_know_s"])),
        ("death: spread after first verdict", _s(r["death_spread_s"])),
        ("facts views current at the end", f"{r['facts_current_pct']} %"),
        ("messages / node / s (steady)", r["msgs_per_node_s_steady"]),
        ("messages / node / s (after death)", r["msgs_per_node_s_after_death"]),
        ("wall time", f"{r['wall_s']} s for {r['simulated_s']} s simulated"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if not args.no_write:
        print(f"wrote {harness.write_results('sim_scale', r, args=args, indent=2)}")
    return 0


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _s(v: float | int | str | None) -> str:
    return "not converged" if v is None else f"{float(v):.2f} s"


if __name__ == "__main__":
    sys.exit(main())
