"""Placement data types: the scenario (pydantic, validated) and the result (frozen dataclasses).

The scenario is CONTRACTS.md "Placement scenario"; the result serialises to "Placement output".
Bad input raises `ScenarioError` (a `ConfigError`, CLI exit code 2) whose message names the field,
e.g. ``scenario.gpus[2].vram_mib: must be >= 0 (got -5)``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aivailable.errors import ConfigError

KV_TYPES = ("f16", "q8_0", "q4_0")  # engine.kvcache.PREFERENCE (placement imports nothing with I/O)
SPLIT_SUM_TOLERANCE = 1e-6  # |sum(split) - 1| allowed in a given split (floating point from JSON)


class ScenarioError(ConfigError):
    """A placement scenario that cannot be solved as given; the message names the field."""


@dataclass(frozen=True)
class Replica:
    """One replica: the GPUs (all of one node) that hold it, and how its VRAM is split across them.

    `split` is None for a single GPU; for several GPUs it is one fraction per GPU, summing to 1
    (None there means: proportional to the GPUs' usable VRAM).
    """

    gpus: tuple[str, ...]
    split: tuple[float, ...] | None = None
    kv_cache_type: str | None = None
    """The KV cache type placement chose for this replica (models with `kv_vram_mib`); None: the model's own."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        """JSON shape of CONTRACTS "Placement output": split only for multi-GPU replicas, kv_cache_type
        only where placement chose one."""
        out: dict[str, Any] = {"gpus": list(self.gpus)}
        if self.split is not None and len(self.gpus) > 1:
            out["split"] = list(self.split)
        if self.kv_cache_type is not None:
            out["kv_cache_type"] = self.kv_cache_type
        return out


class Affinity(BaseModel):
    """GPUs a model may use; every given list must match (None: any)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    nodes: list[str] | None = None
    vendors: list[str] | None = None
    gpu_names: list[str] | None = None


class Gpu(BaseModel):
    """One GPU as the cluster reports it. Usable VRAM is `vram_mib - reserved_mib`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1)
    node: str = Field(min_length=1)
    vendor: str = Field(min_length=1)
    name: str = ""
    vram_mib: int = Field(ge=0)
    reserved_mib: int = Field(default=0, ge=0)

    @property
    def usable_mib(self) -> int:
        """VRAM the solver may fill."""
        return self.vram_mib - self.reserved_mib


class ModelSpec(BaseModel):
    """One catalog model; `vram_mib` is what one replica needs (weights + KV cache + compute)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    vram_mib: int = Field(gt=0)
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=4, ge=0)
    pinned: bool = False
    affinity: Affinity | None = None
    files_on: list[str] | None = None
    kv_vram_mib: dict[str, int] | None = None
    """What one replica needs with each KV cache type placement may choose ("f16", "q8_0", "q4_0"; a model
    with kv_cache_type = "auto"). None: only `vram_mib`, with the model's own type."""

    def need_mib(self, kv_cache_type: str | None = None) -> float:
        """MiB one replica needs with this KV cache type (None, or a type without a figure: `vram_mib`)."""
        if kv_cache_type is not None and self.kv_vram_mib and kv_cache_type in self.kv_vram_mib:
            return float(self.kv_vram_mib[kv_cache_type])
        return float(self.vram_mib)

    @property
    def want_min(self) -> int:
        """Replicas the model must have: min_replicas, and at least 1 when pinned (never above max)."""
        return min(self.max_replicas, max(self.min_replicas, 1 if self.pinned else 0))


