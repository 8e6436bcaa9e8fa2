"""The admin API: POST /admin/drain and /admin/undrain (the operator's maintenance drain,
aivailable/maintenance.py), and /admin/keys (the cluster's API keys, aivailable/apikeys/).

Both need ``Authorization: Bearer <admin key>`` (`maintenance.admin_key`; an API key gets 403) and take an
optional JSON body ``{"gpu": "<local device id>"}`` (absent or null: the whole node). They answer at once
with the node's drain state and the replicas still running on drained GPUs; the hand-over continues in
the background (``aivailable drain`` waits for it).
"""

from __future__ import annotations

import json
import time

from aiohttp import web

from aivailable import maintenance
from aivailable.api.port import NodePort
from aivailable.apikeys.keyset import MAX_EXPIRES, ChangeError, Verdict, fingerprint
from aivailable.errors import Conflict, InvalidRequest, NotFound
from aivailable.statedir import StateDirError


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


def check_admin(request: web.Request, node: NodePort, key: str) -> None:
    """The admin key or nothing: 401 when missing or wrong, 403 for an API key (config or cluster key)."""
    auth = request.headers.get("Authorization")
    token = (auth or "").partition(" ")[2].strip()
    verdict, _rec = node.keyring.verify(token, time.time())
    maintenance.check_admin(auth, key, [*node.config.api_keys, *([token] if verdict is Verdict.OK else [])])


def add_admin_routes(app: web.Application, node: NodePort) -> None:
    """Register the admin endpoints on the node's application."""
    key = maintenance.admin_key(node.secret)

    async def handle(request: web.Request, drained: bool) -> web.Response:
        check_admin(request, node, key)
        return web.json_response(await node.set_drain(await _gpu(request), drained))

    async def drain(request: web.Request) -> web.Response:
        return await handle(request, True)

    async def undrain(request: web.Request) -> web.Response:
        return await handle(request, False)

    app.router.add_post("/admin/drain", drain)
    app.router.add_post("/admin/undrain", undrain)
    add_key_routes(app, node)


# -- cluster-wide API keys (aivailable/apikeys/, aivailable/keysync.py) ---------------------------------

_KEY_FIELDS = ("name", "kind", "models", "rpm", "expires")


def _key_body(raw: bytes) -> dict:
    """The fields of POST /admin/keys, type-checked; InvalidRequest naming the bad field."""
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        raise InvalidRequest("the body is not valid JSON", param="body") from None
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be a JSON object such as {"name": "alice"}', param="body")
    unknown = sorted(set(body) - set(_KEY_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}; the fields are {', '.join(_KEY_FIELDS)}",
                             param=unknown[0])
    if not isinstance(body.get("name"), str) or not body["name"]:
        raise InvalidRequest("name is required: a string such as \"alice\"", param="name")
    models = body.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise InvalidRequest("models must be a list of model names (empty: every model)", param="models")
    rpm = body.get("rpm") or 0
    if isinstance(rpm, bool) or not isinstance(rpm, int) or rpm < 0:
        raise InvalidRequest("rpm must be a whole number >= 0 (0: no limit)", param="rpm")
    expires = body.get("expires")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, (int, float))
                                or not 0 < expires <= MAX_EXPIRES):
        raise InvalidRequest("expires must be UTC epoch seconds (before the year 10000) or null", param="expires")
    kind = body.get("kind") or "user"
    return {"name": body["name"], "kind": kind, "models": models, "rpm": rpm,
            "expires": None if expires is None else float(expires)}


def add_key_routes(app: web.Application, node: NodePort) -> None:
    """POST/GET /admin/keys and DELETE /admin/keys/{name}: the cluster's API keys, admin key only."""
    key = maintenance.admin_key(node.secret)

    def check(request: web.Request) -> None:
        check_admin(request, node, key)

    async def apply(change) -> list[str]:
        """Make the change, save and push it (rolled back when the save fails); the peers not reached."""
        before = node.keyring.keyset
        try:
            change()
        except ChangeError as exc:
            cls = {404: NotFound, 409: Conflict}.get(exc.status, InvalidRequest)
            raise cls(exc.message, param=exc.param) from None
        try:
            return await node.keys_changed()
        except StateDirError:
            node.keyring.restore(before)  # the save runs before any await: nobody has seen the change
            raise

    async def create(request: web.Request) -> web.Response:
        check(request)
        fields = _key_body(await request.read())
        out: list[str] = []
        pending = await apply(lambda: out.append(node.keyring.add(now=time.time(), **fields)))
        rec = node.keyring.keyset.get(fields["name"])
        if rec is None or not out[0].startswith(fingerprint(rec.key_id) + "-"):
            raise Conflict(f"a key named {fields['name']!r} was added on another node at the same time and won; "
                           "this one does not work: choose another name", param="name")
        return web.json_response({**rec.view(), "key": out[0], "not_yet_on": pending,
                                  "note": "the key is shown only now: it is stored as a salted hash"})

    async def listing(request: web.Request) -> web.Response:
        check(request)
        ring = node.keyring
        return web.json_response({"keys": ring.listing(time.time()), "digest": ring.digest})

    async def delete(request: web.Request) -> web.Response:
        check(request)
        name = request.match_info["name"]
        pending = await apply(lambda: node.keyring.revoke(name, now=time.time()))
        return web.json_response({"name": name, "revoked": True, "digest": node.keyring.digest,
                                  "not_yet_on": pending})

    app.router.add_post("/admin/keys", create)
    app.router.add_get("/admin/keys", listing)
    app.router.add_delete("/admin/keys/{name}", delete)
