"""Hostile inter-node messages, shared by the in-process transport tests and the live-node tests."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from aivailable.gossip import envelope
from aivailable.gossip.messages import Gossip


def seal(body: Any, secret: bytes, sender: str = "intruder", ts: float | None = None) -> bytes:
    return envelope.seal(body, secret, sender, time.time() if ts is None else ts, os.urandom(12))


def _with_mac(good: bytes, mac: str) -> bytes:
    header_len = int.from_bytes(good[4:6], "big")
    header = json.loads(good[6 : 6 + header_len])
    header["mac"] = mac
    raw = json.dumps(header).encode()
    return good[:4] + len(raw).to_bytes(2, "big") + raw + good[6 + header_len :]


def bad_envelopes(secret: bytes, receiver: str, max_bytes: int = envelope.MAX_BYTES) -> list[tuple[str, bytes, int, str]]:
    """(what, frame, HTTP status, rejection reason) for every way a message must be refused, at an
    endpoint that takes envelopes of up to `max_bytes`."""
    good = seal(Gossip(updates=()), secret)
    header_len = int.from_bytes(good[4:6], "big")
    odd = b'{"sender":"\\ud800","ts":1,"nonce":"abcdefgh","mac":"00"}'  # a lone surrogate as sender
    v2 = bytearray(good)
    v2[3] = 2
    return [
        ("forged signature", _with_mac(good, "0" * 64), 401, "bad_signature"),
        ("missing signature", _with_mac(good, ""), 401, "missing_signature"),
        ("wrong secret", seal(Gossip(updates=()), b"another-secret-entirely-000000"), 401, "bad_signature"),
        ("tampered body", good[:-1] + b"]", 401, "bad_signature"),
        ("stale timestamp", seal(Gossip(updates=()), secret, ts=time.time() - 120), 400, "stale"),
        ("future timestamp", seal(Gossip(updates=()), secret, ts=time.time() + 120), 400, "stale"),
        ("truncated frame", good[: 6 + header_len // 2], 400, "malformed"),
        ("truncated JSON body", seal(b'{"v":1,"type":"gossip","upd', secret), 400, "malformed"),
        ("undecodable sender id", b"AIV\x01" + len(odd).to_bytes(2, "big") + odd + b"{}", 400, "malformed"),
        ("not an envelope", b"GET / HTTP/1.0\r\n\r\n", 400, "malformed"),
        ("unknown message version", seal(b'{"v":99,"type":"gossip","updates":[]}', secret), 400, "unknown_version"),
        ("unknown envelope version", bytes(v2), 400, "unknown_version"),
        ("unknown message type", seal(b'{"v":1,"type":"frobnicate"}', secret), 400, "unknown_type"),
        ("signed as the receiver", seal(Gossip(updates=()), secret, sender=receiver), 409, "own_id"),
        ("oversized", b"\0" * (max_bytes + 1), 413, "oversized"),
    ]
