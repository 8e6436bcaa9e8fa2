"""Making room for a replica: evict, or relocate, replicas worth less than it (used by solver.py).

A plan for a site (one GPU, or the GPUs of one node and vendor for a model no single GPU holds) evicts the
replicas that are cheapest to lose until the model fits, keeps any that turn out not to be in the way, then
relocates each evicted replica where that costs less than losing it: to another GPU with room, or, for a
multi-GPU replica, re-split across its node. The plan's net gain is the objective's change, except for the
fragmentation tie-breaker of GPUs that an eviction leaves empty.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aivailable.placement.solver import Rep, _Solver

EPS_MIB = 1e-6  # fit tolerance for float splits; validate_result allows 1e-2, so results always pass
EPS_GAIN = 1e-9  # an action must raise the objective by more than this (guarantees termination)
RELOCATION_CANDIDATES = 4  # best-fit targets remembered per model when planning a relocation
EVICTION_SITES = 8  # sites planned exactly when a replica needs room made (cost grows linearly with it)
EVICTION_CANDIDATES = 32  # sites considered at all for eviction: GPUs of the cheapest-to-evict models


@dataclass
class Plan:
    """Where a replica goes (GPUs, MiB on each), what is evicted for it and where evicted ones move."""

    net: float
    tie: tuple
    gpus: tuple[int, ...]
    needs: tuple[float, ...]
    evict: list[Rep] = field(default_factory=list)
    relocate: dict[int, tuple] = field(default_factory=dict)  # id(evicted rep) -> (gpus, needs) elsewhere


def evicting_plan(s: _Solver, m: int, gain: float) -> Plan | None:
    """Best site after evicting or relocating cheaper replicas.

    Candidate sites are the GPUs of the cheapest-to-evict models (at most EVICTION_CANDIDATES), ranked
    by an optimistic cost (relocation assumed to work when some GPU has room for it); the best
    EVICTION_SITES of them are planned exactly."""
    if s.multi[m]:
        sites = sorted(
            (grp for grp in s.groups[m] if any(s.on_gpu[g] for g in grp)),
            key=lambda grp: (-sum(s.free[g] for g in grp), grp[0]),
        )[:EVICTION_CANDIDATES]
    else:
        sites = _eviction_sites(s, m, gain)
    ranked = []
    for site in sites:
        reps = list({id(r): r for g in site for r in s.on_gpu[g].values()}.values())
        need = s.v[m] + (s.oh * 2 if s.multi[m] else 0.0) - sum(s.free[g] for g in site)
        est = 0.0
        for cost, size in sorted((_optimistic(s, r), sum(r.needs)) for r in reps):
            est += cost
            need -= size
            if need <= 0:
                break
        if gain - est > EPS_GAIN:
            ranked.append((est, site[0], site, reps))
    ranked.sort(key=lambda t: (t[0], t[1]))
    relocs: dict[int, list[int]] = {}
    best: Plan | None = None
    for _, _, site, reps in ranked[:EVICTION_SITES]:
        plan = _plan_site(s, m, gain, site, reps, relocs)
        if plan is not None and plan.net > EPS_GAIN and (best is None or plan.tie < best.tie):
            best = plan
    return best


def _eviction_sites(s: _Solver, m: int, gain: float) -> list[list[int]]:
    bounds = []
    largest = s.by_free[-1][0] + EPS_MIB
    for j, reps in enumerate(s.reps):
        if reps and j != m:
            cost = s.loss(j)
            if s.multi[j] or s.v[j] <= largest:
                cost = min(cost, s.min_load[j])
            bound = cost - s.max_load[j]  # optimistic: the largest refund any replica could bring
            if bound < gain:
                bounds.append((bound, j))
    bounds.sort()
    v, cap, emask, on_gpu = s.v[m], s.cap, s.emask[m], s.on_gpu
    sites: list[list[int]] = []
    seen: set[int] = set()
    for _, j in bounds:
        for r in s.reps[j]:
            for g in r.gpus:
                if g not in seen and emask[g] and cap[g] + EPS_MIB >= v and m not in on_gpu[g]:
                    seen.add(g)
                    sites.append([g])
        if len(sites) >= EVICTION_CANDIDATES:
            break
    return sites


def _optimistic(s: _Solver, r: Rep) -> float:
    """A lower bound on what evicting `r` costs: removal, or a relocation at the cheapest load cost
    (only when the largest free block could hold it, or it is a multi-GPU replica that may re-split)."""
    removal = s.loss(r.m) - r.load_cost
    if s.multi[r.m] or s.v[r.m] <= s.by_free[-1][0] + EPS_MIB:
        return min(removal, s.min_load[r.m] - r.load_cost)
    return removal


def _relocation_targets(s: _Solver, j: int, relocs: dict[int, list[int]]) -> list[int]:
    """Up to RELOCATION_CANDIDATES GPUs with room for a replica of model j, best fit first."""
    if j not in relocs:
        found: list[int] = []
        start = bisect.bisect_left(s.by_free, (s.v[j] - EPS_MIB, -1))
        for _, h in itertools.islice(s.by_free, start, None):
            if s.emask[j][h] and j not in s.on_gpu[h]:
                found.append(h)
                if len(found) == RELOCATION_CANDIDATES:
                    break
        relocs[j] = found
    return relocs[j]


def _fit_new(s: _Solver, m: int, site: list[int], free: dict[int, float]) -> tuple | None:
    if s.multi[m]:
        return s.fit_group(m, site, free)
    g = site[0]
    return ((g,), (s.v[m],)) if free[g] + EPS_MIB >= s.v[m] else None


def _plan_site(
    s: _Solver, m: int, gain: float, site: list[int], reps: list[Rep], relocs: dict[int, list[int]]
) -> Plan | None:
    """Evict the cheapest replicas on `site` until the model fits, then relocate each evicted replica
    where that costs less than losing it (another GPU with room, or a re-split within its node)."""
    free = {g: s.free[g] for g in site}
    evict: list[Rep] = []
    fit = None
    for r in sorted(reps, key=lambda r: (_optimistic(s, r), -sum(r.needs), r.m, r.gpus)):
        evict.append(r)
        for g, n in zip(r.gpus, r.needs, strict=True):
            if g in free:
                free[g] += n
        fit = _fit_new(s, m, site, free)
        if fit is not None:
            break
    if fit is None:
        return None
    for r in reversed(evict[:-1]):  # keep what turned out not to be in the way
        trial = dict(free)
        for g, n in zip(r.gpus, r.needs, strict=True):
            if g in trial:
                trial[g] -= n
        again = _fit_new(s, m, site, trial)
        if again is not None:
            evict.remove(r)
            free, fit = trial, again
    gpus, needs = fit
    delta: dict[int, float] = {}
    for r in evict:
        for g, n in zip(r.gpus, r.needs, strict=True):
            delta[g] = delta.get(g, 0.0) + n
    for g, n in zip(gpus, needs, strict=True):
        delta[g] = delta.get(g, 0.0) - n
    opened = set(gpus)
    plan = Plan(0.0, (), gpus, needs, evict)
    cost = s.load_cost(m, gpus, needs) + s.open_cost(gpus)
    removed: Counter[int] = Counter()
    for r in evict:
        removal = s.loss(r.m, removed[r.m]) - r.load_cost
        where = _relocate(s, r, delta, relocs)
        if where is not None and any(
            e.m == r.m and set(w[0]) & set(where[0]) for e in evict if (w := plan.relocate.get(id(e)))
        ):
            where = None  # another replica of the same model is moving there in this plan
        if where is not None:
            reloc = s.load_cost(r.m, *where) - r.load_cost
            reloc += sum(s.frag[h] for h in where[0] if not s.on_gpu[h] and h not in opened)
            if reloc < removal:
                plan.relocate[id(r)] = where
                for h, n in zip(*where, strict=True):
                    delta[h] = delta.get(h, 0.0) - n
                opened.update(where[0])
                cost += reloc
                continue
        removed[r.m] += 1
        cost += removal
        if gain - cost <= EPS_GAIN:
            return None
    plan.net = gain - cost
    plan.tie = (-round(plan.net, 9), len(evict), gpus)
    return plan


def _relocate(s: _Solver, r: Rep, delta: dict[int, float], relocs: dict[int, list[int]]) -> tuple | None:
    """Where an evicted replica could go instead, given the plan's changes so far (None: nowhere)."""
    j = r.m
    if not s.multi[j]:
        for h in _relocation_targets(s, j, relocs):
            if h not in r.gpus and s.free[h] + delta.get(h, 0.0) + EPS_MIB >= s.v[j]:
                return (h,), (s.v[j],)
        return None
    group = next(grp for grp in s.groups[j] if r.gpus[0] in grp)
    free = {g: s.free[g] + delta.get(g, 0.0) for g in group}
    return s.fit_group(j, group, free, ignore=r)
