"""The placement objective (one scalar, shared by the solver, the baselines and the ILP) and the checker.

Objective, higher is better, in the issue's order of priority:

    objective = W_COVER * coverage + W_REPL * replicas - W_MOVE * (moved + transfer) / usable
                - W_FRAG * fragmentation - W_MIN * shortfall

- coverage = sum over models of share_m * [r_m >= 1], share_m = demand_m / total demand.  In [0, 1].
  Demand served (primary metric) is exactly this: the fraction of requests/s whose model has a replica.
- replicas = sum share_m * (1/2 + 1/3 + ... + 1/r_m): the k-th replica is worth share/k (Jefferson/D'Hondt),
  so greedily adding the best next replica gives replica counts proportional to demand, up to max_replicas.
- moved = MiB of replicas that are not in `previous` (each is a load); transfer = MiB of those loaded on a
  node outside the model's `files_on` (the file must be copied first). usable = total usable VRAM.
- fragmentation = usable VRAM of GPUs holding anything / usable: prefer filling used (and small) GPUs,
  keeping whole large cards free for large models.
- shortfall = replicas missing to reach min_replicas (pinned counts as min 1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from aivailable.placement.model import (
    Gpu,
    ModelSpec,
    PlacementResult,
    Problem,
    Replica,
    default_split,
)

W_MIN = 1e6  # per replica below min_replicas: dominates everything (min_replicas is a hard constraint)
W_COVER = 1e3  # serving a model: 1000 x its demand share, far above any number of extra replicas
W_REPL = 1.0  # the k-th replica of a model with demand share s is worth s / k
W_MOVE = 0.03  # reloading all of the cluster's VRAM costs 0.03: a load must buy a real replica gain
W_FRAG = 1e-3  # tie-breaker: opening a GPU costs its share of the cluster's usable VRAM
VRAM_TOLERANCE_MIB = 1e-2  # a GPU may be over by this much (float splits); the solver keeps 1e-6


@dataclass(frozen=True)
class ObjectiveTerms:
    """The parts of the objective, each in its own unit."""

    coverage: float
    replicas: float
    moved_mib: float
    transfer_mib: float
    fragmentation: float
    shortfall: int
    usable_mib: float

    @property
    def value(self) -> float:
        """The scalar objective."""
        return (
            W_COVER * self.coverage
            + W_REPL * self.replicas
            - W_MOVE * (self.moved_mib + self.transfer_mib) / self.usable_mib
            - W_FRAG * self.fragmentation
            - W_MIN * self.shortfall
        )


def demand_shares(problem: Problem) -> dict[str, float]:
    """Each catalog model's share of the total demand (all 0 when there is no demand)."""
    total = sum(problem.demand.get(m.name, 0.0) for m in problem.models)
    if total <= 0:
        return {m.name: 0.0 for m in problem.models}
    return {m.name: problem.demand.get(m.name, 0.0) / total for m in problem.models}


def marginal_value(share: float, want_min: int, k: int) -> float:
    """Objective gain of a model's k-th replica (k >= 1), not counting movement or fragmentation."""
    value = W_MIN if k <= want_min else 0.0
    return value + (W_COVER * share if k == 1 else W_REPL * share / k)


def replica_key(rep: Replica, gpus: Mapping[str, Gpu]) -> tuple[tuple[str, float], ...]:
    """Identity of a replica for movement: its GPUs with their split (rounded), order-free."""
    if len(rep.gpus) == 1:
        return ((rep.gpus[0], 1.0),)
    split = rep.split or default_split(gpus[g] for g in rep.gpus)
    return tuple(sorted((g, round(f, 6)) for g, f in zip(rep.gpus, split, strict=True)))


def wanted(problem: Problem) -> set[str]:
    """Models that should have a replica: demand > 0, pinned, or min_replicas > 0 (and max > 0)."""
    return {
        m.name
        for m in problem.models
        if m.max_replicas > 0 and (problem.demand.get(m.name, 0.0) > 0 or m.want_min > 0)
    }


def needs_per_gpu(
    problem: Problem, model: ModelSpec, rep: Replica, gpus: Mapping[str, Gpu]
) -> dict[str, float]:
    """MiB the replica takes on each GPU (same rule as `model.replica_needs`, with a prebuilt index)."""
    need = model.need_mib(rep.kv_cache_type)
    if len(rep.gpus) == 1:
        return {rep.gpus[0]: need}
    split = rep.split or default_split(gpus[g] for g in rep.gpus)
    return {g: f * need + problem.split_overhead_mib for g, f in zip(rep.gpus, split, strict=True)}


