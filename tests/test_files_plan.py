"""The sans-IO transfer plan, driven event by event with seeds; the token bucket; the disk budget; the
catalog merge."""

from __future__ import annotations

import hashlib
import random

import pytest

from aivailable.files.budget import StoredFile, plan_evictions
from aivailable.files.catalog import merge
from aivailable.files.fetch import TokenBucket
from aivailable.files.plan import PlanConfig, TransferPlan, from_bitmap

CS = 4


def make(data: bytes, seed: int = 0, have=(), **cfg) -> TransferPlan:
    hashes = [hashlib.sha256(data[i:i + CS]).hexdigest() for i in range(0, max(1, len(data)), CS)]
    return TransferPlan(hashes, CS, len(data), PlanConfig(**cfg), random.Random(seed), set(have))


def simulate(data: bytes, seed: int, peers: dict[str, str], kill_at: dict[str, int] | None = None,
             have=()) -> tuple[TransferPlan, bytearray, list[str], int]:
    """Run a transfer against simulated peers: "good", "corrupt" or "dead" (from step `kill_at[p]`).
    Returns (plan, assembled bytes, event kinds, steps)."""
    rng = random.Random(seed)
    plan = make(data, seed, have)
    out = bytearray(len(data))
    for i in plan.have:
        out[i * CS:(i + 1) * CS] = data[i * CS:(i + 1) * CS]
    now, steps, kinds = 0.0, 0, []
    kill_at = kill_at or {}
    plan.set_peers(peers, now)
    inflight: list[tuple[int, str]] = []
    while not plan.done and not plan.failed and steps < 10_000:
        steps += 1
        now += 0.1
        live = [p for p in peers if steps < kill_at.get(p, 1 << 30)]
        plan.set_peers(live, now)
        inflight += plan.next_requests(now)
        if not inflight:
            continue
        i, p = inflight.pop(rng.randrange(len(inflight)))  # answers arrive in any order
        chunk = data[i * CS:(i + 1) * CS]
        if p not in live:
            plan.on_error(i, p, "connection refused", now)
        elif peers[p] == "corrupt":
            bad = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            plan.on_data(i, p, hashlib.sha256(bad).hexdigest(), len(bad), now)
        elif plan.on_data(i, p, hashlib.sha256(chunk).hexdigest(), len(chunk), now):
            out[i * CS:(i + 1) * CS] = chunk
        kinds += [e.kind for e in plan.drain_events()]
    return plan, out, kinds, steps


DATA = bytes(range(256)) * 3 + b"tail"


@pytest.mark.parametrize("seed", range(20))
def test_good_peers_assemble_the_file_and_spread_the_load(seed):
    plan, out, kinds, _ = simulate(DATA, seed, {"a": "good", "b": "good", "c": "good"})
    assert plan.done and bytes(out) == DATA and kinds == []
    assert all(s.bytes > 0 for s in plan.peers.values())  # every holder served a share
    assert plan.bytes_done() == len(DATA)


@pytest.mark.parametrize("seed", range(20))
def test_a_corrupt_peer_is_banned_and_its_chunks_refetched(seed):
    plan, out, kinds, _ = simulate(DATA, seed, {"a": "good", "evil": "corrupt"})
    assert plan.done and bytes(out) == DATA
    assert kinds.count("corrupt") >= 1 and "evil" in plan.banned() and "corrupt" in plan.banned()["evil"]
    assert plan.peers["evil"].bytes == 0


@pytest.mark.parametrize("seed", range(20))
def test_a_peer_that_dies_mid_transfer_is_replaced(seed):
    plan, out, kinds, _ = simulate(DATA, seed, {"a": "good", "b": "good"}, kill_at={"a": 30})
    assert plan.done and bytes(out) == DATA
    assert plan.peers["a"].bytes > 0 and plan.peers["b"].bytes > plan.peers["a"].bytes


