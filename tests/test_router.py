"""Replica choice: power of two choices by load per slot, local first on ties, cooled-down peers last."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
from aiohttp import web

from aivailable.api.router import Proxy, Upstream, pick


def up(key: str, *, local: bool = False, slots: int = 1, outstanding: int = 0, reported: int = 0,
       cooldown: float = 0.0) -> Upstream:
    return Upstream(key, "m", lambda: None, "http://x", local, slots=slots, outstanding=outstanding,
                    reported_load=reported, cooldown_until=cooldown)


def test_two_candidates_pick_lower_load_per_slot():
    busy_small = up("a", local=True, slots=1, outstanding=1)
    roomy = up("b", slots=4, outstanding=2)
    assert pick([busy_small, roomy], random.Random(0), set()).key == "b"


def test_local_wins_ties_and_reported_load_counts():
    local, remote = up("l", local=True), up("r")
    assert all(pick([local, remote], random.Random(s), set()).key == "l" for s in range(20))
    assert pick([up("l", local=True, outstanding=1), up("r", reported=3)], random.Random(0), set()).key == "l"
    assert pick([up("l", local=True, outstanding=2), up("r", reported=1)], random.Random(0), set()).key == "r"


def test_excluded_and_cooling_down_replicas_are_avoided():
    hot = up("hot", cooldown=time.monotonic() + 60)
    ok = up("ok", outstanding=5)
    assert all(pick([hot, ok], random.Random(s), set()).key == "ok" for s in range(20))
    assert pick([hot, ok], random.Random(0), {"ok"}).key == "hot"  # better a cooling replica than none
    assert pick([hot, ok], random.Random(0), {"ok", "hot"}) is None


def test_load_spreads_over_many_replicas():
    ups = [up(f"u{i}") for i in range(8)]
    rng = random.Random(7)
    for _ in range(800):
        choice = pick(ups, rng, set())
        choice.outstanding += 1  # requests never finish: P2C must still keep loads close
    loads = sorted(u.outstanding for u in ups)
    assert loads[-1] - loads[0] <= 3, loads


# ---- retries before the first byte, over real sockets ---------------------------------------------------

GOOD_EVENTS = b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'


async def _serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)  # the hanging handler is cancelled at cleanup
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


async def _good(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(GOOD_EVENTS)
    await resp.write_eof()
    return resp


async def _dies_after_headers(request: web.Request) -> web.StreamResponse:
    """A worker killed after answering 200 but before its first token."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    request.transport.close()  # type: ignore[union-attr]
    return resp


async def _hangs(request: web.Request) -> web.StreamResponse:
    """A peer whose machine froze (SIGSTOP): the connection is open, nothing ever comes."""
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


async def _through_proxy(bad_handler, alive_fn=None) -> tuple[int, bytes, str]:
    bad_runner, bad_url = await _serve(bad_handler)
    good_runner, good_url = await _serve(_good)
    session = aiohttp.ClientSession()
    bad = Upstream("bad", "m", lambda: session, bad_url, False, alive_fn=alive_fn)
    good = Upstream("good", "m", lambda: session, good_url, False, cooldown_until=time.monotonic() + 60)
    proxy = Proxy(seed=1)  # `good` is cooling down, so `bad` is always tried first

    async def front(request: web.Request) -> web.StreamResponse:
        return await proxy.forward(request, "/v1/completions", b"{}", [bad, good])

    front_runner, front_url = await _serve(front)
    try:
        async with aiohttp.ClientSession() as client, client.post(front_url + "/v1/completions", data=b"{}") as r:
            return r.status, await r.read(), r.headers.get("X-AIvailable-Replica", "")
    finally:
        await session.close()
        for runner in (front_runner, bad_runner, good_runner):
            await runner.cleanup()


def test_stream_whose_replica_dies_before_its_first_byte_is_retried_on_another():
    status, body, replica = asyncio.run(_through_proxy(_dies_after_headers))
    assert (status, body, replica) == (200, GOOD_EVENTS, "good")  # no error event, no half answer


def test_wait_on_a_peer_declared_dead_moves_to_another_replica():
    declared_dead_at = time.monotonic() + 0.5
    status, body, replica = asyncio.run(_through_proxy(_hangs, alive_fn=lambda: time.monotonic() < declared_dead_at))
    assert (status, body, replica) == (200, GOOD_EVENTS, "good")


# ---- resuming a stream on another replica after it broke mid-way, over real sockets -------------------

def _events(*objs) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n" for o in objs)


def _chunk(kind: str, cid: str, text: str | None, finish: str | None = None, role: bool = False) -> dict:
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    return {"id": cid, "object": "x", "created": 111 if cid == "first" else 999, "model": "m", "choices": [choice]}


