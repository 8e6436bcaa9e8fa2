"""What the HTTP front end needs from a node: `NodePort`, and the `ApiSettings` it reads.

The API never reaches into the node's parts (cluster, manager, settings): every fact it reads and every
change it makes is a member of `NodePort`. `aivailable/node_api.py` implements it over a real `Node`;
tests implement it with a plain class and run the real `build_app` in-process (tests/test_api_inprocess.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol

from aiohttp import web

from aivailable.api.metrics import NodeMetrics
from aivailable.api.router import Upstream

if TYPE_CHECKING:
    from aivailable.apikeys.ring import KeyRing
    from aivailable.config import NodeConfig


@dataclass(frozen=True)
class ApiSettings:
    """The `[node]` settings the API reads (aivailable/config.py documents each)."""

    host: str
    api_keys: tuple[str, ...]
    rate_limit_rpm: int
    rate_limit_burst: int
    api_key_rpm: Mapping[str, int]
    max_body_bytes: int
    body_timeout_s: float
    allow_image_urls: bool
    max_image_bytes: int
    cors_origins: tuple[str, ...]
    allowed_hosts: tuple[str, ...]
    max_tokens_default: int
    routing: str
    load_wait_s: float
    cluster_tls: bool = False
    """Peers reach this node only over TLS on the cluster port: cluster traffic on the API port is refused."""
    protect_status: bool = False

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> ApiSettings:
        return cls(host=cfg.host, api_keys=tuple(cfg.api_keys), rate_limit_rpm=cfg.rate_limit_rpm,
                   rate_limit_burst=cfg.rate_limit_burst, api_key_rpm=dict(cfg.api_key_rpm),
                   max_body_bytes=cfg.max_body_bytes, body_timeout_s=cfg.body_timeout_s,
                   allow_image_urls=cfg.allow_image_urls, max_image_bytes=cfg.max_image_bytes,
                   cors_origins=tuple(cfg.cors_origins), allowed_hosts=tuple(cfg.allowed_hosts),
                   max_tokens_default=cfg.max_tokens_default, routing=cfg.routing, load_wait_s=cfg.load_wait_s,
                   cluster_tls=not cfg.insecure_cluster,
                   protect_status=cfg.protect_status)


class NodePort(Protocol):
    """The node as the API sees it. Read-only views are shared objects: read them, never change them."""

    # -- identity ------------------------------------------------------------------------------
    @property
    def config(self) -> ApiSettings:
        """The API's settings (read once: the node's configuration is frozen)."""
    @property
    def node_id(self) -> str: ...
    @property
    def address(self) -> str:
        """host:port that peers and the status page use to reach this node."""
    @property
    def port(self) -> int | None:
        """The port the API listens on (None before it listens)."""
    @property
    def started_at_unix(self) -> int: ...
    @property
    def secret(self) -> bytes:
        """The cluster secret: signs and verifies hops (api/hop.py), fingerprints API keys, derives the admin key."""
    @property
    def metrics(self) -> NodeMetrics:
        """The node's Prometheus metrics (api/metrics.py), which the API counts into and renders."""
    def uptime_s(self) -> float: ...
    @property
    def ca_pem(self) -> bytes | None:
        """The cluster CA certificate (PEM, public), which `tls = "auto"` certificates chain to (GET
        /api/ca.pem); None with insecure_cluster."""
    def loopback(self) -> tuple[str, dict]:
        """(base URL, aiohttp request options) by which the node calls its own API (/v1/responses)."""

    # -- models and replicas -------------------------------------------------------------------
    def models(self) -> Mapping[str, dict]:
        """Every model the cluster serves: name -> definition."""
    def upstreams(self, model: str, *, local_only: bool = False) -> list[Upstream]:
        """Ready replicas of `model`: this node's, then (unless `local_only`) its peers'."""
    def model_state(self, model: str) -> tuple[str, str]:
        """(state, reason): ready, loading, fetching, failed, placing or unplaced."""
    def raise_unavailable(self, model: str) -> NoReturn:
        """Raise the ModelUnavailable (503, Retry-After) that says why `model` has no replica here."""
    @property
    def planned(self) -> bool:
        """A placement has reached this node."""
    def placed_replicas(self, model: str) -> int:
        """Replicas of `model` in the placement this node accepted."""

    # -- cluster and health --------------------------------------------------------------------
    def starting(self) -> bool:
        """Serving HTTP but not yet its cluster state: /health answers 503 "starting"."""
    def ready_models(self) -> list[str]:
        """Models with a ready worker on this node, sorted."""
    def cluster_view(self) -> dict:
        """GET /api/cluster (CONTRACTS.md); raises NodeStarting before the cluster state is loaded."""
    def history(self) -> dict:
        """GET /api/history: this node's last hour per model and per GPU."""
    async def handle_gossip(self, request: web.Request) -> web.StreamResponse:
        """POST /_cluster/gossip: a signed inter-node message."""
    async def handle_files(self, request: web.Request) -> web.StreamResponse:
        """POST /_cluster/files: a signed model-file request."""
    async def set_drain(self, gpu: object, drained: bool) -> dict:
        """Drain or undrain `gpu` (None: the whole node), re-place and reconcile; the drain view."""

    # -- request accounting --------------------------------------------------------------------
    def begin_request(self, model: str, keep_alive: float | None) -> None:
        """A client's request for `model` entered the cluster here: demand, and the model is in use."""
    def end_request(self, model: str) -> None:
        """That request is finished (answered, failed or abandoned)."""
    def record_cluster_refusal(self, peer: str, reason: str, detail: str) -> None:
        """Cluster traffic from `peer` was refused (counted and shown like the transport's rejections)."""
    # -- API keys (aivailable/apikeys/, aivailable/keysync.py) ------------------------------------------
    @property
    def keyring(self) -> KeyRing:
        """This node's replica of the cluster's key set: verify keys, admit requests, admin changes."""
    async def keys_changed(self) -> list[str]:
        """After an admin change of `keyring`: persist it and push it to every alive peer."""
    async def handle_keys(self, request: web.Request) -> web.StreamResponse:
        """POST /_cluster/keys: a signed key-set exchange with a peer."""

    def record_rate_limited(self, fingerprint: str) -> None:
        """A request of the API key with this fingerprint got 429 (the status page's security table)."""
