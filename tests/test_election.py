"""ElectionCore driven message by message (etcd-raft style), plus placement fencing tables."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from aivailable.errors import ConfigError
from aivailable.gossip.election import (
    BecameLeader,
    ElectionConfig,
    ElectionCore,
    HardState,
    IllegalTransition,
    LeaderChanged,
    Role,
    SteppedDown,
    VotersChanged,
)
from aivailable.gossip.fencing import PlacementFence, accept_placement
from aivailable.gossip.messages import Heartbeat, HeartbeatAck, VoteRequest, VoteResponse, VoterSet

CFG = ElectionConfig.lan()  # heartbeat 0.25, election timeout 1.5 (timer 1.5..3.0), lease 1.0, removal 30


def core(node: str, voters: tuple[str, ...] = ("a", "b", "c"), now: float = 0.0, **kw) -> ElectionCore:
    return ElectionCore(node, kw.pop("cfg", CFG), random.Random(node), now, voters=voters, **kw)


def sent(c: ElectionCore) -> list[tuple[str, object]]:
    """Messages of the pending Ready, then advance (as a driver would)."""
    rd = c.ready()
    c.advance()
    return [(s.to, s.msg) for s in rd.messages]


def fire_timeout(c: ElectionCore, now: float = 3.0) -> None:
    """Election timer is uniform in [1.5, 3.0): at 3.0 it has fired."""
    c.tick(now)


class Net:
    """Instant, lossless delivery among cores, with optional cut links (etcd's test network)."""

    def __init__(self, *cores: ElectionCore):
        self.cores = {c.id: c for c in cores}
        self.cut: set[frozenset[str]] = set()
        self.disk: dict[str, HardState] = {}
        self.events: list[tuple[str, object]] = []

    def isolate(self, node: str) -> None:
        self.cut |= {frozenset((node, other)) for other in self.cores if other != node}

    def pump(self, now: float) -> None:
        pending = True
        while pending:
            pending = False
            for c in list(self.cores.values()):
                if not c.has_ready():
                    continue
                rd = c.ready()
                if rd.persist is not None:
                    self.disk[c.id] = rd.persist
                self.events += [(c.id, e) for e in rd.events]
                c.advance()
                for s in rd.messages:
                    dst = self.cores.get(s.to)
                    if dst is not None and frozenset((c.id, s.to)) not in self.cut:
                        dst.step(c.id, s.msg, now)
                        pending = True

    def run(self, start: float, end: float, step: float = 0.05) -> None:
        t = start
        while t <= end + 1e-9:
            for c in self.cores.values():
                c.tick(t)
            self.pump(t)
            t = round(t + step, 6)

    def leaders(self) -> list[str]:
        return sorted(n for n, c in self.cores.items() if c.is_leader)


# ---- config --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"lease": 0.3}, "lease"),
        ({"election_timeout": 0.5}, "election_timeout"),
        ({"removal_timeout": 1.0}, "removal_timeout"),
    ],
)
def test_config_validate_names_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        replace(ElectionConfig.lan(), **change).validate()
    assert err.value.param == field and field in str(err.value)


def test_profiles_are_valid():
    assert ElectionConfig.lan().validate() and ElectionConfig.local().validate()
    assert ElectionConfig.local().lease < ElectionConfig.lan().lease


# ---- pre-vote and vote ---------------------------------------------------------------------------------


def test_timeout_starts_a_pre_vote_that_changes_nothing_durable():
    a = core("a")
    sent(a)  # bootstrap persist
    fire_timeout(a)
    rd = a.ready()
    assert rd.persist is None and a.term == 0 and a.role is Role.PRE_CANDIDATE
    msgs = sorted((s.to, s.msg) for s in rd.messages)
    assert msgs == [(to, VoteRequest(term=1, pre=True, config_term=0, config_index=0)) for to in ("b", "c")]


