"""OpenAI-shaped error responses, and the middleware that makes every failure one.

Every aiohttp server that answers OpenAI clients uses these: the node's API (`api/app.py`), each worker
(`engine/worker.py`) and the signed gossip endpoints (`gossip/signed.py`); `read_json` is the one reader
of a request's JSON body (time, size, Content-Type and nesting limits).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from aivailable.errors import NodeError

log = logging.getLogger("aivailable.api")


def error_body(message: str, *, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: NodeError, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON response for a NodeError, with Retry-After when the error carries one."""
    hdrs = dict(headers or {})
    if exc.retry_after is not None:
        hdrs["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    body = error_body(exc.message, type_=exc.error_type, param=exc.param, code=exc.code)
    return web.Response(status=exc.http_status, text=json.dumps(body), content_type="application/json",
                        headers=hdrs)


_HTTP_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
               404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
               413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_exceeded"}


@web.middleware
async def openai_errors(request: web.Request, handler):
    """Turn NodeErrors, aiohttp HTTP errors and unexpected exceptions into OpenAI error JSON."""
    try:
        return await handler(request)
    except NodeError as exc:
        resp = error_response(exc)
        if exc.http_status == 408 or request.content.exception() is not None:
            abandon_body(request, resp)
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            msg = f"Request body too large: the limit is {request.client_max_size} bytes."
            code = "request_too_large"
        elif exc.status == 404:
            msg, code = f"Unknown path {request.path}.", "not_found"
        elif exc.status == 405:
            msg, code = f"Method {request.method} is not allowed on {request.path}.", "method_not_allowed"
        else:
            msg, code = exc.reason or "error", None
        body = error_body(msg, type_=_HTTP_TYPES.get(exc.status, "server_error"), code=code)
        return web.Response(status=exc.status, text=json.dumps(body), content_type="application/json")
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path)
        body = error_body("Internal error; the node logged the details.", type_="server_error",
                          code="internal_error")
        return web.Response(status=500, text=json.dumps(body), content_type="application/json")


BODY_TIMEOUT_S = 30.0
"""A request body must arrive whole within this; a client that stalls gets 408 instead of holding a
connection and a handler forever."""


def abandon_body(request: web.Request, resp: web.StreamResponse) -> None:
    """Answer, then close the connection without reading the rest of a stalled or broken body (aiohttp
    would otherwise keep reading it after the answer and log the broken body's error as unhandled)."""
    resp.force_close()
    if request.content.exception() is not None:
        request.content.feed_eof()


async def read_json(request: web.Request, timeout_s: float = BODY_TIMEOUT_S) -> object:
    """The request's JSON body; NodeError (400/408/413) for an empty, stalled, undecodable, oversized or
    malformed one."""
    from aivailable.errors import BodyTooLarge, InvalidRequest, RequestTimeout

    if request.content_length is not None and request.content_length > request.client_max_size:
        raise BodyTooLarge(f"Request body too large: {request.content_length} bytes, the limit is "
                           f"{request.client_max_size} bytes.")
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"Request body too large: the limit is {request.client_max_size} bytes.") from None
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout_s:g} s "
                             f"(Content-Length {request.content_length}).") from None
    except (web.RequestPayloadError, HttpProcessingError) as exc:  # e.g. a corrupt gzip body
        cause = exc if isinstance(exc, HttpProcessingError) else exc.__cause__
        reason = getattr(cause, "message", None) or str(exc)
        raise InvalidRequest(f"The request body could not be read: {' '.join(str(reason).split())}.") from None
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    check_json_content_type(request)
    return parse_json(raw)


def check_json_content_type(request: web.Request) -> None:
    """UnsupportedMediaType (415) unless the body is declared `application/json` (charset, if any, UTF-8).

    A web page can make a browser POST `text/plain`, a form encoding or no Content-Type to any address
    without asking it first (a CORS "simple" request); requiring application/json means such a page must
    pass a preflight (api/browser.py), which the node refuses unless its origin is in cors_origins."""
    from aivailable.errors import UnsupportedMediaType

    declared = request.headers.get("Content-Type")
    charset = (request.charset or "utf-8").lower().replace("_", "-")
    if declared is None or request.content_type.lower() != "application/json" or charset not in ("utf-8", "utf8"):
        shown = "none" if declared is None else repr(declared[:80])
        raise UnsupportedMediaType(f"Content-Type {shown} is not supported: send the JSON body with "
                                   "'Content-Type: application/json'.", param="Content-Type")


MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a request body may have (OpenAI bodies need fewer than 10)."""
MAX_JSON_INT_DIGITS = 100
"""Longest integer literal a request body may hold (Python refuses int() above 4300 digits)."""


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise _Refused(f"it holds an integer of {len(text.lstrip('-'))} digits "
                       f"(at most {MAX_JSON_INT_DIGITS} are accepted)")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON number (use a finite number)")


class _Refused(ValueError):
    """A JSON body that parses but breaks a limit (the message says which)."""


def parse_json(raw: bytes) -> object:
    """A request body as JSON; InvalidRequest (400) naming the problem for bytes that are not JSON, nesting
    deeper than MAX_JSON_DEPTH, integers longer than MAX_JSON_INT_DIGITS digits, NaN, Infinity or a number
    that overflows a float. Nothing here reaches the log as a traceback."""
    from aivailable.errors import InvalidRequest

    try:
        value = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except _Refused as exc:
        raise InvalidRequest(f"The request body was refused: {exc}.") from None
    except RecursionError:
        raise InvalidRequest(f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels of "
                             "arrays and objects).") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels of "
                             "arrays and objects).")
    return value


def _depth(value: object) -> int:
    """How deeply arrays and objects nest in a decoded JSON value (a scalar: 0); iterative, no recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_JSON_DEPTH:
            break
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def install_protocol_error_bodies() -> None:
    """Answer requests that aiohttp cannot parse at all (a broken request line, header or chunked
    encoding) in OpenAI's error shape, and log one line instead of a traceback.

    aiohttp answers those itself, before any middleware runs, with a plain-text body from
    `RequestHandler.handle_error`. This wraps that method for status 400 (every HTTP parse error); any
    other status keeps aiohttp's own handling. Installed once per process, by build_app.
    """
    from aiohttp import web_protocol

    original = web_protocol.RequestHandler.handle_error
    if getattr(original, "_aivailable", False):
        return

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400:
            return original(self, request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        why = str(getattr(exc, "message", "") or message or exc or "bad request").strip().splitlines()[0][:200]
        log.info("refused an unparsable HTTP request from %s: %s", request.remote, why)
        body = error_body(f"The HTTP request could not be parsed: {why}", type_="invalid_request_error",
                          code="malformed_http")
        resp = web.Response(status=400, text=json.dumps(body), content_type="application/json")
        resp.force_close()
        return resp

    handle_error._aivailable = True  # type: ignore[attr-defined]
    web_protocol.RequestHandler.handle_error = handle_error  # type: ignore[method-assign]
