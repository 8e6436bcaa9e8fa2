"""Baseline placement policies, for benchmarks and tests only (the node uses `solver.place`).

- `static`: one model per GPU, as an admin hand-assigns Ollama instances behind a load balancer: models by
  demand to the smallest empty GPU that fits; `static_fill` then gives spare GPUs extra replicas by demand.
- `first_fit` / `spread`: GPUStack-style binpack / spread: each replica goes to the first GPU (by id) with
  room, or to the GPU with the most free VRAM. Neither evicts.
- `per_node_lru`: Ollama-style: requests (drawn from demand, seeded) reach nodes round-robin; a node loads
  the requested model on its GPU with the most free VRAM, evicting its least recently used models first.
- `optimum`: the same objective as the solver, as an ILP for `scipy.optimize.milp` (scipy imported lazily).

All of them keep the still-valid replicas of `previous` first (an admin or GPUStack does not move running
instances), and never exceed VRAM, max_replicas, affinity or one node per replica.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from aivailable.placement.model import Gpu, ModelSpec, PlacementResult, Problem, Replica, default_split
from aivailable.placement.objective import demand_shares, eligible, wanted

__all__ = ["first_fit", "optimum", "per_node_lru", "spread", "static", "static_fill"]


@dataclass
class _State:
    """Free VRAM and replicas while a baseline builds its placement."""

    problem: Problem
    gpus: dict[str, Gpu] = field(init=False)
    free: dict[str, float] = field(init=False)
    holds: dict[str, set[str]] = field(init=False)
    placement: dict[str, list[Replica]] = field(init=False)

    def __post_init__(self) -> None:
        self.gpus = {g.id: g for g in sorted(self.problem.gpus, key=lambda g: g.id)}
        self.free = {g: float(x.usable_mib) for g, x in self.gpus.items()}
        self.holds = {g: set() for g in self.gpus}
        self.placement = {}

    def needs(self, model: ModelSpec, gpus: tuple[str, ...], split: tuple[float, ...] | None) -> list[float]:
        if len(gpus) == 1:
            return [float(model.vram_mib)]
        split = split or default_split(self.gpus[g] for g in gpus)
        return [f * model.vram_mib + self.problem.split_overhead_mib for f in split]

    def fits(self, model: ModelSpec, gpus: tuple[str, ...], split: tuple[float, ...] | None = None) -> bool:
        return all(
            model.name not in self.holds[g] and eligible(self.gpus[g], model) and self.free[g] + 1e-6 >= n
            for g, n in zip(gpus, self.needs(model, gpus, split), strict=True)
        )

    def add(self, model: ModelSpec, gpus: tuple[str, ...], split: tuple[float, ...] | None = None) -> None:
        if len(gpus) > 1 and split is None:
            split = default_split(self.gpus[g] for g in gpus)
        for g, n in zip(gpus, self.needs(model, gpus, split), strict=True):
            self.free[g] -= n
            self.holds[g].add(model.name)
        self.placement.setdefault(model.name, []).append(Replica(gpus, split if len(gpus) > 1 else None))

    def remove(self, model: ModelSpec, rep: Replica) -> None:
        for g, n in zip(rep.gpus, self.needs(model, rep.gpus, rep.split), strict=True):
            self.free[g] += n
            self.holds[g].discard(model.name)
        self.placement[model.name].remove(rep)
        if not self.placement[model.name]:
            del self.placement[model.name]

    def count(self, name: str) -> int:
        return len(self.placement.get(name, ()))

    def keep_previous(self, one_model_per_gpu: bool = False) -> None:
        for model in sorted(self.problem.models, key=lambda m: m.name):
            for rep in self.problem.previous.get(model.name, ()):
                if self.count(model.name) >= model.max_replicas or any(g not in self.gpus for g in rep.gpus):
                    continue
                if one_model_per_gpu and any(self.holds[g] for g in rep.gpus):
                    continue
                if self.fits(model, rep.gpus, rep.split):
                    self.add(model, rep.gpus, rep.split)

    def groups(self, model: ModelSpec) -> list[list[str]]:
        """Eligible GPUs of one node and vendor, for a model that needs several GPUs."""
        out: dict[tuple[str, str], list[str]] = {}
        for g, gpu in self.gpus.items():
            if eligible(gpu, model) and gpu.usable_mib > 0:
                out.setdefault((gpu.node, gpu.vendor.lower()), []).append(g)
        return [v for _, v in sorted(out.items())]

    def result(self) -> PlacementResult:
        placement = {n: tuple(sorted(r, key=lambda x: x.gpus)) for n, r in sorted(self.placement.items())}
        missing = sorted(n for n in wanted(self.problem) if n not in placement)
        below = {
            m.name: "baseline placed fewer than min_replicas"
            for m in self.problem.models
            if 0 < len(placement.get(m.name, ())) < m.want_min
        }
        reasons = dict.fromkeys(missing, "not placed by this baseline")
        return PlacementResult(placement, tuple(missing), reasons, below, 0.0)


def _single_capable(state: _State, model: ModelSpec) -> bool:
    return any(eligible(g, model) and g.usable_mib >= model.vram_mib for g in state.gpus.values())


def _multi_site(state: _State, model: ModelSpec, empty_only: bool) -> tuple[str, ...] | None:
    """Fewest GPUs of one node (largest free first) that hold the model with the default split."""
    for group in state.groups(model):
        cands = sorted(
            (g for g in group if not (empty_only and state.holds[g])), key=lambda g: (-state.free[g], g)
        )
        for k in range(2, len(cands) + 1):
            site = tuple(sorted(cands[:k]))
            if state.fits(model, site):
                return site
    return None


def _requests(problem: Problem, extras: bool = True) -> list[ModelSpec]:
    """Replica requests in the order an operator would make them: wanted models by demand, then (if
    `extras`) extra replicas in D'Hondt order (demand / k), up to max_replicas."""
    shares = demand_shares(problem)
    want = wanted(problem)
    models = sorted(
        (m for m in problem.models if m.name in want), key=lambda m: (-m.want_min, -shares[m.name], m.name)
    )
    out = list(models)
    for m in models:
        out += [m] * max(0, m.want_min - 1)
    if not extras:
        return out
    more = [
        (-shares[m.name] / k, m.name, k, m)
        for m in models
        if shares[m.name] > 0
        for k in range(max(2, m.want_min + 1), m.max_replicas + 1)
    ]
    return out + [m for *_, m in sorted(more, key=lambda e: e[:3])]


