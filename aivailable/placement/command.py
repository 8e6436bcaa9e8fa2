"""`aivailable place --scenario FILE.json`: run the solver once on a scenario file and print the placement.

Also runnable as ``python -m aivailable.placement.command FILE.json``. Exit codes (CONTRACTS): 0 on
success, 2 on a bad scenario (missing file, not JSON, invalid field: one line on stderr naming the field).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import TextIO

from aivailable.placement.kvchoice import place_kv
from aivailable.placement.model import ScenarioError, load_problem


def read_scenario(path: str):
    """Load and validate a scenario file; raise ScenarioError with a one-line message."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as err:
        raise ScenarioError(f"scenario: no such file {path!r}") from err
    except OSError as err:
        raise ScenarioError(f"scenario: cannot read {path!r}: {err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScenarioError(f"scenario: {path!r} is not valid JSON: {err}") from err
    return load_problem(data)


def place_command(
    scenario_path: str,
    out: TextIO | None = None,
    err: TextIO | None = None,
    max_moves: int | None = None,
) -> int:
    """Solve the scenario file and print the placement JSON to `out`; return the exit code (0 or 2)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        problem = read_scenario(scenario_path)
    except ScenarioError as e:
        print(f"aivailable place: {e.message}", file=err)
        return 2
    start = time.perf_counter()
    result = place_kv(problem, max_moves=max_moves)
    result = dataclasses.replace(result, solve_ms=(time.perf_counter() - start) * 1000.0)
    print(result.to_json(indent=2), file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m aivailable.placement.command FILE.json``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--scenario":
        args = args[1:]
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m aivailable.placement.command [--scenario] FILE.json", file=sys.stderr)
        return 2
    return place_command(args[0])


if __name__ == "__main__":
    sys.exit(main())