class Problem(BaseModel):
    """A placement scenario: GPUs, catalog, demand (requests/s) and the previous placement.

    Build it from Python (``Problem(gpus=[Gpu(...)], models=[...], demand={...})``) or from JSON
    with `load_problem`. Cross-field errors raise `ScenarioError` naming the field; field errors raise
    pydantic's ValidationError (`load_problem` turns both into one-line `ScenarioError`s). The coordinator
    drops replicas on vanished GPUs from `previous` first, with `prune_previous`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    gpus: list[Gpu]
    models: list[ModelSpec]
    demand: dict[str, float] = Field(default_factory=dict)
    previous: dict[str, list[Replica]] = Field(default_factory=dict)
    split_overhead_mib: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _cross_check(self) -> Problem:
        gpu_by_id: dict[str, Gpu] = {}
        for i, g in enumerate(self.gpus):
            if g.id in gpu_by_id:
                raise ScenarioError(f"scenario.gpus[{i}].id: duplicate GPU id {g.id!r}")
            if g.reserved_mib > g.vram_mib:
                raise ScenarioError(
                    f"scenario.gpus[{i}].reserved_mib: must be <= vram_mib "
                    f"(got {g.reserved_mib} > {g.vram_mib})"
                )
            gpu_by_id[g.id] = g
        names: set[str] = set()
        for i, m in enumerate(self.models):
            if m.name in names:
                raise ScenarioError(f"scenario.models[{i}].name: duplicate model {m.name!r}")
            names.add(m.name)
            if m.min_replicas > m.max_replicas:
                raise ScenarioError(
                    f"scenario.models[{i}].min_replicas: must be <= max_replicas "
                    f"(got {m.min_replicas} > {m.max_replicas})"
                )
            if m.pinned and m.max_replicas == 0:
                raise ScenarioError(f"scenario.models[{i}].pinned: a pinned model needs max_replicas >= 1")
            for kv, mib in (m.kv_vram_mib or {}).items():
                if kv not in KV_TYPES:
                    raise ScenarioError(f"scenario.models[{i}].kv_vram_mib: unknown KV cache type {kv!r} "
                                        f"(use {', '.join(KV_TYPES)})")
                if mib <= 0:
                    raise ScenarioError(f"scenario.models[{i}].kv_vram_mib.{kv}: must be > 0 (got {mib})")
        for name, rate in self.demand.items():
            where = f"scenario.demand{_key(name)}"
            if name not in names:
                raise ScenarioError(f"{where}: unknown model {name!r}")
            if not math.isfinite(rate) or rate < 0:
                raise ScenarioError(f"{where}: must be a finite number >= 0 (got {rate})")
        for name, replicas in self.previous.items():
            if name not in names:
                raise ScenarioError(f"scenario.previous{_key(name)}: unknown model {name!r}")
            for j, rep in enumerate(replicas):
                _check_replica(rep, gpu_by_id, f"scenario.previous{_key(name)}[{j}]")
                if rep.kv_cache_type is not None and rep.kv_cache_type not in KV_TYPES:
                    raise ScenarioError(f"scenario.previous{_key(name)}[{j}].kv_cache_type: unknown KV cache "
                                        f"type {rep.kv_cache_type!r} (use {', '.join(KV_TYPES)})")
        return self

    def gpu(self, gpu_id: str) -> Gpu:
        """The GPU with this id (KeyError if absent)."""
        for g in self.gpus:
            if g.id == gpu_id:
                return g
        raise KeyError(gpu_id)

    def model(self, name: str) -> ModelSpec:
        """The catalog model with this name (KeyError if absent)."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def _key(name: str) -> str:
    return f".{name}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f"[{json.dumps(name)}]"


def _check_replica(rep: Replica, gpu_by_id: Mapping[str, Gpu], where: str) -> None:
    if not rep.gpus:
        raise ScenarioError(f"{where}.gpus: must not be empty")
    for k, gid in enumerate(rep.gpus):
        if gid not in gpu_by_id:
            raise ScenarioError(f"{where}.gpus[{k}]: unknown GPU {gid!r}")
        if gid in rep.gpus[:k]:
            raise ScenarioError(f"{where}.gpus[{k}]: GPU {gid!r} listed twice")
    nodes = sorted({gpu_by_id[g].node for g in rep.gpus})
    if len(nodes) > 1:
        raise ScenarioError(f"{where}.gpus: a replica stays within one node (got nodes {', '.join(nodes)})")
    vendors = sorted({gpu_by_id[g].vendor.lower() for g in rep.gpus})
    if len(vendors) > 1:
        raise ScenarioError(f"{where}.gpus: a replica never mixes vendors (got {', '.join(vendors)})")
    if rep.split is not None:
        if len(rep.split) != len(rep.gpus):
            raise ScenarioError(
                f"{where}.split: needs one fraction per GPU (got {len(rep.split)} for {len(rep.gpus)} GPUs)"
            )
        if any(not math.isfinite(f) or f <= 0 for f in rep.split):
            raise ScenarioError(f"{where}.split: fractions must be > 0 (got {list(rep.split)})")
        if abs(sum(rep.split) - 1.0) > SPLIT_SUM_TOLERANCE:
            raise ScenarioError(f"{where}.split: fractions must sum to 1 (got {sum(rep.split):.6g})")


