"""MembershipCore driven message by message, plus table tests of the suspicion math."""

from __future__ import annotations

import math
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from aivailable.errors import ConfigError
from aivailable.gossip.broadcast import BroadcastQueue, update_size
from aivailable.gossip.membership import MemberChanged, MembershipCore
from aivailable.gossip.membership_types import FactsChanged, MembershipConfig, Refuted
from aivailable.gossip.messages import (
    Ack,
    Alive,
    Dead,
    Facts,
    Gossip,
    MemberState,
    Nack,
    Ping,
    PingReq,
    Status,
    Suspect,
    Sync,
)
from aivailable.gossip.suspicion import (
    Suspicion,
    expected_confirmations,
    push_pull_scale,
    remaining_suspicion,
    retransmit_limit,
    suspicion_timeout,
)

CFG = MembershipConfig.lan()  # probe 0.5 s, probe timeout 0.2 s, suspicion 2 x 0.5 s (n < 10)

# ---- the math: table tests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mult", "n", "interval", "expected"),
    [
        (4, 1, 1.0, 4.0),  # log10(1) = 0 -> node scale clamped to 1
        (4, 5, 1.0, 4.0),  # still < 10 nodes
        (4, 10, 1.0, 4.0),
        (4, 100, 1.0, 8.0),
        (4, 1000, 0.5, 6.0),
        (2, 1000, 0.5, 3.0),
        (3, 0, 0.2, 0.6),  # n = 0 is treated like 1
        (5, 50, 2.0, 5 * math.log10(50) * 2.0),
    ],
)
def test_suspicion_timeout(mult, n, interval, expected):
    assert suspicion_timeout(mult, n, interval) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("k", "n", "expected"), [(2, 1, 0), (2, 2, 0), (2, 3, 1), (2, 4, 2), (2, 100, 2), (0, 100, 0), (5, 6, 4)]
)
def test_expected_confirmations(k, n, expected):
    assert expected_confirmations(k, n) == expected


@pytest.mark.parametrize(
    ("c", "k", "elapsed", "lo", "hi", "expected"),
    [
        (0, 3, 0.0, 2.0, 30.0, 30.0),  # no confirmation yet: the max
        (3, 3, 0.0, 2.0, 30.0, 2.0),  # all expected confirmations: the min
        (1, 3, 0.0, 2.0, 30.0, 30.0 - 0.5 * 28.0),  # log(2)/log(4) = 0.5
        (7, 3, 0.0, 2.0, 30.0, 2.0),  # more than expected: never below min
        (1, 3, 10.0, 2.0, 30.0, 6.0),  # elapsed time is subtracted
        (0, 0, 0.0, 2.0, 30.0, 2.0),  # k < 1: min straight away
        (0, 0, 5.0, 2.0, 30.0, -3.0),  # already expired
    ],
)
def test_remaining_suspicion(c, k, elapsed, lo, hi, expected):
    assert remaining_suspicion(c, k, elapsed, lo, hi) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("mult", "n", "expected"), [(4, 1, 4), (4, 9, 4), (4, 10, 8), (4, 1000, 16), (3, 5, 3)]
)
def test_retransmit_limit(mult, n, expected):
    assert retransmit_limit(mult, n) == expected


@pytest.mark.parametrize(
    ("n", "expected"), [(1, 10.0), (32, 10.0), (33, 20.0), (64, 20.0), (65, 30.0), (1000, 60.0)]
)
def test_push_pull_scale(n, expected):
    assert push_pull_scale(10.0, n) == expected


def test_suspicion_shrinks_with_independent_confirmations():
    s = Suspicion.begin("a", now=100.0, k=2, min_s=2.0, max_s=12.0)
    assert s.deadline == 112.0
    assert not s.confirm("a")  # the first accuser does not count twice
    assert s.confirm("b") and s.deadline == pytest.approx(100.0 + 12.0 - math.log(2) / math.log(3) * 10.0)
    assert s.confirm("c") and s.deadline == 102.0
    assert not s.confirm("d")  # k reached: nothing more to gain


# ---- config --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"probe_interval": 0}, "probe_interval"),
        ({"probe_timeout": 0.5}, "probe_timeout"),
        ({"gossip_nodes": 0}, "gossip_nodes"),
        ({"suspicion_mult": 0}, "suspicion_mult"),
        ({"suspicion_max_timeout_mult": 0.5}, "suspicion_max_timeout_mult"),
        ({"indirect_checks": -1}, "indirect_checks"),
        ({"reap_timeout": 1.0}, "reap_timeout"),
        ({"max_piggyback_bytes": 10}, "max_piggyback_bytes"),
        ({"reconnect_interval": -1}, "reconnect_interval"),
    ],
)
def test_config_validate_names_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        replace(MembershipConfig.lan(), **change).validate()
    assert err.value.param == field