def test_pre_vote_majority_then_real_vote_persisted_before_sending():
    a = core("a")
    fire_timeout(a)
    sent(a)
    a.step("b", VoteResponse(term=1, pre=True, granted=True), 3.0)
    rd = a.ready()
    assert a.role is Role.CANDIDATE and a.term == 1
    assert rd.persist == HardState(1, "a", VoterSet(voters=("a", "b", "c")))
    assert {m.msg for m in rd.messages} == {VoteRequest(term=1, pre=False, config_term=0, config_index=0)}
    a.advance()
    a.step("c", VoteResponse(term=1, pre=False, granted=True), 3.0)
    assert a.is_leader
    evs = a.ready().events
    assert BecameLeader(1, VoterSet(voters=("a", "b", "c")), False, 3.0) in evs
    assert LeaderChanged(1, "a") in evs
    assert {m.msg.type for m in a.ready().messages} == {"heartbeat"}


def test_pre_vote_rejections_send_candidate_back_to_follower():
    a = core("a")
    fire_timeout(a)
    a.step("b", VoteResponse(term=0, pre=True, granted=False), 3.0)
    assert a.role is Role.PRE_CANDIDATE
    a.step("c", VoteResponse(term=0, pre=True, granted=False), 3.0)
    assert a.role is Role.FOLLOWER and a.term == 0


def test_one_vote_per_term():
    b = core("b")
    sent(b)
    b.step("a", VoteRequest(term=1, pre=False, config_term=0, config_index=0), 5.0)
    rd = b.ready()
    assert rd.persist == HardState(1, "a", b.config)
    assert rd.messages[0].msg == VoteResponse(term=1, pre=False, granted=True)
    b.advance()
    b.step("c", VoteRequest(term=1, pre=False, config_term=0, config_index=0), 5.1)
    assert sent(b) == [("c", VoteResponse(term=1, pre=False, granted=False))]
    b.step("a", VoteRequest(term=1, pre=False, config_term=0, config_index=0), 5.2)  # a retries: still yes
    assert sent(b) == [("a", VoteResponse(term=1, pre=False, granted=True))]


def test_restart_remembers_term_and_vote():
    b = core("b")
    b.step("a", VoteRequest(term=4, pre=False, config_term=0, config_index=0), 5.0)
    disk = b.ready().persist
    b2 = ElectionCore("b", CFG, random.Random(1), 100.0, state=disk)
    assert (b2.term, b2.voted_for, b2.config) == (4, "a", b.config)
    assert b2.ready().persist is None  # nothing new to write
    b2.step("c", VoteRequest(term=4, pre=False, config_term=0, config_index=0), 100.0)
    assert sent(b2) == [("c", VoteResponse(term=4, pre=False, granted=False))]


def test_pre_vote_grant_does_not_change_voter_state():
    b = core("b")
    sent(b)
    b.step("a", VoteRequest(term=1, pre=True, config_term=0, config_index=0), 5.0)
    rd = b.ready()
    assert rd.persist is None and b.term == 0 and b.voted_for is None
    assert rd.messages[0].msg == VoteResponse(term=1, pre=True, granted=True)


def test_candidate_with_older_voter_set_is_refused():
    b = core("b", state=HardState(3, None, VoterSet(voters=("a", "b", "c"), term=3, index=2)))
    b.step("a", VoteRequest(term=4, pre=False, config_term=2, config_index=9), 5.0)
    assert sent(b)[-1] == ("a", VoteResponse(term=4, pre=False, granted=False))
    assert b.voted_for is None


def test_sticky_follower_refuses_votes_while_leader_is_in_lease():
    b = core("b")
    b.step("a", Heartbeat(term=2, sent_at=10.0, lease=1.0, config=b.config), 10.0)
    assert b.leader == "a" and b.term == 2
    sent(b)
    b.step("c", VoteRequest(term=3, pre=True, config_term=0, config_index=0), 10.5)
    assert sent(b) == [("c", VoteResponse(term=2, pre=True, granted=False))]
    b.step("c", VoteRequest(term=3, pre=False, config_term=0, config_index=0), 10.6)
    assert sent(b) == [("c", VoteResponse(term=2, pre=False, granted=False))]
    assert b.term == 2 and b.voted_for is None  # did not even adopt the term
    b.step("c", VoteRequest(term=3, pre=True, config_term=0, config_index=0), 11.1)  # lease over
    assert sent(b) == [("c", VoteResponse(term=3, pre=True, granted=True))]


