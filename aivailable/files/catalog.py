"""The cluster's model catalog, merged from every node's gossiped definitions (pure functions).

Each node gossips the models of its config file (with the sha256 and size of the file when it holds
it) and offers the `*.gguf` files dropped into its models directory (`offered: true`, name = file
name without `.gguf`, ctx/embedding from the GGUF). Merge rule, in order:

1. A configured definition beats an offered one of the same name.
2. Among definitions of the same kind, the lowest node id's wins.
3. Two definitions of one name that differ (in anything but the node-local `path`/`source`, or in
   sha256 where both know it) are a **conflict**: the winner is used, and the conflict is reported on
   the status page (the model's reason) and in the coordinator's log — never silently merged.

A winning definition without a sha256 takes it from an agreeing definition that knows it.

A definition whose name is not a model name (aivailable/names.py) or whose sha256 is not 64 lowercase hex
digits is dropped before merging (`invalid` says why): a sha256 becomes a file name on every node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from aivailable.names import MODEL_NAME_RULE, is_model_name, is_sha256

log = logging.getLogger("aivailable.files")
_warned: set[tuple[str, str]] = set()

LOCAL_KEYS = frozenset({"path", "source", "sha256", "size", "mmproj", "mmproj_source", "mmproj_sha256", "mmproj_size"})
"""Keys that may differ between nodes without a conflict (sha256 is compared separately)."""


def _definition(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in LOCAL_KEYS}


def _agree(a: dict, b: dict) -> bool:
    if _definition(a) != _definition(b):
        return False
    return not any(a.get(k) and b.get(k) and a[k] != b[k] for k in ("sha256", "mmproj_sha256"))


def invalid(m: Any) -> str | None:
    """Why a gossiped catalog definition cannot be used (None: it can)."""
    if not isinstance(m, dict):
        return f"a {type(m).__name__} is not a model definition"
    if not is_model_name(m.get("name")):
        return f"name {str(m.get('name'))[:140]!r} is not a model name ({MODEL_NAME_RULE})"
    for key in ("sha256", "mmproj_sha256"):
        if m.get(key) is not None and not is_sha256(m[key]):
            return f"model {m['name']}: {key} {str(m[key])[:80]!r} is not 64 lowercase hex digits"
    return None


def merge(node_catalogs: Iterable[tuple[str, list[dict[str, Any]]]]) -> tuple[dict[str, dict], dict[str, str]]:
    """(name -> winning definition, name -> conflict text) from (node id, definitions) pairs; invalid
    definitions are dropped (and logged once per node and problem)."""
    ranked: dict[str, list[tuple[bool, str, dict]]] = {}
    for node_id, defs in node_catalogs:
        for m in defs:
            why = invalid(m)
            if why is not None:
                if (node_id, why) not in _warned:
                    if len(_warned) > 1000:
                        _warned.clear()
                    _warned.add((node_id, why))
                    log.warning("ignoring a catalog entry gossiped by %s: %s", node_id, why)
                continue
            ranked.setdefault(m["name"], []).append((bool(m.get("offered")), node_id, m))
    catalog: dict[str, dict] = {}
    conflicts: dict[str, str] = {}
    for name, entries in sorted(ranked.items()):
        entries.sort(key=lambda e: (e[0], e[1]))
        offered, owner, win = entries[0]
        win = dict(win)
        differ = sorted({n for _, n, m in entries[1:] if not _agree(win, m)})
        if differ:
            kind = "offered file" if offered else "definition"
            conflicts[name] = (f"defined differently on {owner} and {', '.join(differ)}; "
                               f"using {owner}'s {kind}")
        for sha, size in (("sha256", "size"), ("mmproj_sha256", "mmproj_size")):
            if not win.get(sha):
                for _, _, m in entries[1:]:
                    if m.get(sha) and _agree(win, m):
                        win[sha], win[size] = m[sha], m.get(size)
                        break
        catalog[name] = win
    return catalog, conflicts


def holders(name: str, entry: dict, facts: Iterable[Any]) -> list[str]:
    """Node ids that hold the file of catalog model `name`: by sha256 when the catalog knows it, else the
    nodes that could read the model from a configured path (they estimated its VRAM)."""
    sha = entry.get("sha256")
    return sorted(f.node_id for f in facts if (sha in f.files if sha else name in f.needs_mib))
