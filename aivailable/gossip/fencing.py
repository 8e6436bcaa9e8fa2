"""Placement fencing: a node applies a placement only if it is from the newest term it has seen.

Rule (ARCHITECTURE "Fence by term"): accept ``(term, version)`` iff ``term >= highest term seen`` and
``(term, version)`` is newer than the placement applied last, compared as a pair, so a new coordinator
may restart its version counter (it should still continue from the last version it saw). A deposed
coordinator's placements carry an older term and are refused once any newer term has been seen, from
an election message or a placement. Persist :class:`PlacementFence` with the accepted placement.
"""

from __future__ import annotations

from dataclasses import dataclass


def accept_placement(highest_term: int, applied: tuple[int, int], term: int, version: int) -> bool:
    """Pure rule: should a placement ``(term, version)`` replace ``applied`` given ``highest_term``?"""
    return term >= highest_term and (term, version) > applied


@dataclass(slots=True)
class PlacementFence:
    """The fence state one node keeps (and persists): highest term seen, and the applied placement."""

    highest_term: int = 0
    term: int = 0
    version: int = 0

    def observe_term(self, term: int) -> None:
        """Feed every term this node learns (its election core's ``term`` after each step)."""
        if term > self.highest_term:
            self.highest_term = term

    def accept(self, term: int, version: int) -> bool:
        """Apply-or-refuse; on True the caller reconciles toward that placement."""
        if not accept_placement(self.highest_term, (self.term, self.version), term, version):
            return False
        self.highest_term, self.term, self.version = max(self.highest_term, term), term, version
        return True
