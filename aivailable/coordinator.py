"""The coordinator's decisions, as pure functions: cluster facts in, a placement out.

Each node publishes facts (`NodeFacts`: its GPUs, the catalog it was configured with, which model
files it holds and what they need, its replicas and request rates). The coordinator — the elected
leader, or a lone node — folds every live node's facts into a placement `Problem`, runs
`placement.solver.place`, and turns the result into `Assignments` (model -> replicas, each
replica = one node's GPUs). Nodes reconcile their engine to their share. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aivailable import keepalive, maintenance
from aivailable.files import catalog as fcat
from aivailable.placement import Gpu, ModelSpec, PlacementResult, Problem, Replica, prune_previous
from aivailable.placement.kvchoice import place_kv
from aivailable.placement.model import Affinity as PAffinity

BASELINE_DEMAND = 0.01
"""Requests/s credited to every catalog model, so configured models load while VRAM allows (like a
single Ollama node would on first use); real traffic outweighs it by orders of magnitude."""

RESERVE_HEADROOM_MIB = 256
"""Kept free on every real GPU for the CUDA/ROCm context and fragmentation (llama.cpp's buffer
sizes do not include the driver context of the worker process)."""

SOLVE_MAX_MOVES = 1000
"""Work cap on the solver's improving passes (actions after its first pass), instead of a wall-clock
budget, so that every coordinator computes the same placement from the same facts however loaded it is.
In bench/placement.py's scenarios (lab, 64 and 1,000 GPUs, overloaded) those passes take no action at
all; 1,000 actions is about 0.5 s on the 1,000-GPU scenario."""

Assignments = dict[str, list[dict[str, Any]]]
"""model -> [{"node": id, "gpus": [device ids on that node], "split": [...] | None}]"""


@dataclass(frozen=True)
class NodeFacts:
    """What one node tells the cluster about itself (gossiped as a dict; see `to_dict`)."""

    node_id: str
    address: str
    devices: list[dict] = field(default_factory=list)
    """[{id, vendor, name, vram_total_mib, vram_used_mib, simulated, usable}] for this node's GPUs."""
    catalog: list[dict] = field(default_factory=list)
    """ModelConfig dicts from this node's config (the cluster catalog is the union)."""
    needs_mib: dict[str, float] = field(default_factory=dict)
    """VRAM one replica of each model needs, for models whose file this node holds (estimate or measured)."""
    kv_needs_mib: dict[str, dict[str, float]] = field(default_factory=dict)
    """For models with kv_cache_type "auto": VRAM one replica needs with each KV cache type, best first."""
    replicas: list[dict] = field(default_factory=list)
    """[{model, gpus, state, vram_mib, outstanding, queued}] of this node's workers."""
    rates: dict[str, float] = field(default_factory=dict)
    """Requests/s per model that clients sent to this node (any replica)."""
    claims_mib: dict[str, float] = field(default_factory=dict)
    """VRAM claimed by this node's workers per device id, loading ones included."""
    backend: str = ""
    """The llama.cpp backend compiled into this node (CPU only, CUDA, ROCm, Vulkan...)."""
    files: dict[str, dict] = field(default_factory=dict)
    """sha256 -> {size, name} of the complete, verified model files this node holds (peers fetch from it)."""
    transfers: list[dict] = field(default_factory=list)
    """Model-file transfers into this node (files/fetch.py `Transfer.view`)."""
    bad_peers: dict[str, str] = field(default_factory=dict)
    """Peers this node stopped fetching from because they served corrupt data, with why."""
    leaving: bool = False
    """The node is shutting down gracefully: place nothing on it and move its models elsewhere; it
    keeps serving what it runs until they are ready on other nodes (see `aivailable.leave`)."""
    usage: dict[str, dict] = field(default_factory=dict)
    """model -> {at, keep_alive, active}: when this node's clients last used each model (`keepalive.Usage`)."""
    drained: bool = False
    """The operator drained the whole node (`aivailable drain`): place nothing on its GPUs; it keeps serving
    its replicas until they are ready elsewhere (`aivailable.maintenance`)."""
    drained_gpus: list[str] = field(default_factory=list)
    """Local device ids drained one by one: placement gives them nothing."""
    keys: str | None = None
    """Digest of the node's API key set (aivailable/keysync.py pulls a peer's set when it differs); None
    from a node that predates cluster-wide keys."""
    key_load: dict[str, int] = field(default_factory=dict)
    """Requests this node admitted in the last 60 s per rate-limited API key name (apikeys/quota.py)."""

    def to_dict(self) -> dict:
        return {"node_id": self.node_id, "address": self.address, "devices": self.devices, "catalog": self.catalog,
                "needs_mib": self.needs_mib, "kv_needs_mib": self.kv_needs_mib, "replicas": self.replicas, "rates": self.rates,
                "claims_mib": self.claims_mib, "backend": self.backend, "files": self.files,
                "transfers": self.transfers, "bad_peers": self.bad_peers, "leaving": self.leaving,
                "usage": self.usage, "keys": self.keys, "key_load": self.key_load,
                **({"drained": self.drained, "drained_gpus": self.drained_gpus}
                   if self.drained or self.drained_gpus else {})}

    @classmethod
    def from_dict(cls, d: dict) -> NodeFacts:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def gpu_id(node: str, device: str) -> str:
    """Cluster-wide GPU id: `node/device`."""
    return f"{node}/{device}"


