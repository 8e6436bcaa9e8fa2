"""Unit tests of the placement solver, its objective, its checker and the baselines."""

from __future__ import annotations

import json
import random

import pytest

from aivailable.placement import (
    Affinity,
    Gpu,
    ModelSpec,
    PlacementResult,
    Problem,
    Replica,
    objective,
    objective_terms,
    place,
    validate_result,
)
from aivailable.placement.baselines import first_fit, optimum, per_node_lru, spread, static, static_fill
from aivailable.placement.objective import W_COVER, W_FRAG, W_MIN, W_MOVE, W_REPL, marginal_value


def gpu(gid: str, vram: int, vendor: str = "nvidia", reserved: int = 0, name: str = "") -> Gpu:
    return Gpu(id=gid, node=gid.split("/")[0], vendor=vendor, name=name, vram_mib=vram, reserved_mib=reserved)


def problem(gpus, models, demand=None, previous=None, overhead=0) -> Problem:
    return Problem(
        gpus=gpus, models=models, demand=demand or {}, previous=previous or {}, split_overhead_mib=overhead
    )


def reps(result: PlacementResult, name: str) -> list[tuple[str, ...]]:
    return [r.gpus for r in result.replicas(name)]


# -- objective -------------------------------------------------------------------------------------------
def test_marginal_value_orders_min_then_coverage_then_replicas():
    assert marginal_value(0.5, 0, 1) == W_COVER * 0.5
    assert marginal_value(0.5, 0, 2) == W_REPL * 0.5 / 2
    assert marginal_value(0.5, 0, 3) == W_REPL * 0.5 / 3
    assert marginal_value(0.0, 1, 1) == W_MIN
    assert marginal_value(0.2, 2, 2) == W_MIN + W_REPL * 0.2 / 2
    # serving any model with 1% of demand beats every extra replica of a model with all the rest
    assert marginal_value(0.01, 0, 1) > sum(marginal_value(0.99, 0, k) for k in range(2, 50))


def test_objective_terms_by_hand():
    p = problem(
        [gpu("a/0", 10000), gpu("a/1", 10000), gpu("b/0", 20000)],
        [
            ModelSpec(name="x", vram_mib=4000, files_on=["b"]),
            ModelSpec(name="y", vram_mib=1000, pinned=True),
            ModelSpec(name="z", vram_mib=3000),
        ],
        demand={"x": 3.0, "z": 1.0},
        previous={"x": [Replica(("b/0",))]},
    )
    r = PlacementResult({"x": (Replica(("a/0",)), Replica(("b/0",)))}, ("y", "z"), {"y": "-", "z": "-"})
    t = objective_terms(p, r)
    assert t.coverage == pytest.approx(0.75)
    assert t.replicas == pytest.approx(0.75 / 2)
    assert t.moved_mib == 4000  # the replica on a/0 is new, b/0 was there
    assert t.transfer_mib == 4000  # node a does not have the file
    assert t.fragmentation == pytest.approx(30000 / 40000)
    assert t.shortfall == 1  # pinned y has no replica
    expected = W_COVER * 0.75 + W_REPL * 0.375 - W_MOVE * 8000 / 40000 - W_FRAG * 0.75 - W_MIN
    assert objective(p, r) == pytest.approx(expected)


def test_validate_result_finds_each_violation():
    p = problem(
        [gpu("a/0", 8000, reserved=500), gpu("a/1", 8000, vendor="amd"), gpu("b/0", 8000)],
        [
            ModelSpec(name="x", vram_mib=7000, max_replicas=1),
            ModelSpec(name="y", vram_mib=1000, affinity=Affinity(vendors=["amd"])),
        ],
        demand={"x": 1.0, "y": 1.0},
    )
    bad = PlacementResult(
        {
            "x": (
                Replica(("a/0",)),
                Replica(("a/0", "b/0"), (0.5, 0.5)),
                Replica(("a/0", "a/1"), (0.5, 0.5)),
            ),
            "y": (Replica(("b/0",)),),
            "ghost": (Replica(("zz",)),),
        },
        ("y",),
        {"y": "?"},
    )
    text = "\n".join(validate_result(p, bad))
    for needle in (
        "ghost: not in the catalog",
        "3 replicas > max_replicas 1",
        "x[1]: spans nodes",
        "x[2]: mixes vendors",
        "y[0]: outside the model's affinity",
        "GPU a/0: 14000.0 MiB placed > usable 7500",
        "unplaced is ['y'], expected []",
    ):
        assert needle in text
    good = place(p)
    assert validate_result(p, good) == []


