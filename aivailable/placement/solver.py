"""VRAM-aware placement: which GPUs hold which replicas of which models. Pure and deterministic.

`place(problem)` runs in three steps, all driven by the scalar objective of `objective.py`:

1. keep every replica of `previous` that is still valid (GPU present, affinity, fits, <= max_replicas);
2. repeatedly give a replica to the model first in priority: replicas up to min_replicas, then a first
   replica for models with demand, then extra replicas; within each class by value per MiB (knapsack
   greedy), the value being the objective's marginal gain. The site is the one with the best net gain:
   gain - load cost (MiB not already there, doubled off `files_on`) - cost of opening an unused GPU, then
   a node without the model (spread for availability), then best fit. When nothing fits, `eviction.py`
   frees a site by evicting replicas worth less, or relocating them. Every accepted action raises the
   objective by more than EPS_GAIN, so the loop ends; it stops when a full pass changes nothing;
3. report models that are wanted but have no replica, with the reason.

GPUs are sorted by id and models by name and every choice ends its sort key with an index, so equal
inputs give equal outputs whatever their order. The solver reads no clock: its work is bounded by
MAX_PASSES and, optionally, by `max_moves` (accepted actions after the first pass), so a loaded machine
gets the same placement as an idle one; the state is valid after every action.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import Counter
from dataclasses import dataclass

from aivailable.placement.eviction import EPS_GAIN, EPS_MIB, Plan, evicting_plan
from aivailable.placement.model import PlacementResult, Problem, Replica, default_split
from aivailable.placement.objective import (
    W_FRAG,
    W_MOVE,
    demand_shares,
    eligible,
    marginal_value,
    objective,
    objective_terms,
    replica_key,
    validate_result,
)

__all__ = ["objective", "objective_terms", "place", "validate_result"]

MAX_PASSES = 50  # deterministic bound on full passes (each pass that changes something raises the objective)


@dataclass(eq=False)
class Rep:
    """A placed replica: model index, GPU indices, MiB on each, split, whether `previous` had it, the
    load cost paid for it (refunded if it is removed again)."""

    m: int
    gpus: tuple[int, ...]
    needs: tuple[float, ...]
    split: tuple[float, ...] | None
    kept: bool
    load_cost: float


class _Solver:
    """Mutable state of one solve: free VRAM per GPU and the replicas placed so far."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.gpus = sorted(problem.gpus, key=lambda g: g.id)
        self.models = sorted(problem.models, key=lambda m: m.name)
        self.gidx = {g.id: i for i, g in enumerate(self.gpus)}
        nodes = sorted({g.node for g in self.gpus})
        self.node_idx = {n: i for i, n in enumerate(nodes)}
        self.node = [self.node_idx[g.node] for g in self.gpus]
        self.cap = [float(max(g.usable_mib, 0)) for g in self.gpus]
        self.free = list(self.cap)
        self.by_free = sorted((f, g) for g, f in enumerate(self.free))  # (free MiB, GPU), kept sorted
        self.usable = sum(self.cap) or 1.0
        self.frag = [W_FRAG * c / self.usable for c in self.cap]
        self.oh = float(problem.split_overhead_mib)
        shares = demand_shares(problem)
        self.share = [shares[m.name] for m in self.models]
        self.want_min = [m.want_min for m in self.models]
        self.rmax = [m.max_replicas for m in self.models]
        self.v = [float(m.vram_mib) for m in self.models]
        self.elig: list[list[int]] = []
        self.emask: list[bytearray] = []
        self.multi: list[bool] = []
        self.groups: list[list[list[int]]] = []
        self.load: list[list[float]] = []
        for mi, m in enumerate(self.models):
            el = [i for i, g in enumerate(self.gpus) if self.cap[i] > 0 and eligible(g, m)]
            self.elig.append(el)
            mask = bytearray(len(self.gpus))
            for i in el:
                mask[i] = 1
            self.emask.append(mask)
            multi = bool(el) and self.v[mi] > max(self.cap[i] for i in el) + EPS_MIB
            self.multi.append(multi)
            by_group: dict[tuple[int, str], list[int]] = {}
            if multi:
                for i in el:
                    by_group.setdefault((self.node[i], self.gpus[i].vendor.lower()), []).append(i)
            self.groups.append(
                [
                    gs
                    for _, gs in sorted(by_group.items())
                    if sum(self.cap[i] - self.oh for i in gs) >= self.v[mi]
                ]
            )
            base = W_MOVE * self.v[mi] / self.usable
            files = None if m.files_on is None else set(m.files_on)
            self.load.append([base if files is None or n in files else 2 * base for n in nodes])
        self.min_load = [min(costs, default=0.0) for costs in self.load]
        self.max_load = [max(costs, default=0.0) for costs in self.load]
        self.on_gpu: list[dict[int, Rep]] = [{} for _ in self.gpus]
        self.node_count: list[Counter[int]] = [Counter() for _ in self.models]
        self.reps: list[list[Rep]] = [[] for _ in self.models]
        gpu_by_id = {g.id: g for g in self.gpus}
        self.prev_avail: list[Counter] = [
            Counter(replica_key(r, gpu_by_id) for r in problem.previous.get(m.name, ())) for m in self.models
        ]

    # -- values ---------------------------------------------------------------------------------------
    def gain(self, m: int) -> float:
        """Objective gain of the model's next replica (-inf at max_replicas)."""
        r = len(self.reps[m])
        return -math.inf if r >= self.rmax[m] else marginal_value(self.share[m], self.want_min[m], r + 1)

    def priority(self, m: int) -> tuple[int, float]:
        """Heap order: replicas up to min_replicas, then first replicas, then extra replicas; within each,
        by value per MiB (a knapsack greedy: VRAM is what they compete for)."""
        r = len(self.reps[m])
        if r < self.want_min[m]:
            return (0, -self.gain(m))
        return (1 if r == 0 else 2, -self.gain(m) / self.v[m])

    def loss(self, m: int, already: int = 0) -> float:
        """Objective lost by removing one more replica after `already` were removed in the same plan."""
        return marginal_value(self.share[m], self.want_min[m], len(self.reps[m]) - already)

    def _key(self, gpus: tuple[int, ...], needs: tuple[float, ...], m: int) -> tuple:
        if len(gpus) == 1:
            return ((self.gpus[gpus[0]].id, 1.0),)
        total = self.v[m]
        return tuple(
            sorted(
                (self.gpus[g].id, round((n - self.oh) / total, 6)) for g, n in zip(gpus, needs, strict=True)
            )
        )

    def load_cost(self, m: int, gpus: tuple[int, ...], needs: tuple[float, ...]) -> float:
        """Movement cost of loading this replica (0 when `previous` has it there and it is not used yet)."""
        if self.prev_avail[m] and self.prev_avail[m][self._key(gpus, needs, m)] > 0:
            return 0.0
        return self.load[m][self.node[gpus[0]]]

    # -- mutations ------------------------------------------------------------------------------------
    def add(
        self, m: int, gpus: tuple[int, ...], needs: tuple[float, ...], split: tuple[float, ...] | None = None
    ) -> Rep:
        key = self._key(gpus, needs, m)
        kept = self.prev_avail[m][key] > 0
        cost = 0.0 if kept else self.load[m][self.node[gpus[0]]]
        if kept:
            self.prev_avail[m][key] -= 1
        if split is None and len(gpus) > 1:
            split = tuple((n - self.oh) / self.v[m] for n in needs)
        rep = Rep(m, gpus, needs, split, kept, cost)
        for g, n in zip(gpus, needs, strict=True):
            self._set_free(g, self.free[g] - n)
            self.on_gpu[g][m] = rep
        self.node_count[m][self.node[gpus[0]]] += 1
        self.reps[m].append(rep)
        return rep

    def remove(self, rep: Rep) -> None:
        for g, n in zip(rep.gpus, rep.needs, strict=True):
            self._set_free(g, self.free[g] + n)
            del self.on_gpu[g][rep.m]
        self.node_count[rep.m][self.node[rep.gpus[0]]] -= 1
        self.reps[rep.m].remove(rep)
        if rep.kept:
            self.prev_avail[rep.m][self._key(rep.gpus, rep.needs, rep.m)] += 1

    # -- step 1: keep previous ------------------------------------------------------------------------
    def keep_previous(self) -> None:
        order = sorted(range(len(self.models)), key=lambda m: (-self.want_min[m], -self.share[m], m))
        for m in order:
            model = self.models[m]
            for rep in self.problem.previous.get(model.name, ()):
                if len(self.reps[m]) >= self.rmax[m]:
                    break
                if any(g not in self.gidx for g in rep.gpus):
                    continue
                gpus = tuple(self.gidx[g] for g in rep.gpus)
                if any(m in self.on_gpu[g] or not eligible(self.gpus[g], model) for g in gpus):
                    continue
                if len(gpus) == 1:
                    needs, split = (self.v[m],), None
                else:
                    split = rep.split or default_split(self.gpus[g] for g in gpus)
                    needs = tuple(f * self.v[m] + self.oh for f in split)
                if all(self.free[g] + EPS_MIB >= n for g, n in zip(gpus, needs, strict=True)):
                    self.add(m, gpus, needs, split)

    # -- step 2: planning -----------------------------------------------------------------------------
    def fit_group(
        self, m: int, gpus: list[int], free: dict[int, float], ignore: Rep | None = None
    ) -> tuple | None:
        """Fewest GPUs of one node (largest free first) that hold the model; None if they cannot.
        `ignore`: a replica of the model about to be removed (its GPUs count as free of the model)."""
        order = sorted(
            (g for g in gpus if self.on_gpu[g].get(m, ignore) is ignore and free[g] > self.oh),
            key=lambda g: (-free[g], g),
        )
        chosen, parts, left = [], [], self.v[m]
        for g in order:
            part = min(free[g] - self.oh, left)
            chosen.append(g)
            parts.append(part)
            left -= part
            if left <= EPS_MIB:
                break
        if left > EPS_MIB or len(chosen) < 2:
            return None
        parts[-1] += left  # absorb float dust so the parts sum to vram exactly
        pairs = sorted(zip(chosen, parts, strict=True))
        return tuple(g for g, _ in pairs), tuple(p + self.oh for _, p in pairs)

    def open_cost(self, gpus: tuple[int, ...]) -> float:
        return sum(self.frag[g] for g in gpus if not self.on_gpu[g])

    def best_plan(self, m: int) -> Plan | None:
        """The best site for the model's next replica, freeing room by eviction if needed."""
        gain = self.gain(m)
        if gain <= EPS_GAIN:
            return None
        best: Plan | None = None
        v = self.v[m]
        if not self.multi[m]:
            site = self._best_single(m)
            if site is not None:
                cost, _, left, g = site
                best = Plan(gain - cost, (cost, left, g), (g,), (v,))
        else:
            for group in self.groups[m]:
                fit = self.fit_group(m, group, {g: self.free[g] for g in group})
                if fit is None:
                    continue
                gpus, needs = fit
                net = gain - self.load_cost(m, gpus, needs) - self.open_cost(gpus)
                tie = (-net, len(gpus), sum(self.free[g] for g in gpus) - sum(needs), gpus)
                if best is None or tie < best.tie:
                    best = Plan(net, tie, gpus, needs)
        if best is not None:
            return best if best.net > EPS_GAIN else None
        return evicting_plan(self, m, gain)

    def _best_single(self, m: int) -> tuple[float, bool, float, int] | None:
        """Cheapest GPU with room for the model: key (cost, node already has it, leftover MiB, index).

        Scans GPUs in increasing free VRAM (best fit first) and stops at the first one that cannot be
        beaten: cheapest possible cost on a node without the model."""
        v = self.v[m]
        load, node, frag, on_gpu = self.load[m], self.node, self.frag, self.on_gpu
        prev = self.prev_avail[m] if +self.prev_avail[m] else None
        counts = self.node_count[m]
        cmin = 0.0 if prev else min(load)
        if len(self.elig[m]) * 4 < len(self.gpus):
            scan = sorted((self.free[g], g) for g in self.elig[m] if self.free[g] + EPS_MIB >= v)
        else:
            scan = itertools.islice(self.by_free, bisect.bisect_left(self.by_free, (v - EPS_MIB, -1)), None)
        emask = self.emask[m]
        best = None
        for f, g in scan:
            og = on_gpu[g]
            if not emask[g] or m in og:
                continue
            c = load[node[g]]
            if prev is not None and prev.get(((self.gpus[g].id, 1.0),), 0) > 0:
                c = 0.0
            if not og:
                c += frag[g]
            key = (c, counts.get(node[g], 0) > 0, f - v, g)
            if best is None or key < best:
                best = key
                if c <= cmin and not key[1]:
                    break
        return best

    def _set_free(self, g: int, value: float) -> None:
        i = bisect.bisect_left(self.by_free, (self.free[g], g))
        del self.by_free[i]
        self.free[g] = value
        bisect.insort(self.by_free, (value, g))

    def apply(self, m: int, plan: Plan) -> set[int]:
        """Carry out a plan; return the models whose replica count changed."""
        changed = {m}
        for r in plan.evict:
            self.remove(r)
        self.add(m, plan.gpus, plan.needs)
        for r in plan.evict:
            where = plan.relocate.get(id(r))
            if where is None:
                changed.add(r.m)
            else:
                self.add(r.m, *where)
        return changed

    def fill(self, max_moves: int | None) -> None:
        """Give replicas by priority until a full pass changes nothing. The first pass always completes
        (it builds the placement); `max_moves`, if given, stops the improving passes after it once they
        have accepted that many actions."""
        n_models = len(self.models)
        moves = 0
        for i in range(MAX_PASSES):
            changed_any = False
            heap = [(self.priority(m), m) for m in range(n_models) if self.gain(m) > EPS_GAIN]
            heapq.heapify(heap)
            while heap:
                prio, m = heapq.heappop(heap)
                if prio != self.priority(m):
                    continue
                plan = self.best_plan(m)
                if plan is None:
                    continue
                changed_any = True
                moves += i > 0
                for j in self.apply(m, plan):
                    if self.gain(j) > EPS_GAIN:
                        heapq.heappush(heap, (self.priority(j), j))
            if not changed_any or (max_moves is not None and moves >= max_moves):
                return

    # -- step 3: result -------------------------------------------------------------------------------
    def result(self, solve_ms: float) -> PlacementResult:
        placement: dict[str, tuple[Replica, ...]] = {}
        unplaced: list[str] = []
        reasons: dict[str, str] = {}
        below: dict[str, str] = {}
        for m, model in enumerate(self.models):
            reps = sorted(
                (Replica(tuple(self.gpus[g].id for g in r.gpus), r.split) for r in self.reps[m]),
                key=lambda r: r.gpus,
            )
            if reps:
                placement[model.name] = tuple(reps)
            wanted = self.rmax[m] > 0 and (self.share[m] > 0 or self.want_min[m] > 0)
            if wanted and not reps:
                unplaced.append(model.name)
                reasons[model.name] = self._reason(m)
            elif 0 < len(reps) < self.want_min[m]:
                below[model.name] = f"only {len(reps)} of min {self.want_min[m]} replicas fit"
        return PlacementResult(placement, tuple(unplaced), reasons, below, solve_ms)

    def _reason(self, m: int) -> str:
        v = int(self.v[m])
        if not self.elig[m]:
            return "no GPU matches its affinity" if self.models[m].affinity else "no GPU with usable VRAM"
        if self.multi[m] and not self.groups[m]:
            single = int(max(self.cap[g] for g in self.elig[m]))
            by_node: Counter[tuple[int, str]] = Counter()
            for g in self.elig[m]:
                by_node[(self.node[g], self.gpus[g].vendor.lower())] += int(self.cap[g] - self.oh)
            return (
                f"needs {v} MiB: more than any eligible GPU ({single} MiB usable) and any node's "
                f"GPUs of one vendor together ({max(by_node.values())} MiB)"
            )
        return f"no room: the GPUs that could hold its {v} MiB are taken by models with more demand"


def place(problem: Problem, *, max_moves: int | None = None) -> PlacementResult:
    """Decide the placement for `problem`; pure and deterministic (see the module docstring).

    `max_moves` (None: up to MAX_PASSES passes) caps the actions the improving passes may take; the result
    is valid either way. `solve_ms` is left 0: callers that report it time the call (no clock in here)."""
    solver = _Solver(problem)
    solver.keep_previous()
    solver.fill(max_moves)
    return solver.result(0.0)