def test_profiles_are_valid():
    assert MembershipConfig.lan().validate() is not None
    assert MembershipConfig.local().validate().probe_interval < CFG.probe_interval


def test_status_transitions():
    assert Status.ALIVE.transition(Status.SUSPECT) is Status.SUSPECT
    assert Status.DEAD.transition(Status.ALIVE) is Status.ALIVE
    for bad in [(Status.DEAD, Status.SUSPECT), (Status.ALIVE, Status.ALIVE), (Status.LEFT, Status.SUSPECT)]:
        with pytest.raises(ValueError):
            bad[0].transition(bad[1])


def test_cores_do_no_io():
    """The sans-IO cores read no clock, open no socket or file and use no global random: the gossip cores,
    the node core, the placement solver and its baselines (placement/command.py is the CLI edge that reads
    the scenario file and times the solver), the model-file transfer plan, and autonomous serving's decision
    and state."""
    pkg = Path(__file__).resolve().parents[1] / "aivailable"
    gossip = ("membership.py", "election.py", "suspicion.py", "broadcast.py", "fencing.py", "envelope.py",
              "node_core.py", "node_types.py")
    paths = [pkg / "gossip" / name for name in gossip]
    paths += [p for p in sorted((pkg / "placement").glob("*.py")) if p.name != "command.py"]
    paths += [pkg / "files" / "plan.py", pkg / "autonomy.py", pkg / "autonomy_state.py"]
    assert len(paths) > 10
    for path in paths:
        text = path.read_text()
        name = str(path.relative_to(pkg))
        assert not re.search(r"^\s*(import|from)\s+(time|asyncio|socket|os|pathlib|subprocess)\b", text, re.M), name
        assert not re.search(r"\b(perf_counter|monotonic)\(", text), name
        assert "random.random(" not in text and "random.choice(" not in text, name


# ---- harness -------------------------------------------------------------------------------------------


def mk(
    node: str, peers: tuple[str, ...] = (), now: float = 0.0, cfg: MembershipConfig = CFG
) -> MembershipCore:
    c = MembershipCore(node, f"{node}:7946", cfg, random.Random(node), now)
    rows = [MemberState(node=p, addr=f"{p}:7946", incarnation=0, status=Status.ALIVE) for p in peers]
    c.seed_members(rows, now)
    c.drop_pending()
    return c


def out(c: MembershipCore) -> list:
    rd = c.ready()
    c.advance()
    return list(rd.messages)


def events(c: MembershipCore) -> list:
    evs = list(c.ready().events)
    c.advance()
    return evs


def probe_of(c: MembershipCore, now: float) -> Ping:
    """Tick until ``c`` sends a direct probe; return it."""
    t = now
    while True:
        c.tick(t)
        pings = [s for s in out(c) if isinstance(s.msg, Ping)]
        if pings:
            return pings[0].msg
        t += 0.05


# ---- probing -------------------------------------------------------------------------------------------


def test_ping_is_acked_with_same_seq():
    b = mk("b", ("a",))
    b.step("a", Ping(seq=7, target="b"), 1.0)
    (s,) = out(b)
    assert s.to == "a" and s.addr == "a:7946" and s.msg == Ack(seq=7)


def test_misdirected_ping_is_not_acked():
    b = mk("b", ("a",))
    b.step("a", Ping(seq=7, target="someone-else"), 1.0)
    assert out(b) == []


def test_acked_probe_keeps_member_alive_and_health_recovers():
    a = mk("a", ("b",))
    a.health = 3
    ping = probe_of(a, 0.0)
    a.step("b", Ack(seq=ping.seq), 0.7)
    a.tick(5.0)
    assert a.status("b") is Status.ALIVE and a.health == 2


def test_probe_timeout_sends_ping_req_and_forwarded_ack_clears_it():
    a, b, c = mk("a", ("b", "c")), mk("b", ("a", "c")), mk("c", ("a", "b"))
    ping = probe_of(a, 0.0)
    target, helper = ping.target, ("c" if ping.target == "b" else "b")
    t0 = a._probe.timeout_at
    a.tick(t0)
    (req,) = out(a)
    assert req.to == helper and req.msg == PingReq(seq=ping.seq, target=target)
    h = {"b": b, "c": c}[helper]
    h.step("a", req.msg, t0)
    (fwd,) = [s for s in out(h) if isinstance(s.msg, Ping)]
    assert fwd.to == target
    tgt = {"b": b, "c": c}[target]
    tgt.step(helper, fwd.msg, t0)
    (ack,) = out(tgt)
    h.step(target, ack.msg, t0)
    (back,) = out(h)
    assert back.to == "a" and back.msg == Ack(seq=ping.seq)
    a.step(helper, back.msg, t0)
    a.tick(t0 + 1.0)
    assert a.status(target) is Status.ALIVE


