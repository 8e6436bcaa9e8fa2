"""The cluster's key set (aivailable/apikeys/): CRDT merge rules as tables and hypothesis properties, key
text parse/verify, expiry, persistence, and the cluster-wide rate limit's admission arithmetic."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.apikeys import keyset as ks
from aivailable.apikeys import quota, store
from aivailable.apikeys.keyset import ChangeError, KeySet, Record, Verdict
from aivailable.apikeys.ring import KeyRing
from aivailable.statedir import StateDirError

T0 = 1_800_000_000.0


def rec(name: str, ts: int, node: str = "n1", revoked: bool = False, **kw) -> Record:
    return Record(name=name, kind=kw.pop("kind", "user"), key_id=kw.pop("key_id", f"{ts:016x}"), salt="00" * 16,
                  hash="ab" * 32, stamp=(ts, node), revoked=revoked, **kw)


def keyset(*records: Record) -> KeySet:
    return ks.merge(KeySet(), records)


# -- merge rules: tables ---------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, winner", [
    (rec("k", 1), rec("k", 2), "b"),                          # later stamp wins
    (rec("k", 2), rec("k", 1), "a"),
    (rec("k", 5, "n1"), rec("k", 5, "n2"), "b"),              # same ms: the node id breaks the tie
    (rec("k", 5, "n1", revoked=True), rec("k", 5, "n1"), "a"),  # same stamp: a revoke beats an add
    (rec("k", 5, "n1"), rec("k", 5, "n1", revoked=True), "b"),
    (rec("k", 4, revoked=True), rec("k", 9), "b"),            # re-added after the revoke
    (rec("k", 9, revoked=True), rec("k", 4), "a"),            # an older add does not resurrect it
])
def test_last_writer_wins_per_name_and_revoke_wins_a_tie(a, b, winner):
    expect = a if winner == "a" else b
    assert keyset(a).records.keys() == {"k"}
    assert ks.merge(keyset(a), keyset(b)).get("k") == expect
    assert ks.merge(keyset(b), keyset(a)).get("k") == expect


def test_names_are_independent_and_digest_names_the_version():
    s1 = keyset(rec("a", 1), rec("b", 2))
    s2 = keyset(rec("b", 2), rec("a", 1))
    assert s1 == s2 and ks.digest(s1) == ks.digest(s2) and len(ks.digest(s1)) == 16
    assert ks.digest(ks.merge(s1, [rec("a", 3, revoked=True)])) != ks.digest(s1)
    assert ks.digest(KeySet()) == ks.digest(keyset())


# -- merge properties: hypothesis ------------------------------------------------------------------------

records = st.builds(
    lambda name, ts, node, revoked, rpm: rec(name, ts, node, revoked, rpm=rpm),
    st.sampled_from(["a", "b", "c"]), st.integers(0, 5), st.sampled_from(["n1", "n2"]), st.booleans(),
    st.sampled_from([0, 1, 30]))
sets = st.lists(records, max_size=6).map(lambda rs: keyset(*rs))


@settings(max_examples=300, deadline=None)
@given(sets, sets, sets)
def test_merge_is_commutative_associative_idempotent(a, b, c):
    assert ks.merge(a, b) == ks.merge(b, a)
    assert ks.merge(ks.merge(a, b), c) == ks.merge(a, ks.merge(b, c))
    assert ks.merge(a, a) == a and ks.merge(ks.merge(a, b), b) == ks.merge(a, b)
    assert ks.digest(ks.merge(a, b)) == ks.digest(ks.merge(b, a))


@settings(max_examples=100, deadline=None)
@given(st.lists(records, max_size=8), st.randoms(use_true_random=False))
def test_any_delivery_order_converges(rs, rnd):
    shuffled = list(rs)
    rnd.shuffle(shuffled)
    one = KeySet()
    for r in rs:
        one = ks.merge(one, [r])
    other = KeySet()
    for r in shuffled + shuffled[:2]:  # and duplicates
        other = ks.merge(other, [r])
    assert one == other


# -- changes, key text, verification, expiry ---------------------------------------------------------------

def test_add_gives_a_key_text_that_verifies_and_is_never_stored():
    s, text = ks.add(KeySet(), name="alice", models=["m2", "m1"], rpm=30, now=T0, node_id="n1")
    key_id, secret = ks.parse_key(text)
    r = s.get("alice")
    assert r.key_id == key_id and r.models == ("m1", "m2") and r.rpm == 30 and r.stamp == (int(T0 * 1000), "n1")
    assert text.startswith("aiv-") and secret not in ks.canonical(s.records.values()) and text not in s.to_list().__repr__()
    assert ks.verify(s, text, T0) == (Verdict.OK, r)
    assert ks.verify(s, text[:-1] + ("A" if text[-1] != "A" else "B"), T0)[0] is Verdict.UNKNOWN
    assert ks.verify(s, "sk-not-ours", T0) == (Verdict.UNKNOWN, None)
    assert ks.verify(s, f"aiv-{'0' * 16}-{secret}", T0)[0] is Verdict.UNKNOWN


@pytest.mark.parametrize("text, ok", [
    ("aiv-0123456789abcdef-" + "x" * 43, True),
    ("aiv-0123456789abcdef-" + "x" * 31, False),     # secret too short
    ("aiv-0123456789ABCDEF-" + "x" * 43, False),     # key id is lowercase hex
    ("aiv-admin-" + "0" * 64, False),                 # the admin key is not a cluster key
    ("aiv-0123456789abcdef" + "x" * 43, False),
    ("", False),
])
def test_parse_key(text, ok):
    assert (ks.parse_key(text) is not None) is ok


def test_revoke_expiry_and_refused_changes():
    s, text = ks.add(KeySet(), name="bob", expires=T0 + 10, now=T0, node_id="n1")
    assert ks.verify(s, text, T0 + 9.9)[0] is Verdict.OK
    assert ks.verify(s, text, T0 + 10)[0] is Verdict.EXPIRED  # at `expires` it is over
    assert s.protecting() and s.active(T0 + 10) == []  # expiry never reopens the cluster
    with pytest.raises(ChangeError) as e:
        ks.add(s, name="bob", now=T0, node_id="n2")
    assert e.value.status == 409
    s2 = ks.revoke(s, "bob", now=T0 + 1, node_id="n2")
    assert ks.verify(s2, text, T0 + 1)[0] is Verdict.REVOKED and not s2.protecting()
    with pytest.raises(ChangeError) as e:
        ks.revoke(s2, "bob", now=T0 + 2, node_id="n1")
    assert e.value.status == 404
    s3, text3 = ks.add(s2, name="bob", now=T0 + 2, node_id="n1")  # the name is free again
    assert ks.verify(s3, text3, T0 + 2)[0] is Verdict.OK and ks.verify(s3, text, T0 + 2)[0] is Verdict.UNKNOWN
    for fields, param in [({"name": "bad name"}, "name"), ({"name": "x", "kind": "root"}, "kind"),
                          ({"name": "x", "rpm": -1}, "rpm"), ({"name": "x", "expires": T0 - 1}, "expires"),
                          ({"name": "x", "models": [""]}, "models")]:
        with pytest.raises(ChangeError) as e:
            ks.add(KeySet(), now=T0, node_id="n1", **fields)
        assert (e.value.status, e.value.param) == (400, param)


def test_a_slow_clock_still_writes_a_newer_stamp():
    s, _ = ks.add(KeySet(), name="k", now=T0, node_id="n1")
    s = ks.revoke(s, "k", now=T0 - 3600, node_id="n2")  # n2's clock is an hour behind
    assert s.get("k").revoked and s.get("k").stamp == (int(T0 * 1000) + 1, "n2")


def test_records_from_peers_are_validated():
    good = rec("a", 1).to_dict()
    assert Record.from_dict(good) == rec("a", 1)
    for bad, field in [({**good, "kind": "root"}, "kind"), ({**good, "name": "a b"}, "name"),
                       ({**good, "rpm": -1}, "rpm"), ({**good, "extra": 1}, "extra"), ({**good, "models": "m"}, "models")]:
        with pytest.raises(ks.RecordError, match=field):
            Record.from_dict(bad)
    with pytest.raises(ks.RecordError):
        KeySet.from_list({"a": 1})


def test_store_round_trip_is_0600_and_atomic(tmp_path):
    path = tmp_path / store.KEYS_FILE
    assert store.load(path) == KeySet()
    s, _ = ks.add(KeySet(), name="a", now=T0, node_id="n1")
    store.save(path, s)
    assert store.load(path) == s
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and not path.with_name(path.name + ".tmp").exists()
    path.write_text("{not json")
    with pytest.raises(StateDirError, match="unreadable API key set"):
        store.load(path)


# -- cluster-wide rate limit arithmetic ------------------------------------------------------------------

@pytest.mark.parametrize("own, others, rpm, ok", [
    (0, [], 0, True), (10**6, [5], 0, True),   # 0 = no limit
    (29, [], 30, True), (30, [], 30, False),
    (10, [10, 9], 30, True), (10, [10, 10], 30, False),
    (0, [31], 30, False),
])
def test_admit(own, others, rpm, ok):
    assert quota.admit(own, others, rpm) is ok


def test_overshoot_bound():
    assert quota.overshoot_bound(30, 1, 100.0, 2.0) == 30
    assert quota.overshoot_bound(30, 3, 2.0, 1.5) == 36
    assert quota.overshoot_bound(30, 3, 100.0, 2.0) == 90  # capped: no node admits more than rpm alone


def test_window_counts_slide():
    w = quota.WindowCounts()
    for t in (0.0, 10.0, 20.0):
        w.note("k", t)
    assert w.count("k", 59.9) == 3 and w.count("k", 60.0) == 2 and w.counts(80.0) == {}
    w.note("k", 100.0)
    assert w.retry_after("k", 130.0) == pytest.approx(30.0) and w.retry_after("x", 130.0) == 1.0


def test_ring_admits_against_peers_counts_and_reports_its_own():
    ring = KeyRing("n1")
    text = ring.add(name="lim", rpm=5, now=T0)
    verdict, r = ring.verify(text, T0)
    ring.set_peers({"n2": (ring.digest, {"lim": 2}), "n3": (None, {"lim": 1})})
    assert [ring.admit(r, 1.0 + i, T0) for i in range(2)] == [0.0, 0.0]
    assert ring.admit(r, 3.0, T0) > 0  # 2 here + 3 elsewhere = 5
    assert ring.facts(3.0) == {"keys": ring.digest, "key_load": {"lim": 2}}
    assert ring.view(T0) == {"active": 1, "digest": ring.digest, "converged": False,
                             "nodes": {"n1": ring.digest, "n2": ring.digest, "n3": None}}
    ring.set_peers({"n2": (ring.digest, {})})  # n3 gone, n2's window emptied
    assert ring.admit(r, 4.0, T0) == 0.0 and ring.view(T0)["converged"]
    assert ring.listing(T0)[0]["last_used"] == {"n1": T0}


def test_facts_of_a_node_without_keys_still_parse():
    """Facts gossiped by a node that predates cluster keys have no `keys`/`key_load`: defaults, no pull."""
    from aivailable.coordinator import NodeFacts

    old = NodeFacts.from_dict({"node_id": "n9", "address": "127.0.0.1:1"})
    assert old.keys is None and old.key_load == {}
    assert NodeFacts.from_dict(old.to_dict()) == old
