"""`NodeApi`: the API's port (api/port.py `NodePort`) over a real `Node`.

An adapter rather than methods on `Node`: the node stays the wiring of its parts, and everything the HTTP
front end may read or change of it is in this one short class, each member one or two lines over the part
that owns the fact (cluster, manager, drainer, usage, observer).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn

from aiohttp import web

from aivailable.api.metrics import NodeMetrics
from aivailable.api.port import ApiSettings
from aivailable.api.responses_endpoint import loopback_address
from aivailable.api.router import Upstream

if TYPE_CHECKING:
    from aivailable.apikeys.ring import KeyRing
    from aivailable.node import Node


class NodeApi:
    """A `NodePort` reading and changing `node` through its methods and parts."""

    def __init__(self, node: Node):
        self._node = node
        self._config = ApiSettings.from_config(node.settings.node)  # once: NodeConfig is frozen

    # -- identity ------------------------------------------------------------------------------
    @property
    def config(self) -> ApiSettings:
        return self._config

    @property
    def node_id(self) -> str:
        return self._node.node_id

    @property
    def address(self) -> str:
        return self._node.address

    @property
    def port(self) -> int | None:
        return self._node.port

    @property
    def started_at_unix(self) -> int:
        return self._node.started_at_unix

    @property
    def secret(self) -> bytes:
        return self._node.cluster.secret

    @property
    def metrics(self) -> NodeMetrics:
        return self._node.metrics

    def uptime_s(self) -> float:
        return self._node.uptime_s()

    @property
    def ca_pem(self) -> bytes | None:
        ctls = self._node.cluster.tls
        return ctls.ca.pem if ctls is not None else None

    def loopback(self) -> tuple[str, dict]:
        """Its own cluster port over mutual TLS with its own certificate, as a peer would call it: whatever
        the client API's TLS, and forwarded (hop-signed) requests are taken there only (plain HTTP on the
        API port with insecure_cluster)."""
        node = self._node
        address = loopback_address(node.settings.node.host, node.port or 0)
        dialer = node.cluster.dialer
        return dialer.base_url(address), dialer.options(node.node_id)

    # -- models and replicas -------------------------------------------------------------------
    def models(self) -> Mapping[str, dict]:
        return self._node.models()

    def upstreams(self, model: str, *, local_only: bool = False) -> list[Upstream]:
        return self._node.upstreams(model, local_only=local_only)

    def model_state(self, model: str) -> tuple[str, str]:
        return self._node.model_state(model)

    def raise_unavailable(self, model: str) -> NoReturn:
        self._node.raise_unavailable(model)

    @property
    def planned(self) -> bool:
        return self._node.planned

    def placed_replicas(self, model: str) -> int:
        return len(self._node.placement.get(model, ()))

    # -- cluster and health --------------------------------------------------------------------
    def starting(self) -> bool:
        return self._node.cluster.transport is None

    def ready_models(self) -> list[str]:
        return sorted({h.model for h in self._node.manager.workers.values() if h.state == "ready"})

    def cluster_view(self) -> dict:
        return self._node.cluster_view()

    def history(self) -> dict:
        return self._node.observe.history.to_dict()

    async def handle_gossip(self, request: web.Request) -> web.StreamResponse:
        return await self._node.cluster.handle(request)

    async def handle_files(self, request: web.Request) -> web.StreamResponse:
        return await self._node.files.server.handle(request)

    async def set_drain(self, gpu: object, drained: bool) -> dict:
        node = self._node
        node.drainer.set(gpu, drained)
        node.cluster.wake()  # the coordinator (this node, or the next facts round elsewhere) re-places now
        await node.reconcile()
        return node.drainer.view()

    # -- request accounting --------------------------------------------------------------------
    def begin_request(self, model: str, keep_alive: float | None) -> None:
        self._node.cluster.rates.hit(model)  # demand, gossiped to the coordinator (also for models not loaded)
        self._node.usage.begin(model, time.time(), keep_alive)

    def end_request(self, model: str) -> None:
        self._node.usage.end(model, time.time())

    def record_cluster_refusal(self, peer: str, reason: str, detail: str) -> None:
        self._node.record_cluster_refusal(peer, reason, detail)

    # -- API keys ------------------------------------------------------------------------------------
    @property
    def keyring(self) -> KeyRing:
        return self._node.keys.ring

    async def keys_changed(self) -> list[str]:
        return await self._node.keys.changed()

    async def handle_keys(self, request: web.Request) -> web.StreamResponse:
        return await self._node.keys.handle(request)

    def record_rate_limited(self, fingerprint: str) -> None:
        self._node.rate_limited[fingerprint] = self._node.rate_limited.get(fingerprint, 0) + 1
