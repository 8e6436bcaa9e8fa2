"""Which JSON Schemas a grammar can enforce: a pure check the node runs before routing a request.

Structured outputs (`response_format: json_schema`) and tool arguments are constrained by a grammar
that llama.cpp's JSON-schema converter builds (engine/grammar.py). It enforces the keywords in
`SUPPORTED`; a schema using any other validation keyword gets a 400 naming it, never an answer that
silently ignores part of the schema. Annotations (title, description, examples, ...) are allowed.
"""

from __future__ import annotations

from typing import Any

from aivailable.errors import InvalidRequest

SUPPORTED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "minLength",
    "maxLength", "format",
})
# Not enforced by the converter (so refused): minimum, maximum, exclusiveMinimum, exclusiveMaximum,
# multipleOf, uniqueItems, not, if/then/else, patternProperties, dependent*, contains, propertyNames, ...
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly", "nullable", "strict", "name",
})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
MAX_DEPTH = 32
MAX_NODES = 2000


def check_schema(schema: Any, param: str = "response_format.json_schema.schema") -> None:
    """Raise InvalidRequest naming the first keyword (and where) the grammar cannot enforce."""
    count = [0]
    _check(schema, param, 0, count, schema)


def _check(node: Any, where: str, depth: int, count: list[int], root: Any) -> None:
    count[0] += 1
    if count[0] > MAX_NODES or depth > MAX_DEPTH:
        raise InvalidRequest(f"{where}: schema too large or too deeply nested "
                             f"(at most {MAX_NODES} subschemas, {MAX_DEPTH} levels)", param=where)
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise InvalidRequest(f"{where}: a schema must be a JSON object, got {type(node).__name__}", param=where)
    for key, value in node.items():
        if key in ANNOTATIONS:
            continue
        if key not in SUPPORTED:
            raise InvalidRequest(f"{where}: unsupported JSON Schema keyword '{key}' (structured outputs here "
                                 f"support: {', '.join(sorted(SUPPORTED))})", param=where)
        at = f"{where}.{key}"
        if key == "type":
            types = value if isinstance(value, list) else [value]
            bad = [t for t in types if t not in TYPES]
            if bad or not types:
                raise InvalidRequest(f"{at}: unknown type {bad[0] if bad else value!r}", param=at)
        elif key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise InvalidRequest(f"{at} must be an object of schemas", param=at)
            for name, sub in value.items():
                _check(sub, f"{at}.{name}", depth + 1, count, root)
        elif key in ("items", "additionalProperties"):
            _check(value, at, depth + 1, count, root)
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise InvalidRequest(f"{at} must be a non-empty list of schemas", param=at)
            for i, sub in enumerate(value):
                _check(sub, f"{at}[{i}]", depth + 1, count, root)
        elif key == "$ref":
            _check_ref(value, at, root)
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidRequest(f"{at} must be a list of property names", param=at)
        elif key == "enum":
            if not isinstance(value, list) or not value:
                raise InvalidRequest(f"{at} must be a non-empty list", param=at)
        elif key in ("minItems", "maxItems", "minLength", "maxLength"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequest(f"{at} must be a non-negative integer", param=at)
        elif key == "pattern" and (not isinstance(value, str) or not (value.startswith("^") and value.endswith("$"))):
            raise InvalidRequest(f"{at}: patterns must be anchored (start with ^ and end with $)", param=at)


def _check_ref(ref: Any, at: str, root: Any) -> None:
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise InvalidRequest(f"{at}: only local references ('#/$defs/NAME') are supported, got {str(ref)[:80]!r}",
                             param=at)
    node = root
    for part in ref[2:].split("/"):
        if not isinstance(node, dict) or part not in node:
            raise InvalidRequest(f"{at}: reference {ref!r} does not resolve in the schema", param=at)
        node = node[part]
