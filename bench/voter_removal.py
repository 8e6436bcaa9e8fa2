"""How soon should the coordinator remove dead voters? The simulator, side by side.

For each ``removal_timeout`` (``--timeouts``, default 3, 10, 30 s) and each fault schedule of the simulator
(``cascade``: a majority of 5 crashes one after another 12 s apart; ``majority``: at once; ``random``:
crashes, partitions and isolations every ~6 s), run ``--seeds`` seeds of ``aivailable.gossip.sim`` and
report: safety (violations, double leaders, split-brain terms), the mean time with no leader anywhere
(nobody can place), and how many autonomous replicas the leaderless spells needed.

    python bench/voter_removal.py [--seeds 30] [--timeouts 3,10,30] [--jobs 2]

Writes bench/results/voter_removal.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aivailable.gossip.election import ElectionConfig  # noqa: E402
from aivailable.gossip.sim import SimConfig, campaign  # noqa: E402
from bench import harness  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=30)
    p.add_argument("--timeouts", default="3,10,30")
    p.add_argument("--jobs", type=int, default=2)
    harness.add_output_args(p, "voter_removal")
    args = p.parse_args(argv)
    rows = []
    for schedule in ("cascade", "majority", "random"):
        for t in (float(x) for x in args.timeouts.split(",")):
            cfg = SimConfig(nodes=5, schedule=schedule,
                            election_cfg=replace(ElectionConfig.lan(), removal_timeout=t))
            rs = campaign(list(range(args.seeds)), cfg, jobs=args.jobs)
            rows.append({"schedule": schedule, "removal_timeout_s": t, "seeds": len(rs),
                         "violations": sum(len(r["violations"]) for r in rs),
                         "double_leader_terms": sum(r["double_leader_terms"] for r in rs),
                         "split_brain_terms": sum(r["split_brain_terms"] for r in rs),
                         "leaderless_s_mean": round(statistics.mean(r["leaderless_s"] for r in rs), 2),
                         "autonomous_loads": sum(r["autonomous_loads"] for r in rs)})
            print(json.dumps(rows[-1]), flush=True)
    print("| schedule | removal timeout s | violations | double leaders | split-brain terms | leaderless s (mean) "
          "| autonomous loads |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['removal_timeout_s']:g} | {r['violations']} | {r['double_leader_terms']} | "
              f"{r['split_brain_terms']} | {r['leaderless_s_mean']} | {r['autonomous_loads']} |")
    out = {"bench": "voter_removal", "nodes": 5, "rows": rows}
    print(f"wrote {harness.write_results('voter_removal', out, args=args, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
