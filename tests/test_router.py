"""Replica choice: power of two choices by load per slot, local first on ties, cooled-down peers last."""

from __future__ import annotations

import asyncio
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
