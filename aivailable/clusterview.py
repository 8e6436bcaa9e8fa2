"""GET /api/cluster and the status page: the whole cluster as one JSON document, from gossiped facts."""

from __future__ import annotations

from dataclasses import dataclass

from aivailable import keepalive
from aivailable.coordinator import Assignments, NodeFacts, merged_catalog


@dataclass(frozen=True)
class MemberInfo:
    """A node as the membership layer sees it, with its last gossiped facts (None: not heard yet)."""

    node_id: str
    address: str
    state: str
    """alive, suspect, dead or left"""
    facts: NodeFacts | None


def _transfer_text(t: dict) -> str:
    if t["state"] == "verifying":
        return f"{t['node']} is verifying the sha256 of its copy"
    if t["state"] == "queued":
        return f"{t['node']} is about to fetch its file"
    eta = f", ETA {t['eta_s']:.0f}s" if t.get("eta_s") is not None else ""
    return f"{t['node']} {t['state']} its file: {t['percent']:.0f}% at {t['rate_mib_s']:.1f} MiB/s{eta}"


def _model_state(name: str, replicas: list[dict], placed: bool, reason: str,
                 transfers: list[dict] = ()) -> tuple[str, str]:
    states = {r["state"] for r in replicas}
    if "ready" in states:
        return "ready", ""
    if states & {"loading", "starting"}:
        return "loading", ""
    active = [t for t in transfers if t["state"] in ("queued", "fetching", "verifying")]
    if placed and active:
        return "fetching", "; ".join(_transfer_text(t) for t in active)
    failed = [t for t in transfers if t["state"] == "failed"]
    if placed and failed and "failed" not in states:
        return "failed", "; ".join(f"{t['node']} could not fetch its file: {t['error']}" for t in failed)
    if "failed" in states:
        return "failed", next(r.get("reason", "") for r in replicas if r["state"] == "failed")
    if placed:
        return "loading", "assigned; the node has not started loading it yet"
    return "unplaced", reason or "not placed yet"


