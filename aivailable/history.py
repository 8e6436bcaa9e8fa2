"""The last hour on this node, in memory: per-model requests/s, tokens/s and mean time to first token, and
per-GPU VRAM and utilisation, one point per sampling interval in fixed-size ring buffers (no database).

`History.sample` is pure: the node's sampler task hands it the time and the cumulative totals
(engine/latency.py ModelBook) and GPU readings; rates are differences between consecutive samples. GET
/api/history serves `to_dict()`, and the status page draws it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DEFAULT_INTERVAL_S = 10.0
HORIZON_S = 3600.0
_MODEL_FIELDS = ("requests_per_s", "tokens_per_s", "ttft_s")
_GPU_FIELDS = ("vram_used_mib", "utilization_pct", "temperature_c", "power_w")


@dataclass(frozen=True, slots=True)
class ModelTotals:
    """Cumulative figures of one model on this node (they only grow)."""

    requests: int = 0
    completion_tokens: int = 0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0


@dataclass(frozen=True, slots=True)
class ModelPoint:
    t: float
    requests_per_s: float
    tokens_per_s: float
    ttft_s: float | None
    """Mean time to first token of the requests that finished in the interval (None: none did)."""


@dataclass(frozen=True, slots=True)
class GpuPoint:
    t: float
    vram_used_mib: float
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None


def interval_point(t: float, dt: float, prev: ModelTotals, cur: ModelTotals) -> ModelPoint:
    """Rates over one interval of `dt` seconds from two cumulative readings. Totals that went down (they
    should not) count from zero, never as a negative rate."""
    if cur.requests < prev.requests or cur.completion_tokens < prev.completion_tokens or cur.ttft_count < prev.ttft_count:
        prev = ModelTotals()
    dt = max(dt, 1e-9)
    n = cur.ttft_count - prev.ttft_count
    return ModelPoint(t, round((cur.requests - prev.requests) / dt, 4),
                      round((cur.completion_tokens - prev.completion_tokens) / dt, 3),
                      round((cur.ttft_sum_s - prev.ttft_sum_s) / n, 4) if n > 0 else None)


class History:
    """Ring buffers of the last `horizon_s` seconds at one point per `interval_s`."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, horizon_s: float = HORIZON_S):
        if interval_s <= 0 or horizon_s < interval_s:
            raise ValueError("need 0 < interval_s <= horizon_s")
        self.interval_s, self.horizon_s = interval_s, horizon_s
        self.size = int(horizon_s // interval_s)
        self.models: dict[str, collections.deque[ModelPoint]] = {}
        self.gpus: dict[str, collections.deque[GpuPoint]] = {}
        self.gpu_info: dict[str, dict] = {}
        self._totals: dict[str, ModelTotals] = {}
        self._last_t: float | None = None

    def sample(self, t: float, models: Mapping[str, ModelTotals], gpus: Iterable[Mapping]) -> None:
        """Add one point per model and per GPU. `gpus`: the status page's GPU views (id, name,
        vram_used_mib, vram_total_mib, and the telemetry fields, each possibly None)."""
        dt = self.interval_s if self._last_t is None else t - self._last_t
        self._last_t = t
        for name, cur in models.items():
            point = interval_point(t, dt, self._totals.get(name, ModelTotals()), cur)
            self._totals[name] = cur
            self.models.setdefault(name, collections.deque(maxlen=self.size)).append(point)
        for g in gpus:
            gid = str(g["id"])
            self.gpu_info[gid] = {"name": g.get("name", gid), "vram_total_mib": g.get("vram_total_mib", 0),
                                  "simulated": bool(g.get("simulated", False))}
            self.gpus.setdefault(gid, collections.deque(maxlen=self.size)).append(
                GpuPoint(t, float(g.get("vram_used_mib") or 0.0), g.get("utilization_pct"),
                         g.get("temperature_c"), g.get("power_w")))

    def to_dict(self) -> dict:
        """GET /api/history: per series, parallel arrays `t` (unix seconds) and one per figure."""
        def columns(points: Iterable, fields: tuple[str, ...]) -> dict[str, list]:
            pts = list(points)
            return {"t": [p.t for p in pts], **{f: [getattr(p, f) for p in pts] for f in fields}}

        return {"interval_s": self.interval_s, "horizon_s": self.horizon_s,
                "models": {n: columns(pts, _MODEL_FIELDS) for n, pts in sorted(self.models.items())},
                "gpus": {g: {**self.gpu_info[g], **columns(pts, _GPU_FIELDS)} for g, pts in sorted(self.gpus.items())}}