def test_helper_nacks_when_target_stays_silent():
    b = mk("b", ("a", "c"))
    b.step("a", PingReq(seq=3, target="c"), 1.0)
    out(b)
    b.tick(1.0 + CFG.probe_timeout)
    assert [s.msg for s in out(b) if isinstance(s.msg, Nack)] == [Nack(seq=3)]


def test_failed_probe_suspects_then_declares_dead():
    a = mk("a", ("b",))
    ping = probe_of(a, 0.0)
    end = a._probe.end_at
    a.tick(end)
    assert a.status(ping.target) is Status.SUSPECT
    assert MemberChanged("b", Status.ALIVE, Status.SUSPECT, 0) in events(a)
    assert a.health == 1  # no helper could nack: we might be the problem
    # n = 2: k = 0, so the timer runs at min = 2 * 1 * 0.5 s straight away
    sus = a.member("b").suspicion
    assert sus.deadline == pytest.approx(end + 1.0)
    a.tick(end + 0.99)
    assert a.status("b") is Status.SUSPECT
    a.tick(end + 1.0)
    assert a.status("b") is Status.DEAD
    assert MemberChanged("b", Status.SUSPECT, Status.DEAD, 0) in events(a)
    a.tick(end + 1.0 + CFG.reap_timeout)
    assert a.status("b") is None and MemberChanged("b", Status.DEAD, None, 0) in events(a)


def test_nacks_spare_local_health():
    a = mk("a", ("b", "c", "d"))
    ping = probe_of(a, 0.0)
    a.tick(a._probe.timeout_at)
    helpers = [s.to for s in out(a) if isinstance(s.msg, PingReq)]
    assert len(helpers) == 2
    for h in helpers:
        a.step(h, Nack(seq=ping.seq), a._probe.timeout_at + 0.1)
    a.tick(a._probe.end_at)
    assert a.health == 0 and a.status(ping.target) is Status.SUSPECT


def test_confirmations_shrink_the_timer():
    a = mk("a", ("b", "c", "d", "e"))  # n = 5: k = 1, min 1.0 s, max 3.0 s
    a.step("c", Gossip(updates=(Suspect(node="b", incarnation=0, accuser="c"),)), 10.0)
    assert a.member("b").suspicion.deadline == pytest.approx(13.0)
    a.step("d", Gossip(updates=(Suspect(node="b", incarnation=0, accuser="d"),)), 10.5)
    assert a.member("b").suspicion.deadline == pytest.approx(11.0)
    assert a._probe_order[a._probe_pos] == "b"  # probe the accused next


# ---- incarnations and refutation -----------------------------------------------------------------------


def test_suspected_node_refutes_with_higher_incarnation():
    b = mk("b", ("a",))
    b.step("a", Gossip(updates=(Suspect(node="b", incarnation=0, accuser="a"),)), 1.0)
    assert b.incarnation == 1 and Refuted(1) in events(b)
    b.step("a", Ping(seq=1, target="b"), 1.1)
    (ack,) = out(b)
    assert Alive(node="b", incarnation=1, addr="b:7946") in ack.msg.updates
    a = mk("a", ("b",))
    a.step("c", Gossip(updates=(Suspect(node="b", incarnation=0, accuser="c"),)), 1.0)
    a.step("b", ack.msg, 1.2)
    assert a.status("b") is Status.ALIVE and a.member("b").incarnation == 1


def test_stale_suspect_is_ignored_and_dead_beats_alive_at_equal_incarnation():
    a = mk("a", ("b",))
    a.step("b", Gossip(updates=(Alive(node="b", incarnation=3, addr="b:1"),)), 1.0)
    a.step("c", Gossip(updates=(Suspect(node="b", incarnation=2, accuser="c"),)), 1.1)
    assert a.status("b") is Status.ALIVE
    a.step("c", Gossip(updates=(Dead(node="b", incarnation=3, accuser="c"),)), 1.2)
    assert a.status("b") is Status.DEAD
    a.step("c", Gossip(updates=(Alive(node="b", incarnation=3, addr="b:1"),)), 1.3)
    assert a.status("b") is Status.DEAD
    a.step("b", Gossip(updates=(Alive(node="b", incarnation=4, addr="b:1"),)), 1.4)
    assert a.status("b") is Status.ALIVE


