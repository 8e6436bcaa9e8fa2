"""The import graph of aivailable/, read from the source with `ast` (nothing is imported).

Three rules keep the packages layered:
- (a) no module imports a private name (one with a leading underscore, dunders aside) from a module of
  another package, nor reaches one through an imported module (`envelope._HEAD`). The packages are
  aivailable/X/ for each subpackage X; the top-level modules form the package `aivailable`.
- (b) engine/, gossip/, placement/, files/ and wire/ never import api/ (the HTTP front end), and wire/
  (the OpenAI wire shapes every side shares) imports none of api/, engine/, gossip/, files/,
  placement/, node.py or cluster.py.
- (c) no import cycle at module level runs through node.py, cluster.py, leave.py or the api package
  (api/ counts as one module).

Imports inside functions count for (a) and (b), not for (c): they run after every module has loaded.
Imports under `if TYPE_CHECKING:` count for (a) and (b), never for (c): they do not run at all.
`test_checker_bites` feeds the checks synthetic modules that break each rule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "aivailable"
TOP = "aivailable"

NEVER_IMPORT = {
    f"{TOP}.engine": (f"{TOP}.api",),
    f"{TOP}.gossip": (f"{TOP}.api",),
    f"{TOP}.placement": (f"{TOP}.api",),
    f"{TOP}.files": (f"{TOP}.api",),
    f"{TOP}.wire": tuple(f"{TOP}.{m}" for m in ("api", "engine", "gossip", "files", "placement", "node",
                                                 "cluster")),
}
"""Package -> the modules (each with everything under it) that no module of the package may import."""

ACYCLIC = (f"{TOP}.node", f"{TOP}.cluster", f"{TOP}.leave", f"{TOP}.api")
"""Modules that no module-level import cycle may run through (api: the whole package as one)."""

COLLAPSED = (f"{TOP}.api",)
"""Packages counted as one module when looking for cycles."""


@dataclass(frozen=True)
class Edge:
    source: str
    """The importing module."""
    target: str
    """The imported module: `pkg.mod` for `from pkg import mod` when mod is a module, else `pkg`."""
    name: str | None
    """The name taken from `target` (`from target import name`); None when the module itself is imported."""
    lineno: int
    in_function: bool
    type_checking: bool
    alias: str | None = None
    """The local name bound to the imported module (`import a.b as alias`, `from a import b`), if any."""

    @property
    def private(self) -> bool:
        parts = self.target.split(".")[1:] + ([self.name] if self.name else [])
        return any(_private(p) for p in parts)

    def __str__(self) -> str:
        what = f"from {self.target} import {self.name}" if self.name else f"import {self.target}"
        return f"{self.source}:{self.lineno}: {what}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def read_sources(root: Path = ROOT) -> tuple[dict[str, str], set[str]]:
    """Every module under `root` as {dotted name: source}, and the dotted names of the packages."""
    sources, packages = {}, set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
            packages.add(".".join(parts))
        sources[".".join(parts)] = path.read_text()
    return sources, packages


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST, in_function: bool = False,
                  type_checking: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, in_function, type_checking
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for stmt in node.body:
            yield from _import_nodes(stmt, in_function, True)
        for stmt in node.orelse:
            yield from _import_nodes(stmt, in_function, type_checking)
        return
    inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in ast.iter_child_nodes(node):
        yield from _import_nodes(child, inner, type_checking)


def _ours(module: str) -> bool:
    return module == TOP or module.startswith(TOP + ".")


def edges_of(module: str, source: str, modules: set[str], packages: set[str]) -> list[Edge]:
    """The imports of one module's source that name a module of aivailable."""
    edges = []
    for node, in_function, type_checking in _import_nodes(ast.parse(source, filename=module)):
        found: list[tuple[str, str | None, str | None]] = []
        if isinstance(node, ast.Import):
            found = [(alias.name, None, alias.asname) for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                here = module.split(".") if module in packages else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None, alias.asname or alias.name) if sub in modules else (base, alias.name, None))
        edges += [Edge(module, target, name, node.lineno, in_function, type_checking, bound)
                  for target, name, bound in found if _ours(target)]
    return edges