def merged_catalog(facts: list[NodeFacts]) -> tuple[dict[str, dict], dict[str, str]]:
    """The cluster catalog from every node's definitions and offers, and the conflicts (`files/catalog.py`)."""
    return fcat.merge((f.node_id, f.catalog) for f in facts)


def _reserved(device: dict, claims: float) -> int:
    """VRAM of a real GPU that is not ours to give: what other processes use, plus headroom."""
    if device.get("simulated"):
        return 0
    foreign = max(0.0, float(device.get("vram_used_mib", 0)) - claims)
    return int(foreign + RESERVE_HEADROOM_MIB)


def free_vram(device: dict, claims: float, planned: float) -> float:
    """MiB of one of this node's GPUs left after the replicas `planned` for it and what foreign processes use
    (with headroom on real GPUs); `claims` is what this node's running workers hold now."""
    total = float(device.get("vram_total_mib", 0))
    return total - min(total, _reserved(device, claims)) - planned


def idle_models(facts: list[NodeFacts], catalog: dict[str, dict], now: float, keep_alive_default: float
                ) -> dict[str, str]:
    """Models unused for longer than their keep-alive (`keepalive.idle`), with the reason: not placed."""
    uses = keepalive.merge(f.usage for f in facts)
    busy = {r["model"] for f in facts for r in f.replicas if r.get("outstanding") or r.get("queued")}
    return {name: keepalive.idle_reason(m, uses.get(name), keep_alive_default) for name, m in catalog.items()
            if keepalive.idle(m, uses.get(name), keep_alive_default, now, busy=name in busy)}


