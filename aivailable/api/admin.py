"""POST /admin/drain and /admin/undrain: the operator's maintenance drain (aivailable/maintenance.py).

Both need ``Authorization: Bearer <admin key>`` (`maintenance.admin_key`; an API key gets 403) and take an
optional JSON body ``{"gpu": "<local device id>"}`` (absent or null: the whole node). They answer at once
with the node's drain state and the replicas still running on drained GPUs; the hand-over continues in
the background (``aivailable drain`` waits for it).
"""

from __future__ import annotations

import json

from aiohttp import web

from aivailable import maintenance
from aivailable.api.port import NodePort
from aivailable.errors import InvalidRequest


async def _gpu(request: web.Request) -> object:
    """The body's `gpu` (None when the body is empty); InvalidRequest naming the body or the field."""
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequest("the body is not valid JSON; send {\"gpu\": \"<id>\"} or nothing",
                             param="body") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object such as {\"gpu\": \"0\"}", param="body")
    unknown = sorted(set(body) - {"gpu"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}; the only field is 'gpu'", param=unknown[0])
    gpu = body.get("gpu")
    return str(gpu) if isinstance(gpu, int) and not isinstance(gpu, bool) else gpu


def add_admin_routes(app: web.Application, node: NodePort) -> None:
    """Register the admin endpoints on the node's application."""
    key = maintenance.admin_key(node.secret)

    async def handle(request: web.Request, drained: bool) -> web.Response:
        maintenance.check_admin(request.headers.get("Authorization"), key, node.config.api_keys)
        return web.json_response(await node.set_drain(await _gpu(request), drained))

    async def drain(request: web.Request) -> web.Response:
        return await handle(request, True)

    async def undrain(request: web.Request) -> web.Response:
        return await handle(request, False)

    app.router.add_post("/admin/drain", drain)
    app.router.add_post("/admin/undrain", undrain)