def test_dead_about_self_is_refuted_but_not_while_leaving():
    b = mk("b", ("a",))
    b.step("a", Gossip(updates=(Dead(node="b", incarnation=0, accuser="a"),)), 1.0)
    assert b.incarnation == 1
    b.leave()
    b.step("a", Gossip(updates=(Dead(node="b", incarnation=1, accuser="a"),)), 2.0)
    assert b.incarnation == 1 and b.status("b") is Status.LEFT


def test_graceful_leave_is_left_not_dead():
    a = mk("a", ("b",))
    a.step("b", Gossip(updates=(Dead(node="b", incarnation=0, accuser="b"),)), 1.0)
    assert a.status("b") is Status.LEFT
    assert "b" not in a.live_members()


def test_restarted_node_jumps_past_its_old_incarnation_and_facts_version():
    b = mk("b", ("a",))
    b.set_facts({"gpus": 1})
    b.step("a", Gossip(updates=(Alive(node="b", incarnation=5, addr="b:7946"),)), 1.0)
    assert b.incarnation == 6
    b.step("a", Gossip(updates=(Facts(node="b", version=9, facts={"gpus": 2}),)), 1.0)
    assert b.facts_version == 10 and b.own_facts == {"gpus": 1}


# ---- facts ---------------------------------------------------------------------------------------------


def test_newer_facts_win_and_are_passed_on():
    a = mk("a", ("b", "c"))
    a.step("b", Gossip(updates=(Facts(node="b", version=2, facts={"free": 10}),)), 1.0)
    a.step("c", Gossip(updates=(Facts(node="b", version=1, facts={"free": 99}),)), 1.1)
    assert a.facts("b") == (2, {"free": 10})
    assert events(a) == [FactsChanged("b", 2)]
    a.step("c", Ping(seq=1, target="a"), 1.2)
    (ack,) = out(a)
    assert Facts(node="b", version=2, facts={"free": 10}) in ack.msg.updates


def test_set_facts_versions_and_the_core_does_not_look_inside():
    a = mk("a", ("b",))
    assert a.set_facts({"anything": [1, {"x": None}]}) == 1
    assert a.set_facts({}) == 2
    assert a.facts("a") == (2, {})


# ---- piggyback queue -----------------------------------------------------------------------------------


def test_queue_least_sent_first_newest_first_and_limited():
    q = BroadcastQueue()
    q.put("x", Alive(node="x", incarnation=0, addr=""))
    q.put("y", Alive(node="y", incarnation=0, addr=""))
    first, _ = q.take(budget=10_000, limit=2)
    assert [u.node for u in first] == ["y", "x"]
    q.put("z", Alive(node="z", incarnation=0, addr=""))
    second, _ = q.take(budget=10_000, limit=2)
    assert [u.node for u in second] == ["z", "y", "x"]
    assert len(q) == 1  # x and y reached the limit


def test_queue_respects_budget_but_sends_at_least_one():
    q = BroadcastQueue()
    big = Facts(node="a", version=1, facts={"blob": "x" * 500})
    q.put("a", big)
    q.put("b", Alive(node="b", incarnation=0, addr=""))
    taken, used = q.take(budget=100, limit=3)
    assert len(taken) == 1 and used == update_size(taken[0])
    assert q.take(budget=10, limit=3, at_least_one=False) == ([], 0)


def test_newer_update_replaces_queued_one():
    q = BroadcastQueue()
    q.put("b", Alive(node="b", incarnation=1, addr=""))
    q.take(10_000, 5)
    q.put("b", Suspect(node="b", incarnation=1, accuser="a"))
    taken, _ = q.take(10_000, 5)
    assert taken == [Suspect(node="b", incarnation=1, accuser="a")] and len(q) == 1


def test_state_updates_go_before_facts():
    cfg = replace(CFG, max_piggyback_bytes=200)
    a = mk("a", ("b",), cfg=cfg)
    a.set_facts({"blob": "y" * 150})
    a.step("b", Gossip(updates=(Suspect(node="a", incarnation=0, accuser="b"),)), 1.0)  # -> refute
    a.step("b", Ping(seq=1, target="a"), 1.0)
    (ack,) = out(a)
    assert [u.type for u in ack.msg.updates] == ["alive"]


# ---- join, sync, reconnect -----------------------------------------------------------------------------