# -- solver behaviour ----------------------------------------------------------------------------------
def test_contract_example_output_shape():
    p = problem(
        [gpu("n1/0", 11264, reserved=300)],
        [ModelSpec(name="llama", vram_mib=5800, max_replicas=4)],
        demand={"llama": 12.5},
        previous={"llama": [Replica(("n1/0",))]},
    )
    out = json.loads(place(p).to_json())
    assert out["placement"] == {"llama": [{"gpus": ["n1/0"]}]}
    assert out["unplaced"] == [] and out["unplaced_reasons"] == {}
    assert isinstance(out["solve_ms"], float)


def test_large_model_keeps_the_large_card():
    """A 20 GiB model gets the 24 GiB card; small models fill the small cards, whatever the demand order."""
    p = problem(
        [gpu("a/0", 24576), gpu("b/0", 8192), gpu("c/0", 8192)],
        [
            ModelSpec(name="big", vram_mib=20480, max_replicas=1),
            ModelSpec(name="s1", vram_mib=3000, max_replicas=1),
            ModelSpec(name="s2", vram_mib=3000, max_replicas=1),
            ModelSpec(name="s3", vram_mib=3000, max_replicas=1),
        ],
        demand={"s1": 10.0, "s2": 9.0, "s3": 8.0, "big": 1.0},
    )
    r = place(p)
    assert reps(r, "big") == [("a/0",)]
    assert r.unplaced == ()
    assert validate_result(p, r) == []


def test_multi_gpu_replica_within_one_node_and_vendor():
    p = problem(
        [
            gpu("a/0", 16384),
            gpu("a/1", 16384, vendor="amd"),
            gpu("b/0", 16384),
            gpu("b/1", 16384),
            gpu("c/0", 24576),
        ],
        [ModelSpec(name="70b", vram_mib=30000, max_replicas=2)],
        demand={"70b": 1.0},
        overhead=256,
    )
    r = place(p)
    assert reps(r, "70b") == [("b/0", "b/1")]
    (rep,) = r.replicas("70b")
    assert rep.split is not None and sum(rep.split) == pytest.approx(1.0)
    assert all(f * 30000 + 256 <= 16384 + 1e-6 for f in rep.split)
    assert validate_result(p, r) == []


def test_model_that_fits_nowhere_is_unplaced_with_a_reason():
    p = problem(
        [gpu("a/0", 16384), gpu("b/0", 16384)],
        [ModelSpec(name="huge", vram_mib=40000), ModelSpec(name="idle", vram_mib=100000)],
        demand={"huge": 2.0},
    )
    r = place(p)
    assert r.unplaced == ("huge",)  # "idle" has no demand: not wanted, not unplaced
    assert "needs 40000 MiB" in r.unplaced_reasons["huge"]
    assert r.placement == {}


def test_replicas_follow_demand_up_to_max():
    p = problem(
        [gpu(f"n{i}/0", 8192) for i in range(8)],
        [
            ModelSpec(name="hot", vram_mib=7000, max_replicas=5),
            ModelSpec(name="warm", vram_mib=7000),
            ModelSpec(name="cold", vram_mib=7000),
        ],
        demand={"hot": 6.0, "warm": 2.0, "cold": 1.0},
    )
    r = place(p)
    counts = {n: len(r.replicas(n)) for n in ("hot", "warm", "cold")}
    assert counts == {"hot": 5, "warm": 2, "cold": 1}  # one each, then hot/2, hot/3, hot/4, hot/5, warm/2
    assert len({g for rs in r.placement.values() for rep in rs for g in rep.gpus}) == 8