def _fill(
    problem: Problem,
    choose: Callable[[_State, ModelSpec], tuple[str, ...] | None],
    one_model_per_gpu: bool = False,
    extras: bool = True,
) -> PlacementResult:
    state = _State(problem)
    state.keep_previous(one_model_per_gpu)
    budget = {m.name: m.max_replicas - state.count(m.name) for m in problem.models}
    have = {m.name: state.count(m.name) for m in problem.models}
    for model in _requests(problem, extras):
        if have[model.name] > 0:  # the previous placement already covers this request
            have[model.name] -= 1
            continue
        if budget[model.name] <= 0:
            continue
        site = choose(state, model)
        if site is not None:
            state.add(model, site)
            budget[model.name] -= 1
    return state.result()


def _static_choice(state: _State, model: ModelSpec) -> tuple[str, ...] | None:
    if not _single_capable(state, model):
        return _multi_site(state, model, empty_only=True)
    empty = [g for g in state.gpus if not state.holds[g] and state.fits(model, (g,))]
    return (min(empty, key=lambda g: (state.gpus[g].usable_mib, g)),) if empty else None


def _first_fit_choice(state: _State, model: ModelSpec) -> tuple[str, ...] | None:
    if not _single_capable(state, model):
        return _multi_site(state, model, empty_only=False)
    return next(((g,) for g in state.gpus if state.fits(model, (g,))), None)


def _spread_choice(state: _State, model: ModelSpec) -> tuple[str, ...] | None:
    if not _single_capable(state, model):
        return _multi_site(state, model, empty_only=False)
    ok = [g for g in state.gpus if state.fits(model, (g,))]
    return (min(ok, key=lambda g: (-state.free[g], g)),) if ok else None


def static(problem: Problem, *, fill_spare: bool = False) -> PlacementResult:
    """One model per GPU: by demand to the smallest empty GPU that fits (several GPUs of one node for a
    model no GPU holds). With `fill_spare`, GPUs left empty then get extra replicas by demand."""
    return _fill(problem, _static_choice, one_model_per_gpu=True, extras=fill_spare)


