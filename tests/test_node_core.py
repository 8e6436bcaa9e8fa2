"""The sans-IO node core driven message by message on a virtual clock: founding, seed waits, mDNS
candidates (issue 20 defect 2) and placement delivery; and the proof that the simulator and the
transport drive this same class."""

from __future__ import annotations

import inspect
import random
from dataclasses import replace

import pytest

from aivailable.errors import ConfigError
from aivailable.gossip.messages import PlacementPublish, Sync
from aivailable.gossip.node_core import NodeCore, NodeCoreConfig, Note, Outbound
from aivailable.gossip.sim import Sim, SimConfig
from aivailable.gossip.simnode import SimNode
from aivailable.gossip.transport import ClusterTransport

CFG = NodeCoreConfig.local()
FAKE = "10.9.9.9:8000"  # an address nobody answers from


def core(node: str = "a", cfg: NodeCoreConfig = CFG, now: float = 0.0, voters: tuple[str, ...] = ()) -> NodeCore:
    c = NodeCore(node, f"{node}:1", cfg, random.Random(node), now, voters=voters)
    c.start(now)
    return c


class Clock:
    """Drives one core alone: every send fails (nobody answers), as for a node whose peers are fake."""

    def __init__(self, c: NodeCore):
        self.c, self.now, self.sent, self.notes = c, 0.0, [], []

    def drain(self) -> None:
        while self.c.has_ready():
            rd = self.c.ready()
            self.c.advance()
            self.sent += rd.messages
            self.notes += [e.text for e in rd.events if isinstance(e, Note)]
            for out in rd.messages:
                if out.ack is not None:
                    self.c.delivered(out.ack, False, self.now)

    def run(self, until: float, step: float = 0.05) -> None:
        while self.now < until:
            self.now = round(self.now + step, 6)
            self.c.tick(self.now)
            self.drain()


def test_the_simulator_and_the_transport_drive_the_production_core():
    sim = Sim(0, SimConfig(nodes=3, faults=False))
    assert all(type(n.core) is NodeCore for n in sim.nodes.values())
    boot = Sim(0, SimConfig(nodes=3, bootstrap="rooted"))
    boot.run_until(30.0)
    assert boot.nodes and all(type(n.core) is NodeCore for n in boot.nodes.values())
    # No second driver of the inner cores: SimNode builds neither of them itself.
    src = inspect.getsource(SimNode)
    assert "MembershipCore(" not in src and "ElectionCore(" not in src and "PlacementFence(" not in src
    assert "NodeCore(" in inspect.getsource(ClusterTransport.__init__)


def test_a_lone_node_without_seeds_founds_after_the_grace():
    clk = Clock(core())
    clk.run(CFG.bootstrap_grace - 0.1)
    assert clk.c.term == 0
    clk.run(CFG.bootstrap_grace + 0.5)
    assert clk.c.is_leader and clk.c.elect.config.voters == ("a",)
    assert any("bootstrapped" in t and "no join seeds" in t for t in clk.notes)


def test_a_node_told_to_join_never_founds_alone():
    clk = Clock(core())
    clk.c.join(["b:1"], 0.0)
    clk.run(CFG.seed_wait + 5.0)
    assert clk.c.term == 0 and not clk.c.elect.config.voters


def test_a_fake_mdns_peer_neither_blocks_founding_nor_gets_gossip_forever():
    """Issue 20 defect 2: a record announced before the node starts, at an address nobody answers on."""
    clk = Clock(core())
    assert clk.c.discovered(FAKE, 0.0)
    clk.drain()
    clk.run(CFG.bootstrap_grace + 0.5)
    assert clk.c.is_leader and clk.c.term >= 1 and clk.c.elect.config.voters == ("a",)
    clk.run(CFG.candidate_cooldown - 2.0)
    to_fake = [o for o in clk.sent if o.addr == FAKE]
    assert len(to_fake) == CFG.candidate_attempts and all(isinstance(o.msg, Sync) for o in to_fake)
    assert not clk.c.candidates
    assert any("forgotten" in t and FAKE in t for t in clk.notes)
    # Re-announced: ignored while it cools down, tried again afterwards.
    assert not clk.c.discovered(FAKE, clk.now)
    assert clk.c.discovered(FAKE, clk.now + CFG.candidate_cooldown)