def build_problem(facts: list[NodeFacts], previous: Assignments, demand: dict[str, float] | None = None,
                  idle: dict[str, str] | None = None) -> Problem:
    """The placement problem for the live nodes' `facts`, keeping `previous` where it still applies. Models
    in `idle` (past their keep-alive) get no demand and lose their previous replicas: they are unloaded."""
    gpus: list[Gpu] = []
    for f in facts:
        if f.leaving:
            continue  # shutting down: its GPUs take nothing, its replicas are re-placed elsewhere
        drained = maintenance.excluded_devices(f)  # the operator's drain: nothing new there
        for d in f.devices:
            if not d.get("usable", True) or d["id"] in drained:
                continue
            gpus.append(Gpu(id=gpu_id(f.node_id, d["id"]), node=f.node_id,
                            vendor=d["vendor"], name=d.get("name", ""),
                            vram_mib=int(d["vram_total_mib"]),
                            reserved_mib=min(int(d["vram_total_mib"]),
                                             _reserved(d, f.claims_mib.get(d["id"], 0.0)))))
    catalog, _ = merged_catalog(facts)
    leaving = {f.node_id for f in facts if f.leaving}  # their GPUs take nothing; their files still serve peers
    rates: dict[str, float] = {}
    for f in facts:
        for m, r in f.rates.items():
            rates[m] = rates.get(m, 0.0) + r
    models: list[ModelSpec] = []
    want: dict[str, float] = {}
    for name, m in sorted(catalog.items()):
        need = _need(name, facts)
        if need is None:
            continue  # no node holds the file yet: nothing to place
        holders = fcat.holders(name, m, facts)
        aff = m.get("affinity") or {}
        # A file with a known sha256 that a live node holds can be fetched by any node (a transfer costs
        # like a reload off `files_on`); without a sha256 only the nodes that hold it can run it.
        fetchable = bool(m.get("sha256")) and bool(holders)
        candidates = sorted(f.node_id for f in facts) if fetchable else holders
        nodes = [n for n in candidates if n not in leaving and (not aff.get("nodes") or n in aff["nodes"])]
        if not nodes:
            continue
        kv_needs = _kv_needs(name, facts, need) if m.get("kv_cache_type") == "auto" else None
        if kv_needs:
            need = next(iter(kv_needs.values()))  # the best type's: what the model needs when it can choose
        models.append(ModelSpec(
            name=name, vram_mib=max(1, int(round(need))), kv_vram_mib=kv_needs, min_replicas=m.get("min_replicas", 0),
            max_replicas=m.get("max_replicas", 4), pinned=m.get("pinned", False),
            files_on=[n for n in holders if n not in leaving],
            affinity=PAffinity(nodes=nodes, vendors=list(aff.get("vendors") or []) or None,
                               gpu_names=list(aff.get("gpu_names") or []) or None)))
        # Offered (dropped-in) files load on demand only; configured models get the baseline.
        baseline = 0.0 if m.get("offered") else BASELINE_DEMAND
        want[name] = (demand or {}).get(name, rates.get(name, 0.0)) + baseline
        if idle and name in idle:
            want[name] = 0.0
    prev = {m: [Replica(gpus=tuple(gpu_id(r["node"], g) for g in r["gpus"]),
                        split=tuple(r["split"]) if r.get("split") else None,
                        kv_cache_type=r.get("kv_cache_type")) for r in reps]
            for m, reps in previous.items() if not (idle and m in idle)}
    names = {m.name for m in models}
    prev = prune_previous(prev, gpus, names)
    return Problem(gpus=gpus, models=models, demand=want, previous=prev)


def _need(name: str, facts: list[NodeFacts]) -> float | None:
    """Measured VRAM of a running replica if any (most reliable), else the largest estimate."""
    measured = [r["vram_mib"] for f in facts for r in f.replicas
                if r["model"] == name and r.get("state") == "ready" and r.get("vram_mib")]
    if measured:
        return max(measured)
    estimates = [f.needs_mib[name] for f in facts if name in f.needs_mib]
    return max(estimates) if estimates else None


def _kv_needs(name: str, facts: list[NodeFacts], need: float) -> dict[str, int] | None:
    """VRAM per KV cache type for an "auto" model: the largest estimate of each type, shifted so that the
    type of a measured ready replica matches its measurement (the KV sizes are exact; the rest is not)."""
    by_type: dict[str, float] = {}
    for f in facts:
        for kv, mib in (f.kv_needs_mib.get(name) or {}).items():
            by_type[kv] = max(by_type.get(kv, 0.0), float(mib))
    if len(by_type) < 2:
        return None
    measured = [(r["vram_mib"], r.get("kv_cache_type", "f16")) for f in facts for r in f.replicas
                if r["model"] == name and r.get("state") == "ready" and r.get("vram_mib")]
    ref = max(measured, default=None)
    shift = need - by_type[ref[1]] if ref is not None and ref[1] in by_type else 0.0
    return {kv: max(1, int(round(mib + shift))) for kv, mib in by_type.items()}