def test_join_through_seed_fills_both_views():
    seed = mk("s", ("x",))
    seed.set_facts({"gpu": "3090"})
    new = mk("n")
    new.join(["s:7946"])
    (push,) = out(new)
    assert push.to == "" and push.addr == "s:7946" and isinstance(push.msg, Sync) and not push.msg.reply
    seed.step("n", push.msg, 1.0)
    assert seed.status("n") is Status.ALIVE
    (reply,) = [s for s in out(seed) if isinstance(s.msg, Sync)]
    assert reply.to == "n" and reply.msg.reply
    new.step("s", reply.msg, 1.1)
    assert new.live_members() == ["n", "s", "x"]
    assert new.facts("s") == (1, {"gpu": "3090"})
    assert out(new) == []  # a reply is not answered


def test_remote_dead_merges_as_suspect():
    a = mk("a", ("b", "c"))
    row = MemberState(node="b", addr="b:7946", incarnation=0, status=Status.DEAD)
    a.step("c", Sync(members=(row,), reply=True), 1.0)
    assert a.status("b") is Status.SUSPECT


def test_alone_node_retries_seeds_and_pings_the_recently_dead():
    new = mk("n")
    new.join(["s:7946"])
    out(new)
    new.tick(10.0)
    assert [s.addr for s in out(new) if isinstance(s.msg, Sync)] == ["s:7946"]
    a = mk("a", ("b",))
    a.step("c", Gossip(updates=(Dead(node="b", incarnation=0, accuser="c"),)), 0.0)
    out(a)
    a.tick(5.0)
    pings = [s for s in out(a) if isinstance(s.msg, Ping) and s.to == "b"]
    assert pings
    a.step("b", Ack(seq=pings[-1].msg.seq), 5.1)
    assert [s.to for s in out(a) if isinstance(s.msg, Sync)] == ["b"]  # it lives: tell it


def test_seeds_not_reached_are_retried_even_when_other_peers_are_known():
    n = mk("n", ("p",))  # p found this node first; its seeds s1 (a live member's address) and s2 are not up
    n.join(["s1:7946", "s2:7946", "h:80"])
    out(n)
    n.step("s1", Sync(members=(MemberState(node="s1", addr="s1:7946", incarnation=0, status=Status.ALIVE),),
                      reply=True), 0.1)
    assert n.unreached_seeds(0.1) == ["s2:7946", "h:80"]
    n.seed_answered("h:80", 0.2)  # a seed given by host name answered: its address never matches a member's
    assert n.unreached_seeds(0.3) == ["s2:7946"]
    assert n.unreached_seeds(0.3, settle=0.5) == ["s2:7946", "h:80"]  # its reply may still be on the way
    assert n.unreached_seeds(0.8, settle=0.5) == ["s2:7946"]
    n.tick(10.0)
    assert [s.addr for s in out(n) if isinstance(s.msg, Sync) and s.to == ""] == ["s2:7946"]  # seed pushes only


def test_step_rejects_foreign_messages():
    with pytest.raises(TypeError):
        mk("a").step("b", object(), 0.0)


# ---- small simulated clusters --------------------------------------------------------------------------


def run_cluster(
    cores: dict[str, MembershipCore], until: float, start: float = 0.0, down: set[str] = frozenset()
):
    """Lossless, zero-delay delivery between cores (crashed ones in ``down`` are silent)."""
    t = start
    while t <= until + 1e-9:
        for c in cores.values():
            if c.id not in down:
                c.tick(t)
        moving = True
        while moving:
            moving = False
            for c in list(cores.values()):
                for s in out(c):
                    dst = s.to or (s.addr or "").split(":")[0]
                    if dst in cores and dst not in down:
                        cores[dst].step(c.id, s.msg, t)
                        moving = True
        t = round(t + 0.05, 6)


def test_cluster_of_five_detects_a_crash_everywhere_within_3s():
    ids = ["a", "b", "c", "d", "e"]
    cores = {n: mk(n, tuple(x for x in ids if x != n)) for n in ids}
    run_cluster(cores, 5.0)
    run_cluster(cores, 8.0, start=5.05, down={"c"})
    assert all(cores[n].status("c") is Status.DEAD for n in ids if n != "c")
    assert all(cores[n].live_members() == ["a", "b", "d", "e"] for n in ids if n != "c")


def test_cluster_forms_from_one_seed():
    ids = [f"n{i}" for i in range(8)]
    cores = {n: mk(n) for n in ids}
    for n in ids[1:]:
        cores[n].join(["n0:7946"])
    run_cluster(cores, CFG.push_pull_interval + 2.0)  # gossip, then anti-entropy for any node it missed
    assert all(c.live_members() == sorted(ids) for c in cores.values())
