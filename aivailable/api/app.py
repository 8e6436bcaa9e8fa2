"""The node's HTTP surface: OpenAI endpoints, status page, /api/cluster, /health, /metrics."""

from __future__ import annotations

import hmac
import logging
import time
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web

from aivailable.api import hop
from aivailable.api.affinity import request_key
from aivailable.api.browser import BrowserGuard, page_csp
from aivailable.api.errors import install_protocol_error_bodies, openai_errors, read_json
from aivailable.api.openapi import OPENAPI_PATH, openapi_document
from aivailable.api.ratelimit import KeyLimiter, fingerprint
from aivailable.api.responses_endpoint import add_responses_route
from aivailable.api.resume import Continuation, resumable
from aivailable.api.router import Proxy, body_bytes, check_hops
from aivailable.api.schemas import parse_request
from aivailable.config import token_budget
from aivailable.engine.spec import generation_limit
from aivailable.errors import AuthenticationError, InvalidRequest, ModelNotFound, RateLimited

if TYPE_CHECKING:
    from aivailable.node import Node

log = logging.getLogger("aivailable.api")

NODE = web.AppKey("node", object)
PROXY = web.AppKey("proxy", Proxy)
LIMITER = web.AppKey("limiter", KeyLimiter)
HOPS = web.AppKey("hops", hop.HopVerifier)

_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}


def _node(request: web.Request) -> Node:
    return request.app[NODE]  # type: ignore[return-value]


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
    """Check /v1/* hop headers before anything else reads them: an unsigned counter counts for nothing."""
    if request.path.startswith("/v1/"):
        checked_hop(request)
    return await handler(request)


@web.middleware
async def api_keys(request: web.Request, handler):
    """With API keys configured, /v1/* needs `Authorization: Bearer <key>` (compared in constant time),
    within the key's rate limit. Keys appear in logs and metrics only as fingerprints."""
    node = _node(request)
    keys = node.settings.node.api_keys
    if keys and request.path.startswith("/v1/"):
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.")
        token = token.strip()
        key = next((k for k in keys if hmac.compare_digest(token.encode(), k.encode())), None)
        if key is None:
            raise AuthenticationError("Incorrect API key provided.")
        if checked_hop(request).signed:
            return await handler(request)  # charged where it entered the cluster (api/hop.py)
        wait = request.app[LIMITER].check(key, time.monotonic())
        if wait > 0:
            rpm, fp = request.app[LIMITER].limit(key), fingerprint(key, node.cluster.secret)
            node.metrics.rate_limited.labels(fp).inc()
            node.rate_limited[fp] = node.rate_limited.get(fp, 0) + 1
            raise RateLimited(f"Rate limit reached for API key {fp}: {rpm} requests per minute on this node. "
                              f"Retry after {wait:.1f} s.", retry_after=wait)
    return await handler(request)


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
    data = [{"id": name, "object": "model", "created": node.started_at_unix, "owned_by": "aivailable",
             "state": states.get(name, "unplaced"), "embedding": m.get("embedding", False),
             **context_fields(m)}
            for name, m in sorted(node.models().items())]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    node = _node(request)
    name = request.match_info["model"]
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
    req = parse_request(kind, await read_json(request, node.settings.node.body_timeout_s))
    name = req.model  # type: ignore[attr-defined]
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
    if not forwarded:
        node.cluster.rates.hit(name)  # demand, gossiped to the coordinator (also for models not loaded)
    upstreams = node.upstreams(name, local_only=forwarded)
    if not upstreams:
        node.raise_unavailable(name)
    t0 = time.perf_counter()
    sent = req.model_dump(exclude_unset=True, by_alias=True)
    body = body_bytes(sent)
    if kind == "chat" and req.images():  # type: ignore[attr-defined]
        raise InvalidRequest(f"model '{name}' does not accept images (no model here has a multimodal projector)",
                             param=req.images()[0])  # type: ignore[attr-defined]
    resume = None
    if kind in ("chat", "completions") and getattr(req, "stream", False) and resumable(req):
        limit = req.token_limit() if kind == "chat" else req.max_tokens  # type: ignore[attr-defined]
        # What the replica will apply (engine.spec): a resumed stream must not start a fresh budget.
        limit = generation_limit(limit, *token_budget(spec, node.settings.node.max_tokens_default))
        resume = Continuation(kind, sent, limit)
    metrics = node.metrics
    ttfb = metrics.ttfb.labels(name, kind)
    try:
        affinity = request_key(kind, req) if node.settings.node.routing == "prefix" and len(upstreams) > 1 else None
        resp = await request.app[PROXY].forward(
            request, request.path, body, upstreams, on_first_byte=lambda _u: ttfb.observe(time.perf_counter() - t0),
            authorization=request.headers.get("Authorization"), resume=resume, affinity=affinity)
    except Exception as exc:
        status = getattr(exc, "http_status", 500)
        metrics.requests.labels(name, kind, str(status)).inc()
        raise
    metrics.requests.labels(name, kind, str(resp.status)).inc()
    metrics.latency.labels(name, kind).observe(time.perf_counter() - t0)
    return resp


async def health(request: web.Request) -> web.Response:
    node = _node(request)
    if node.cluster.transport is None:  # serving HTTP, not yet its cluster state: not "ok" for a balancer
        return web.json_response({"status": "starting", "node_id": node.node_id}, status=503,
                                 headers={"Retry-After": "1"})
    return web.json_response({"status": "ok", "node_id": node.node_id, "uptime_s": round(node.uptime_s(), 1),
                              "models_ready": sorted({h.model for h in node.manager.workers.values()
                                                      if h.state == "ready"})})


async def cluster(request: web.Request) -> web.Response:
    return web.json_response(_node(request).cluster_view())


async def metrics(request: web.Request) -> web.Response:
    body, ctype = _node(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": ctype})


async def cluster_gossip(request: web.Request) -> web.StreamResponse:
    """POST /_cluster/gossip: signed inter-node messages (the transport verifies and counts them)."""
    return await _node(request).cluster.handle(request)


async def cluster_files(request: web.Request) -> web.StreamResponse:
    """POST /_cluster/files: signed model-file requests (manifest, chunks) from peers."""
    return await _node(request).files.server.handle(request)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def status_page(request: web.Request) -> web.Response:
    html = resources.files("aivailable.api").joinpath("static/index.html").read_text()
    return web.Response(text=html, content_type="text/html", headers={"Content-Security-Policy": page_csp(html)})


def build_app(node: Node) -> web.Application:
    """The node's aiohttp application; `node` provides catalog, replicas and cluster facts."""
    install_protocol_error_bodies()
    cfg = node.settings.node
    guard = BrowserGuard(cfg.cors_origins, cfg.allowed_hosts, own_host=node.address.rpartition(":")[0])
    app = web.Application(middlewares=[openai_errors, guard.middleware, hops, api_keys],
                          client_max_size=cfg.max_body_bytes)
    app.on_response_prepare.append(guard.on_prepare)
    app[NODE] = node
    secret = node.cluster.secret
    app[PROXY] = Proxy(hop_auth=lambda path: hop.sign(secret, node.node_id, path, time.time()))
    node.metrics.watch_routing(app[PROXY].choices)
    app[HOPS] = hop.HopVerifier(secret)
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
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/api/cluster", cluster)
    r.add_get(OPENAPI_PATH, openapi)
    r.add_get("/", status_page)
    r.add_post("/_cluster/gossip", cluster_gossip)
    r.add_post("/_cluster/files", cluster_files)
    return app