def test_non_voter_never_campaigns():
    d = core("d", voters=())
    d.tick(10.0)
    assert d.role is Role.FOLLOWER and not d.has_ready()


def test_illegal_transitions_raise():
    a = core("a", voters=("a",))
    fire_timeout(a)
    assert a.is_leader
    with pytest.raises(IllegalTransition):
        a._campaign(5.0, pre=True)
    with pytest.raises(IllegalTransition):
        a._become_follower(0, None, 5.0)
    f = core("f")
    with pytest.raises(IllegalTransition):
        f._become_leader(5.0)


# ---- leader: heartbeats, lease, step-down --------------------------------------------------------------


def leader_of_three() -> tuple[ElectionCore, Net]:
    a, b, c = core("a"), core("b"), core("c")
    net = Net(a, b, c)
    b._deadline = c._deadline = 99.0  # only a's timer fires
    a.tick(3.0)
    net.pump(3.0)
    assert net.leaders() == ["a"] and a.term == 1
    return a, net


def test_follower_acks_heartbeat_and_learns_leader():
    b = core("b")
    beat = Heartbeat(term=1, sent_at=7.0, lease=1.0, config=b.config)
    b.step("a", beat, 7.01)
    rd = b.ready()
    assert rd.messages[0].msg == HeartbeatAck(term=1, sent_at=7.0, success=True)
    assert LeaderChanged(1, "a") in rd.events and rd.persist is not None  # term 1 must hit disk first


def test_stale_leader_is_deposed_by_a_higher_term_ack():
    a, _ = leader_of_three()
    sent(a)
    a.step("b", HeartbeatAck(term=5, sent_at=3.0, success=False), 3.2)
    assert a.role is Role.FOLLOWER and a.term == 5 and a.leader is None
    assert SteppedDown(1, "higher term") in a.ready().events


def test_heartbeat_from_lower_term_gets_our_term_back():
    b = core("b", state=HardState(7, None, VoterSet(voters=("a", "b", "c"))))
    b.step("a", Heartbeat(term=3, sent_at=1.0, lease=1.0, config=b.config), 1.0)
    assert sent(b) == [("a", HeartbeatAck(term=7, sent_at=1.0, success=False))]


def test_leader_without_majority_acks_steps_down_within_lease():
    a, net = leader_of_three()
    net.isolate("a")
    net.run(3.05, 4.2)
    assert not a.is_leader and a.term == 1
    assert a.leader is None


def test_leader_keeps_lease_with_majority():
    a, net = leader_of_three()
    net.cut |= {frozenset(("a", "b"))}  # c still acks: 2 of 3
    net.run(3.05, 8.0)
    assert a.is_leader and a.term == 1


def test_minority_partition_elects_nobody_and_keeps_its_term():
    cores = [core(n, voters=("a", "b", "c", "d", "e")) for n in "abcde"]
    net = Net(*cores)
    for n in "abcde":
        net.cut |= {frozenset((x, n)) for x in "ab" if n not in "ab"}
    net.run(0.0, 20.0)
    by = {c.id: c for c in cores}
    assert not by["a"].is_leader and not by["b"].is_leader
    assert by["a"].term == 0 and by["b"].term == 0  # pre-vote: no term inflation
    assert len([n for n in "cde" if by[n].is_leader]) == 1


def test_leader_failover_and_one_leader_per_term():
    cores = [core(n, voters=("a", "b", "c", "d", "e")) for n in "abcde"]
    net = Net(*cores)
    net.run(0.0, 5.0)
    (first,) = net.leaders()
    net.isolate(first)
    net.run(5.05, 12.0)
    others = [n for n in net.leaders() if n != first]
    assert len(others) == 1 and net.cores[others[0]].term > net.cores[first].term
    assert not net.cores[first].is_leader  # it lost its lease before the new one was elected


