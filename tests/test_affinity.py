"""Prefix-aware routing (api/affinity.py, api/router.py:pick): keys are canonical, choices agree and stay
within the load bound."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from aivailable.api import affinity
from aivailable.api.affinity import PREFIX_CHARS, affine, chat_key, completion_key, order
from aivailable.api.router import Upstream, pick
from aivailable.wire.schemas import parse_request

SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 20}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                           "parameters": {"type": "object", "required": ["city"],
                                                          "properties": {"city": {"type": "string"}}}}}]


def chat(messages: list[dict], **extra) -> object:
    return parse_request("chat", {"model": "m", "messages": messages, **extra})


@dataclass
class R:
    key: str
    slots: int = 2
    outstanding: int = 0
    reported_load: int = 0


def test_every_turn_of_a_conversation_has_the_key_of_its_first():
    turn1 = [SYSTEM, {"role": "user", "content": "Plan a trip to Lisbon."}]
    turn3 = [*turn1, {"role": "assistant", "content": "Day 1: Alfama."},
             {"role": "user", "content": "And day 2?"}, {"role": "assistant", "content": "Belem."},
             {"role": "user", "content": "Day 3?"}]
    assert chat_key(chat(turn1)) == chat_key(chat(turn3))


def test_the_key_ignores_how_the_client_formats_the_same_conversation():
    plain = chat([SYSTEM, {"role": "user", "content": "Hello there"}], tools=TOOLS)
    parts = chat([{"role": "system", "content": [{"type": "text", "text": SYSTEM["content"]}]},
                  {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}],
                 tools=[{"function": {"parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"],
                                                     "type": "object"},
                                      "description": "Weather for a city.", "name": "get_weather"},
                         "type": "function"}])
    assert chat_key(plain) == chat_key(parts)


@pytest.mark.parametrize("other", [
    [SYSTEM, {"role": "user", "content": "Plan a trip to Porto."}],               # another opening question
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plan a trip to Lisbon."}],
    [{"role": "user", "content": "Plan a trip to Lisbon."}],                       # no system prompt
])
def test_different_conversations_have_different_keys(other):
    base = chat_key(chat([SYSTEM, {"role": "user", "content": "Plan a trip to Lisbon."}]))
    assert chat_key(chat(other)) != base


def test_tools_are_part_of_the_key():
    msgs = [{"role": "user", "content": "Weather?"}]
    assert chat_key(chat(msgs)) != chat_key(chat(msgs, tools=TOOLS))


def test_completion_key_covers_one_reuse_chunk_and_needs_one():
    short = parse_request("completions", {"model": "m", "prompt": "x" * (PREFIX_CHARS - 1)})
    assert completion_key(short) is None
    a = parse_request("completions", {"model": "m", "prompt": "y" * PREFIX_CHARS + " first"})
    b = parse_request("completions", {"model": "m", "prompt": "y" * PREFIX_CHARS + " second, longer"})
    assert completion_key(a) == completion_key(b) is not None
    assert affinity.request_key("embeddings", object()) is None


def test_the_order_is_the_same_whatever_order_the_replicas_are_listed_in():
    reps = [R(f"n{i}/m@g0") for i in range(5)]
    key = b"conversation-1"
    want = [r.key for r in order(key, reps)]
    for seed in range(5):
        shuffled = reps[:]
        random.Random(seed).shuffle(shuffled)
        assert [r.key for r in order(key, shuffled)] == want
        assert affine(shuffled, key).key == want[0]


@pytest.mark.parametrize("loads, expect_index", [
    ((0, 0, 0), 0),   # idle: the key's first choice
    ((1, 0, 0), 0),   # a free slot left on the first choice: it still takes it
    ((2, 0, 0), 1),   # first choice full (2 slots), the rest idle: past the bound, the next one
    ((2, 2, 0), 2),
    ((2, 2, 2), None),  # everyone full: no one within the bound (the caller falls back to two choices)
    ((4, 4, 4), 0),   # everyone equally queued: within the bound again
    ((6, 1, 1), 1),   # first choice far above the average
])
def test_bounded_load_table(loads, expect_index):
    reps = [R(f"n{i}/m@g0") for i in range(3)]
    key = b"hot conversation"
    ranked = order(key, reps)
    for r, n in zip(ranked, loads, strict=True):
        r.outstanding = n
    assert affine(reps, key) is (None if expect_index is None else ranked[expect_index])


def test_no_replica_within_the_bound_gives_none():
    reps = [R("a", slots=1, outstanding=3), R("b", slots=1, outstanding=3)]
    assert affine(reps, b"k", bound=1.0) is None
    assert affine(reps, b"k", bound=1.25) is not None  # 4 <= floor(1.25 x 7 / 2)


def test_keys_spread_over_replicas_in_proportion_to_their_slots():
    reps = [R("n1/m@g0", slots=2), R("n2/m@g0", slots=2), R("n3/m@g0", slots=4)]
    counts = Counter(order(f"conversation {i}".encode(), reps)[0].key for i in range(4000))
    assert 0.20 < counts["n1/m@g0"] / 4000 < 0.30 and 0.20 < counts["n2/m@g0"] / 4000 < 0.30
    assert 0.45 < counts["n3/m@g0"] / 4000 < 0.55


def test_removing_a_replica_moves_only_the_keys_it_had():
    reps = [R(f"n{i}/m@g0") for i in range(4)]
    keys = [f"c{i}".encode() for i in range(500)]
    before = {k: order(k, reps)[0].key for k in keys}
    after = {k: order(k, reps[:3])[0].key for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "n3/m@g0" for k in moved)


def ups(n: int) -> list[Upstream]:
    return [Upstream(key=f"n{i}/m@g0", model="m", session_fn=lambda: None, base_url="", local=i == 0, slots=2)
            for i in range(n)]


def test_pick_follows_the_key_and_counts_how_it_chose():
    rng, counts = random.Random(1), {}
    u = ups(3)
    first = pick(u, rng, set(), b"k1", counts)
    assert all(pick(u, rng, set(), b"k1", counts) is first for _ in range(10))
    first.outstanding = 2  # full: the next in the key's order
    assert pick(u, rng, set(), b"k1", counts) is order(b"k1", u)[1]
    pick(u, rng, set(), None, counts)
    pick(u[:1], rng, set(), b"k1", counts)
    assert counts == {"prefix": 12, "p2c": 1, "only": 1}
    for x in u:
        x.outstanding = 2  # every replica full
    pick(u, rng, set(), b"k1", counts)
    assert counts["overflow"] == 1


def test_pick_skips_replicas_in_cooldown_and_tried_ones():
    import time

    u = ups(3)
    ranked = order(b"k", u)
    ranked[0].cooldown_until = time.monotonic() + 60
    assert pick(u, random.Random(0), set(), b"k") is ranked[1]
    assert pick(u, random.Random(0), {ranked[1].key}, b"k") is ranked[2]  # a retry / resumed stream