def default_split(gpus: Iterable[Gpu]) -> tuple[float, ...]:
    """Split proportional to the GPUs' usable VRAM (CONTRACTS default for a multi-GPU replica)."""
    usable = [max(g.usable_mib, 0) for g in gpus]
    total = sum(usable)
    if total <= 0:
        return tuple(1.0 / len(usable) for _ in usable)
    return tuple(u / total for u in usable)


def replica_needs(problem: Problem, model: ModelSpec, rep: Replica) -> dict[str, float]:
    """MiB a replica takes on each of its GPUs: its share of its need (`ModelSpec.need_mib` of its KV cache
    type), plus split overhead if split."""
    need = model.need_mib(rep.kv_cache_type)
    if len(rep.gpus) == 1:
        return {rep.gpus[0]: need}
    split = rep.split or default_split(problem.gpu(g) for g in rep.gpus)
    return {g: f * need + problem.split_overhead_mib for g, f in zip(rep.gpus, split, strict=True)}


def prune_previous(
    previous: Mapping[str, Iterable[Replica]], problem_gpus: Iterable[Gpu], model_names: Iterable[str]
) -> dict[str, list[Replica]]:
    """Drop replicas on GPUs that are gone and models no longer in the catalog (for the coordinator)."""
    ids = {g.id for g in problem_gpus}
    names = set(model_names)
    out: dict[str, list[Replica]] = {}
    for name, reps in previous.items():
        kept = [r for r in reps if r.gpus and all(g in ids for g in r.gpus)]
        if name in names and kept:
            out[name] = kept
    return out


@dataclass(frozen=True)
class PlacementResult:
    """What the solver decided. `unplaced` lists wanted models (demand > 0, pinned or min_replicas > 0)
    that got no replica, each with a reason in `unplaced_reasons`; `below_min` explains models that got
    some replicas but fewer than `min_replicas`. `solve_ms` is excluded from equality."""

    placement: dict[str, tuple[Replica, ...]]
    unplaced: tuple[str, ...] = ()
    unplaced_reasons: dict[str, str] = field(default_factory=dict)
    below_min: dict[str, str] = field(default_factory=dict)
    solve_ms: float = field(default=0.0, compare=False)

    def replicas(self, name: str) -> tuple[Replica, ...]:
        """Replicas of a model (empty when it has none)."""
        return self.placement.get(name, ())

    def to_dict(self) -> dict[str, Any]:
        """CONTRACTS "Placement output", plus `unplaced_reasons` (and `below_min` when non-empty)."""
        out: dict[str, Any] = {
            "placement": {name: [r.to_dict() for r in reps] for name, reps in sorted(self.placement.items())},
            "unplaced": list(self.unplaced),
            "unplaced_reasons": dict(sorted(self.unplaced_reasons.items())),
            "solve_ms": round(self.solve_ms, 3),
        }
        if self.below_min:
            out["below_min"] = dict(sorted(self.below_min.items()))
        return out

    def to_json(self, indent: int | None = None) -> str:
        """The output as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)


_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "missing": "required field is missing",
    "extra_forbidden": "unknown field",
    "unexpected_keyword_argument": "unknown field",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "dataclass_type": "must be an object",
    "model_attributes_type": "must be an object",
}


def format_validation_error(err: ValidationError) -> str:
    """The first pydantic error as one line: ``scenario.gpus[2].vram_mib: must be >= 0 (got -5)``."""
    e = err.errors()[0]
    path = "scenario"
    for part in e["loc"]:
        path += f"[{part}]" if isinstance(part, int) else _key(str(part))
    template = _MESSAGES.get(e["type"])
    msg = template.format(**e.get("ctx", {})) if template else e["msg"]
    got = e.get("input")
    if e["type"] not in ("missing", "extra_forbidden", "unexpected_keyword_argument") and isinstance(
        got, str | int | float | bool | type(None)
    ):
        msg += f" (got {json.dumps(got)})"
    return f"{path}: {msg}"


def load_problem(data: Any) -> Problem:
    """Validate a decoded scenario (dict); raise `ScenarioError` naming the first bad field."""
    if not isinstance(data, dict):
        raise ScenarioError("scenario: must be a JSON object")
    try:
        return Problem.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(format_validation_error(err)) from err
