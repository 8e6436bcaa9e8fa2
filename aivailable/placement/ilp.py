"""The placement objective as an integer linear program, for `baselines.optimum` (benchmarks and tests).

scipy is imported inside `solve_ilp` only: it is not a runtime dependency of the node.

Variables: x[c] = 1 when candidate replica c is placed (a GPU, or a set of GPUs of one node and vendor
for a model that no single GPU holds, with continuous parts p[c, g] of its MiB); y[m, k] = 1 when model m
has at least k replicas; u[g] = 1 when GPU g holds anything. Maximise
sum marginal_value(m, k) * y[m, k] - sum load_cost(c) * x[c] - sum W_FRAG * usable_g / usable * u[g],
which equals `objective()` up to the constant W_MIN * sum(min replicas). The search space is the solver's:
multi-GPU replicas only for models that fit no single eligible GPU, at most one replica of a model per GPU.
"""

from __future__ import annotations

import itertools

from aivailable.placement.model import PlacementResult, Problem, Replica, default_split
from aivailable.placement.objective import (
    W_FRAG,
    W_MOVE,
    demand_shares,
    eligible,
    marginal_value,
    replica_key,
    wanted,
)

CAPACITY_MARGIN_MIB = 1e-3  # keep the LP's float parts safely under capacity
MIN_PART_MIB = 1.0  # every GPU of a multi-GPU replica holds at least this much of it (split > 0)


