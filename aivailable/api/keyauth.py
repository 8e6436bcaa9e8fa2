"""Who may call what: API keys on /v1/*, and keys on the status surface with ``protect_status``.

Keys come from two places: the config file's ``api_keys`` (every model, per-node token buckets,
api/ratelimit.py) and the cluster's key set (aivailable/apikeys/: kinds, allow-lists, expiry, cluster-wide
rpm). /v1/* needs a key when either has one: a cluster whose key set has no key that is not revoked
stays open, as without keys. A request forwarded by a peer (a signed hop with a count) was checked and
charged at the node where it entered the cluster and is not checked again.
"""

from __future__ import annotations

import hmac
import time

from aiohttp import web

from aivailable import maintenance
from aivailable.api.metrics import NodeMetrics
from aivailable.api.port import NodePort
from aivailable.apikeys.keyset import Record, Verdict, fingerprint
from aivailable.errors import AuthenticationError, KeyKindForbidden, ModelNotAllowed

RECORD = web.RequestKey("api_key_record", Record)
"""Request key: the cluster key's `Record` a /v1 request was admitted with (absent for config keys)."""

STATUS_PATHS = frozenset({"/", "/api/cluster", "/api/history", "/metrics"})
"""What `protect_status` protects; /health always stays open."""


def bearer(request: web.Request, metrics: NodeMetrics, what: str = "API key") -> str:
    """The request's `Authorization: Bearer` token; AuthenticationError (counted) when there is none."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        metrics.key_rejections.labels("missing").inc()
        raise AuthenticationError(f"Missing {what}: send 'Authorization: Bearer <key>'.")
    return token


def config_key(token: str, keys: tuple[str, ...]) -> str | None:
    """The config-file key equal to `token` (constant-time compare), if any."""
    return next((k for k in keys if hmac.compare_digest(token.encode(), k.encode())), None)


def cluster_key(node: NodePort, token: str, metrics: NodeMetrics, now: float) -> Record:
    """The usable cluster key `token`; AuthenticationError (counted) for an unknown, revoked or expired one."""
    verdict, rec = node.keyring.verify(token, now)
    if verdict is Verdict.OK and rec is not None:
        return rec
    metrics.key_rejections.labels(verdict.value).inc()
    if verdict is Verdict.EXPIRED and rec is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec.expires))
        raise AuthenticationError(f"API key '{rec.name}' expired at {when}; ask an admin for a new one.")
    if verdict is Verdict.REVOKED and rec is not None:
        raise AuthenticationError(f"API key '{rec.name}' has been revoked.")
    raise AuthenticationError("Incorrect API key provided.")


def user_key(node: NodePort, token: str, metrics: NodeMetrics, now: float) -> Record:
    """`cluster_key`, and a viewer key is refused (403): viewers read the status, they do not use models."""
    rec = cluster_key(node, token, metrics, now)
    if rec.kind == "viewer":
        metrics.key_rejections.labels("viewer").inc()
        raise KeyKindForbidden(f"API key '{rec.name}' is a viewer key: it reads the status page, /api/cluster "
                               "and /metrics, not the OpenAI API.")
    return rec


def check_model(request: web.Request, model: str, metrics: NodeMetrics) -> None:
    """403 `model_not_allowed` when the request's cluster key has an allow-list without `model`."""
    rec = request.get(RECORD)
    if rec is not None and rec.models and model not in rec.models:
        metrics.key_rejections.labels("model_not_allowed").inc()
        raise ModelNotAllowed(f"API key '{rec.name}' may not use the model '{model}' (it may use: "
                              f"{', '.join(rec.models)}).", param="model")


def allowed_models(request: web.Request) -> tuple[str, ...] | None:
    """The models the request's key may use (None: all)."""
    rec = request.get(RECORD)
    return rec.models if rec is not None and rec.models else None


def check_status_access(request: web.Request, node: NodePort, metrics: NodeMetrics) -> web.Response | None:
    """With protect_status, any valid key reads the status surface (viewer, user, config or admin key).
    None when allowed; for the HTML page a plain 401 answer; JSON paths raise AuthenticationError."""
    try:
        token = bearer(request, metrics, "key (this node has protect_status = true)")
        if config_key(token, node.config.api_keys) is not None:
            return None
        if hmac.compare_digest(token.encode(), maintenance.admin_key(node.secret).encode()):
            return None
        cluster_key(node, token, metrics, time.time())
        return None
    except AuthenticationError as exc:
        if request.path != "/":
            raise
        return web.Response(status=401, text=f"401: {exc.message}\nThis node protects its status page: open it "
                            "with a key (e.g. curl -H 'Authorization: Bearer KEY'), or read /api/cluster with "
                            "`aivailable status --api-key KEY`.\n", headers={"WWW-Authenticate": "Bearer"})


def key_label(rec: Record) -> str:
    """How a cluster key appears in 429 messages, the status page's rate-limited table and metrics."""
    return fingerprint(rec.key_id)