async def _resume_through_proxy(kind: str, request: dict, limit: int | None, break_after: list[str],
                                second_dies: bool = False, peer_error: bool = False):
    """`first` sends `break_after` as text events then dies; `second` records what it was asked and finishes."""
    from aivailable.wire.resume import Continuation

    asked: list[dict] = []

    async def first(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        opening = [_chunk(kind, "first", None, role=True)] if kind == "chat" else []
        await resp.write(_events(*opening, *(_chunk(kind, "first", t) for t in break_after)))
        if peer_error:  # a peer node whose own replica broke and which had no other to continue on
            await resp.write(b'data: {"error":{"message":"the replica serving this stream failed","type":'
                             b'"server_error","param":null,"code":"upstream_failed"}}\n\n')
            await resp.write_eof()
            return resp
        await resp.write(b'data: {"id": "first", "choi')  # half an event: it must never reach the client
        await asyncio.sleep(0.05)
        request.transport.close()  # type: ignore[union-attr]  # kill -9 of the worker
        return resp

    async def second(request: web.Request) -> web.StreamResponse:
        asked.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        opening = [_chunk(kind, "second", None, role=True)] if kind == "chat" else []
        usage = {"id": "second", "object": "x", "created": 999, "model": "m", "choices": [],
                 "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}}
        await resp.write(_events(*opening, _chunk(kind, "second", " three"), _chunk(kind, "second", " four")))
        if second_dies:
            request.transport.close()  # type: ignore[union-attr]
            return resp
        await resp.write(_events(_chunk(kind, "second", None, "stop"), usage, b"[DONE]"))
        await resp.write_eof()
        return resp

    runners = [await _serve(first), await _serve(second)]
    session = aiohttp.ClientSession()
    a = Upstream("a", "m", lambda: session, runners[0][1], False)
    b = Upstream("b", "m", lambda: session, runners[1][1], False, cooldown_until=time.monotonic() + 60)
    proxy = Proxy(seed=1)
    body = json.dumps(request).encode()

    async def front(req: web.Request) -> web.StreamResponse:
        return await proxy.forward(req, "/v1/completions", body, [a, b], resume=Continuation(kind, request, limit))

    front_runner, front_url = await _serve(front)
    try:
        async with aiohttp.ClientSession() as client, client.post(front_url + "/v1/completions", data=b"{}") as r:
            raw = await r.read()
    finally:
        await session.close()
        for runner in (front_runner, *(x[0] for x in runners)):
            await runner.cleanup()
    events = [e[len(b"data: "):] for e in raw.split(b"\n\n") if e]
    return events, asked, proxy, (a.outstanding, b.outstanding)


def _texts(kind: str, events: list[bytes]) -> list[str]:
    out = []
    for e in events:
        if e == b"[DONE]":
            continue
        for c in json.loads(e).get("choices", []):
            t = c.get("text") if kind == "completions" else c.get("delta", {}).get("content")
            if t:
                out.append(t)
    return out


def test_completion_stream_broken_mid_way_goes_on_from_another_replica():
    request = {"model": "m", "prompt": "Count:", "max_tokens": 10, "stream": True,
               "stream_options": {"include_usage": True}}
    events, asked, proxy, outstanding = asyncio.run(
        _resume_through_proxy("completions", request, 10, [" one", " two"]))
    assert asked == [{**request, "prompt": "Count: one two", "max_tokens": 8}]
    assert _texts("completions", events) == [" one", " two", " three", " four"]
    objs = [json.loads(e) for e in events if e != b"[DONE]"]
    assert {(o["id"], o["created"]) for o in objs} == {("first", 111)}  # one stream to the client
    assert objs[-1]["usage"] == {"prompt_tokens": 18, "completion_tokens": 5, "total_tokens": 23}
    assert objs[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == b"[DONE]"
    assert not any("error" in o for o in objs) and proxy.resumed == 1 and outstanding == (0, 0)


def test_chat_stream_resumes_by_continuing_the_assistant_message():
    request = {"model": "m", "messages": [{"role": "user", "content": "Count"}], "max_completion_tokens": 10,
               "stream": True}
    events, asked, _, _ = asyncio.run(_resume_through_proxy("chat", request, 10, [" one", " two"]))
    assert asked == [{"model": "m", "stream": True, "max_tokens": 8, "continue_final_message": True,
                      "messages": [{"role": "user", "content": "Count"},
                                   {"role": "assistant", "content": " one two"}]}]
    roles = [json.loads(e)["choices"][0]["delta"].get("role") for e in events if e != b"[DONE]"
             and json.loads(e).get("choices")]
    assert roles.count("assistant") == 1  # the continuation's own opening chunk is dropped
    assert _texts("chat", events) == [" one", " two", " three", " four"]


def test_stream_that_breaks_again_with_no_replica_left_ends_with_an_error_event():
    request = {"model": "m", "prompt": "Count:", "stream": True}
    events, asked, proxy, outstanding = asyncio.run(
        _resume_through_proxy("completions", request, 16, [" one"], second_dies=True))
    assert asked[0]["max_tokens"] == 15  # the default 16, less the one token sent
    assert _texts("completions", events) == [" one", " three", " four"]
    last = json.loads(events[-1])
    assert last["error"]["code"] == "upstream_failed" and proxy.resumed == 1 and outstanding == (0, 0)


def test_stream_log_reads_back_what_was_sent_across_folds_and_chunk_splits():
    """Upstream bytes cut anywhere; only whole events are passed on, and the log's progress equals what
    the client got, also for a stream long enough to be folded several times."""
    from aivailable.wire.resume import StreamLog

    events = [_chunk("completions", "first", f" w{i}") for i in range(3000)]
    raw = _events(*events, _chunk("completions", "first", None, "length"), b"[DONE]")
    rng = random.Random(5)
    log, passed, i = StreamLog(), bytearray(), 0
    while i < len(raw):
        n = rng.randint(1, 300)
        whole = log.split(raw[i:i + n])
        i += n
        assert whole == b"" or whole.endswith(b"\n\n")
        log.record(whole)
        passed += whole
    assert bytes(passed) == raw and log.done
    p = log.progress()
    assert p.text == "".join(f" w{i}" for i in range(3000)) and p.text_events == 3000
    assert (p.id, p.created, p.finish_reason, p.errored) == ("first", 111, "length", False)
    assert len(raw) > 3 * StreamLog.FOLD_BYTES


def test_chat_stream_broken_before_its_first_token_is_asked_again():
    """Only the opening role chunk had been sent: the other replica gets the request as it was."""
    request = {"model": "m", "messages": [{"role": "user", "content": "Count"}], "stream": True}
    events, asked, proxy, _ = asyncio.run(_resume_through_proxy("chat", request, None, []))
    assert asked == [request] and proxy.resumed == 1
    roles = [json.loads(e)["choices"][0]["delta"].get("role") for e in events
             if e != b"[DONE]" and json.loads(e).get("choices")]
    assert roles.count("assistant") == 1 and _texts("chat", events) == [" three", " four"]


def test_stream_broken_after_its_last_token_gets_only_its_end():
    """The budget was spent but the finish had not come: one muted token supplies finish and usage."""
    request = {"model": "m", "prompt": "Count:", "max_tokens": 2, "stream": True,
               "stream_options": {"include_usage": True}}
    events, asked, _, _ = asyncio.run(_resume_through_proxy("completions", request, 2, [" one", " two"]))
    assert asked[0]["max_tokens"] == 1 and asked[0]["prompt"] == "Count: one two"
    assert _texts("completions", events) == [" one", " two"]
    objs = [json.loads(e) for e in events if e != b"[DONE]"]
    assert [o["choices"][0]["finish_reason"] for o in objs if o["choices"]][-1] == "length"
    assert objs[-1]["usage"] == {"prompt_tokens": 18, "completion_tokens": 2, "total_tokens": 20}
    assert events[-1] == b"[DONE]"


def test_a_peers_upstream_failed_event_is_resumed_here_not_passed_on():
    """The holder node could not continue (no other local replica): the entry node continues elsewhere."""
    request = {"model": "m", "prompt": "Count:", "max_tokens": 10, "stream": True}
    events, asked, proxy, _ = asyncio.run(
        _resume_through_proxy("completions", request, 10, [" one", " two"], peer_error=True))
    assert asked == [{**request, "prompt": "Count: one two", "max_tokens": 8}] and proxy.resumed == 1
    assert _texts("completions", events) == [" one", " two", " three", " four"]
    assert not any(b"error" in e for e in events)


async def _busy_with_a_bad_retry_after(request: web.Request) -> web.Response:
    """A replica (a peer's node, maybe an old or hostile one) answering 503 with a Retry-After that is
    not a number."""
    return web.Response(status=503, headers={"Retry-After": "soon"}, text="busy")


def test_an_unparsable_retry_after_from_a_replica_does_not_break_the_request():
    """The next replica is tried, as for any 503 (was a 500 from float("soon"))."""
    status, body, replica = asyncio.run(_through_proxy(_busy_with_a_bad_retry_after))
    assert status == 200 and replica == "good" and body == GOOD_EVENTS
