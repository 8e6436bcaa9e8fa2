"""KV cache type per replica, for models that let placement choose (`kv_cache_type = "auto"`).

Such a model carries `ModelSpec.kv_vram_mib`: what one replica needs with each type it may use, best
quality first (f16, q8_0, q4_0). `place_kv(problem)` is pure and deterministic, like `solver.place`:

1. Levels: at level i every choosing model needs its i-th type's figure (its last past the end); other
   models are unchanged. The solver runs once per level (three runs at most).
2. The level kept is the first one that no later level beats on `served` (min_replicas shortfall, demand
   coverage and replicas, less movement: the objective without the packing tie-break). So a model is
   quantized only where that fits another model or replica, never just to pack tighter.
3. Upgrade: the GPUs hold the kept level's needs. Replicas kept from `previous` keep their previous type
   while it fits (changing the type reloads the replica). The others move one type better per round
   (q4_0 -> q8_0 -> f16) while the extra MiB fit on their GPUs, in the order demand share, name, GPUs:
   q8_0 wherever it fits before f16 anywhere, since q4_0 costs far more quality than q8_0.
"""

from __future__ import annotations

from collections import Counter

from aivailable.placement.eviction import EPS_GAIN, EPS_MIB
from aivailable.placement.model import (
    KV_TYPES,
    ModelSpec,
    PlacementResult,
    Problem,
    Replica,
    default_split,
    replica_needs,
)
from aivailable.placement.objective import (
    W_COVER,
    W_MIN,
    W_MOVE,
    W_REPL,
    demand_shares,
    objective_terms,
    replica_key,
)
from aivailable.placement.solver import place


def kv_options(model: ModelSpec) -> tuple[str, ...]:
    """The KV cache types placement may give the model's replicas, best first (empty: not its choice)."""
    if not model.kv_vram_mib:
        return ()
    return tuple(t for t in KV_TYPES if t in model.kv_vram_mib)


def choosing(problem: Problem) -> list[ModelSpec]:
    """Models whose replicas' KV cache type placement picks (two or more options)."""
    return [m for m in problem.models if len(kv_options(m)) > 1]


def level_problem(problem: Problem, level: int) -> Problem:
    """`problem` with every choosing model's `vram_mib` at its `level`-th KV type (its last past the end)."""
    models = []
    for m in problem.models:
        opts = kv_options(m)
        if opts:
            m = m.model_copy(update={"vram_mib": int(m.kv_vram_mib[opts[min(level, len(opts) - 1)]])})
        models.append(m)
    return problem.model_copy(update={"models": models})


def served(problem: Problem, result: PlacementResult) -> float:
    """What a level is judged on: the objective's service terms less movement, without packing. Judge
    every level on the original `problem`, so that a replica moved costs the same at every level."""
    t = objective_terms(problem, result)
    return (W_COVER * t.coverage + W_REPL * t.replicas - W_MIN * t.shortfall
            - W_MOVE * (t.moved_mib + t.transfer_mib) / t.usable_mib)


def place_kv(problem: Problem, *, max_moves: int | None = None) -> PlacementResult:
    """Placement with a KV cache type for every replica of a choosing model (see the module docstring)."""
    models = choosing(problem)
    if not models:
        return _label_fixed(problem, place(problem, max_moves=max_moves))
    levels = max(len(kv_options(m)) for m in models)
    best = None
    for level in range(levels):
        sub = level_problem(problem, level)
        result = place(sub, max_moves=max_moves)
        score = served(problem, result)  # movement in the same MiB at every level
        if best is None or score > best[0] + EPS_GAIN:
            best = (score, level, result)
    _, level, result = best
    return upgrade(problem, result, level)


def _label_fixed(problem: Problem, result: PlacementResult) -> PlacementResult:
    """Replicas of one-option models get that option's name, so the node loads what was sized."""
    placement = dict(result.placement)
    for m in problem.models:
        opts = kv_options(m)
        if len(opts) == 1 and m.name in placement:
            placement[m.name] = tuple(Replica(r.gpus, r.split, opts[0]) for r in placement[m.name])
    return PlacementResult(placement, result.unplaced, result.unplaced_reasons, result.below_min, result.solve_ms)


def upgrade(problem: Problem, result: PlacementResult, level: int) -> PlacementResult:
    """Give each replica of a model with KV options the best type that fits, from a solve at `level`."""
    gpus = {g.id: g for g in problem.gpus}
    models = {m.name: m for m in problem.models}
    free = {g.id: float(max(g.usable_mib, 0)) for g in problem.gpus}
    chosen: dict[tuple[str, int], str] = {}
    todo = []
    for name, reps in sorted(result.placement.items()):
        m = models[name]
        opts = kv_options(m)
        for j, rep in enumerate(reps):
            kv = opts[min(level, len(opts) - 1)] if opts else rep.kv_cache_type
            for g, need in replica_needs(problem, m, Replica(rep.gpus, rep.split, kv)).items():
                free[g] -= need
            if opts:
                chosen[(name, j)] = kv
                todo.append((name, j, rep))
    shares = demand_shares(problem)
    prev_types = {name: Counter((replica_key(r, gpus), r.kv_cache_type or kv_options(models[name])[0])
                                for r in problem.previous.get(name, ()) if all(g in gpus for g in r.gpus))
                  for name in {n for n, _, _ in todo}}

    def previous_type(name: str, rep: Replica) -> str | None:
        key = replica_key(rep, gpus)
        for (k, kv), n in sorted(prev_types[name].items()):
            if k == key and n > 0:
                prev_types[name][(k, kv)] -= 1
                return kv
        return None

    kept = [(name, j, rep, previous_type(name, rep)) for name, j, rep in todo]
    order = sorted(kept, key=lambda x: (x[3] is None, -shares.get(x[0], 0.0), x[0], x[2].gpus, x[1]))

    def try_type(name: str, j: int, rep: Replica, kv: str) -> bool:
        extra = _extra(problem, models[name], rep, chosen[(name, j)], kv)
        if not all(free[g] + EPS_MIB >= x for g, x in extra.items()):
            return False
        for g, x in extra.items():
            free[g] -= x
        chosen[(name, j)] = kv
        return True

    settled = {(name, j) for name, j, rep, was in order if was is not None and try_type(name, j, rep, was)}
    changed = True
    while changed:  # one step better per round: q8_0 everywhere it fits before f16 anywhere
        changed = False
        for name, j, rep, _ in order:
            opts = kv_options(models[name])
            at = opts.index(chosen[(name, j)])
            if (name, j) not in settled and at > 0 and try_type(name, j, rep, opts[at - 1]):
                changed = True
    placement = {
        name: tuple(Replica(r.gpus, r.split, chosen.get((name, j), r.kv_cache_type)) for j, r in enumerate(reps))
        for name, reps in result.placement.items()
    }
    return PlacementResult(placement, result.unplaced, result.unplaced_reasons, result.below_min, result.solve_ms)


def _extra(problem: Problem, m: ModelSpec, rep: Replica, current: str, kv: str) -> dict[str, float]:
    """MiB more (or less, when negative) the replica takes on each GPU with `kv` instead of `current`."""
    delta = m.need_mib(kv) - m.need_mib(current)
    if len(rep.gpus) == 1:
        return {rep.gpus[0]: delta}
    split = rep.split or default_split(problem.gpu(g) for g in rep.gpus)
    return {g: f * delta for g, f in zip(rep.gpus, split, strict=True)}