def objective_terms(problem: Problem, result: PlacementResult) -> ObjectiveTerms:
    """Compute every term of the objective for `result` (movement relative to `problem.previous`)."""
    gpus = {g.id: g for g in problem.gpus}
    shares = demand_shares(problem)
    usable = float(sum(max(g.usable_mib, 0) for g in problem.gpus)) or 1.0
    coverage = replicas = moved = transfer = 0.0
    shortfall = 0
    used: set[str] = set()
    for m in problem.models:
        reps = result.placement.get(m.name, ())
        r = len(reps)
        s = shares[m.name]
        coverage += s if r >= 1 else 0.0
        replicas += s * sum(1.0 / k for k in range(2, r + 1))
        shortfall += max(0, m.want_min - r)
        before = Counter(replica_key(p, gpus) for p in problem.previous.get(m.name, ()) if _known(p, gpus))
        for rep in reps:
            if not _known(rep, gpus):
                continue
            used.update(rep.gpus)
            key = replica_key(rep, gpus)
            if before[key] > 0:
                before[key] -= 1
                continue
            moved += m.vram_mib
            if m.files_on is not None and gpus[rep.gpus[0]].node not in m.files_on:
                transfer += m.vram_mib
    frag = sum(max(gpus[g].usable_mib, 0) for g in used) / usable
    return ObjectiveTerms(coverage, replicas, moved, transfer, frag, shortfall, usable)


def objective(problem: Problem, result: PlacementResult) -> float:
    """The scalar objective of a placement (higher is better); see the module docstring."""
    return objective_terms(problem, result).value


def _known(rep: Replica, gpus: Mapping[str, Gpu]) -> bool:
    return bool(rep.gpus) and all(g in gpus for g in rep.gpus)


def eligible(gpu: Gpu, model: ModelSpec) -> bool:
    """Whether the model's affinity allows this GPU (vendors and GPU names compare case-insensitively)."""
    a = model.affinity
    if a is None:
        return True
    if a.nodes is not None and gpu.node not in a.nodes:
        return False
    if a.vendors is not None and gpu.vendor.lower() not in {v.lower() for v in a.vendors}:
        return False
    return a.gpu_names is None or gpu.name.lower() in {n.lower() for n in a.gpu_names}


def validate_result(problem: Problem, result: PlacementResult) -> list[str]:
    """Every hard-constraint violation of `result` for `problem`, as readable lines (empty: valid)."""
    errors: list[str] = []
    gpus = {g.id: g for g in problem.gpus}
    models = {m.name: m for m in problem.models}
    load: dict[str, float] = {g: 0.0 for g in gpus}
    for name, reps in sorted(result.placement.items()):
        model = models.get(name)
        if model is None:
            errors.append(f"{name}: not in the catalog")
            continue
        if len(reps) > model.max_replicas:
            errors.append(f"{name}: {len(reps)} replicas > max_replicas {model.max_replicas}")
        for j, rep in enumerate(reps):
            where = f"{name}[{j}]"
            if not rep.gpus:
                errors.append(f"{where}: no GPUs")
                continue
            unknown = [g for g in rep.gpus if g not in gpus]
            if unknown:
                errors.append(f"{where}: unknown GPUs {unknown}")
                continue
            if len(set(rep.gpus)) != len(rep.gpus):
                errors.append(f"{where}: a GPU listed twice")
            if len({gpus[g].node for g in rep.gpus}) > 1:
                errors.append(f"{where}: spans nodes")
            if len({gpus[g].vendor.lower() for g in rep.gpus}) > 1:
                errors.append(f"{where}: mixes vendors")
            if any(not eligible(gpus[g], model) for g in rep.gpus):
                errors.append(f"{where}: outside the model's affinity")
            if rep.split is not None and (
                len(rep.split) != len(rep.gpus) or abs(sum(rep.split) - 1) > 1e-6 or min(rep.split) <= 0
            ):
                errors.append(f"{where}: bad split {rep.split}")
                continue
            for g, need in needs_per_gpu(problem, model, rep, gpus).items():
                load[g] += need
    for gid, used in load.items():
        cap = gpus[gid].usable_mib
        if used > cap + VRAM_TOLERANCE_MIB:
            errors.append(f"GPU {gid}: {used:.1f} MiB placed > usable {cap} MiB")
    want = wanted(problem)
    missing = sorted(n for n in want if not result.placement.get(n))
    if sorted(result.unplaced) != missing:
        errors.append(f"unplaced is {sorted(result.unplaced)}, expected {missing}")
    if set(result.unplaced_reasons) != set(result.unplaced):
        errors.append("unplaced_reasons must give a reason for each unplaced model, and only for them")
    for m in problem.models:
        r = len(result.placement.get(m.name, ()))
        if 0 < r < m.want_min and m.name not in result.below_min:
            errors.append(f"{m.name}: {r} replicas < min {m.want_min} without a reason in below_min")
    return errors