def test_same_seed_same_transfer():
    runs = [simulate(DATA, 7, {"a": "good", "b": "good", "x": "corrupt"}) for _ in range(2)]
    assert [(p.peers["a"].bytes, p.peers["b"].bytes, k, s) for p, _, k, s in runs][0] == \
        [(p.peers["a"].bytes, p.peers["b"].bytes, k, s) for p, _, k, s in runs][1]


def test_only_a_corrupt_holder_fails_with_a_reason_and_never_completes():
    plan = make(DATA, give_up_after_s=5.0)
    plan.set_peers(["evil"], 0.0)
    for i, p in plan.next_requests(0.0):
        assert not plan.on_data(i, p, "0" * 64, CS, 0.0)
    assert plan.next_requests(1.0) == [] and not plan.failed
    plan.set_peers(["evil"], 6.0)
    assert plan.failed and not plan.done
    assert "evil (served corrupt data" in plan.error


def test_resume_from_a_bitmap_requests_only_the_missing_chunks():
    plan = make(DATA)
    plan.set_peers(["a"], 0.0)
    for i in (0, 2, 5, 9):
        plan.on_data(i, "a", plan.chunk_hashes[i], plan.chunk_len(i), 0.0)
    bitmap = plan.bitmap()
    resumed = make(DATA, have=from_bitmap(bitmap, plan.n_chunks), max_inflight=1000, max_inflight_per_peer=1000)
    assert resumed.have == {0, 2, 5, 9} and resumed.bytes_done() == 4 * CS
    resumed.set_peers(["a"], 0.0)
    asked = {i for i, _ in resumed.next_requests(0.0)}
    assert asked == set(range(resumed.n_chunks)) - {0, 2, 5, 9}
    plan2, out, _, _ = simulate(DATA, 3, {"b": "good"}, have={0, 2, 5, 9})
    assert plan2.done and bytes(out) == DATA and plan2.peers["b"].bytes == len(DATA) - 4 * CS


def test_failed_peer_backs_off_exponentially_and_limits_hold():
    plan = make(DATA, max_inflight=4, max_inflight_per_peer=2, backoff_initial_s=1.0)
    plan.set_peers(["a", "b"], 0.0)
    first = plan.next_requests(0.0)
    assert sorted(q for _, q in first) == ["a", "a", "b", "b"]  # per-peer and total limits
    a_chunks = [i for i, q in first if q == "a"]
    b_chunks = [i for i, q in first if q == "b"]
    plan.on_error(a_chunks[0], "a", "timeout", 0.0)
    assert plan.next_wakeup(0.0) == 1.0
    assert plan.next_requests(0.5) == []  # a backs off, b is busy
    plan.on_data(b_chunks[0], "b", plan.chunk_hashes[b_chunks[0]], plan.chunk_len(b_chunks[0]), 0.5)
    again = plan.next_requests(0.5)
    assert [q for _, q in again] == ["b"] and again[0][0] == a_chunks[0]  # the failed chunk, lowest first
    plan.on_error(a_chunks[1], "a", "timeout", 0.6)
    assert plan.peers["a"].retry_at == pytest.approx(0.6 + 2.0)  # doubled
    assert {q for _, q in plan.next_requests(2.7)} <= {"a", "b"}


def test_wrong_manifest_length_is_refused():
    with pytest.raises(ValueError, match="chunk hashes"):
        TransferPlan(["00" * 32], CS, 10)


def test_token_bucket_paces_to_the_rate():
    b = TokenBucket(1000.0, burst=100.0)
    assert b.delay(100, 0.0) == 0.0
    assert b.delay(500, 0.0) == pytest.approx(0.5)
    assert b.delay(100, 0.6) == pytest.approx(0.0)  # 0.5 s paid the debt, 0.1 s refilled 100
    assert b.delay(200, 0.6) == pytest.approx(0.2)
    assert TokenBucket(0).delay(10**9, 0.0) == 0.0