def test_unverified_candidates_are_capped():
    c = core()
    added = [c.discovered(f"10.0.0.{i}:8000", 0.0) for i in range(CFG.max_candidates + 5)]
    assert sum(added) == CFG.max_candidates and c.candidates_dropped == 5
    assert not c.discovered("a:1", 0.0) and not c.discovered("10.0.0.0:8000", 0.0)  # itself; a known one


def test_a_candidate_that_answers_with_a_signed_message_is_verified():
    a, b = core("a"), core("b")
    a.discovered("b:1", 0.0)
    push = next(o for o in a.ready().messages if o.addr == "b:1")
    a.advance()
    b.step("a", push.msg, 0.1)  # b got a's push (a signed envelope: b holds the secret) ...
    reply = next(o for o in b.ready().messages if o.addr == "a:1")
    a.step("b", reply.msg, 0.2)  # ... and answers with its own signed state
    assert "b" in a.mem.live_members() and not a.candidates
    assert any(isinstance(e, Note) and "verified" in e.text for e in a.ready().events)


def test_new_nodes_wait_for_a_silent_seed_then_found_without_it():
    """The e3a5284 rule on a virtual clock: b and c know each other, b's seed s never answers."""
    b, c = core("b"), core("c")
    b.join(["s:1"], 0.0)
    net = {"b:1": b, "c:1": c}
    c.join(["b:1"], 0.0)
    now = 0.0
    while now < CFG.seed_wait + 2.0 and b.term == 0:
        now = round(now + 0.05, 6)
        for n in (b, c):
            n.tick(now)
        moved = True
        while moved:
            moved = False
            for n in (b, c):
                rd = n.ready()
                n.advance()
                for out in rd.messages:
                    moved = True
                    dst = net.get(out.addr or "")
                    if dst is not None:
                        dst.step(n.id, out.msg, now)
                    if out.ack is not None:
                        n.delivered(out.ack, dst is not None, now)
        if now < CFG.seed_wait - 0.1:
            assert b.term == 0 and c.term == 0, f"founded at {now} before the seed wait ran out"
    assert b.is_leader and CFG.seed_wait <= now < CFG.seed_wait + 1.0
    assert "never answered" in (b.founded or "")


def test_placement_is_resent_until_acknowledged():
    quiet = replace(CFG, membership=replace(CFG.membership, probe_interval=1e6, probe_timeout=1.0))  # b stays alive
    a = core("a", quiet, voters=("a",))
    a.mem.seed_members([*core("b").mem.full_state()[:1]], 0.0)
    a.elect.observe_member("b", True, 0.0)
    now = 0.0
    while not a.is_leader:
        now += 0.05
        a.tick(now)
    a.advance()
    stamp = a.publish_placement({"m": {"node": "b"}}, now)
    assert stamp is not None

    def placements() -> list[Outbound]:
        rd = a.ready()
        a.advance()
        return [o for o in rd.messages if isinstance(o.msg, PlacementPublish) and o.to == "b"]

    first = placements()
    assert len(first) == 1 and first[0].ack == ("placement", "b", *stamp)
    a.tick(now + CFG.placement_resend + 0.01)
    assert placements() == []  # still in flight: no second copy
    a.delivered(first[0].ack, False, now + 0.3)  # no 2xx answer
    a.tick(now + 2 * CFG.placement_resend + 0.02)
    again = placements()
    assert len(again) == 1
    a.delivered(again[0].ack, True, now + 0.5)
    assert a.acked["b"] == stamp
    a.tick(now + 3 * CFG.placement_resend + 0.03)
    assert placements() == []  # acknowledged: nothing more until the refresh
    a.tick(now + CFG.placement_refresh + 0.1)
    assert len(placements()) == 1


def test_core_config_is_validated():
    for field, bad in (("max_candidates", 0), ("candidate_attempts", 0), ("placement_resend", 0.0),
                       ("seed_wait", -1.0)):
        with pytest.raises(ConfigError) as e:
            replace(CFG, **{field: bad}).validate()
        assert e.value.param == field

