"""`POST /v1/responses`: the Responses API, served at the entry node over its own chat endpoint.

The handler validates the request, converts it (api/responses_api.py) and sends it over loopback to this
node's `/v1/chat/completions` (on its cluster port over mutual TLS, as a peer would: `NodePort.loopback`),
so routing, load balancing, retries and mid-stream resume apply unchanged. It passes the client's
`Authorization` on with a signed hop header (api/hop.py): the API key is checked again but its rate limit
is charged once, here. Chat errors come back with their status and OpenAI error body, `param` renamed to
the client's field where it differs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from aivailable.api import hop
from aivailable.api.port import NodePort
from aivailable.api.responses_api import (
    SSEDecoder,
    StreamConverter,
    StreamError,
    chat_body,
    new_id,
    renamed_error,
    response_from_chat,
    sse_event,
)
from aivailable.api.responses_schema import ResponsesRequest, parse_responses_request
from aivailable.errors import NodeError
from aivailable.wire.errors import error_body, read_json

log = logging.getLogger("aivailable.api")

PATH = "/v1/responses"
CHAT_PATH = "/v1/chat/completions"
SESSION = web.AppKey("responses_session", aiohttp.ClientSession)
_PASS_HEADERS = ("Retry-After", "X-AIvailable-Replica")


class LoopbackFailed(NodeError):
    """This node's own chat endpoint could not be reached (it is shutting down)."""

    http_status = 503
    error_type = "service_unavailable"
    code = "node_unavailable"


def loopback_address(host: str, port: int) -> str:
    """host:port of a listener bound to `host`, as this machine reaches it: a wildcard becomes loopback."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def loopback_url(host: str, port: int) -> str:
    """The plain-HTTP base URL of a listener bound to `host` (see `loopback_address`)."""
    return "http://" + loopback_address(host, port)


def add_responses_route(app: web.Application, node: NodePort, hop_auth: Callable[[str], str] | None) -> None:
    """Register `POST /v1/responses` and its loopback HTTP session on `app`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        cfg = node.config
        req = parse_responses_request(await read_json(request, cfg.body_timeout_s))
        base, options = node.loopback()
        return await _respond(request, req, base, options, hop_auth)

    app.cleanup_ctx.append(_session)
    app.router.add_post(PATH, handler)


async def _session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    yield
    await app[SESSION].close()


async def _respond(request: web.Request, req: ResponsesRequest, base: str, options: dict,
                   hop_auth: Callable[[str], str] | None) -> web.StreamResponse:
    body, origins = chat_body(req)
    headers = {"Content-Type": "application/json"}
    if hop_auth is not None:
        headers[hop.HEADER] = hop_auth(CHAT_PATH)  # the key was charged here, by the api_keys middleware
    if auth := request.headers.get("Authorization"):
        headers["Authorization"] = auth
    try:
        r = await request.app[SESSION].post(base + CHAT_PATH, data=json.dumps(body, separators=(",", ":")),
                                            headers=headers, **options)
    except aiohttp.ClientError as exc:
        log.warning("/v1/responses: this node's own chat endpoint at %s is unreachable (%s)", base, exc)
        raise LoopbackFailed(f"this node could not serve the request ({type(exc).__name__}); retry, or use "
                             "another node", retry_after=1) from None
    try:
        passed = {h: r.headers[h] for h in _PASS_HEADERS if h in r.headers}
        if r.status != 200:
            return await _error(r, origins, passed)
        if not req.stream:
            completion = await r.json(content_type=None)
            now = int(time.time())
            return web.json_response(response_from_chat(req, completion, resp_id=new_id("resp"), created_at=now,
                                                        completed_at=now), headers=passed)
        return await _stream(request, r, req, passed)
    finally:
        r.close()


async def _error(r: aiohttp.ClientResponse, origins: list[str], headers: dict[str, str]) -> web.Response:
    """The chat endpoint's error, with its status, in OpenAI's shape and with the client's field names."""
    raw = await r.read()
    body = renamed_error(raw, origins)
    if body is not None:
        return web.json_response(body, status=r.status, headers=headers)
    log.warning("/v1/responses: the chat endpoint answered %d without an OpenAI error body: %r", r.status, raw[:200])
    return web.json_response(error_body(f"the chat endpoint answered {r.status}", type_="server_error",
                                        code="upstream_failed"), status=502, headers=headers)


class _ClientGone(Exception):
    pass


async def _stream(request: web.Request, r: aiohttp.ClientResponse, req: ResponsesRequest,
                  headers: dict[str, str]) -> web.StreamResponse:
    """Relay a chat stream as Responses events, as its chunks arrive."""
    resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    conv = StreamConverter(req, new_id("resp"), int(time.time()))

    async def send(events: list[dict[str, Any]]) -> None:
        if not events:
            return
        try:
            await resp.write(b"".join(sse_event(e) for e in events))
        except (ConnectionError, RuntimeError) as exc:  # the client went away
            raise _ClientGone from exc

    decoder = SSEDecoder()
    try:
        await send(conv.start())
        try:
            while not conv.ended:
                data = await r.content.readany()
                if not data:
                    raise StreamError("the chat stream ended before [DONE]")
                for payload in decoder.feed(data):
                    await send(_convert(conv, payload))
                    if conv.ended:
                        break
        except (aiohttp.ClientError, StreamError, ValueError) as exc:
            log.warning("/v1/responses: the chat stream for %s broke (%s); ending the response as failed",
                        conv.skeleton["id"], exc)
            await send(conv.fail(f"the stream of this response broke ({exc}); retry the request"))
    except _ClientGone:
        return resp
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.write_eof()
    return resp


def _convert(conv: StreamConverter, payload: str) -> list[dict[str, Any]]:
    """The Responses events for one chat event: a chunk, an error, or `[DONE]`."""
    if payload == "[DONE]":
        return conv.finish(int(time.time()))
    chunk = json.loads(payload)
    if not isinstance(chunk, dict):
        raise StreamError(f"unexpected chat event {payload[:80]!r}")
    if isinstance(chunk.get("error"), dict):
        err = chunk["error"]
        log.warning("/v1/responses: the chat stream for %s ended with an error: %s", conv.skeleton["id"],
                    err.get("message"))
        return conv.fail(str(err.get("message") or "the model failed"), err.get("code"))
    return conv.feed(chunk)
