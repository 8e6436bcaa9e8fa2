"""Token-level latency: time to first token and inter-token gaps, as cumulative histograms.

A worker measures each request (engine/batch.py records when every token is sampled) and adds it to its
`LatencyRecorder`; `/health` reports the recorder's cumulative buckets. The node folds those reports into
per-model totals with `ModelBook.fold`, which survives worker restarts (a restarted worker's counts start
from zero again) and stopped replicas (their last counts stay in the model's total), so the node can
export monotonic Prometheus histograms per model. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

TTFT_BUCKETS: tuple[float, ...] = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (s) of time-to-first-token buckets: queueing plus prompt processing, 25 ms to a minute."""
ITL_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
"""Upper bounds (s) of inter-token-latency buckets: 200 tok/s down to one token every few seconds."""
COUNTERS = ("requests", "completion_tokens", "prompt_tokens")
"""Worker counters folded per model alongside the histograms (for rates in aivailable.history)."""


@dataclass
class Histo:
    """A fixed-bucket histogram: `counts[i]` observations <= bounds[i] (not cumulative), plus +Inf."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, values: Iterable[float]) -> None:
        for v in values:
            self.observe(v)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (le, observations <= le), ending with +Inf."""
        out, run = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            run += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), run))
        return out

    def to_dict(self) -> dict:
        return {"counts": list(self.counts), "sum": round(self.total, 6)}

    @classmethod
    def from_dict(cls, bounds: tuple[float, ...], d: Mapping | None) -> Histo:
        """A reported histogram; one of other bounds (or malformed) is read as empty."""
        counts = list((d or {}).get("counts") or [])
        if len(counts) != len(bounds) + 1 or any(not isinstance(c, int) or c < 0 for c in counts):
            return cls(bounds)
        return cls(bounds, counts, float((d or {}).get("sum") or 0.0))

    def minus(self, other: Histo) -> Histo:
        """self - other, bucket by bucket (other must be an earlier state of self)."""
        return Histo(self.bounds, [a - b for a, b in zip(self.counts, other.counts, strict=True)],
                     self.total - other.total)

    def add(self, other: Histo) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    def covers(self, earlier: Histo) -> bool:
        """True if `earlier` can be an earlier state of self (no bucket went down)."""
        return all(a >= b for a, b in zip(self.counts, earlier.counts, strict=True))


def token_gaps(times: list[float]) -> list[float]:
    """Gaps between consecutive token times (s): the inter-token latencies of one sequence."""
    return [b - a for a, b in zip(times, times[1:], strict=False)]


class LatencyRecorder:
    """One worker's cumulative TTFT and inter-token histograms (owned by its event loop)."""

    def __init__(self) -> None:
        self.ttft = Histo(TTFT_BUCKETS)
        self.itl = Histo(ITL_BUCKETS)

    def record(self, ttft_s: float | None, gaps: Iterable[float]) -> None:
        """One finished sequence: its time to first token (None when no token was sampled) and gaps."""
        if ttft_s is not None:
            self.ttft.observe(max(0.0, ttft_s))
        self.itl.observe_many(max(0.0, g) for g in gaps)

    def report(self) -> dict:
        """The part of the worker's /health that `ModelBook.fold` reads."""
        return {"ttft": self.ttft.to_dict(), "itl": self.itl.to_dict()}


@dataclass
class _Seen:
    pid: object
    ttft: Histo
    itl: Histo
    counters: dict[str, int]


class ModelBook:
    """Per-model totals of every worker's reports on this node, monotonic across worker restarts."""

    def __init__(self) -> None:
        self.ttft: dict[str, Histo] = {}
        self.itl: dict[str, Histo] = {}
        self.counters: dict[str, dict[str, int]] = {}
        self._seen: dict[str, _Seen] = {}

    def fold(self, key: str, model: str, report: Mapping) -> None:
        """Add what worker `key` (a replica of `model`) did since its previous report. A report from a
        new process (other pid) or with counts that went down starts from zero: a restarted worker."""
        ttft = Histo.from_dict(TTFT_BUCKETS, report.get("ttft"))
        itl = Histo.from_dict(ITL_BUCKETS, report.get("itl"))
        counters = {c: int(report.get(c) or 0) for c in COUNTERS}
        prev = self._seen.get(key)
        fresh = (prev is None or prev.pid != report.get("pid") or not ttft.covers(prev.ttft)
                 or not itl.covers(prev.itl) or any(counters[c] < prev.counters[c] for c in COUNTERS))
        d_ttft, d_itl = (ttft, itl) if fresh else (ttft.minus(prev.ttft), itl.minus(prev.itl))
        self.ttft.setdefault(model, Histo(TTFT_BUCKETS)).add(d_ttft)
        self.itl.setdefault(model, Histo(ITL_BUCKETS)).add(d_itl)
        tot = self.counters.setdefault(model, dict.fromkeys(COUNTERS, 0))
        for c in COUNTERS:
            tot[c] += counters[c] - (0 if fresh else prev.counters[c])
        self._seen[key] = _Seen(report.get("pid"), ttft, itl, counters)

    def models(self) -> list[str]:
        return sorted(self.ttft)
