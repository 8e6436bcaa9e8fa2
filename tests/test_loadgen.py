"""bench/loadgen.py, the frontend benchmark's load generator, against a real aiohttp server on loopback:
it must find where each kind of answer ends (Content-Length, chunked SSE), keep connections alive, and count
bad answers as errors rather than latencies."""

from __future__ import annotations

import asyncio

from aiohttp import web

from bench.loadgen import Answer, run


async def _serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1/chat/completions"


def test_json_and_streamed_answers_are_timed_and_bad_ones_counted():
    asyncio.run(_exercise())


async def _exercise() -> None:
    seen: list[int] = []  # connections the server saw, by the id of the transport

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(id(request.transport))
        body = await request.json()
        if body.get("fail"):
            return web.json_response({"error": {"message": "no"}}, status=503)
        if not body.get("stream"):
            resp = web.json_response({"id": "x", "choices": []})
            if body.get("close"):
                resp.force_close()  # as a server whose keep-alive timeout ran out
            return resp
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f'data: {{"i": {i}}}\n\n'.encode())
            await asyncio.sleep(0.001)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    runner, url = await _serve(handler)
    try:
        plain = await run(url, b'{"model": "m"}', 2, 20, 1, 10)
        assert (plain["ok"], plain["errors"], plain["latency_ms"]["n"]) == (20, 0, 20)
        assert len(set(seen)) == 2, "each of the 2 clients keeps one connection alive"
        streamed = await run(url, b'{"model": "m", "stream": true}', 3, 12, 1, 10, stream=True)
        assert (streamed["ok"], streamed["errors"]) == (12, 0)
        assert streamed["first_byte_ms"]["p50"] <= streamed["latency_ms"]["p50"]
        closing = await run(url, b'{"model": "m", "close": true}', 2, 6, 1, 10)
        assert (closing["ok"], closing["errors"]) == (6, 0) and closing["reconnects"] >= 6
        failed = await run(url, b'{"model": "m", "fail": true}', 1, 5, 0, 10)
        assert (failed["ok"], failed["errors"]) == (0, 5)
        assert "HTTP 503" in failed["error_samples"][0]
    finally:
        await runner.cleanup()


def test_answer_parser_finds_the_end_of_split_chunked_and_sized_bodies():
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    a = Answer()
    assert not a.feed(sized[:20], 1.0)
    assert a.feed(sized[20:], 2.0) and a.status == 200 and a.body() == b"hello" and a.first_body == 2.0
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    b = Answer()
    assert not b.feed(chunked[:-3], 1.0)
    assert b.feed(chunked[-3:], 1.5) and b"data: [DONE]" in b.body()
    empty = Answer()
    assert empty.feed(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", 1.0) and empty.status == 204
