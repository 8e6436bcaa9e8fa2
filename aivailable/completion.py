"""`aivailable completion bash|zsh|fish`: shell completion scripts generated from the argument parser,
so new commands and flags complete without editing a script by hand."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

SHELLS = ("bash", "zsh", "fish")
_FILE_METAVARS = ("FILE", "PATH", "JSON")
_DIR_METAVARS = ("DIR",)


@dataclass(frozen=True)
class Option:
    names: tuple[str, ...]
    help: str
    takes_value: bool
    repeatable: bool
    choices: tuple[str, ...]
    complete: str  # "file", "dir" or ""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    options: tuple[Option, ...]
    words: tuple[str, ...] = ()
    """Values of its positional arguments that have choices (e.g. `completion bash|zsh|fish`)."""


def _value_kind(action: argparse.Action) -> str:
    meta = str(action.metavar or action.dest).upper()
    if "=" in meta:
        return ""  # NAME=PATH and the like: no plain file name
    if action.dest.endswith("_dir"):
        return "dir"
    if action.dest.endswith("_file"):
        return "file"
    if any(m in meta for m in _DIR_METAVARS):
        return "dir"
    if any(m in meta for m in _FILE_METAVARS) or action.dest in ("config", "scenario"):
        return "file"
    return ""


def _options(parser: argparse.ArgumentParser) -> tuple[Option, ...]:
    out = []
    for a in parser._actions:
        if not a.option_strings or a.help == argparse.SUPPRESS:
            continue
        takes = a.nargs != 0 and not isinstance(a, argparse._VersionAction | argparse._HelpAction)
        if isinstance(a, argparse.BooleanOptionalAction):
            takes = False
        out.append(Option(tuple(a.option_strings), " ".join((a.help or "").split()).replace("%%", "%"), takes,
                          isinstance(a, argparse._AppendAction), tuple(str(c) for c in a.choices or ()),
                          _value_kind(a) if takes else ""))
    return tuple(out)


def commands(parser: argparse.ArgumentParser) -> tuple[tuple[Option, ...], tuple[Command, ...]]:
    """(top-level options, subcommands) of `parser`."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    cmds = tuple(Command(name, helps.get(name, ""), _options(p),
                         tuple(str(c) for a in p._actions if not a.option_strings for c in a.choices or ()))
                 for name, p in sub.choices.items())
    return _options(parser), cmds


def _words(opts: tuple[Option, ...]) -> str:
    return " ".join(n for o in opts for n in o.names)


def bash(parser: argparse.ArgumentParser, prog: str = "aivailable") -> str:
    top, cmds = commands(parser)
    fn = "_" + re.sub(r"\W", "_", prog)
    cases, values = [], []
    for c in cmds:
        cases.append(f"        {c.name}) opts=\"{' '.join(c.words)} {_words(c.options)}\" ;;")
        for o in c.options:
            if not o.takes_value:
                continue
            pat = "|".join(f"{c.name}:{n}" for n in o.names)
            if o.choices:
                values.append(f"        {pat}) COMPREPLY=($(compgen -W \"{' '.join(o.choices)}\" -- \"$cur\")); return ;;")
            elif o.complete == "dir":
                values.append(f"        {pat}) COMPREPLY=($(compgen -d -- \"$cur\")); return ;;")
            elif o.complete == "file":
                values.append(f"        {pat}) COMPREPLY=($(compgen -f -- \"$cur\")); return ;;")
            else:
                values.append(f"        {pat}) COMPREPLY=(); return ;;")
    return f"""# bash completion for {prog}; load with: source <({prog} completion bash)
{fn}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{' '.join(c.name for c in cmds)} {_words(top)}" -- "$cur"))
        return
    fi
    local cmd="${{COMP_WORDS[1]}}" opts=""
    case "$cmd:$prev" in
{chr(10).join(values)}
    esac
    case "$cmd" in
{chr(10).join(cases)}
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -o default -F {fn} {prog}
"""


def _zsh_text(text: str) -> str:
    return re.sub(r"[\[\]:'\\`$]", " ", text)[:100].strip()


def zsh(parser: argparse.ArgumentParser, prog: str = "aivailable") -> str:
    top, cmds = commands(parser)
    fn = "_" + re.sub(r"\W", "_", prog)
    described = "\n".join(f"        '{c.name}:{_zsh_text(c.help)}'" for c in cmds)
    cases = []
    for c in cmds:
        specs = []
        for o in c.options:
            for n in o.names:
                spec = f"{'*' if o.repeatable else ''}{n}[{_zsh_text(o.help)}]"
                if o.takes_value:
                    action = (f"({' '.join(o.choices)})" if o.choices else
                              "_files -/" if o.complete == "dir" else "_files" if o.complete == "file" else " ")
                    spec += f":value:{action}"
                specs.append(f"'{spec}'")
        if c.words:
            specs.append(f"'1:value:({' '.join(c.words)})'")
        cases.append(f"        {c.name}) _arguments {' '.join(specs)} ;;")
    return f"""#compdef {prog}
# zsh completion for {prog}; load with: source <({prog} completion zsh)
{fn}() {{
    local -a cmds
    cmds=(
{described}
    )
    if (( CURRENT == 2 )); then
        _describe 'command' cmds
        return
    fi
    words=("${{(@)words[2,-1]}}")
    (( CURRENT-- ))
    case "$words[1]" in
{chr(10).join(cases)}
    esac
}}
if [ "$funcstack[1]" = "{fn}" ]; then {fn} "$@"; else compdef {fn} {prog}; fi
"""


def _fish_text(text: str) -> str:
    return text.replace("\\", " ").replace("'", " ")[:100].strip()


def fish(parser: argparse.ArgumentParser, prog: str = "aivailable") -> str:
    top, cmds = commands(parser)
    lines = [f"# fish completion for {prog}; load with: {prog} completion fish | source",
             f"complete -c {prog} -f"]
    names = " ".join(c.name for c in cmds)
    for c in cmds:
        lines.append(f"complete -c {prog} -n 'not __fish_seen_subcommand_from {names}' -a {c.name} "
                     f"-d '{_fish_text(c.help)}'")
        if c.words:
            lines.append(f"complete -c {prog} -n '__fish_seen_subcommand_from {c.name}' -a '{' '.join(c.words)}'")
        for o in c.options:
            longs = [n[2:] for n in o.names if n.startswith("--")]
            shorts = [n[1:] for n in o.names if not n.startswith("--")]
            if not longs and not shorts:
                continue
            flags = " ".join([*(f"-l {n}" for n in longs), *(f"-s {n}" for n in shorts)])
            arg = ""
            if o.takes_value:
                arg = (f" -x -a '{' '.join(o.choices)}'" if o.choices else
                       " -r -F" if o.complete in ("file", "dir") else " -x")
            lines.append(f"complete -c {prog} -n '__fish_seen_subcommand_from {c.name}' {flags}{arg} "
                         f"-d '{_fish_text(o.help)}'")
    return "\n".join(lines) + "\n"


def script(shell: str, parser: argparse.ArgumentParser, prog: str = "aivailable") -> str:
    return {"bash": bash, "zsh": zsh, "fish": fish}[shell](parser, prog)