# ---- voter set -----------------------------------------------------------------------------------------


def test_leader_adds_a_live_non_voter_that_acks():
    a, net = leader_of_three()
    d = core("d", voters=())
    net.cores["d"] = d
    a.observe_member("d", True, 3.0)
    net.run(3.05, 4.0)
    assert a.config.voters == ("a", "b", "c", "d") and a.config.id == (1, 1)
    assert d.config == a.config and net.disk["d"].config == a.config  # every node persists it
    assert ("d", VotersChanged(a.config)) in net.events


def test_leader_removes_a_voter_dead_past_removal_timeout_one_at_a_time():
    cfg = replace(CFG, removal_timeout=5.0)
    cores = [core(n, voters=("a", "b", "c", "d", "e"), cfg=cfg) for n in "abcde"]
    net = Net(*cores)
    net.run(0.0, 4.0)
    (lead,) = net.leaders()
    gone = [n for n in "abcde" if n != lead][:2]
    for n in gone:
        net.isolate(n)
        for c in cores:
            c.observe_member(n, False, 4.0)
    net.run(4.05, 8.9)
    assert len(net.cores[lead].config.voters) == 5  # not yet: 5 s
    net.run(9.0, 9.3)
    assert len(net.cores[lead].config.voters) in (3, 4)
    net.run(9.35, 11.0)
    assert net.cores[lead].config.voters == tuple(n for n in "abcde" if n not in gone)


def test_leader_removes_a_voter_that_left_at_once_and_a_two_voter_survivor_takes_over():
    cfg = replace(CFG, removal_timeout=30.0)
    cores = [core(n, cfg=cfg) for n in "abc"]
    net = Net(*cores)
    net.run(0.0, 4.0)
    (lead,) = net.leaders()
    leaver = next(n for n in "abc" if n != lead)
    net.isolate(leaver)
    for c in cores:
        c.observe_member(leaver, False, 4.0, left=True)  # it said goodbye: no 30 s wait
    net.run(4.05, 4.6)
    assert net.cores[lead].config.voters == tuple(n for n in "abc" if n != leaver)
    # The leader leaves too: the last voter takes over at once, not after removal_timeout.
    last = next(n for n in "abc" if n not in (lead, leaver))
    net.isolate(lead)
    net.cores[last].observe_member(lead, False, 5.0, left=True)
    net.run(5.0, 7.0)
    assert net.cores[last].is_leader and net.cores[last].config.voters == (last,)


def test_unknown_voter_is_never_removed():
    a, net = leader_of_three()
    net.run(3.05, 200.0, step=1.0)
    assert a.config.voters == ("a", "b", "c")


# ---- small clusters ------------------------------------------------------------------------------------


def test_single_node_elects_itself():
    a = core("a", voters=("a",))
    fire_timeout(a)
    assert a.is_leader and a.term == 1


def test_sole_voter_restart_leads_the_same_term_again():
    a = core("a", voters=("a",))
    fire_timeout(a)
    disk = a.ready().persist
    assert disk.term == 1 and disk.voted_for == "a"
    again = ElectionCore("a", CFG, random.Random(2), 50.0, state=disk)
    again.tick(53.0)
    assert again.is_leader and again.term == 1 and again.ready().persist is None


def test_two_voters_survivor_takes_over_after_removal_timeout_with_its_parity_term():
    cfg = replace(CFG, removal_timeout=5.0)
    a, b = core("a", ("a", "b"), cfg=cfg), core("b", ("a", "b"), cfg=cfg)
    net = Net(a, b)
    net.run(0.0, 4.0)
    assert len(net.leaders()) == 1
    net.isolate("a")
    net.isolate("b")
    a.observe_member("b", False, 4.0)
    b.observe_member("a", False, 4.0)
    net.run(4.05, 8.9)
    assert net.leaders() == []  # neither has a majority of {a, b}
    net.run(9.0, 10.5)
    assert net.leaders() == ["a", "b"]  # true partition: both sides serve, documented
    assert a.term % 2 == 0 and b.term % 2 == 1  # never the same term
    assert a.config.voters == ("a",) and b.config.voters == ("b",)
    takeovers = [n for n, e in net.events if isinstance(e, BecameLeader) and e.takeover]
    assert sorted(takeovers) == ["a", "b"]
    higher = max((a, b), key=lambda c: c.term).id
    net.cut.clear()  # heal: the higher term wins
    a.observe_member("b", True, 11.0)
    b.observe_member("a", True, 11.0)
    net.run(11.0, 14.0)
    assert net.leaders() == [higher]
    assert net.cores[higher].config.voters == ("a", "b")


