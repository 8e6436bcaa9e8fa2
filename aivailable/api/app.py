"""The node's HTTP surface: OpenAI endpoints, status page, /api/cluster, /health, /metrics.

Handlers see the node only through `NodePort` (api/port.py), held under the `NODE` key; the proxy, hop
verifier, rate limiter, load-wait queues and metrics are the application's own, each under its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from importlib import resources

from aiohttp import web

from aivailable.api import hop, keyauth, loadwait
from aivailable.api.admin import add_admin_routes
from aivailable.api.affinity import request_key
from aivailable.api.browser import BrowserGuard, page_csp
from aivailable.api.image_input import (
    ImageRef,
    accepts_images,
    check_images,
    fetch_images,
    image_refs,
    inline,
)
from aivailable.api.metrics import NodeMetrics
from aivailable.api.openapi import OPENAPI_PATH, openapi_document
from aivailable.api.port import NodePort
from aivailable.api.ratelimit import KeyLimiter, fingerprint
from aivailable.api.responses_endpoint import add_responses_route
from aivailable.api.router import Proxy, Upstream, body_bytes, check_hops
from aivailable.config import token_budget
from aivailable.engine.spec import generation_limit
from aivailable.errors import (
    InvalidRequest,
    MisdirectedRequest,
    ModelNotFound,
    ModelUnavailable,
    NodeStarting,
    RateLimited,
)
from aivailable.gossip.signed import peer_certificate_id
from aivailable.wire.errors import install_protocol_error_bodies, openai_errors, read_json
from aivailable.wire.resume import Continuation, resumable
from aivailable.wire.schemas import parse_request

log = logging.getLogger("aivailable.api")

NODE = web.AppKey("node", NodePort)
METRICS = web.AppKey("metrics", NodeMetrics)
PROXY = web.AppKey("proxy", Proxy)
LIMITER = web.AppKey("limiter", KeyLimiter)
HOPS = web.AppKey("hops", hop.HopVerifier)
LOAD_WAITS = web.AppKey("load_waits", loadwait.WaitQueue)

_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}


def _node(request: web.Request) -> NodePort:
    return request.app[NODE]


def checked_hop(request: web.Request) -> hop.Received:
    """The request's hop headers, parsed (400 naming a malformed counter) and the signature verified, once
    per request (a signature's nonce is accepted only once)."""
    received = request.get(hop.REQUEST_KEY)
    if received is None:
        count = hop.parse_count(request.headers.get(hop.COUNT_HEADER))
        signed = request.app[HOPS].verify(request.headers.get(hop.HEADER), request.path, time.time())
        received = hop.Received(count if signed else 0, signed)
        request[hop.REQUEST_KEY] = received
    return received


@web.middleware
async def hops(request: web.Request, handler):
    """Check /v1/* hop headers before anything else reads them: an unsigned counter counts for nothing.
    With cluster TLS, cluster traffic (/_cluster/*, forwarded requests) arriving in plaintext on the API
    port is refused with 421 and counted: peers must use the TLS cluster port."""
    if request.path.startswith("/_cluster/") or (request.path.startswith("/v1/") and hop.HEADER in request.headers):
        node = _node(request)
        if node.config.cluster_tls and peer_certificate_id(request) is None:
            node.record_cluster_refusal(request.remote or "?", "plaintext",
                                        f"{request.method} {request.path} over plain HTTP on the API port: a node "
                                        "started with --insecure-cluster, or a version without cluster TLS")
            raise MisdirectedRequest(
                "This node takes cluster traffic only over TLS on its cluster port (API port + 1); is the "
                "sending node started with --insecure-cluster while this one is not?")
    if request.path.startswith("/v1/"):
        checked_hop(request)
    return await handler(request)


@web.middleware
async def api_keys(request: web.Request, handler):
    """/v1/* needs `Authorization: Bearer <key>` when the node has config keys or the cluster's key set has
    a key (api/keyauth.py), within the key's rate limit; with protect_status, so does the status surface.
    Keys appear in logs and metrics only as fingerprints."""
    node = _node(request)
    if request.path.startswith("/v1/"):
        await _check_v1(request, node)
    elif node.config.protect_status and request.path in keyauth.STATUS_PATHS:
        refused = keyauth.check_status_access(request, node, request.app[METRICS])
        if refused is not None:
            return refused
    return await handler(request)


async def _check_v1(request: web.Request, node: NodePort) -> None:
    keys, ring, metrics = node.config.api_keys, node.keyring, request.app[METRICS]
    if not keys and not ring.protecting():
        return
    token = keyauth.bearer(request, metrics)
    key = keyauth.config_key(token, keys)
    hop_in = checked_hop(request)
    if key is not None:
        if hop_in.signed:
            return  # charged where it entered the cluster (api/hop.py)
        wait = request.app[LIMITER].check(key, time.monotonic())
        if wait > 0:
            rpm, fp = request.app[LIMITER].limit(key), fingerprint(key, node.secret)
            _refuse_rate(request, node, fp, f"Rate limit reached for API key {fp}: {rpm} requests per minute on "
                         f"this node. Retry after {wait:.1f} s.", wait)
        return
    if hop_in.signed and hop_in.count > 0:
        return  # forwarded by a peer: the entry node checked the key (its set may be newer than ours)
    rec = keyauth.user_key(node, token, metrics, time.time())
    request[keyauth.RECORD] = rec
    if hop_in.signed:
        return  # this node's /v1/responses adapter: charged when the client's request entered
    wait = ring.admit(rec, time.monotonic(), time.time())
    if wait > 0:
        fp = keyauth.key_label(rec)
        _refuse_rate(request, node, fp, f"Rate limit reached for API key '{rec.name}': {rec.rpm} requests per "
                     f"minute across the cluster. Retry after {wait:.1f} s.", wait)


def _refuse_rate(request: web.Request, node: NodePort, fp: str, message: str, wait: float) -> None:
    request.app[METRICS].rate_limited.labels(fp).inc()
    request.app[METRICS].key_rejections.labels("rate_limited").inc()
    node.record_rate_limited(fp)
    raise RateLimited(message, retry_after=wait)


def context_fields(m: dict) -> dict:
    """A model card's context: `context_length` is what one request can use (the replica's ctx split over
    its `parallel` slots), `context_length_total` the replica's whole context."""
    ctx, parallel = m.get("ctx"), int(m.get("parallel") or 1)
    if ctx is None:
        return {"context_length": None, "context_length_total": None, "parallel": parallel}
    return {"context_length": int(ctx) // parallel, "context_length_total": int(ctx), "parallel": parallel}


async def list_models(request: web.Request) -> web.Response:
    node = _node(request)
    states = {m["name"]: m["state"] for m in node.cluster_view()["models"]}
    allowed = keyauth.allowed_models(request)
    data = [{"id": name, "object": "model", "created": node.started_at_unix, "owned_by": "aivailable",
             "state": states.get(name, "unplaced"), "embedding": m.get("embedding", False), "vision": accepts_images(m),
             **context_fields(m)}
            for name, m in sorted(node.models().items()) if allowed is None or name in allowed]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    node = _node(request)
    name = request.match_info["model"]
    keyauth.check_model(request, name, request.app[METRICS])
    if name not in node.models():
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
    return web.json_response({"id": name, "object": "model", "created": node.started_at_unix,
                              "owned_by": "aivailable"})


async def inference(request: web.Request) -> web.StreamResponse:
    """Validate, find the model, proxy to a replica."""
    node = _node(request)
    kind = _ENDPOINTS[request.path]
    check_hops(request)
    # Forwarded by a peer: a signed hop with a count. A client's own counter counts for nothing, and a
    # signed hop without one (this node's /v1/responses adapter) is an entry like any client's.
    forwarded = checked_hop(request).count > 0
    req = parse_request(kind, await read_json(request, node.config.body_timeout_s))
    name = req.model  # type: ignore[attr-defined]
    keyauth.check_model(request, name, request.app[METRICS])  # a forwarded request carries no key record
    spec = node.models().get(name)
    if spec is None:
        known = ", ".join(sorted(node.models())) or "none"
        raise ModelNotFound(f"The model '{name}' does not exist (models here: {known}).", param="model")
    embedding = bool(spec.get("embedding"))
    if kind == "embeddings" and not embedding:
        raise InvalidRequest(f"model '{name}' is not an embedding model (set embedding = true for it)",
                             param="model")
    if kind != "embeddings" and embedding:
        raise InvalidRequest(f"model '{name}' is an embedding model; use /v1/embeddings", param="model")
    refs = image_refs(req) if kind == "chat" else []
    to_fetch = check_images(refs, model=name, accepts=accepts_images(spec), allow_urls=node.config.allow_image_urls,
                            max_bytes=node.config.max_image_bytes)
    if forwarded:
        return await _route(request, node, kind, req, spec, forwarded, to_fetch)
    node.begin_request(name, req.keep_alive)  # type: ignore[attr-defined]  # demand, and keepalive.py's use
    try:
        return await _route(request, node, kind, req, spec, forwarded, to_fetch)
    finally:
        node.end_request(name)


async def _route(request: web.Request, node: NodePort, kind: str, req, spec: dict, forwarded: bool,
                 to_fetch: list[ImageRef]) -> web.StreamResponse:
    """Wait for a replica if the model is loading (api/loadwait.py), then proxy to one."""
    name = req.model
    t0 = time.perf_counter()
    sent = req.model_dump(exclude_unset=True, by_alias=True)
    sent.pop("keep_alive", None)  # the entry node's business (keepalive.py), not the replica's
    if to_fetch:  # replicas get the bytes, never a URL to fetch
        sent = inline(sent, await fetch_images(to_fetch, node.config.max_image_bytes))
    body = body_bytes(sent)
    upstreams = node.upstreams(name, local_only=forwarded)
    if not upstreams or (not forwarded and request.app[LOAD_WAITS].waiting(name)):  # in line behind waiters
        upstreams = await wait_for_replicas(request, node, name, forwarded)
    resume = None
    if kind in ("chat", "completions") and getattr(req, "stream", False) and resumable(req):
        limit = req.token_limit() if kind == "chat" else req.max_tokens  # type: ignore[attr-defined]
        # What the replica will apply (engine.spec): a resumed stream must not start a fresh budget.
        limit = generation_limit(limit, *token_budget(spec, node.config.max_tokens_default))
        resume = Continuation(kind, sent, limit)
    metrics = request.app[METRICS]
    ttfb = metrics.ttfb.labels(name, kind)

    async def forward(upstreams: list[Upstream]) -> web.StreamResponse:
        affinity = request_key(kind, req) if node.config.routing == "prefix" and len(upstreams) > 1 else None
        return await request.app[PROXY].forward(
            request, request.path, body, upstreams, on_first_byte=lambda _u: ttfb.observe(time.perf_counter() - t0),
            authorization=request.headers.get("Authorization"), resume=resume, affinity=affinity)

    try:
        try:
            resp = await forward(upstreams)
        except ModelUnavailable:  # every replica failed before its first byte: nothing was sent yet
            if forwarded or node.config.load_wait_s <= 0 or any(u.local for u in upstreams):
                raise  # a local worker that crashed on this request is not given it again
            # Their nodes just died (membership has not said so yet): wait for the model's re-placement.
            resp = await forward(await wait_for_replicas(request, node, name, forwarded,
                                                         avoid=frozenset(u.key for u in upstreams)))
    except Exception as exc:
        status = getattr(exc, "http_status", 500)
        metrics.requests.labels(name, kind, str(status)).inc()
        raise
    metrics.requests.labels(name, kind, str(resp.status)).inc()
    metrics.latency.labels(name, kind).observe(time.perf_counter() - t0)
    return resp


async def wait_for_replicas(request: web.Request, node: NodePort, name: str, forwarded: bool,
                            avoid: frozenset[str] = frozenset()) -> list[Upstream]:
    """Ready replicas of `name` (other than those in `avoid`, which just failed) once it has loaded: the
    request waits in the model's FIFO queue (bounded by its replicas' capacity) for at most `load_wait_s`;
    otherwise, or when it cannot wait, today's 503. Only at the entry node: a forwarded request answers at
    once, and its entry node tries elsewhere."""
    load_wait_s = node.config.load_wait_s
    if forwarded or load_wait_s <= 0:
        node.raise_unavailable(name)
    queue = request.app[LOAD_WAITS]
    t0 = time.monotonic()
    limit = loadwait.capacity(node.models().get(name, {}), node.placed_replicas(name))
    me = queue.join(name, t0, limit, asyncio.get_running_loop().create_future())
    if me is None:  # as many wait as its replicas could queue: refuse as when nobody waited
        state, _ = node.model_state(name)
        raise ModelUnavailable(f"model '{name}' is {state} and {limit} requests already wait for it (its "
                               "replicas' queue limit); retry shortly", retry_after=2)
    waiting = request.app[METRICS].load_waiting.labels(name)
    waiting.inc()
    try:
        while not me.token.done():  # the oldest waiter polls and decides for all of the model's, in order
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(me.token), loadwait.POLL_S)
            if me.token.done() or queue.first(name) is not me:
                continue
            ups = [u for u in node.upstreams(name) if u.key not in avoid]
            try:
                view = next((m for m in node.cluster_view()["models"] if m["name"] == name), None)
            except NodeStarting:
                view = None
            status = loadwait.status_of(view, node.planned)
            for w, verdict in queue.step(name, status, reachable=bool(ups), now=time.monotonic(),
                                         load_wait_s=load_wait_s):
                w.token.set_result(ups if verdict is loadwait.Verdict.SERVE else [])
        upstreams = me.token.result()
    finally:
        queue.leave(me)  # a client that disconnected (handler cancelled) leaves the queue here
        waiting.dec()
        request.app[METRICS].load_wait.labels(name).observe(time.monotonic() - t0)
    if not upstreams:
        node.raise_unavailable(name)
    log.info("request for %s waited %.1f s for the model to load", name, time.monotonic() - t0)
    return upstreams


async def health(request: web.Request) -> web.Response:
    node = _node(request)
    if node.starting():  # serving HTTP, not yet its cluster state: not "ok" for a balancer
        return web.json_response({"status": "starting", "node_id": node.node_id}, status=503,
                                 headers={"Retry-After": "1"})
    return web.json_response({"status": "ok", "node_id": node.node_id, "uptime_s": round(node.uptime_s(), 1),
                              "models_ready": node.ready_models()})


async def cluster(request: web.Request) -> web.Response:
    return web.json_response(_node(request).cluster_view())


async def history(request: web.Request) -> web.Response:
    """GET /api/history: this node's last hour per model and per GPU (aivailable.history)."""
    return web.json_response(_node(request).history())


async def metrics(request: web.Request) -> web.Response:
    body, ctype = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": ctype})


async def cluster_gossip(request: web.Request) -> web.StreamResponse:
    """POST /_cluster/gossip: signed inter-node messages (the transport verifies and counts them)."""
    return await _node(request).handle_gossip(request)


async def cluster_files(request: web.Request) -> web.StreamResponse:
    """POST /_cluster/files: signed model-file requests (manifest, chunks) from peers."""
    return await _node(request).handle_files(request)


async def cluster_keys(request: web.Request) -> web.StreamResponse:
    """POST /_cluster/keys: signed key-set exchanges with peers (aivailable/keysync.py)."""
    return await _node(request).handle_keys(request)


async def ca_certificate(request: web.Request) -> web.Response:
    """GET /api/ca.pem: the cluster CA certificate (public) that tls = "auto" certificates chain to. Fetched
    without verification (`curl -k`), compare its fingerprint with `aivailable ca` on a node."""
    pem = _node(request).ca_pem
    if pem is None:
        raise web.HTTPNotFound(text="no cluster CA: this node runs with insecure_cluster\n")
    return web.Response(body=pem, content_type="application/x-pem-file")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def status_page(request: web.Request) -> web.Response:
    html = resources.files("aivailable.api").joinpath("static/index.html").read_text()
    return web.Response(text=html, content_type="text/html", headers={"Content-Security-Policy": page_csp(html)})


def build_app(node: NodePort) -> web.Application:
    """The node's aiohttp application; `node` provides catalog, replicas and cluster facts."""
    install_protocol_error_bodies()
    cfg = node.config
    guard = BrowserGuard(cfg.cors_origins, cfg.allowed_hosts, own_host=node.address.rpartition(":")[0])
    app = web.Application(middlewares=[openai_errors, guard.middleware, hops, api_keys],
                          client_max_size=cfg.max_body_bytes)
    app.on_response_prepare.append(guard.on_prepare)
    app[NODE] = node
    app[METRICS] = node.metrics
    secret = node.secret
    app[PROXY] = Proxy(hop_auth=lambda path: hop.sign(secret, node.node_id, path, time.time()))
    app[METRICS].watch_routing(app[PROXY].choices)
    app[HOPS] = hop.HopVerifier(secret)
    app[LOAD_WAITS] = loadwait.WaitQueue()
    app[LIMITER] = KeyLimiter(cfg.rate_limit_rpm, cfg.api_key_rpm, cfg.rate_limit_burst)
    if cfg.rate_limit_rpm and not cfg.api_keys:
        log.warning("rate_limit_rpm = %d has no effect: limits are per API key and no --api-key is set",
                    cfg.rate_limit_rpm)
    r = app.router
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model}", get_model)
    for path in _ENDPOINTS:
        r.add_post(path, inference)
    add_responses_route(app, node, app[PROXY].hop_auth)
    add_admin_routes(app, node)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/api/cluster", cluster)
    r.add_get("/api/history", history)
    r.add_get("/api/ca.pem", ca_certificate)
    r.add_get(OPENAPI_PATH, openapi)
    r.add_get("/", status_page)
    r.add_post("/_cluster/gossip", cluster_gossip)
    r.add_post("/_cluster/files", cluster_files)
    r.add_post("/_cluster/keys", cluster_keys)
    return app
