"""The node's observability: per-model token latency (folded from its workers' reports), KV-cache use,
GPU telemetry, model load times as Prometheus metrics, and the last hour in memory (aivailable.history).

One `Observer` per node. The worker manager calls `fold` after each health poll; `run` samples telemetry
and history every `history_interval_s`; `collect` is a Prometheus collector read at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from aivailable.engine.latency import ModelBook
from aivailable.engine.telemetry import NONE, GpuTelemetry, Telemetry
from aivailable.history import History, ModelTotals

if TYPE_CHECKING:
    from aivailable.engine.manager import WorkerHandle
    from aivailable.node import Node

log = logging.getLogger("aivailable.observe")

_GPU_GAUGES = (("utilization_pct", "aivailable_gpu_utilization_percent", "GPU busy share (%), from NVML/amdsmi/sysfs"),
               ("temperature_c", "aivailable_gpu_temperature_celsius", "GPU temperature (degrees C)"),
               ("power_w", "aivailable_gpu_power_watts", "GPU power draw (W)"))


class Observer:
    """Latency book, telemetry and history of one node."""

    def __init__(self, node: Node, *, telemetry: Telemetry | None = None):
        self.node = node
        self.book = ModelBook()
        self.telemetry = telemetry or Telemetry()
        self.readings: dict[str, GpuTelemetry] = {}
        self.history = History(node.settings.node.history_interval_s)

    # -- inputs --------------------------------------------------------------------------------
    def fold(self, h: WorkerHandle) -> None:
        """A worker's health report arrived: add its new latency observations to its model's totals."""
        self.book.fold(h.assignment.key, h.model, h.health)

    def gpu_fields(self, device_id: str) -> dict:
        """Telemetry fields of one GPU for the status page (None where not reported)."""
        return self.readings.get(device_id, NONE).to_dict()

    def totals(self) -> dict[str, ModelTotals]:
        b = self.book
        return {m: ModelTotals(requests=b.counters[m]["requests"], completion_tokens=b.counters[m]["completion_tokens"],
                               ttft_sum_s=b.ttft[m].total, ttft_count=b.ttft[m].count) for m in b.models()}

    async def read_telemetry(self) -> None:
        devices = [d for d in self.node.inventory.devices if not d.simulated]
        if devices:
            self.readings = await asyncio.to_thread(self.telemetry.read_all, devices)

    async def run(self) -> None:
        """Every interval: read GPU telemetry, then add a history point."""
        interval = self.history.interval_s
        while True:
            try:
                await self.read_telemetry()
                self.history.sample(time.time(), self.totals(), self.node._gpu_views())
            except Exception:  # observability must never take the node down
                log.exception("history sample failed")
            await asyncio.sleep(interval)

    # -- Prometheus ----------------------------------------------------------------------------
    def collect(self) -> Iterable:
        ttft = HistogramMetricFamily("aivailable_time_to_first_token_seconds",
                                     "Time from a request reaching its replica's worker (queueing and prompt "
                                     "included) to its first sampled token, per model", labels=["model"])
        itl = HistogramMetricFamily("aivailable_inter_token_latency_seconds",
                                    "Time between consecutive output tokens of a sequence, per model",
                                    labels=["model"])
        for m in self.book.models():
            t, i = self.book.ttft[m], self.book.itl[m]
            ttft.add_metric([m], t.cumulative(), t.total)
            itl.add_metric([m], i.cumulative(), i.total)
        yield ttft
        yield itl
        kv_used = GaugeMetricFamily("aivailable_kv_cache_used_cells", "KV-cache cells holding tokens (busy slots' "
                                    "positions plus idle slots' cached prefixes), per replica",
                                    labels=["model", "replica"])
        kv_total = GaugeMetricFamily("aivailable_kv_cache_total_cells", "KV-cache cells of the replica's context",
                                     labels=["model", "replica"])
        load = GaugeMetricFamily("aivailable_model_load_seconds", "Seconds the replica's worker took from start "
                                 "to ready at its last load", labels=["model", "replica"])
        for h in list(self.node.manager.workers.values()):
            lab = [h.model, h.assignment.key]
            used, total = h.health.get("kv_cells_used"), h.health.get("kv_cells_total")
            if h.state == "ready" and used is not None and total:
                kv_used.add_metric(lab, used)
                kv_total.add_metric(lab, total)
            if h.load_s is not None:
                load.add_metric(lab, h.load_s)
        yield from (kv_used, kv_total, load)
        names = {d.id: d.name for d in self.node.inventory.devices}
        for field, metric, doc in _GPU_GAUGES:
            fam = GaugeMetricFamily(metric, doc, labels=["gpu", "name"])
            for gid, r in self.readings.items():
                value = getattr(r, field)
                if value is not None:
                    fam.add_metric([gid, names.get(gid, gid)], value)
            yield fam