def test_no_takeover_with_a_two_voter_set_the_other_voter_never_got():
    """Found by the 10,000-seed campaign: a leader of {a, b, c} removes dead c while b is cut off. b still
    counts {a, b, c}, so c (back) and b may elect a leader of the next term; a must not take over into it."""
    cfg = replace(CFG, removal_timeout=5.0)
    a, b, c = (core(n, cfg=cfg) for n in "abc")
    net = Net(a, b, c)
    b._deadline = c._deadline = 99.0
    net.run(0.0, 4.0)
    assert net.leaders() == ["a"]
    net.isolate("c")
    a.observe_member("c", False, 4.0)
    net.run(4.05, 8.9)
    net.isolate("b")  # b never hears of the new set
    net.run(9.0, 9.6)
    assert a.config.voters == ("a", "b") and not a.config_shared and a.hard_state().config_shared is False
    assert b.config.voters == ("a", "b", "c")
    a.observe_member("b", False, 9.6)
    net.run(9.65, 30.0)
    assert not a.is_leader  # waits: b and c may lead the next term under {a, b, c}
    # Had b acked the set, a would take over (the documented two-voter rule).
    a2, b2 = core("a", ("a", "b"), cfg=cfg), core("b", ("a", "b"), cfg=cfg)
    assert a2.config_shared and b2.config_shared


def test_takeover_disabled_keeps_two_voters_leaderless():
    cfg = replace(CFG, removal_timeout=5.0, small_cluster_takeover=False)
    a = core("a", ("a", "b"), cfg=cfg)
    a.observe_member("b", False, 0.0)
    for t in range(0, 60):
        a.tick(float(t))
        for s in sent(a):
            assert s[1].type == "vote_request"
    assert not a.is_leader


def test_rival_leader_in_same_term_yields_to_lower_id():
    b = core("b", voters=("b",))
    fire_timeout(b)
    assert b.is_leader
    sent(b)
    b.step("a", Heartbeat(term=b.term, sent_at=5.0, lease=1.0, config=VoterSet(voters=("a",))), 5.0)
    assert b.role is Role.FOLLOWER and b.leader == "a"
    c = core("c", voters=("c",))
    fire_timeout(c)
    c.step("d", Heartbeat(term=c.term, sent_at=5.0, lease=1.0, config=VoterSet(voters=("d",))), 5.0)
    assert c.is_leader


def test_step_rejects_foreign_messages():
    with pytest.raises(TypeError):
        core("a").step("b", object(), 0.0)


# ---- fencing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("highest", "applied", "term", "version", "ok"),
    [
        (0, (0, 0), 1, 1, True),
        (3, (3, 5), 3, 6, True),  # newer version, same term
        (3, (3, 5), 3, 5, False),  # same placement again
        (3, (3, 5), 3, 4, False),  # older version
        (4, (3, 5), 3, 9, False),  # deposed coordinator: term below highest seen
        (4, (3, 5), 4, 1, True),  # new coordinator may restart its version
        (5, (3, 5), 4, 7, False),
        (2, (3, 5), 3, 6, True),
    ],
)
def test_accept_placement_table(highest, applied, term, version, ok):
    assert accept_placement(highest, applied, term, version) is ok


def test_fence_tracks_highest_term():
    f = PlacementFence()
    assert f.accept(1, 1)
    f.observe_term(3)
    assert not f.accept(2, 10)
    assert f.accept(3, 1) and (f.term, f.version, f.highest_term) == (3, 1, 3)
    assert not f.accept(3, 1)