def test_affinity_pinned_files_on_and_idle_models():
    p = problem(
        [
            gpu("a/0", 16384, name="Tesla P100"),
            gpu("b/0", 16384, vendor="amd", name="MI50"),
            gpu("c/0", 16384, name="Tesla T4"),
        ],
        [
            ModelSpec(name="nv", vram_mib=5000, max_replicas=3, affinity=Affinity(vendors=["NVIDIA"])),
            ModelSpec(name="t4", vram_mib=5000, max_replicas=3, affinity=Affinity(gpu_names=["tesla t4"])),
            ModelSpec(name="file", vram_mib=5000, max_replicas=1, files_on=["b"]),
            ModelSpec(name="embed", vram_mib=500, max_replicas=1, pinned=True),
            ModelSpec(name="unused", vram_mib=500),
        ],
        demand={"nv": 1.0, "t4": 1.0, "file": 1.0},
    )
    r = place(p)
    assert {g for rep in r.replicas("nv") for g in rep.gpus} <= {"a/0", "c/0"}
    assert reps(r, "t4") == [("c/0",)]
    assert reps(r, "file") == [("b/0",)]
    assert len(r.replicas("embed")) == 1 and r.replicas("unused") == ()
    assert validate_result(p, r) == []


def test_min_replicas_are_placed_before_demand():
    p = problem(
        [gpu("a/0", 8192), gpu("b/0", 8192)],
        [
            ModelSpec(name="ha", vram_mib=6000, min_replicas=2, max_replicas=2),
            ModelSpec(name="busy", vram_mib=6000),
        ],
        demand={"busy": 100.0},
    )
    r = place(p)
    assert len(r.replicas("ha")) == 2
    assert r.unplaced == ("busy",)


def test_below_min_is_reported():
    p = problem([gpu("a/0", 8192)], [ModelSpec(name="ha", vram_mib=6000, min_replicas=2, max_replicas=3)])
    r = place(p)
    assert len(r.replicas("ha")) == 1 and "ha" in r.below_min
    assert validate_result(p, r) == []


def test_previous_is_kept_even_when_not_where_a_fresh_solve_would_put_it():
    gpus = [gpu("a/0", 8192), gpu("b/0", 24576)]
    models = [ModelSpec(name="m", vram_mib=4000, max_replicas=1)]
    fresh = place(problem(gpus, models, {"m": 1.0}))
    assert reps(fresh, "m") == [("a/0",)]  # best fit
    moved = place(problem(gpus, models, {"m": 1.0}, previous={"m": [Replica(("b/0",))]}))
    assert reps(moved, "m") == [("b/0",)]


def test_previous_that_no_longer_fits_is_replaced_and_counted_as_moved():
    gpus = [gpu("a/0", 8192, reserved=3000), gpu("b/0", 8192)]
    p = problem(
        gpus,
        [ModelSpec(name="m", vram_mib=6000, max_replicas=1)],
        {"m": 1.0},
        previous={"m": [Replica(("a/0",))]},
    )
    r = place(p)
    assert reps(r, "m") == [("b/0",)]
    assert objective_terms(p, r).moved_mib == 6000


def test_coverage_evicts_extra_replicas():
    gpus = [gpu(f"n{i}/0", 8192) for i in range(3)]
    models = [ModelSpec(name="a", vram_mib=7000, max_replicas=3), ModelSpec(name="b", vram_mib=7000)]
    full = place(problem(gpus, models, {"a": 5.0}))
    assert len(full.replicas("a")) == 3
    previous = {n: list(rs) for n, rs in full.placement.items()}
    r = place(problem(gpus, models, {"a": 5.0, "b": 0.5}, previous=previous))
    assert len(r.replicas("a")) == 2 and len(r.replicas("b")) == 1
    assert {rep.gpus for rep in r.replicas("a")} < {rep.gpus for rep in full.replicas("a")}


