"""GBNF grammars for constrained decoding: JSON, JSON Schema (structured outputs) and tool calls.

Schemas become grammar rules through llama.cpp's JSON-schema converter as llama-cpp-python ships it
(`llama_cpp.llama_grammar.SchemaConverter`); the node has already refused, with a 400 naming the
keyword, any schema the converter cannot enforce (aivailable/jsonschema_check.py). Every grammar's
start rule is `root`.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from aivailable.errors import InvalidRequest

JSON_GRAMMAR = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
'''


def _converter():
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=False)


class Rules:
    """Grammar rules built from several schemas (one converter, so shared rules are named once)."""

    def __init__(self) -> None:
        self._conv = _converter()

    def schema(self, schema: dict[str, Any] | bool, name: str, param: str) -> str:
        """Add rules for `schema` under `name`; return the rule name that matches it."""
        try:
            # The converter rewrites `$ref`s in place: give it a copy.
            own = copy.deepcopy(schema) if isinstance(schema, dict) else {}
            resolved = self._conv.resolve_refs(own, name or "root")
            return self._conv.visit(resolved, name)
        except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise InvalidRequest(f"{param}: this JSON Schema cannot be turned into a grammar: {exc}",
                                 param=param) from None

    def add(self, name: str, rule: str) -> str:
        return self._conv._add_rule(name, rule)

    def text(self) -> str:
        return self._conv.format_grammar()


def schema_grammar(schema: dict[str, Any], param: str = "response_format.json_schema.schema") -> str:
    """A grammar whose sentences are the JSON documents valid under `schema`."""
    rules = Rules()
    top = rules.schema(schema, "", param)
    if top != "root":
        rules.add("root", top)
    return rules.text()
