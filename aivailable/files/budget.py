"""Disk budget of fetched model files: which files to remove (least recently used first) to make room.

`plan_evictions` is a pure function; `files/store.py` applies it. A file a worker uses, a file a
pinned model needs, and a file being written are never candidates.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoredFile:
    """One complete file in the fetched-files folder."""

    sha256: str
    size: int
    last_used: float
    """Wall-clock time a worker last used it (or when it arrived)."""
    in_use: bool = False
    pinned: bool = False


@dataclass(frozen=True)
class Evictions:
    remove: list[str]
    """sha256 of the files to remove, oldest use first."""
    fits: bool
    """False: even removing every candidate leaves too little room; nothing should be removed then."""
    short_by: int = 0


def plan_evictions(files: list[StoredFile], budget: int, need: int) -> Evictions:
    """Files to remove so that `need` more bytes fit in `budget` bytes (budget 0 = unlimited)."""
    if budget <= 0:
        return Evictions([], True)
    used = sum(f.size for f in files)
    excess = used + need - budget
    if excess <= 0:
        return Evictions([], True)
    candidates = sorted((f for f in files if not f.in_use and not f.pinned), key=lambda f: (f.last_used, f.sha256))
    remove, freed = [], 0
    for f in candidates:
        if freed >= excess:
            break
        remove.append(f.sha256)
        freed += f.size
    if freed < excess:
        return Evictions([], False, excess - freed)
    return Evictions(remove, True)