def test_relocation_makes_room_for_a_large_model():
    """The small model sits on the big card; rather than leave the big model out, it is moved."""
    gpus = [gpu("a/0", 8192), gpu("b/0", 24576)]
    models = [ModelSpec(name="small", vram_mib=6000, max_replicas=1), ModelSpec(name="big", vram_mib=20000)]
    p = problem(gpus, models, {"small": 5.0, "big": 1.0}, previous={"small": [Replica(("b/0",))]})
    r = place(p)
    assert reps(r, "small") == [("a/0",)] and reps(r, "big") == [("b/0",)]


def test_order_of_inputs_does_not_matter_and_budget_keeps_validity():
    rng = random.Random(3)
    gpus = [gpu(f"n{i // 2}/{i % 2}", rng.choice([8192, 11264, 16384, 24576])) for i in range(10)]
    models = [
        ModelSpec(name=f"m{j}", vram_mib=rng.choice([900, 3000, 6000, 9000, 20000, 30000])) for j in range(8)
    ]
    demand = {m.name: rng.random() * 5 for m in models}
    p = problem(gpus, models, demand, overhead=256)
    shuffled = problem(
        list(reversed(gpus)), list(reversed(models)), dict(reversed(list(demand.items()))), overhead=256
    )
    assert place(p) == place(shuffled)
    assert validate_result(p, place(p, max_moves=0)) == []


def test_gpu_with_zero_usable_vram_is_never_used():
    p = problem(
        [gpu("a/0", 0), gpu("b/0", 1000, reserved=1000), gpu("c/0", 2000)],
        [ModelSpec(name="m", vram_mib=500)],
        {"m": 1.0},
    )
    r = place(p)
    assert reps(r, "m") == [("c/0",)]


# -- baselines -----------------------------------------------------------------------------------------
def _lab() -> Problem:
    gpus = [
        gpu("a/0", 11264, reserved=300),
        gpu("a/1", 11264, reserved=300),
        gpu("b/0", 24576, reserved=300),
        gpu("b/1", 8192, reserved=300),
        gpu("c/0", 32768),
        gpu("c/1", 32768),
        gpu("d/0", 8192, "amd"),
        gpu("d/1", 8192, "amd"),
    ]
    models = [ModelSpec(name=f"m{v}", vram_mib=v, max_replicas=3) for v in (900, 3000, 5800, 9600, 21000)]
    models.append(ModelSpec(name="m70", vram_mib=44000, max_replicas=1))
    demand = {"m900": 1.0, "m3000": 4.0, "m5800": 8.0, "m9600": 2.0, "m21000": 1.5, "m70": 0.5}
    return problem(gpus, models, demand, overhead=256)


@pytest.mark.parametrize("policy", [static, static_fill, first_fit, spread, per_node_lru])
def test_baselines_are_valid_and_no_better_than_the_solver(policy):
    p = _lab()
    r = policy(p)
    assert validate_result(p, r) == []
    assert objective(p, r) <= objective(p, place(p)) + 1e-9


def test_static_puts_one_model_per_gpu_smallest_fit_first():
    p = _lab()
    r = static(p)
    used = [g for rs in r.placement.values() for rep in rs for g in rep.gpus]
    assert len(used) == len(set(used))
    assert reps(r, "m5800") == [("b/1",)] or reps(r, "m5800") == [("d/0",)]
    assert all(len(rs) == 1 for rs in r.placement.values())
    assert sum(len(rs) for rs in static_fill(p).placement.values()) > sum(
        len(rs) for rs in r.placement.values()
    )


def test_per_node_lru_is_deterministic_for_a_seed():
    p = _lab()
    assert per_node_lru(p, seed=1) == per_node_lru(p, seed=1)


def test_optimum_matches_or_beats_the_solver_and_gives_up_when_too_big():
    pytest.importorskip("scipy")
    p = _lab()
    opt = optimum(p, time_limit_s=30)
    assert opt is not None and validate_result(p, opt) == []
    heur = objective(p, place(p))
    assert objective(p, opt) >= heur - 1e-6
    assert heur >= 0.98 * objective(p, opt)
    assert optimum(p, max_variables=10) is None
