"""`aivailable place --scenario FILE`: good scenarios print placement JSON (exit 0), bad ones exit 2 naming
the field. Tested through `place_command` and as a real subprocess."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aivailable.placement.command import main, place_command

ROOT = Path(__file__).resolve().parents[1]
GOOD = {
    "gpus": [
        {
            "id": "n1/0",
            "node": "n1",
            "vendor": "nvidia",
            "name": "GTX 1080 Ti",
            "vram_mib": 11264,
            "reserved_mib": 300,
        },
        {"id": "n3/0", "node": "n3", "vendor": "nvidia", "name": "Tesla V100", "vram_mib": 32768},
        {"id": "n3/1", "node": "n3", "vendor": "nvidia", "name": "Tesla V100", "vram_mib": 32768},
    ],
    "models": [
        {"name": "llama-3.1-8b-q4_k_m", "vram_mib": 5800, "min_replicas": 0, "max_replicas": 4},
        {"name": "llama-3.3-70b-q4_k_m", "vram_mib": 43878, "max_replicas": 1},
        {"name": "some-400b", "vram_mib": 240000},
    ],
    "demand": {"llama-3.1-8b-q4_k_m": 12.5, "llama-3.3-70b-q4_k_m": 1.0, "some-400b": 0.5},
    "previous": {"llama-3.1-8b-q4_k_m": [{"gpus": ["n1/0"]}]},
    "split_overhead_mib": 256,
}


def write(tmp_path: Path, data, name: str = "scenario.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def run(path: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = place_command(path, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def mutated(change) -> dict:
    data = json.loads(json.dumps(GOOD))
    change(data)
    return data


def test_good_scenario_prints_the_placement(tmp_path):
    code, out, err = run(write(tmp_path, GOOD))
    assert code == 0 and err == ""
    result = json.loads(out)
    assert set(result) == {"placement", "unplaced", "unplaced_reasons", "solve_ms"}
    assert {"gpus": ["n1/0"]} in result["placement"]["llama-3.1-8b-q4_k_m"]
    (big,) = result["placement"]["llama-3.3-70b-q4_k_m"]
    assert big["gpus"] == ["n3/0", "n3/1"] and sum(big["split"]) == pytest.approx(1.0)
    assert result["unplaced"] == ["some-400b"]
    assert "needs 240000 MiB" in result["unplaced_reasons"]["some-400b"]


def _set(path, value):
    def change(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


BAD = [
    ("negative VRAM", _set(["gpus", 2, "vram_mib"], -5), "scenario.gpus[2].vram_mib: must be >= 0 (got -5)"),
    (
        "unknown GPU in previous",
        _set(["previous", "llama-3.1-8b-q4_k_m", 0, "gpus"], ["n9/0"]),
        "scenario.previous[\"llama-3.1-8b-q4_k_m\"][0].gpus[0]: unknown GPU 'n9/0'",
    ),
    (
        "replica across nodes",
        _set(["previous", "llama-3.1-8b-q4_k_m", 0, "gpus"], ["n1/0", "n3/0"]),
        'scenario.previous["llama-3.1-8b-q4_k_m"][0].gpus: '
        "a replica stays within one node (got nodes n1, n3)",
    ),
    (
        "min above max",
        _set(["models", 0, "min_replicas"], 5),
        "scenario.models[0].min_replicas: must be <= max_replicas (got 5 > 4)",
    ),
    ("duplicate GPU id", _set(["gpus", 1, "id"], "n1/0"), "scenario.gpus[1].id: duplicate GPU id 'n1/0'"),
    (
        "reserved above VRAM",
        _set(["gpus", 0, "reserved_mib"], 20000),
        "scenario.gpus[0].reserved_mib: must be <= vram_mib (got 20000 > 11264)",
    ),
    (
        "demand for an unknown model",
        _set(["demand", "ghost"], 1.0),
        "scenario.demand.ghost: unknown model 'ghost'",
    ),
    (
        "negative demand",
        _set(["demand", "some-400b"], -1),
        'scenario.demand["some-400b"]: must be a finite number >= 0 (got -1.0)',
    ),
    ("unknown field", _set(["models", 1, "vram_gb"], 4), "scenario.models[1].vram_gb: unknown field"),
    ("missing field", lambda d: d["gpus"][0].pop("node"), "scenario.gpus[0].node: required field is missing"),
    (
        "VRAM not an integer",
        _set(["models", 0, "vram_mib"], "lots"),
        'scenario.models[0].vram_mib: must be an integer (got "lots")',
    ),
    (
        "split that does not sum to 1",
        _set(["previous", "llama-3.3-70b-q4_k_m"], [{"gpus": ["n3/0", "n3/1"], "split": [0.5, 0.6]}]),
        'scenario.previous["llama-3.3-70b-q4_k_m"][0].split: fractions must sum to 1 (got 1.1)',
    ),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_scenario_exits_2_naming_the_field(tmp_path, case, change, message):
    code, out, err = run(write(tmp_path, mutated(change)))
    assert code == 2 and out == ""
    assert err == f"aivailable place: {message}\n"


def test_missing_file_and_bad_json_exit_2(tmp_path):
    code, _, err = run(str(tmp_path / "nope.json"))
    assert code == 2 and "no such file" in err and err.count("\n") == 1
    code, _, err = run(write(tmp_path, "{not json"))
    assert code == 2 and "is not valid JSON" in err
    code, _, err = run(write(tmp_path, "[1, 2]"))
    assert code == 2 and err == "aivailable place: scenario: must be a JSON object\n"


def test_main_usage_error_exits_2(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aivailable.placement.command", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_real_subprocess_good_and_bad(tmp_path):
    ok = _subprocess("--scenario", write(tmp_path, GOOD))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["unplaced"] == ["some-400b"]
    bad = _subprocess(write(tmp_path, mutated(_set(["gpus", 2, "vram_mib"], -5)), "bad.json"))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == "aivailable place: scenario.gpus[2].vram_mib: must be >= 0 (got -5)"
