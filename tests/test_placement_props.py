"""Property tests of the placement solver over random clusters, catalogs, demands and previous placements."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aivailable.placement import (
    Affinity,
    Gpu,
    ModelSpec,
    PlacementResult,
    Problem,
    Replica,
    objective,
    place,
    validate_result,
)
from aivailable.placement.baselines import first_fit, optimum, spread
from aivailable.placement.model import replica_needs
from aivailable.placement.objective import VRAM_TOLERANCE_MIB, wanted

PROFILE = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VRAMS = [0, 4096, 8192, 11264, 16384, 24576, 32768]
SIZES = [300, 900, 2500, 4000, 6000, 9000, 15000, 21000, 30000, 44000]


@st.composite
def problems(draw, max_nodes: int = 4, max_gpus: int = 3, max_models: int = 7) -> Problem:
    """A random cluster (nodes of 1-3 GPUs, two vendors), catalog, demand and split overhead."""
    gpus = []
    for n in range(draw(st.integers(1, max_nodes))):
        for i in range(draw(st.integers(1, max_gpus))):
            vram = draw(st.sampled_from(VRAMS))
            gpus.append(
                Gpu(
                    id=f"n{n}/{i}",
                    node=f"n{n}",
                    vendor=draw(st.sampled_from(["nvidia", "nvidia", "amd"])),
                    name=draw(st.sampled_from(["P40", "T4", "MI50"])),
                    vram_mib=vram,
                    reserved_mib=draw(st.sampled_from([0, 300])) if vram else 0,
                )
            )
    nodes = sorted({g.node for g in gpus})
    models = []
    for j in range(draw(st.integers(1, max_models))):
        lo = draw(st.integers(0, 1))
        hi = draw(st.integers(max(lo, 1), 4))
        affinity = draw(
            st.sampled_from(
                [
                    None,
                    None,
                    None,
                    Affinity(vendors=["amd"]),
                    Affinity(nodes=nodes[:1]),
                    Affinity(gpu_names=["t4", "P40"]),
                ]
            )
        )
        models.append(
            ModelSpec(
                name=f"m{j}",
                vram_mib=draw(st.sampled_from(SIZES)),
                min_replicas=lo,
                max_replicas=hi,
                pinned=draw(st.booleans()) and lo == 0,
                affinity=affinity,
                files_on=draw(st.sampled_from([None, None, nodes[-1:]])),
            )
        )
    demand = {
        m.name: draw(st.sampled_from([0.0, 0.1, 1.0, 2.5, 7.0, 30.0])) for m in models if draw(st.booleans())
    }
    return Problem(
        gpus=gpus, models=models, demand=demand, split_overhead_mib=draw(st.sampled_from([0, 256]))
    )


def with_previous(p: Problem, placement) -> Problem:
    return p.model_copy(update={"previous": {n: list(r) for n, r in placement.items()}})


@PROFILE
@given(problems())
def test_constraints_hold_and_unplaced_is_exactly_the_wanted_without_replicas(p):
    r = place(p)
    assert validate_result(p, r) == []
    # spelled out, independently of validate_result
    load = {g.id: 0.0 for g in p.gpus}
    gpus = {g.id: g for g in p.gpus}
    for name, reps in r.placement.items():
        model = p.model(name)
        assert 1 <= len(reps) <= model.max_replicas
        for rep in reps:
            assert len({gpus[g].node for g in rep.gpus}) == 1
            assert len({gpus[g].vendor for g in rep.gpus}) == 1
            for g, need in replica_needs(p, model, rep).items():
                load[g] += need
    assert all(load[g] <= gpus[g].usable_mib + VRAM_TOLERANCE_MIB for g in load)
    assert set(r.unplaced) == {n for n in wanted(p) if not r.placement.get(n)}
    assert set(r.unplaced_reasons) == set(r.unplaced)
    assert not set(r.placement) - {m.name for m in p.models if m.name in wanted(p) or r.placement.get(m.name)}


@PROFILE
@given(problems())
def test_deterministic_and_independent_of_input_order(p):
    r = place(p)
    assert place(p) == r
    shuffled = Problem(
        gpus=list(reversed(p.gpus)),
        models=list(reversed(p.models)),
        demand=dict(reversed(list(p.demand.items()))),
        split_overhead_mib=p.split_overhead_mib,
    )
    assert place(shuffled) == r


@PROFILE
@given(problems())
def test_no_replica_for_models_without_demand_pin_or_min(p):
    r = place(p)
    for m in p.models:
        if m.name not in wanted(p):
            assert not r.placement.get(m.name)


@PROFILE
@given(problems())
def test_solving_again_from_its_own_result_keeps_it_unless_strictly_better(p):
    r = place(p)
    p2 = with_previous(p, r.placement)
    r2 = place(p2)
    assert r2 == r or objective(p2, r2) > objective(p2, r) + 1e-9
    assert validate_result(p2, r2) == []


@PROFILE
@given(problems(), st.sampled_from([first_fit, spread]), st.randoms(use_true_random=False))
def test_feasible_previous_is_kept_unless_its_room_is_needed(p, baseline, rnd):
    # a feasible previous placement, made for a different demand
    other = p.model_copy(update={"demand": {m.name: rnd.choice([0.0, 1.0, 5.0]) for m in p.models}})
    previous = baseline(other).placement
    p2 = with_previous(p, previous)
    r = place(p2)
    assert validate_result(p2, r) == []
    # never worse than keeping the previous placement exactly as it is
    assert objective(p2, r) >= objective(p2, PlacementResult(previous)) - 1e-9
    # a previous replica that was dropped could not simply be put back
    gpus = {g.id: g for g in p.gpus}
    free = {g.id: float(g.usable_mib) for g in p.gpus}
    holds = {g.id: set() for g in p.gpus}
    for name, reps in r.placement.items():
        for rep in reps:
            for g, need in replica_needs(p2, p2.model(name), rep).items():
                free[g] -= need
                holds[g].add(name)
    for name, reps in previous.items():
        model = p.model(name)
        now = r.placement.get(name, ())
        for rep in reps:
            if rep in now or len(now) >= model.max_replicas:
                continue
            needs = replica_needs(p2, model, rep)
            blocked = any(name in holds[g] or free[g] + 1e-6 < n for g, n in needs.items())
            assert blocked, f"{name} {rep} dropped although it still fits"
            assert all(g in gpus for g in rep.gpus)


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_nodes=3, max_gpus=2, max_models=5))
def test_close_to_the_ilp_optimum_on_small_instances(p):
    opt = optimum(p, time_limit_s=20)
    if opt is None:
        return
    assert validate_result(p, opt) == []
    best, ours = objective(p, opt), objective(p, place(p))
    assert ours <= best + 1e-6
    assert best - ours <= 0.02 * abs(best) + 1e-6


def test_replicas_keep_their_previous_split():
    p = Problem(
        gpus=[
            Gpu(id="a/0", node="a", vendor="amd", vram_mib=16384),
            Gpu(id="a/1", node="a", vendor="amd", vram_mib=32768),
        ],
        models=[ModelSpec(name="big", vram_mib=40000, max_replicas=1)],
        demand={"big": 1.0},
        previous={"big": [Replica(("a/1", "a/0"), (0.75, 0.25))]},
    )
    r = place(p)
    assert r.placement == {"big": (Replica(("a/1", "a/0"), (0.75, 0.25)),)}
