"""A short chaos run (bench/chaos.py): every failure classified, nobody hangs, no state lost."""

from __future__ import annotations

import json

from bench import chaos


def test_short_chaos_run_has_no_unclassified_failure_hang_or_lost_state(tmp_path, gemma_path):
    out = tmp_path / "chaos.json"
    chaos.main(["--duration", "40", "--nodes", "3", "--clients", "2", "--gap", "8,12", "--seed", "3",
                "--timeout", "60", "--model-path", str(gemma_path), "--out", str(out)])
    r = json.loads(out.read_text())
    assert len(r["faults"]) >= 3 and r["requests"] > 0 and r["successes"] > 0
    assert r["failed_requests"]["other"] == 0 and r["failed_attempts"]["other"] == 0, r["examples"]
    assert r["hung_clients"] == [] and r["failed_attempts"]["timeout"] == 0, r["examples"]
    assert r["term_violations"] == []
    for node, s in r["state"].items():
        assert s["ok"], (node, s)
    assert all(code in (0, None) for code in r["exit_codes"].values()), r["exit_codes"]
