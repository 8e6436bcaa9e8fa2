"""The node's error hierarchy. Each error carries the HTTP status the API maps it to."""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node raises on purpose. `http_status` and `code` map it to OpenAI JSON."""

    http_status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class MisdirectedRequest(NodeError):
    """Cluster traffic sent in plaintext to the API port of a node that takes it only over TLS."""

    http_status = 421
    error_type = "invalid_request_error"
    code = "cluster_traffic_needs_tls"


class ConfigError(NodeError):
    """Bad configuration or command-line value; the message names the field. CLI exit code 2."""

    http_status = 400
    error_type = "invalid_request_error"


class InvalidRequest(NodeError):
    http_status = 400
    error_type = "invalid_request_error"


class AuthenticationError(NodeError):
    http_status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(NodeError):
    http_status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFound(NodeError):
    http_status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class Conflict(NodeError):
    """The change conflicts with the current state (e.g. a key name that is in use)."""

    http_status = 409
    error_type = "invalid_request_error"
    code = "conflict"


class RequestTimeout(NodeError):
    """The client did not send its whole request body in time."""

    http_status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class BodyTooLarge(NodeError):
    http_status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class Forbidden(NodeError):
    """Refused by the node's browser defences: an Origin or Host the configuration does not allow."""

    http_status = 403
    error_type = "invalid_request_error"
    code = "forbidden"


class ModelNotAllowed(Forbidden):
    """The API key's allow-list does not include the requested model."""

    code = "model_not_allowed"


class KeyKindForbidden(Forbidden):
    """A viewer key (read-only: status page, /api/cluster, /metrics) used on the OpenAI API."""

    code = "viewer_key"


class UnsupportedMediaType(NodeError):
    """A request body sent with a Content-Type other than application/json."""

    http_status = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class QueueFullError(NodeError):
    http_status = 429
    error_type = "rate_limit_exceeded"
    code = "queue_full"


class RateLimited(NodeError):
    """An API key sent more requests than its per-minute limit; retry after `retry_after` seconds."""

    http_status = 429
    error_type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class ModelUnavailable(NodeError):
    """The model is known but no replica can take the request now (loading, restarting, failed)."""

    http_status = 503
    error_type = "service_unavailable"
    code = "model_not_ready"


class NodeStarting(NodeError):
    """The node serves HTTP but has not loaded its cluster state and joined yet (a second or two)."""

    http_status = 503
    error_type = "service_unavailable"
    code = "node_starting"


class UpstreamError(NodeError):
    http_status = 502
    error_type = "server_error"
    code = "upstream_failed"


class PlacementInfeasible(NodeError):
    def __init__(self, reasons: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in reasons.items()))
        self.reasons = reasons