def kv_cache_type_of(assignments: Assignments, node_id: str, model: str, device_ids: tuple[str, ...],
                     entry: dict | None) -> str:
    """The KV cache type this node's replica of `model` on `device_ids` loads with: placement's choice,
    else the model's own type (f16 for "auto" when the coordinator chose none)."""
    for r in assignments.get(model, ()):
        if r["node"] == node_id and tuple(r["gpus"]) == tuple(device_ids) and r.get("kv_cache_type"):
            return r["kv_cache_type"]
    own = (entry or {}).get("kv_cache_type") or "f16"
    return "f16" if own == "auto" else own


def to_assignments(result: PlacementResult) -> Assignments:
    """Solver result -> wire form, GPU ids split back into (node, local device id)."""
    out: Assignments = {}
    for model, reps in sorted(result.placement.items()):
        rows = []
        for r in reps:
            node = r.gpus[0].split("/", 1)[0]
            row = {"node": node, "gpus": [g.split("/", 1)[1] for g in r.gpus],
                   "split": list(r.split) if r.split else None}
            if r.kv_cache_type:
                row["kv_cache_type"] = r.kv_cache_type
            rows.append(row)
        out[model] = rows
    return out


def decide(facts: list[NodeFacts], previous: Assignments, *, now: float | None = None,
           keep_alive_default: float = keepalive.FOREVER) -> tuple[Assignments, dict[str, str]]:
    """One coordinator round: (new assignments, unplaced model -> reason). With `now` (unix s), models idle
    past their keep-alive are unloaded (`idle_models`)."""
    catalog, conflicts = merged_catalog(facts)
    idle = idle_models(facts, catalog, now, keep_alive_default) if now is not None else {}
    problem = build_problem(facts, previous, idle=idle)
    result = place_kv(problem, max_moves=SOLVE_MAX_MOVES)
    reasons = dict(result.unplaced_reasons)
    for name, why in idle.items():
        if name not in result.placement:  # pinned/min_replicas never count as idle
            reasons[name] = why
    for name, m in catalog.items():
        if not fcat.holders(name, m, facts) and name not in reasons:
            reasons[name] = "no live node holds its model file"
        elif m.get("offered") and name not in result.placement and name not in reasons:
            reasons[name] = "offered by a node's models directory; loads on the first request"
    for name, why in conflicts.items():
        reasons.setdefault(name, why)
    return to_assignments(result), reasons


def describe_changes(old: Assignments, new: Assignments, cause: str) -> list[str]:
    """Human-readable placement changes for the status page and the log."""
    def keyset(a: Assignments) -> set[tuple[str, str, tuple[str, ...], str]]:
        return {(m, r["node"], tuple(r["gpus"]), f" KV {r['kv_cache_type']}" if r.get("kv_cache_type") else "")
                for m, reps in a.items() for r in reps}

    before, after = keyset(old), keyset(new)
    lines = [f"{m}: + {node}:{'+'.join(g)}{kv} ({cause})" for m, node, g, kv in sorted(after - before)]
    lines += [f"{m}: - {node}:{'+'.join(g)}{kv} ({cause})" for m, node, g, kv in sorted(before - after)]
    return lines


def share(assignments: Assignments, node_id: str) -> list[tuple[str, tuple[str, ...], tuple[float, ...] | None]]:
    """This node's replicas: (model, local device ids, split)."""
    return [(m, tuple(r["gpus"]), tuple(r["split"]) if r.get("split") else None)
            for m, reps in sorted(assignments.items()) for r in reps if r["node"] == node_id]