def solve_ilp(
    problem: Problem, *, time_limit_s: float, require_optimal: bool, max_variables: int
) -> PlacementResult | None:
    """Solve the ILP; None when too large or (if required) not proven optimal in time."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix
    gpus = sorted(problem.gpus, key=lambda g: g.id)
    gpu_by_id = {g.id: g for g in gpus}
    gi = {g.id: i for i, g in enumerate(gpus)}
    usable = float(sum(max(g.usable_mib, 0) for g in gpus)) or 1.0
    oh = float(problem.split_overhead_mib)
    shares = demand_shares(problem)

    cost: list[float] = []
    lower: list[float] = []
    upper: list[float] = []
    integral: list[int] = []

    def var(c: float, hi: float = 1.0, integer: bool = True) -> int:
        cost.append(c)
        lower.append(0.0)
        upper.append(hi)
        integral.append(1 if integer else 0)
        return len(cost) - 1

    rows: list[tuple[dict[int, float], float, float]] = []
    cap_terms: list[dict[int, float]] = [{} for _ in gpus]
    gpu_vars: list[list[int]] = [[] for _ in gpus]
    # candidates: (model name, x var, gpu ids, {gpu index: fixed need}, {gpu index: part var} or None)
    cands: list[tuple[str, int, tuple[str, ...], dict[int, float], dict[int, int] | None]] = []

    for m in sorted(problem.models, key=lambda m: m.name):
        if m.max_replicas == 0:
            continue
        base = W_MOVE * m.vram_mib / usable
        prev = {replica_key(r, gpu_by_id) for r in problem.previous.get(m.name, ())}

        def load(node: str, key: tuple, m=m, base=base, prev=prev) -> float:  # noqa: B023
            if key in prev:
                return 0.0
            return base if m.files_on is None or node in m.files_on else 2 * base

        elig = [g for g in gpus if g.usable_mib > 0 and eligible(g, m)]
        if not elig:
            continue
        multi = m.vram_mib > max(g.usable_mib for g in elig)
        m_cands: list[int] = []
        if not multi:
            for g in elig:
                if g.usable_mib >= m.vram_mib:
                    x = var(load(g.node, ((g.id, 1.0),)))
                    cands.append((m.name, x, (g.id,), {gi[g.id]: float(m.vram_mib)}, None))
                    m_cands.append(x)
        else:
            groups: dict[tuple[str, str], list] = {}
            for g in elig:
                groups.setdefault((g.node, g.vendor.lower()), []).append(g)
            for _, members in sorted(groups.items()):
                for k in range(2, len(members) + 1):
                    for subset in itertools.combinations(members, k):
                        if sum(g.usable_mib - oh for g in subset) < m.vram_mib:
                            continue
                        x = var(base if m.files_on is None or subset[0].node in m.files_on else 2 * base)
                        parts = {}
                        for g in subset:
                            p = var(0.0, hi=max(g.usable_mib - oh, 0.0), integer=False)
                            parts[gi[g.id]] = p
                            rows.append(({p: 1.0, x: -(g.usable_mib - oh)}, -np.inf, 0.0))
                            rows.append(({p: 1.0, x: -MIN_PART_MIB}, 0.0, np.inf))
                        rows.append(({**{p: 1.0 for p in parts.values()}, x: -float(m.vram_mib)}, 0.0, 0.0))
                        cands.append((m.name, x, tuple(g.id for g in subset), {i: oh for i in parts}, parts))
                        m_cands.append(x)
        # previous multi-GPU replicas kept as they are (their own split): movement 0
        for rep in problem.previous.get(m.name, ()):
            if len(rep.gpus) < 2 or any(g not in gpu_by_id for g in rep.gpus):
                continue
            split = rep.split or default_split(gpu_by_id[g] for g in rep.gpus)
            x = var(0.0)
            needs = {gi[g]: f * m.vram_mib + oh for g, f in zip(rep.gpus, split, strict=True)}
            if any(not eligible(gpu_by_id[g], m) for g in rep.gpus):
                upper[x] = 0.0
            cands.append((m.name, x, rep.gpus, needs, None))
            m_cands.append(x)
        if not m_cands:
            continue
        # at most one replica of the model per GPU
        per_gpu: dict[int, dict[int, float]] = {}
        for _, x, ids, _, _ in cands[len(cands) - len(m_cands) :]:
            for gid in ids:
                per_gpu.setdefault(gi[gid], {})[x] = 1.0
        rows += [(terms, -np.inf, 1.0) for _, terms in sorted(per_gpu.items()) if len(terms) > 1]
        # y[m, k]: replica count as a staircase, each step worth its marginal value
        ys = [var(-marginal_value(shares[m.name], m.want_min, k)) for k in range(1, m.max_replicas + 1)]
        rows.append(({**{x: 1.0 for x in m_cands}, **{y: -1.0 for y in ys}}, 0.0, 0.0))
        rows += [({ys[k]: 1.0, ys[k - 1]: -1.0}, -np.inf, 0.0) for k in range(1, len(ys))]
        if len(cost) > max_variables:
            return None

    for _, x, ids, fixed, parts in cands:
        for gid in ids:
            i = gi[gid]
            cap_terms[i][x] = cap_terms[i].get(x, 0.0) + fixed.get(i, 0.0)
            if parts is not None:
                cap_terms[i][parts[i]] = 1.0
            gpu_vars[i].append(x)
    for i, g in enumerate(gpus):
        if not gpu_vars[i]:
            continue
        rows.append((cap_terms[i], -np.inf, max(g.usable_mib, 0) - CAPACITY_MARGIN_MIB))
        u = var(W_FRAG * max(g.usable_mib, 0) / usable)
        rows.append(({**{x: 1.0 for x in gpu_vars[i]}, u: -float(len(gpu_vars[i]))}, -np.inf, 0.0))

    n = len(cost)
    if n == 0:
        return _result(problem, {})
    if n > max_variables:
        return None
    r_idx, c_idx, vals, lb, ub = [], [], [], [], []
    for r, (terms, lo, hi) in enumerate(rows):
        for c, v in terms.items():
            r_idx.append(r)
            c_idx.append(c)
            vals.append(v)
        lb.append(lo)
        ub.append(hi)
    a = coo_matrix((vals, (r_idx, c_idx)), shape=(len(rows), n)).tocsr()
    res = milp(
        np.array(cost),
        constraints=LinearConstraint(a, np.array(lb), np.array(ub)) if rows else None,
        integrality=np.array(integral),
        bounds=Bounds(np.array(lower), np.array(upper)),
        options={"time_limit": time_limit_s, "mip_rel_gap": 0.0, "presolve": True},
    )
    if res.x is None or (require_optimal and res.status != 0):
        return None
    placement: dict[str, list[Replica]] = {}
    for name, x, ids, _, parts in cands:
        if res.x[x] < 0.5:
            continue
        model = problem.model(name)
        if parts is None and len(ids) > 1:
            rep = next(r for r in problem.previous[name] if r.gpus == ids)
        elif parts is None:
            rep = Replica(ids)
        else:
            raw = [max(float(res.x[parts[gi[g]]]), 0.0) for g in ids]
            total = sum(raw)
            rep = Replica(ids, tuple(p / total for p in raw))
            assert abs(total - model.vram_mib) < 1.0, "parts must add up to the model's VRAM"
        placement.setdefault(name, []).append(rep)
    return _result(problem, placement)


def _result(problem: Problem, placement: dict[str, list[Replica]]) -> PlacementResult:
    out = {n: tuple(sorted(r, key=lambda x: x.gpus)) for n, r in sorted(placement.items())}
    missing = sorted(n for n in wanted(problem) if n not in out)
    below = {
        m.name: "ILP: fewer than min_replicas fit"
        for m in problem.models
        if 0 < len(out.get(m.name, ())) < m.want_min
    }
    reasons = dict.fromkeys(missing, "ILP optimum: no room")
    return PlacementResult(out, tuple(missing), reasons, below, 0.0)
