"""Prometheus metrics of one node (its own registry, so tests can run several nodes in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Live:
    """Collects gauges from the node's current state at scrape time."""

    def __init__(self, snapshot: Callable[[], dict]):
        self._snapshot = snapshot

    def collect(self) -> Iterable:
        s = self._snapshot()
        total = GaugeMetricFamily("aivailable_gpu_vram_total_mib", "VRAM of each GPU (MiB)",
                                  labels=["gpu", "name", "simulated"])
        used = GaugeMetricFamily("aivailable_gpu_vram_used_mib", "VRAM in use on each GPU (MiB)",
                                 labels=["gpu", "name", "simulated"])
        for g in s["gpus"]:
            lab = [g["id"], g["name"], str(g["simulated"]).lower()]
            total.add_metric(lab, g["vram_total_mib"])
            used.add_metric(lab, g["vram_used_mib"])
        yield total
        yield used
        queue = GaugeMetricFamily("aivailable_queue_depth", "Requests waiting per replica", labels=["model", "replica"])
        active = GaugeMetricFamily("aivailable_outstanding_requests", "Requests in flight per replica",
                                   labels=["model", "replica"])
        state = GaugeMetricFamily("aivailable_replica_ready", "1 if the replica serves, else 0",
                                  labels=["model", "replica", "state"])
        tokens = CounterMetricFamily("aivailable_worker_tokens", "Tokens processed by the replica's current worker",
                                     labels=["model", "replica", "kind"])
        restarts = CounterMetricFamily("aivailable_worker_restarts", "Worker restarts after a crash",
                                       labels=["model", "replica"])
        cached = CounterMetricFamily("aivailable_prompt_tokens_cached", "Prompt tokens whose KV came from a "
                                     "slot's cached prefix instead of being computed (replica's current worker)",
                                     labels=["model", "replica"])
        autonomous = GaugeMetricFamily("aivailable_autonomous_replicas", "Replicas this node runs without a "
                                       "coordinator's placement (1 per replica; state autonomous or retiring)",
                                       labels=["model", "replica", "state"])
        for w in s["workers"]:
            lab = [w["model"], w["key"]]
            if w.get("autonomous"):
                autonomous.add_metric([*lab, "retiring" if w["state"] == "retiring" else "autonomous"], 1.0)
            queue.add_metric(lab, w["queued"])
            active.add_metric(lab, w["outstanding"])
            state.add_metric([*lab, w["state"]], 1.0 if w["state"] == "ready" else 0.0)
            tokens.add_metric([*lab, "prompt"], w.get("prompt_tokens", 0))
            tokens.add_metric([*lab, "completion"], w["completion_tokens"])
            restarts.add_metric(lab, w["restarts"])
            cached.add_metric(lab, w.get("cached_tokens", 0))
        yield from (queue, active, state, tokens, restarts, cached, autonomous)


class _Routing:
    def __init__(self, choices: dict[str, int]):
        self._choices = choices

    def collect(self) -> Iterable:
        fam = CounterMetricFamily("aivailable_routing_choices", "Replica choices of this entry node: prefix "
                                  "(conversation affinity within the load bound), overflow (every replica past the "
                                  "bound), p2c (no affinity key), only (one candidate)", labels=["how"])
        for how in ("prefix", "overflow", "p2c", "only"):
            fam.add_metric([how], self._choices.get(how, 0))
        yield fam


class NodeMetrics:
    """Request counters and latency histograms, plus live GPU/worker gauges."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.requests = Counter("aivailable_requests", "API requests by model, endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("aivailable_request_duration_seconds", "Time until the response is complete",
                                 ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.rate_limited = Counter("aivailable_rate_limited", "Requests refused with 429 by an API key's rate "
                                    "limit, by key fingerprint", ["key"], registry=self.registry)
        self.ttfb = Histogram("aivailable_time_to_first_byte_seconds", "Time until the replica's first byte",
                              ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.autonomous_retired = Counter("aivailable_autonomous_retired", "Autonomous replicas retired (drained "
                                          "and unloaded) because a coordinator's placement took over",
                                          registry=self.registry)
        self.load_waiting = Gauge("aivailable_load_waiting", "Requests waiting at this entry node for a model to "
                                  "load (api/loadwait.py)", ["model"], registry=self.registry)
        self.load_wait = Histogram("aivailable_load_wait_seconds", "Time requests waited for a model to load, "
                                   "served or not", ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.key_rejections = Counter("aivailable_api_key_rejections", "Requests refused for their API key, by "
                                      "reason (missing, unknown, revoked, expired, viewer, model_not_allowed, "
                                      "rate_limited)", ["reason"], registry=self.registry)
        self.registry.register(_Live(snapshot))

    def watch_routing(self, choices: dict[str, int]) -> None:
        """Export the API router's tally of how it chose replicas (api/router.py pick)."""
        self.registry.register(_Routing(choices))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