def static_fill(problem: Problem) -> PlacementResult:
    """`static` with spare GPUs given extra replicas (a stronger static baseline)."""
    return static(problem, fill_spare=True)


def first_fit(problem: Problem) -> PlacementResult:
    """Each requested replica on the first GPU (by id) with room (GPUStack binpack-like)."""
    return _fill(problem, _first_fit_choice)


def spread(problem: Problem) -> PlacementResult:
    """Each requested replica on the GPU with the most free VRAM (GPUStack spread-like)."""
    return _fill(problem, _spread_choice)


def per_node_lru(problem: Problem, *, requests: int | None = None, seed: int = 0) -> PlacementResult:
    """Ollama-style nodes behind a round-robin load balancer, each evicting its least recently used model.

    `requests` (default 40 per node) are drawn from the demand with `random.Random(seed)`. A request for a
    model at max_replicas goes to a node that has it. A node loads the model on its GPU with the most free
    VRAM (or its GPUs together when no single one can hold it), evicting LRU models of that node until it
    fits; a model that does not fit the node even when empty is refused (never run on the CPU).
    """
    state = _State(problem)
    state.keep_previous()
    models = {m.name: m for m in problem.models}
    nodes = sorted({g.node for g in problem.gpus})
    recency: dict[tuple[str, str], int] = {}  # (node, model) -> last use tick
    for name, reps in sorted(state.placement.items()):
        for rep in reps:
            recency[(state.gpus[rep.gpus[0]].node, name)] = 0
    names = sorted(n for n, d in problem.demand.items() if d > 0)
    if not names or not nodes:
        return state.result()
    rng = random.Random(seed)
    draws = rng.choices(names, weights=[problem.demand[n] for n in names], k=requests or 40 * len(nodes))
    for tick, name in enumerate(draws, start=1):
        model = models[name]
        node = nodes[tick % len(nodes)]
        if model.max_replicas == 0:
            continue
        if (node, name) not in recency and state.count(name) >= model.max_replicas:
            node = min(n for n, m in recency if m == name)
        if (node, name) not in recency:
            _lru_load(state, model, node, recency)
        if (node, name) in recency:
            recency[(node, name)] = tick
    return state.result()


def _lru_load(state: _State, model: ModelSpec, node: str, recency: dict[tuple[str, str], int]) -> None:
    gpus = sorted(g for g, x in state.gpus.items() if x.node == node and eligible(x, model))
    single = any(state.gpus[g].usable_mib >= model.vram_mib for g in gpus)
    by_vendor: dict[str, list[str]] = {}
    for g in gpus:
        by_vendor.setdefault(state.gpus[g].vendor.lower(), []).append(g)
    groups = [
        tuple(v)
        for _, v in sorted(by_vendor.items())
        if len(v) > 1 and sum(state.gpus[g].usable_mib for g in v) >= model.vram_mib
    ]
    if not single and not groups:
        return
    while True:
        if single:
            ok = [g for g in gpus if state.fits(model, (g,))]
            site = (min(ok, key=lambda g: (-state.free[g], g)),) if ok else None
        else:
            site = next((grp for grp in groups if state.fits(model, grp)), None)
        if site is not None:
            state.add(model, site)
            recency[(node, model.name)] = 0
            return
        loaded = sorted((t, n) for (nd, n), t in recency.items() if nd == node)
        if not loaded:
            return
        _, victim = loaded[0]
        vmodel = state.problem.model(victim)
        rep = next(r for r in state.placement[victim] if state.gpus[r.gpus[0]].node == node)
        state.remove(vmodel, rep)
        del recency[(node, victim)]


def optimum(
    problem: Problem, *, time_limit_s: float = 20.0, require_optimal: bool = True, max_variables: int = 20000
) -> PlacementResult | None:
    """The ILP optimum of `objective.objective` with scipy.optimize.milp (HiGHS); see `ilp.py`.

    None when the model is too large, or (with `require_optimal`) not proven optimal within the time limit.
    """
    from aivailable.placement.ilp import solve_ilp

    return solve_ilp(
        problem, time_limit_s=time_limit_s, require_optimal=require_optimal, max_variables=max_variables
    )