def build_view(*, self_id: str, leader: str | None, term: int, version: int, backend: str,
               members: list[MemberInfo], placement: Assignments, unplaced: dict[str, str],
               events: list[dict], extra_models: dict[str, dict] | None = None,
               keep_alive_default: float = keepalive.FOREVER, now: float | None = None) -> dict:
    """The /api/cluster document (fields in CONTRACTS.md, plus operator extras). With `now` (unix s), each
    model says its keep-alive and when it unloads if unused (`_keep_alive`)."""
    nodes = []
    transfers: list[dict] = []
    replicas_by_model: dict[str, list[dict]] = {}
    live_facts = [m.facts for m in members if m.facts is not None and m.state in ("alive", "suspect")]
    for m in sorted(members, key=lambda m: m.node_id):
        f = m.facts
        gpus = []
        if f is not None:
            by_dev: dict[str, list[dict]] = {}
            gone = m.state not in ("alive", "suspect")
            for r in f.replicas:
                row = {"node": m.node_id, **r}
                if gone:  # last facts of a dead node: its replicas are lost, not serving
                    row = {**row, "state": "lost", "reason": f"node {m.node_id} is {m.state}"}
                    r = {**r, "state": "lost"}
                replicas_by_model.setdefault(r["model"], []).append(row)
                for d in r["gpus"]:
                    by_dev.setdefault(d, []).append({"name": r["model"], "state": r["state"],
                                                     "vram_mib": round(r.get("vram_mib", 0) / max(1, len(r["gpus"])),
                                                                       1)})
            for d in f.devices:
                used = f.claims_mib.get(d["id"], 0.0) if d.get("simulated") else d.get("vram_used_mib", 0)
                gpus.append({**d, "vram_used_mib": round(float(used), 1), "models": by_dev.get(d["id"], []),
                             "drained": f.drained or d["id"] in f.drained_gpus})
        if f is not None and m.state in ("alive", "suspect"):
            transfers += [{"node": m.node_id, **t} for t in f.transfers]
        nodes.append({"id": m.node_id, "address": m.address, "state": m.state, "gpus": gpus,
                      "backend": f.backend if f is not None else "", "self": m.node_id == self_id,
                      "files": len(f.files) if f is not None else 0,
                      "bad_peers": dict(f.bad_peers) if f is not None else {},
                      "leaving": bool(f is not None and f.leaving and m.state in ("alive", "suspect")),
                      "drained": bool(f is not None and f.drained),
                      "drained_gpus": list(f.drained_gpus) if f is not None else []})
    catalog, conflicts = merged_catalog(live_facts)
    catalog.update({k: v for k, v in (extra_models or {}).items() if k not in catalog})
    uses = keepalive.merge(f.usage for f in live_facts)
    models = []
    for name, spec in sorted(catalog.items()):
        reps = replicas_by_model.get(name, [])
        placed_nodes = {r["node"] for r in placement.get(name, [])}
        moving = [t for t in transfers if t["model"] == name and t["node"] in placed_nodes]
        state, reason = _model_state(name, reps, bool(placement.get(name)), unplaced.get(name, ""), moving)
        busy = any(r.get("outstanding") or r.get("queued") for r in reps)
        if state == "unplaced" and now is not None and keepalive.idle(spec, uses.get(name), keep_alive_default,
                                                                       now, busy):
            reason = keepalive.idle_reason(spec, uses.get(name), keep_alive_default)  # also where no coordinator
        if name in conflicts:
            reason = (reason + "; " if reason else "") + conflicts[name]
        needs = [f.needs_mib[name] for f in live_facts if name in f.needs_mib]
        models.append({"name": name, "state": state, "reason": reason, "embedding": spec.get("embedding", False),
                       "vision": bool(spec.get("mmproj") or spec.get("mmproj_sha256") or spec.get("mmproj_source")),
                       "sha256": spec.get("sha256"), "size": spec.get("size"), "offered": bool(spec.get("offered")),
                       "holders": [f.node_id for f in live_facts if spec.get("sha256") in f.files],
                       "ctx": spec.get("ctx"), "kv_cache_type": spec.get("kv_cache_type") or "f16",
                       "vram_estimate_mib": round(max(needs), 1) if needs else None,
                       "replicas": reps, "placed_on": placement.get(name, []),
                       "requests": sum(r.get("requests", 0) for r in reps),
                       "tokens_per_s": round(sum(r.get("tokens_per_s", 0.0) for r in reps), 2),
                       **_cache_use(reps), **_keep_alive(spec, uses.get(name), keep_alive_default, now, state, busy)})
    return {"node_id": self_id, "leader": leader, "term": term, "version": version, "backend": backend,
            "nodes": nodes, "models": models, "transfers": transfers, "events": events[-50:]}


def _cache_use(reps: list[dict]) -> dict:
    """Prompt tokens the model's replicas processed and how many of them came from a slot's cached prefix."""
    prompt = sum(int(r.get("prompt_tokens", 0)) for r in reps)
    cached = sum(int(r.get("cached_tokens", 0)) for r in reps)
    return {"prompt_tokens": prompt, "cached_tokens": cached,
            "cache_hit_rate": round(cached / prompt, 3) if prompt else None}


def _keep_alive(spec: dict, use: keepalive.Use | None, default: float, now: float | None, state: str,
                busy: bool) -> dict:
    """`keep_alive` (the one that applies, for people) and `unload_in_s`: seconds until a loaded model is
    unloaded for idleness (0: being unloaded; None: not loaded, or nothing unloads it now)."""
    out: dict = {"keep_alive": keepalive.describe(keepalive.effective(spec, use, default)), "unload_in_s": None}
    if spec.get("pinned") or int(spec.get("min_replicas") or 0) > 0:
        out["keep_alive"] += " (kept: pinned)" if spec.get("pinned") else " (kept: min_replicas)"
    at = keepalive.unload_at(spec, use, default, busy)
    if now is not None and at is not None and state in ("ready", "loading"):
        out["unload_in_s"] = round(max(0.0, at - now), 1)
    return out
