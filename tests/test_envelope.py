"""Signed envelope codec and wire messages: every rejection has its own typed reason."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.errors import ConfigError
from aivailable.gossip import envelope
from aivailable.gossip.envelope import (
    BadSignature,
    EnvelopeError,
    Malformed,
    MissingSignature,
    Oversized,
    ReplayCache,
    Replayed,
    StaleTimestamp,
    UnknownVersion,
    cluster_id_hash,
    seal,
)
from aivailable.gossip.messages import (
    Ack,
    Alive,
    Dead,
    Facts,
    Gossip,
    Heartbeat,
    HeartbeatAck,
    MemberState,
    Nack,
    Ping,
    PingReq,
    PlacementPublish,
    Status,
    Suspect,
    Sync,
    UnknownType,
    VoteRequest,
    VoteResponse,
    VoterSet,
    decode,
    encode,
)

SECRET = b"correct horse battery staple"
NOW = 1_750_000_000.0
NONCE = bytes(range(16))

EVERY_MESSAGE = [
    Ping(seq=1, target="b", updates=(Alive(node="a", incarnation=2, addr="10.0.0.1:7946"),)),
    PingReq(seq=2, target="c", updates=(Suspect(node="c", incarnation=1, accuser="a"),)),
    Ack(seq=3, updates=(Dead(node="d", incarnation=4, accuser="a"),)),
    Nack(seq=4),
    Gossip(
        updates=(Facts(node="a", version=7, facts={"devices": [{"id": "gpu0", "free": 8000}], "x": None}),)
    ),
    Sync(
        members=(
            MemberState(
                node="a", addr="h:1", incarnation=1, status=Status.ALIVE, facts_version=2, facts={"k": 1}
            ),
            MemberState(node="b", addr="h:2", incarnation=0, status=Status.DEAD),
        ),
        reply=True,
    ),
    VoteRequest(term=5, pre=True, config_term=4, config_index=2),
    VoteResponse(term=5, pre=False, granted=True),
    Heartbeat(term=5, sent_at=12.5, lease=1.0, config=VoterSet(voters=("a", "b"), term=4, index=3)),
    HeartbeatAck(term=5, sent_at=12.5, success=True, config_term=4, config_index=3),
    PlacementPublish(term=5, version=9, assignments={"gemma": {"node": "a", "gpus": ["gpu0"]}}),
]


def fresh_cache() -> ReplayCache:
    return ReplayCache(window=30.0)


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=lambda m: m.type)
def test_every_message_round_trips_through_body_and_envelope(msg):
    assert decode(encode(msg)) == msg
    data = seal(msg, SECRET, "node-a", NOW, NONCE)
    assert envelope.open(data, SECRET, NOW + 0.01, fresh_cache()) == ("node-a", msg)


def test_seal_accepts_raw_body_bytes_and_str_secret():
    data = seal(encode(Nack(seq=1)), SECRET.decode(), "a", NOW, NONCE.hex())
    assert envelope.unseal(data, SECRET, NOW, fresh_cache()) == ("a", Nack(seq=1))


def _frame(header: dict, body: bytes, version: int = 1, magic: bytes = b"AIV") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack(">3sBH", magic, version, len(raw)) + raw + body


def _parts(data: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack_from(">H", data, 4)
    return json.loads(data[6 : 6 + hlen]), data[6 + hlen :]


GOOD = seal(Nack(seq=1), SECRET, "a", NOW, NONCE)


def _mutate(**changes) -> bytes:
    header, body = _parts(GOOD)
    body = changes.pop("body", body)
    header.update(changes)
    header = {k: v for k, v in header.items() if v is not ...}
    return _frame(header, body)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (seal(Nack(seq=1), b"another secret", "a", NOW, NONCE), BadSignature),
        (_mutate(mac=""), MissingSignature),
        (_mutate(mac=...), MissingSignature),
        (_mutate(body=b'{"v":1,"seq":2,"type":"nack"}'), BadSignature),
        (_mutate(sender="b"), BadSignature),
        (_mutate(ts=int(NOW * 1000) + 1), BadSignature),
        (_mutate(nonce="00" * 16), BadSignature),
        (_mutate(mac=12), BadSignature),
        (GOOD[:5], Malformed),
        (GOOD[:20], Malformed),
        (_frame({"sender": "a"}, b"")[:-3] + b"}}}", Malformed),
        (_frame([1, 2], b""), Malformed),
        (_frame({}, b""), Malformed),
        (_mutate(ts="soon"), Malformed),
        (_mutate(ts=True), Malformed),
        (_frame(_parts(GOOD)[0], _parts(GOOD)[1], version=2), UnknownVersion),
        (b"XYZ" + GOOD[3:], Malformed),
        (b"", Malformed),
    ],
)
def test_rejections_are_typed(data, error):
    with pytest.raises(error) as exc:
        envelope.open(data, SECRET, NOW, fresh_cache())
    assert isinstance(exc.value, EnvelopeError) and exc.value.reason == error.reason


def test_reason_codes_are_distinct():
    classes = [Oversized, Malformed, UnknownVersion, MissingSignature, BadSignature, StaleTimestamp, Replayed]
    reasons = [c.reason for c in classes] + [UnknownType.reason]
    assert len(set(reasons)) == len(reasons)


def _sealed_body(body: bytes) -> bytes:
    return seal(body, SECRET, "a", NOW, NONCE)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"v":2,"type":"nack","seq":1}', UnknownVersion),
        (b'{"type":"nack","seq":1}', UnknownVersion),
        (b'{"v":1,"type":"teleport","seq":1}', UnknownType),
        (b'{"v":1,"type":"nack","seq":"one"}', Malformed),
        (b'{"v":1,"type":"nack"', Malformed),
        (b"[1,2,3]", Malformed),
        (b"\xff\xfe", Malformed),
        (b'{"v":1,"type":"ping","seq":1,"target":"b","updates":[{"type":"alive","node":"a"}]}', Malformed),
    ],
)
def test_body_rejections(body, error):
    with pytest.raises(error):
        envelope.open(_sealed_body(body), SECRET, NOW, fresh_cache())


def test_oversized_is_rejected_before_parsing():
    big = seal(
        Gossip(updates=(Facts(node="a", version=1, facts={"x": "y" * 5000}),)), SECRET, "a", NOW, NONCE
    )
    with pytest.raises(Oversized):
        envelope.open(big, SECRET, NOW, fresh_cache(), max_bytes=4096)
    with pytest.raises(Oversized):
        envelope.open(b"\0" * 10_000, SECRET, NOW, fresh_cache(), max_bytes=4096)
    assert envelope.open(big, SECRET, NOW, fresh_cache(), max_bytes=len(big))[0] == "a"


@pytest.mark.parametrize(
    ("skew", "ok"), [(0.0, True), (29.9, True), (-29.9, True), (30.5, False), (-31.0, False)]
)
def test_timestamp_window(skew, ok):
    data = seal(Nack(seq=1), SECRET, "a", NOW + skew, NONCE)
    if ok:
        assert envelope.open(data, SECRET, NOW, fresh_cache())[1] == Nack(seq=1)
    else:
        with pytest.raises(StaleTimestamp):
            envelope.open(data, SECRET, NOW, fresh_cache())


def test_replay_is_rejected_then_stale_after_the_window():
    cache = fresh_cache()
    assert envelope.open(GOOD, SECRET, NOW, cache)
    with pytest.raises(Replayed):
        envelope.open(GOOD, SECRET, NOW + 5, cache)
    with pytest.raises(StaleTimestamp):
        envelope.open(GOOD, SECRET, NOW + 31, cache)
    cache.expire(NOW + 31)
    assert len(cache) == 0  # expired by time
    other = seal(Nack(seq=1), SECRET, "b", NOW, NONCE)  # same nonce, other sender: not a replay
    assert envelope.open(other, SECRET, NOW, cache)


def test_forgery_does_not_poison_the_replay_cache():
    cache = fresh_cache()
    with pytest.raises(BadSignature):
        envelope.open(_mutate(sender="b"), SECRET, NOW, cache)
    assert len(cache) == 0


def test_replay_cache_is_bounded_and_fails_closed():
    cache = ReplayCache(window=30.0, max_entries=3)
    for i in range(3):
        assert cache.check_and_add("a", f"n{i}", NOW + i, NOW + i)
    assert cache.check_and_add("a", "n3", NOW + 3, NOW + 3)  # evicts n0 (ts NOW)
    assert len(cache) == 3 and cache.floor == NOW
    assert not cache.check_and_add("a", "n0", NOW, NOW + 3)  # could be a replay: refused
    assert not cache.check_and_add("b", "fresh", NOW - 1, NOW + 3)  # as old as the evicted: refused
    assert cache.check_and_add("b", "fresh", NOW + 3.5, NOW + 3.5)


def test_replay_cache_rejects_bad_config():
    with pytest.raises(ConfigError):
        ReplayCache(window=0)
    with pytest.raises(ConfigError):
        ReplayCache(max_entries=0)


def test_seal_validates_its_inputs():
    with pytest.raises(ConfigError):
        seal(Nack(seq=1), b"", "a", NOW, NONCE)
    with pytest.raises(ValueError):
        seal(Nack(seq=1), SECRET, "", NOW, NONCE)
    with pytest.raises(ValueError):
        seal(Nack(seq=1), SECRET, "a\n", NOW, NONCE)
    with pytest.raises(ValueError):
        seal(Nack(seq=1), SECRET, "a", NOW, b"\x00")


def test_cluster_id_hash_identifies_without_revealing():
    h = cluster_id_hash(SECRET)
    assert h == cluster_id_hash(SECRET.decode()) and len(h) == 16 and int(h, 16) >= 0
    assert h != cluster_id_hash(b"other secret")
    assert SECRET.hex()[:8] not in h and b"horse" not in h.encode()
    with pytest.raises(ConfigError):
        cluster_id_hash(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_ever_raise_envelope_errors(data):
    with pytest.raises(EnvelopeError):
        envelope.open(data, SECRET, NOW, fresh_cache())


def test_every_single_bit_flip_is_rejected():
    for pos in range(len(GOOD)):
        for bit in range(8):
            data = bytearray(GOOD)
            data[pos] ^= 1 << bit
            with pytest.raises(EnvelopeError):
                envelope.open(bytes(data), SECRET, NOW, fresh_cache())
