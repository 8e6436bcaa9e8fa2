"""Simulator campaign: 10,000 seeded cluster runs with partitions, drops, duplicates and crashes.

Each seed runs the production node core (``gossip/node_core.py``: membership, election, fence, founding
rule and placement delivery) of every node in ``aivailable.gossip.sim`` for 60 simulated seconds of faults (crashes with restarts that keep only
persisted state, partitions, isolations; per seed a drop rate of 0-5 %, duplicates 0-2 %, delays
0.5-30 ms), then a final heal and 30 s to settle. Seeds are spread round-robin over cluster sizes
(default 2, 3, 5, 7 nodes, so the documented 2-voter takeover is exercised too), and alternate between
a cluster formed at time 0 and a start-up (``SimConfig.bootstrap="random"``: brand-new nodes with
--join seeds and staggered start times: a late root seed, a root silent past seed_wait, two groups cut
apart that found two clusters and must merge, random seed meshes), whose faults start once all are up.
Rows ``N/startup`` hold the start-up seeds, with ``founders`` (clusters founded), ``one_founder_checked``
(seeds where exactly one founder is required) and ``merged_seeds`` (two or more founders, one cluster
at the end).

Every run also drives the autonomy rule (``aivailable/autonomy.py`` through ``gossip/simserve.py``): a third
of the seeds per size run the ``majority`` schedule (a majority crashed at once for 40 s), and the serving
checks apply to every seed: no GPU overbooked, a stable leaderless minority serves every demanded model that
fits, autonomous replicas gone within 30 s of the cluster being whole (``handback`` figures).

Figures: double leaders in a term (documented disjoint-voter takeovers are counted apart), stale
placements applied (and how many the fences refused), seeds that did not converge after the heal,
convergence time, failure detection, elections. Every failing seed is listed with its replay command.

    python bench/sim_campaign.py                       # 10,000 seeds, all cores
    python bench/sim_campaign.py --seeds 500 --jobs 2  # a quicker look

Prints a table and writes bench/results/sim_campaign.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aivailable.gossip.sim import SimConfig, campaign, summarize  # noqa: E402
from aivailable.gossip.simcheck import percentile  # noqa: E402
from bench import harness  # noqa: E402

NOT_CONVERGED = ("did not converge", "no single leader", "not every node follows", "different placements",
                 "not placed on a live node", "holds facts")


def figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The campaign's safety and liveness figures (on top of ``sim.summarize``)."""
    f = summarize(results)
    unconverged = [r["seed"] for r in results if r["converge_s"] is None
                   or any(any(k in v for k in NOT_CONVERGED) for v in r["violations"])]
    conv = [r["converge_s"] for r in results if r["converge_s"] is not None]
    f.update({
        "double_leader_terms": sum(r["double_leader_terms"] for r in results),
        "stale_placements_applied": sum(r["stale_applied"] for r in results),
        "placements_applied": sum(r["placements_applied"] for r in results),
        "repeats_refused_by_fence": sum(r["placements_refused"] for r in results),
        "stale_refused_by_fence": sum(r["stale_refused"] for r in results),
        "not_converged_seeds": len(unconverged),
        "converge_p90": percentile(conv, 90),
        "founders": sum(r.get("founders", 0) for r in results),
        "one_founder_checked": sum(1 for r in results if r.get("one_founder_expected")),
        "merged_seeds": sum(1 for r in results if r.get("founders", 0) >= 2 and not r["violations"]),
        "serving_violations": sum(1 for r in results for v in r["violations"]
                                  if any(k in v for k in ("MiB of", "nobody it reaches", "outlive", "left after"))),
    })
    return f


def run(seeds: int, start: int, sizes: list[int], jobs: int) -> dict[str, Any]:
    groups = [(n, boot) for n in sizes for boot in (None, "random", "majority")]
    by_size: dict[tuple[int, str | None], list[int]] = {g: [] for g in groups}
    for i, seed in enumerate(range(start, start + seeds)):
        by_size[groups[i % len(groups)]].append(seed)
    out: dict[str, Any] = {"seeds": seeds, "start": start, "sizes": sizes, "jobs": jobs,
                           "python": platform.python_version(), "per_size": {}, "failures": []}
    everything: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for (n, boot), group in by_size.items():
        if not group:
            continue
        t = time.perf_counter()
        cfg = (SimConfig(nodes=n, schedule="majority") if boot == "majority"
               else SimConfig(nodes=n, bootstrap=boot))
        results = campaign(group, cfg, jobs=jobs)
        f = figures(results)
        f["wall_s"] = round(time.perf_counter() - t, 1)
        label = {None: "", "random": "/startup", "majority": "/majority"}[boot]
        out["per_size"][f"{n}{label}"] = f
        everything += results
        for r in results:
            if r["violations"]:
                out["failures"].append({"seed": r["seed"], "nodes": n, "violation": r["violations"][0],
                                        "replay": f"python -m aivailable.gossip.sim --seed {r['seed']} "
                                                  f"--nodes {n}{_flag(boot)} -v"})
        print(f"  {n} nodes{label}: {len(group)} seeds, {f['violations']} violations, {f['wall_s']:.0f} s", flush=True)
    out["total"] = figures(everything)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    t = out["total"]
    out["targets"] = {"no_double_leader": t["double_leader_terms"] == 0,
                      "no_stale_placement_applied": t["stale_placements_applied"] == 0,
                      "all_converged": t["not_converged_seeds"] == 0, "no_violation": t["violations"] == 0}
    return out


def _flag(boot: str | None) -> str:
    return {None: "", "random": " --bootstrap random", "majority": " --schedule majority"}[boot]


def table(out: dict[str, Any]) -> str:
    rows = [("nodes", "seeds", "double leaders", "stale applied", "stale refused", "not converged",
             "converge p50/p99/max s", "leaders", "takeovers", "founders", "merged", "autonomous loads",
             "handback p50/max s", "violations")]
    for n, f in [*out["per_size"].items(), ("all", out["total"])]:
        rows.append((n, str(f["seeds"]), str(f["double_leader_terms"]), str(f["stale_placements_applied"]),
                     str(f["stale_refused_by_fence"]), str(f["not_converged_seeds"]),
                     f"{f['converge_p50']:.2f}/{f['converge_p99']:.2f}/{f['converge_max']:.2f}",
                     str(f["leaders"]), str(f["takeovers"]), str(f["founders"]), str(f["merged_seeds"]),
                     str(f["autonomous_loads"]), f"{f['autonomous_gone_p50']:.1f}/{f['autonomous_gone_max']:.1f}",
                     str(f["violations"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10_000)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--sizes", default="2,3,5,7", help="cluster sizes, comma-separated (seeds round-robin)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    harness.add_output_args(p, "sim_campaign")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        p.error("--sizes: give cluster sizes >= 1, e.g. 2,3,5,7")
    out = run(args.seeds, args.start, sizes, args.jobs)
    print(table(out))
    for f in out["failures"][:20]:
        print(f"FAIL seed {f['seed']} ({f['nodes']} nodes): {f['violation']}\n  replay: {f['replay']}")
    t = out["total"]
    print(f"{t['seeds']} seeds in {out['wall_s']:.0f} s wall: {t['double_leader_terms']} double leaders, "
          f"{t['stale_placements_applied']} stale placements applied ({t['placements_applied']} applied, "
          f"{t['stale_refused_by_fence']} stale ones refused by fences), {t['not_converged_seeds']} seeds not "
          f"converged after healing")
    print(f"wrote {harness.write_results('sim_campaign', out, args=args)}")
    return 0 if all(out["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
