"""Idle unload (Ollama's `keep_alive` convention), as pure functions: durations, usage, idle decisions.

A model stays loaded for its keep-alive after its last request: the request's own `keep_alive` if the
latest request set one (as Ollama does), else the model's `keep_alive`, else the node default. `-1` (any
negative value) keeps it loaded forever, `0` unloads it as soon as no request uses it. Pinned models and
models with `min_replicas` are never unloaded for idleness; nor is a model that a request is using or
waiting for. Every entry node records when its clients last used each model (`Usage`), gossips it, and
the coordinator merges all nodes' records (`merge`) and stops placing models that are `idle`.

Times are wall-clock (unix) seconds so that records from several nodes compare; the cluster already
needs clocks within 30 s of each other (signed envelopes), and a skew only shifts an unload by as much.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

FOREVER = -1.0
"""keep_alive that never unloads (Ollama: any negative duration)."""

LOADS_ON_REQUEST = "loads on the next request"
"""End of the reason an idle model gives; the load-wait logic (api/loadwait.py) waits for such models."""

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")


def parse_duration(value: object) -> float:
    """Seconds from a keep_alive: a number of seconds, a numeric string, or a Go-style duration such as
    "5m", "1h30m", "90s", "-1m". Negative = `FOREVER`. Raises ValueError naming what is wrong."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as \"5m\", \"1h\", a number of seconds, or -1 for forever")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"{value[:40]!r} is not a duration (use e.g. \"5m\", \"1h30m\", \"90s\", "
                                 "a number of seconds, or -1 for forever)") from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise ValueError("must be a duration such as \"5m\", \"1h\", a number of seconds, or -1 for forever")
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration")
    return FOREVER if seconds < 0 else seconds


def describe(seconds: float | None) -> str:
    """A keep-alive for people: "forever", "0s", "90s", "5m", "1h30m"."""
    if seconds is None or seconds < 0:
        return "forever"
    s = round(seconds)
    if s < 60 or s % 60:
        return f"{seconds:g}s"
    h, m = divmod(s // 60, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m or not h else "")


@dataclass(frozen=True)
class Use:
    """The cluster's latest use of a model: when (unix s), the keep_alive that request asked for (None =
    the model's), and how many requests are using or waiting for it right now."""

    at: float
    keep_alive: float | None = None
    active: int = 0


class Usage:
    """One entry node's record of its clients' use of each model (gossiped in its facts as `view()`).
    Not thread-safe; owned by the node's event loop."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}
        self._keep: dict[str, float | None] = {}
        self._active: dict[str, int] = {}

    def touch(self, model: str, now: float, keep_alive: float | None = None) -> None:
        """`model` was used at `now` (e.g. configured at node start: its keep-alive counts from then)."""
        self._at[model] = max(now, self._at.get(model, now))
        self._keep[model] = keep_alive

    def begin(self, model: str, now: float, keep_alive: float | None = None) -> None:
        """A request for `model` entered (it may wait for a load, then run)."""
        self.touch(model, now, keep_alive)
        self._active[model] = self._active.get(model, 0) + 1

    def end(self, model: str, now: float) -> None:
        """That request finished (answered, failed, or its client left); the keep-alive counts from now."""
        self._at[model] = max(now, self._at.get(model, now))
        n = self._active.get(model, 0) - 1
        if n > 0:
            self._active[model] = n
        else:
            self._active.pop(model, None)

    def view(self) -> dict[str, dict]:
        """model -> {"at", "keep_alive" (seconds or None), "active"} (JSON-able, for gossip)."""
        return {m: {"at": round(at, 3), "keep_alive": self._keep.get(m), "active": self._active.get(m, 0)}
                for m, at in sorted(self._at.items())}


def merge(views: Iterable[Mapping[str, Mapping]]) -> dict[str, Use]:
    """Every node's `Usage.view()` folded into one `Use` per model: the latest use (with the keep_alive
    its request asked for) and the sum of active requests. Malformed entries are skipped."""
    out: dict[str, Use] = {}
    for view in views:
        for model, u in (view or {}).items():
            try:
                at, active = float(u["at"]), int(u.get("active", 0))
                keep = None if u.get("keep_alive") is None else float(u["keep_alive"])
            except (KeyError, TypeError, ValueError):
                continue
            prev = out.get(model)
            if prev is None or at > prev.at:
                out[model] = Use(at, keep, active + (prev.active if prev else 0))
            else:
                out[model] = Use(prev.at, prev.keep_alive, prev.active + active)
    return out


def effective(spec: Mapping, use: Use | None, default: float) -> float:
    """The keep-alive that applies to a model: the latest request's, else the model's, else `default`."""
    if use is not None and use.keep_alive is not None:
        return use.keep_alive
    if spec.get("keep_alive") is not None:
        return float(spec["keep_alive"])
    return default


def unload_at(spec: Mapping, use: Use | None, default: float, busy: bool = False) -> float | None:
    """Unix time after which the model is idle, or None if it is never unloaded for idleness now (kept
    forever, pinned, min_replicas, in use or waited for (`busy` or `use.active`), or never used)."""
    if spec.get("pinned") or int(spec.get("min_replicas") or 0) > 0:
        return None
    if use is None or use.active > 0 or busy:
        return None
    keep = effective(spec, use, default)
    return None if keep < 0 else use.at + keep


def idle(spec: Mapping, use: Use | None, default: float, now: float, busy: bool = False) -> bool:
    """True when the model has gone unused for longer than its keep-alive (and nothing else keeps it)."""
    at = unload_at(spec, use, default, busy)
    return at is not None and now >= at


def idle_reason(spec: Mapping, use: Use | None, default: float) -> str:
    """Why an idle model is not placed (shown on the status page and /api/cluster)."""
    return f"idle: no request for {describe(effective(spec, use, default))} (keep_alive); {LOADS_ON_REQUEST}"