def test_budget_removes_least_recently_used_never_in_use_or_pinned():
    files = [StoredFile("old", 40, 1.0), StoredFile("busy", 40, 0.5, in_use=True),
             StoredFile("pin", 40, 0.1, pinned=True), StoredFile("new", 40, 9.0)]
    assert plan_evictions(files, 200, 30).remove == []
    e = plan_evictions(files, 170, 30)
    assert e.fits and e.remove == ["old"]
    e = plan_evictions(files, 130, 30)
    assert e.fits and e.remove == ["old", "new"]
    e = plan_evictions(files, 100, 30)
    assert not e.fits and e.remove == [] and e.short_by == 10
    assert plan_evictions(files, 0, 10**12).fits


def test_catalog_merge_rules():
    sha_a, sha_b = "a" * 64, "b" * 64
    base = {"name": "m", "ctx": 1024}
    cat, conflicts = merge([("n2", [{**base, "path": "/x", "sha256": sha_a, "size": 5}]),
                            ("n1", [{**base, "path": "/y"}])])
    assert conflicts == {} and cat["m"]["sha256"] == sha_a and cat["m"]["path"] == "/y"
    cat, conflicts = merge([("n1", [{**base, "sha256": sha_a}]), ("n2", [{**base, "sha256": sha_b}])])
    assert cat["m"]["sha256"] == sha_a and "n1 and n2" in conflicts["m"]
    cat, conflicts = merge([("n1", [{**base, "ctx": 2048}]), ("n0", [{**base, "offered": True, "sha256": sha_b}])])
    assert cat["m"]["ctx"] == 2048 and "using n1's definition" in conflicts["m"]
    cat, conflicts = merge([("n1", [{**base, "offered": True, "sha256": sha_a}]),
                            ("n2", [{**base, "offered": True, "sha256": sha_a}])])
    assert conflicts == {} and cat["m"]["offered"]


def test_placement_lets_any_node_fetch_a_held_file_and_prefers_holders():
    from aivailable.coordinator import NodeFacts, build_problem, decide

    sha = "c" * 64
    dev = [{"id": "0", "vendor": "sim", "name": "card", "vram_total_mib": 2000, "vram_used_mib": 0,
            "simulated": True, "usable": True}]
    entry = {"name": "m", "ctx": 512, "sha256": sha, "size": 10, "min_replicas": 2, "max_replicas": 2}
    holder = NodeFacts("n1", "a:1", devices=dev, catalog=[entry], needs_mib={"m": 300.0}, files={sha: {"size": 10}})
    others = [NodeFacts(n, "a:1", devices=dev) for n in ("n2", "n3")]
    [spec] = build_problem([holder, *others], {}).models
    assert spec.files_on == ["n1"] and spec.affinity.nodes == ["n1", "n2", "n3"]
    placed, _ = decide([holder, *others], {})
    assert "n1" in {r["node"] for r in placed["m"]} and len(placed["m"]) == 2  # the holder, plus a fetcher
    one = NodeFacts("n1", "a:1", devices=dev, catalog=[{**entry, "min_replicas": 1, "max_replicas": 1}],
                    needs_mib={"m": 300.0}, files={sha: {"size": 10}})
    for order in ([one, *others], [*others, one]):
        placed, _ = decide(order, {})
        assert [r["node"] for r in placed["m"]] == ["n1"]  # a transfer costs more than loading where it is
    # Without a sha256 (nothing to verify a copy against) only the node with the file can run it.
    bare = NodeFacts("n1", "a:1", devices=dev, catalog=[{k: v for k, v in entry.items() if k not in ("sha256", "size")}],
                     needs_mib={"m": 300.0})
    [spec] = build_problem([bare, *others], {}).models
    assert spec.affinity.nodes == ["n1"]
    # Nobody holds it: nothing to place, and the reason says so.
    gone = NodeFacts("n1", "a:1", devices=dev, catalog=[entry])
    placed, reasons = decide([gone, *others], {})
    assert placed == {} and reasons["m"] == "no live node holds its model file"