def graph(sources: Mapping[str, str], packages: set[str]) -> list[Edge]:
    modules = set(sources)
    return [e for module, source in sources.items() for e in edges_of(module, source, modules, packages)]


def package_of(module: str, packages: set[str]) -> str:
    """The subpackage aivailable.X a module belongs to, or `aivailable` for the top-level modules."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 and ".".join(parts[:2]) in packages else TOP


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def private_imports(edges: Iterable[Edge], packages: set[str]) -> list[str]:
    """Rule (a): imports of a private name or module from another package."""
    return sorted(str(e) for e in edges
                  if e.private and package_of(e.source, packages) != package_of(e.target, packages))


def _dotted(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        head = _dotted(expr.value)
        return None if head is None else f"{head}.{expr.attr}"
    return None


def private_uses(sources: Mapping[str, str], edges: Iterable[Edge], packages: set[str]) -> list[str]:
    """Rule (a), the other way in: `mod._name` where `mod` is a module of another package that this
    module imported (under an alias, `from pkg import mod`, or by its full dotted name)."""
    aliases: dict[str, dict[str, str]] = {}
    for e in edges:
        if e.name is None:
            aliases.setdefault(e.source, {})[e.alias or e.target] = e.target
    found = []
    for module, source in sources.items():
        bound = aliases.get(module, {})
        for node in ast.walk(ast.parse(source, filename=module)):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            target = bound.get(_dotted(node.value) or "")
            if target and package_of(module, packages) != package_of(target, packages):
                found.append(f"{module}:{node.lineno}: {target}.{node.attr}")
    return sorted(found)


def forbidden_imports(edges: Iterable[Edge], rules: Mapping[str, tuple[str, ...]] = NEVER_IMPORT) -> list[str]:
    """Rule (b): imports that `rules` ({package: modules it must not import}) forbid."""
    return sorted(f"{e} ({pkg} must not import {banned})"
                  for e in edges for pkg, banned_list in rules.items() if _under(e.source, pkg)
                  for banned in banned_list if _under(e.target, banned))


def _node(module: str, collapsed: Iterable[str]) -> str:
    return next((c for c in collapsed if _under(module, c)), module)


def module_level_graph(edges: Iterable[Edge], collapsed: Iterable[str] = COLLAPSED) -> dict[str, set[str]]:
    """Who imports whom while modules load: module-level imports outside `if TYPE_CHECKING:`.

    Importing `a.b.c` first runs the packages `a.b` and `a` (their `__init__`), except those the importer
    is itself inside (they are already loading); each package in `collapsed` is one node."""
    collapsed = tuple(collapsed)
    out: dict[str, set[str]] = {}
    for e in edges:
        if e.in_function or e.type_checking:
            continue
        src = _node(e.source, collapsed)
        parts = e.target.split(".")
        for i in range(1, len(parts) + 1):
            target = ".".join(parts[:i])
            if i < len(parts) and _under(e.source, target):
                continue
            dst = _node(target, collapsed)
            if dst != src:
                out.setdefault(src, set()).add(dst)
    return out


def _cycle_through(start: str, out: Mapping[str, set[str]]) -> list[str] | None:
    """A shortest import cycle from `start` back to it, or None."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for dst in sorted(out.get(node, ())):
                if dst == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if dst not in parent:
                    parent[dst] = node
                    nxt.append(dst)
        frontier = nxt
    return None


def cycles(edges: Iterable[Edge], watched: Iterable[str] = ACYCLIC, collapsed: Iterable[str] = COLLAPSED) -> list[str]:
    """Rule (c): for each watched module, a module-level import cycle through it (as `a -> b -> a`)."""
    out = module_level_graph(edges, collapsed)
    found = (_cycle_through(w, out) for w in watched)
    return sorted({" -> ".join(c) for c in found if c})


SOURCES, PACKAGES = read_sources()
EDGES = graph(SOURCES, PACKAGES)


