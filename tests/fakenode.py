"""`FakeNode`: a `NodePort` (aivailable/api/port.py) whose models, states and replicas a test sets, and
which records what the API did to it (requests begun and ended, 429s, drains)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from aiohttp import web

from aivailable.api.metrics import NodeMetrics
from aivailable.api.port import ApiSettings
from aivailable.api.responses_endpoint import loopback_url
from aivailable.api.router import Upstream
from aivailable.apikeys.ring import KeyRing
from aivailable.config import NodeConfig
from aivailable.errors import ModelUnavailable, NodeStarting


def api_settings(**overrides: Any) -> ApiSettings:
    """The API settings of a node configured with `overrides` (NodeConfig's defaults and checks otherwise)."""
    return ApiSettings.from_config(NodeConfig(**overrides))


class FakeNode:
    """A node without processes: `models` are its catalog, `states` the cluster's (state, reason) per model,
    `ready` its reachable replicas per model."""

    def __init__(self, models: Mapping[str, dict] | None = None, *, states: Mapping[str, tuple[str, str]] | None = None,
                 ready: Mapping[str, list[Upstream]] | None = None, node_id: str = "n0", secret: bytes = b"fake-secret",
                 **settings: Any):
        self.config = api_settings(**settings)
        self.node_id = node_id
        self.address = "127.0.0.1:1"
        self.port: int | None = None
        self.started_at_unix = 1_700_000_000
        self.secret = secret
        self.ca_pem: bytes | None = None
        self.metrics = NodeMetrics(lambda: {"gpus": [], "workers": []})
        self.catalog = dict(models or {})
        self.states = dict(states or {})
        self.ready = {m: list(ups) for m, ups in (ready or {}).items()}
        self.planned = True
        self.is_starting = False
        self.began: list[tuple[str, float | None]] = []
        self.ended: list[str] = []
        self.rate_limited: dict[str, int] = {}
        self.drains: list[tuple[object, bool]] = []
        self.cluster_refusals: list[tuple[str, str]] = []
        self.keyring = KeyRing(node_id)
        self.key_changes = 0

    def uptime_s(self) -> float:
        return 12.34

    def loopback(self) -> tuple[str, dict]:
        return loopback_url(self.config.host, self.port or 0), {}

    def models(self) -> Mapping[str, dict]:
        return self.catalog

    def upstreams(self, model: str, *, local_only: bool = False) -> list[Upstream]:
        return [u for u in self.ready.get(model, []) if u.local or not local_only]

    def model_state(self, model: str) -> tuple[str, str]:
        return self.states.get(model, ("unplaced", "not placed yet"))

    def raise_unavailable(self, model: str) -> NoReturn:
        state, reason = self.model_state(model)
        raise ModelUnavailable(f"model '{model}' is {state}: {reason}", retry_after=7)

    def placed_replicas(self, model: str) -> int:
        return 1 if model in self.states else 0

    def starting(self) -> bool:
        return self.is_starting

    def ready_models(self) -> list[str]:
        return sorted(m for m, ups in self.ready.items() if ups)

    def cluster_view(self) -> dict:
        if self.is_starting:
            raise NodeStarting(f"node {self.node_id} is starting", retry_after=1)
        return {"node_id": self.node_id, "models": [{"name": m, "state": self.model_state(m)[0],
                                                     "reason": self.model_state(m)[1], "replicas": []}
                                                    for m in sorted(self.catalog)]}

    def history(self) -> dict:
        return {"models": {}, "gpus": {}}

    async def handle_gossip(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def handle_files(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=404)

    async def set_drain(self, gpu: object, drained: bool) -> dict:
        self.drains.append((gpu, drained))
        return {"node": self.node_id, "drained": drained and gpu is None, "drained_gpus": [], "holding": []}

    async def keys_changed(self) -> list[str]:
        self.key_changes += 1
        return []

    async def handle_keys(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=404)

    def begin_request(self, model: str, keep_alive: float | None) -> None:
        self.began.append((model, keep_alive))

    def end_request(self, model: str) -> None:
        self.ended.append(model)

    def record_cluster_refusal(self, peer: str, reason: str, detail: str) -> None:
        self.cluster_refusals.append((peer, reason))

    def record_rate_limited(self, fingerprint: str) -> None:
        self.rate_limited[fingerprint] = self.rate_limited.get(fingerprint, 0) + 1
