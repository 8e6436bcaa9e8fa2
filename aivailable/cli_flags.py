"""`up` flags generated from the settings model, so every NodeConfig field has a flag with help text.

Hand-written flags stay as they are (their names, metavars and help); `add_generated_flags` runs after
them and adds `--field-name` only for fields that no flag covers yet (by dest), and fills in help that a
hand-written flag lacks from the field's docstring. A new NodeConfig field thus gets a flag by itself.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic.fields import FieldInfo

from aivailable.errors import ConfigError

GENERATED = "_generated_flags"
"""Namespace attribute listing the dests this module added (read by `generated_values`)."""


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(annotation without None, whether None was allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return ""
    d = field.default
    if d is None or d == [] or d == {} or d is False:
        return ""
    return f" (default {d})"


def field_help(field: FieldInfo) -> str:
    """The field's description (its docstring) in one line, with its default."""
    text = " ".join((field.description or "").split())
    return (text + _default_text(field)).replace("%", "%%")


def flag_kwargs(name: str, field: FieldInfo) -> dict[str, Any] | None:
    """argparse keyword arguments for NodeConfig field `name` (None: no flag can express it)."""
    ann, _optional = _unwrap(field.annotation)
    origin = typing.get_origin(ann)
    kw: dict[str, Any] = {"dest": name, "default": None, "help": field_help(field)}
    meta = ("SECONDS" if name.endswith("_s") else "MIB" if name.endswith("_mib") else "BYTES"
            if name.endswith("_bytes") else "N" if ann is int else name.upper())
    if ann is bool:
        return {**kw, "action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {**kw, "choices": [str(c) for c in typing.get_args(ann)]}
    if ann in (int, float, str):
        return {**kw, "type": ann, "metavar": meta}
    if origin is list:
        return {**kw, "action": "append", "metavar": name.upper().removesuffix("S")}
    if origin is dict:
        return {**kw, "action": "append", "metavar": "KEY=VALUE"}
    return None


def add_generated_flags(parser: argparse.ArgumentParser, model: type) -> list[str]:
    """Add a flag for each field of pydantic `model` that has none in `parser`; returns their dests."""
    dests = {a.dest: a for a in parser._actions}
    added: dict[str, bool] = {}  # dest -> whether its values are KEY=VALUE pairs of a table
    for name, field in model.model_fields.items():
        if name in dests:
            if not dests[name].help:
                dests[name].help = field_help(field) or None
            continue
        option = "--" + name.replace("_", "-")
        if option in parser._option_string_actions:
            continue  # the name is taken by a flag of another dest: never a duplicate option
        kw = flag_kwargs(name, field)
        if kw is None:
            continue
        parser.add_argument(option, **kw)
        added[name] = kw.get("metavar") == "KEY=VALUE"
    parser.set_defaults(**{GENERATED: added})
    return list(added)


def generated_values(args: argparse.Namespace) -> dict[str, Any]:
    """The generated flags the command line set (KEY=VALUE lists become tables)."""
    out: dict[str, Any] = {}
    for name, is_table in getattr(args, GENERATED, {}).items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if is_table:
            table = {}
            for item in value:
                key, sep, v = item.partition("=")
                if not key or not sep:  # never echo the item: its key may be an API key
                    raise ConfigError(f"--{name.replace('_', '-')}: expected KEY=VALUE", param=name)
                table[key] = v
            value = table
        out[name] = value
    return out
