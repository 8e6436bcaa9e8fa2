"""Placement: which GPUs hold which replicas of which models. Pure functions and data types, no I/O."""

from aivailable.placement.model import (
    Affinity,
    Gpu,
    ModelSpec,
    PlacementResult,
    Problem,
    Replica,
    ScenarioError,
    load_problem,
    prune_previous,
)
from aivailable.placement.objective import ObjectiveTerms, objective, objective_terms, validate_result
from aivailable.placement.solver import place

__all__ = [
    "Affinity",
    "Gpu",
    "ModelSpec",
    "ObjectiveTerms",
    "PlacementResult",
    "Problem",
    "Replica",
    "ScenarioError",
    "load_problem",
    "objective",
    "objective_terms",
    "place",
    "prune_previous",
    "validate_result",
]