def test_sources_found():
    assert {f"{TOP}.node", f"{TOP}.cluster", f"{TOP}.leave", f"{TOP}.wire.schemas", f"{TOP}.api.app"} <= set(SOURCES)
    assert {f"{TOP}.api", f"{TOP}.engine", f"{TOP}.gossip", f"{TOP}.wire"} <= PACKAGES
    assert any(e.source == f"{TOP}.engine.worker" and _under(e.target, f"{TOP}.wire") for e in EDGES)


def test_no_private_imports_across_packages():
    found = private_imports(EDGES, PACKAGES) + private_uses(SOURCES, EDGES, PACKAGES)
    assert not found, "private names of another package:\n" + "\n".join(found)


def test_layers():
    found = forbidden_imports(EDGES)
    assert not found, "imports across the layers:\n" + "\n".join(found)


def test_no_module_level_cycles():
    found = cycles(EDGES)
    assert not found, "module-level import cycles:\n" + "\n".join(found)


def test_checker_bites():
    """The checks report a private import or use, a forbidden import and a cycle in a synthetic tree, each
    also when it hides in a function or a relative import; imports under TYPE_CHECKING make no cycle."""
    sources = {
        TOP: "",
        f"{TOP}.node": f"from {TOP}.api.app import build\n",
        f"{TOP}.leave": "def later():\n    from aivailable import node\n",
        f"{TOP}.api": "",
        f"{TOP}.api.app": f"import {TOP}.cluster\nfrom .hop import _mac\n",
        f"{TOP}.api.hop": "def _mac(): ...\n",
        f"{TOP}.cluster": (f"from {TOP}.node import Node\n"
                           "from typing import TYPE_CHECKING\n"
                           f"if TYPE_CHECKING:\n    from {TOP}.leave import Leave\n"),
        f"{TOP}.gossip": "",
        f"{TOP}.gossip.envelope": "_WINDOW = 1\n",
        f"{TOP}.engine": "",
        f"{TOP}.engine.worker": (f"from {TOP}.wire import responses\n"
                                 f"def f():\n    from {TOP}.gossip.envelope import _WINDOW\n"
                                 f"    from {TOP}.api import hop\n"),
        f"{TOP}.wire": "",
        f"{TOP}.wire.responses": "from ..gossip import envelope\n",
        f"{TOP}.files": "",
        f"{TOP}.files.serve": (f"import {TOP}.gossip.envelope as env\nfrom {TOP}.api import hop\n"
                               f"import {TOP}.gossip.envelope\n"
                               f"x = env._WINDOW + hop._mac() + {TOP}.gossip.envelope._WINDOW + env.WINDOW\n"),
    }
    packages = {TOP, f"{TOP}.api", f"{TOP}.gossip", f"{TOP}.engine", f"{TOP}.wire", f"{TOP}.files"}
    edges = graph(sources, packages)
    assert private_imports(edges, packages) == [
        f"{TOP}.engine.worker:3: from {TOP}.gossip.envelope import _WINDOW"]
    assert private_uses(sources, edges, packages) == [
        f"{TOP}.files.serve:4: {TOP}.api.hop._mac", f"{TOP}.files.serve:4: {TOP}.gossip.envelope._WINDOW",
        f"{TOP}.files.serve:4: {TOP}.gossip.envelope._WINDOW"]
    assert forbidden_imports(edges) == [
        f"{TOP}.engine.worker:4: import {TOP}.api.hop ({TOP}.engine must not import {TOP}.api)",
        f"{TOP}.files.serve:2: import {TOP}.api.hop ({TOP}.files must not import {TOP}.api)",
        f"{TOP}.wire.responses:1: import {TOP}.gossip.envelope ({TOP}.wire must not import {TOP}.gossip)"]
    found = cycles(edges)
    assert f"{TOP}.node -> {TOP}.api -> {TOP}.cluster -> {TOP}.node" in found
    assert not any(f"{TOP}.leave" in c for c in found)
    # Without the cycle's closing edge nothing is reported.
    sources[f"{TOP}.cluster"] = "import json\n"
    assert cycles(graph(sources, packages)) == []
