"""Reading one signed inter-node request body (gossip and model-file requests share it)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from aivailable.gossip import envelope, tls
from aivailable.wire.errors import abandon_body

__all__ = ["Refused", "open_signed", "peer_certificate_id"]


class Refused(Exception):
    """A signed inter-node request refused before its message is looked at: `reason` is what the sender
    is told and what is counted; `abandon` when its body was not read to the end."""

    def __init__(self, reason: str, detail: str, *, abandon: bool = False):
        super().__init__(detail)
        self.reason, self.detail, self.abandon = reason, detail, abandon

    def answer(self, request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        """`resp` (the caller's refusal), closing the connection when the body was left unread."""
        if self.abandon:
            abandon_body(request, resp)
        return resp


async def open_signed(request: web.Request, secret: bytes, replay: envelope.ReplayCache, *, own_id: str,
                      max_bytes: int, timeout_s: float) -> tuple[str, Any]:
    """Read one signed envelope (at most `max_bytes`, within `timeout_s`) and open it: (sender, message).
    Raises Refused for anything else, a message signed with `own_id` included. Gossip and model-file
    requests (files/serve.py) are received with it."""
    try:
        async with asyncio.timeout(timeout_s):
            if request.content_length is not None and request.content_length > max_bytes:
                raise envelope.Oversized(f"Content-Length {request.content_length} > {max_bytes}")
            buf = bytearray()
            async for chunk in request.content.iter_chunked(64 * 1024):
                buf += chunk
                if len(buf) > max_bytes:
                    raise envelope.Oversized(f"body over {max_bytes} bytes")
        src, msg = envelope.open(bytes(buf), secret, time.time(), replay, max_bytes=max_bytes)
    except envelope.EnvelopeError as exc:
        raise Refused(exc.reason, str(exc)) from None
    except TimeoutError:
        raise Refused("timeout", f"body not received within {timeout_s:g} s", abandon=True) from None
    except Exception as exc:  # e.g. a corrupt gzip body, or a frame the codec did not foresee: never a 500
        raise Refused("malformed", type(exc).__name__, abandon=True) from None
    if src == own_id:
        raise Refused("own_id", f"a message signed as this node's id {src!r}")
    cert_id = peer_certificate_id(request)
    if cert_id is not None and cert_id != src:
        raise Refused("wrong_node_cert", f"signed as node {src!r} over a connection whose TLS certificate is "
                                         f"node {cert_id!r}'s")
    return src, msg


def peer_certificate_id(request: web.Request) -> str | None:
    """The node id named by the TLS client certificate of `request`'s connection (None over plain HTTP)."""
    transport = request.transport
    if transport is None:
        return None
    return tls.peer_node_id(transport.get_extra_info("peercert"))


