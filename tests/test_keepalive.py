"""keep_alive as pure decisions (aivailable/keepalive.py) and in the coordinator's placement rounds."""

from __future__ import annotations

import pytest

from aivailable import coordinator as coord
from aivailable import keepalive as ka
from aivailable.config import ModelConfig, load_settings
from aivailable.errors import ConfigError

FOREVER = ka.FOREVER


@pytest.mark.parametrize(("value", "seconds"), [
    ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0), ("90s", 90.0), ("1.5m", 90.0), ("500ms", 0.5),
    ("2d", 172800.0), ("0", 0.0), ("0s", 0.0), (0, 0.0), (300, 300.0), (2.5, 2.5), ("300", 300.0),
    (" 10m ", 600.0), ("-1", FOREVER), (-1, FOREVER), ("-5m", FOREVER), (-0.5, FOREVER), ("1H", 3600.0),
])
def test_parse_duration(value, seconds):
    assert ka.parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "5x", "m", "5 m", "5m3", "abc", "1h-5m", True, None, [5], "inf", float("nan")])
def test_parse_duration_refuses(value):
    with pytest.raises(ValueError):
        ka.parse_duration(value)


@pytest.mark.parametrize(("seconds", "text"), [
    (FOREVER, "forever"), (None, "forever"), (0, "0s"), (45, "45s"), (90, "90s"), (300, "5m"), (3600, "1h"),
    (5400, "1h30m"), (0.5, "0.5s"),
])
def test_describe(seconds, text):
    assert ka.describe(seconds) == text


# spec, use, default, now -> unload_at (None: never), idle
CASES = [
    ({}, None, 300.0, 1000.0, None, False),                                # never used: kept
    ({}, ka.Use(at=100.0), 300.0, 399.0, 400.0, False),                    # node default 5m
    ({}, ka.Use(at=100.0), 300.0, 400.0, 400.0, True),
    ({}, ka.Use(at=100.0), FOREVER, 10**9, None, False),                   # default forever
    ({"keep_alive": 10.0}, ka.Use(at=100.0), FOREVER, 111.0, 110.0, True),  # the model's own
    ({"keep_alive": 10.0}, ka.Use(at=100.0, keep_alive=60.0), FOREVER, 111.0, 160.0, False),  # request wins
    ({"keep_alive": 10.0}, ka.Use(at=100.0, keep_alive=FOREVER), 5.0, 10**9, None, False),
    ({}, ka.Use(at=100.0, keep_alive=0.0), FOREVER, 100.0, 100.0, True),   # 0: after each use
    ({}, ka.Use(at=100.0, keep_alive=0.0, active=1), FOREVER, 500.0, None, False),  # in use / waited for
    ({"pinned": True}, ka.Use(at=100.0), 1.0, 10**9, None, False),
    ({"min_replicas": 1}, ka.Use(at=100.0), 1.0, 10**9, None, False),
]


@pytest.mark.parametrize(("spec", "use", "default", "now", "at", "is_idle"), CASES)
def test_unload_at_and_idle(spec, use, default, now, at, is_idle):
    assert ka.unload_at(spec, use, default) == at
    assert ka.idle(spec, use, default, now) is is_idle


def test_busy_replica_is_never_idle():
    assert not ka.idle({}, ka.Use(at=0.0), 1.0, 100.0, busy=True)


def test_usage_counts_active_requests_and_end_time():
    u = ka.Usage()
    u.touch("a", 10.0)
    u.begin("a", 20.0, keep_alive=5.0)
    u.begin("a", 21.0)
    assert u.view()["a"] == {"at": 21.0, "keep_alive": None, "active": 2}
    u.end("a", 30.0)
    u.end("a", 31.0)
    assert u.view()["a"] == {"at": 31.0, "keep_alive": None, "active": 0}
    u.end("a", 5.0)  # an extra end never goes negative nor back in time
    assert u.view()["a"] == {"at": 31.0, "keep_alive": None, "active": 0}


def test_merge_takes_the_latest_use_and_sums_active():
    merged = ka.merge([
        {"a": {"at": 10.0, "keep_alive": 5.0, "active": 1}, "b": {"at": 3.0, "keep_alive": None, "active": 0}},
        {"a": {"at": 20.0, "keep_alive": None, "active": 2}, "bad": {"at": "x"}},
        {"a": {"at": 15.0, "keep_alive": 0.0, "active": 0}},
        {},
    ])
    assert merged == {"a": ka.Use(20.0, None, 3), "b": ka.Use(3.0, None, 0)}


def test_config_parses_keep_alive_and_names_a_bad_value(tmp_path):
    assert ModelConfig(name="m", path="/x.gguf", keep_alive="5m").keep_alive == 300.0
    assert ModelConfig(name="m", path="/x.gguf").keep_alive is None
    s = load_settings(None, {"keep_alive": "1h", "load_wait_s": 0}, [])
    assert s.node.keep_alive == 3600.0 and s.node.load_wait_s == 0
    assert load_settings(None, {}, []).node.keep_alive == FOREVER
    assert load_settings(None, {}, []).node.load_wait_s == 120.0
    with pytest.raises(ConfigError, match="keep_alive"):
        load_settings(None, {"keep_alive": "soon"}, [])
    with pytest.raises(ConfigError, match="load_wait_s"):
        load_settings(None, {"load_wait_s": -1}, [])
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[models]]\nname = "m"\npath = "/x.gguf"\nkeep_alive = "later"\n')
    with pytest.raises(ConfigError, match=r"models\[0\]\.keep_alive"):
        load_settings(str(cfg), {}, [])


def _facts(usage: dict, keep_alive=None, pinned=False, outstanding=0) -> list[coord.NodeFacts]:
    model = {"name": "m", "path": "/m.gguf", "ctx": 1024, "max_replicas": 1, "pinned": pinned}
    if keep_alive is not None:
        model["keep_alive"] = keep_alive
    reps = [{"model": "m", "gpus": ["g0"], "state": "ready", "vram_mib": 500, "outstanding": outstanding}]
    return [coord.NodeFacts(node_id="n1", address="a:1", catalog=[model], needs_mib={"m": 500.0},
                            devices=[{"id": "g0", "vendor": "sim", "name": "s", "vram_total_mib": 2000,
                                      "vram_used_mib": 0, "simulated": True}],
                            replicas=reps, usage=usage)]


def test_coordinator_unloads_an_idle_model_and_reloads_it_on_use():
    placed = {"m": [{"node": "n1", "gpus": ["g0"], "split": None}]}
    used = {"m": {"at": 1000.0, "keep_alive": None, "active": 0}}
    new, reasons = coord.decide(_facts(used, keep_alive=60.0), placed, now=1059.0)
    assert new == placed
    new, reasons = coord.decide(_facts(used, keep_alive=60.0), placed, now=1060.0)
    assert "m" not in new and reasons["m"].startswith("idle: no request for 1m") and ka.LOADS_ON_REQUEST in reasons["m"]
    waiting = {"m": {"at": 2000.0, "keep_alive": None, "active": 1}}  # a request waits for it
    new, _ = coord.decide(_facts(waiting, keep_alive=60.0), {}, now=2000.0)
    assert new == placed
    # Without `now` (or with keep_alive forever, the default) nothing is unloaded.
    assert coord.decide(_facts(used, keep_alive=60.0), placed)[0] == placed
    assert coord.decide(_facts(used), placed, now=10**9)[0] == placed
    assert coord.decide(_facts(used), placed, now=1100.0, keep_alive_default=30.0)[0] == {}


def test_pinned_busy_and_request_keep_alive_keep_a_model():
    placed = {"m": [{"node": "n1", "gpus": ["g0"], "split": None}]}
    used = {"m": {"at": 1000.0, "keep_alive": None, "active": 0}}
    assert coord.decide(_facts(used, keep_alive=0.0, pinned=True), placed, now=5000.0)[0] == placed
    assert coord.decide(_facts(used, keep_alive=0.0, outstanding=1), placed, now=5000.0)[0] == placed
    forever = {"m": {"at": 1000.0, "keep_alive": FOREVER, "active": 0}}
    assert coord.decide(_facts(forever, keep_alive=0.0), placed, now=5000.0)[0] == placed


def test_cluster_view_shows_keep_alive_time_to_unload_and_why_an_idle_model_is_unloaded():
    from aivailable.clusterview import MemberInfo, build_view

    def view(usage, replicas, placement, now, **spec):
        model = {"name": "m", "path": "/m.gguf", **spec}
        facts = coord.NodeFacts("a", "a:1", catalog=[model], replicas=replicas, usage=usage)
        v = build_view(self_id="a", leader="a", term=1, version=1, backend="cpu", placement=placement,
                       unplaced={}, events=[], members=[MemberInfo("a", "a:1", "alive", facts)],
                       keep_alive_default=FOREVER, now=now)
        return v["models"][0]

    placed = {"m": [{"node": "a", "gpus": ["g0"], "split": None}]}
    ready = [{"model": "m", "gpus": ["g0"], "state": "ready"}]
    used = {"m": {"at": 100.0, "keep_alive": None, "active": 0}}
    m = view(used, ready, placed, 130.0, keep_alive=60.0)
    assert (m["keep_alive"], m["unload_in_s"]) == ("1m", 30.0)
    m = view(used, ready, placed, 130.0)
    assert (m["keep_alive"], m["unload_in_s"]) == ("forever", None)
    m = view(used, ready, placed, 130.0, keep_alive=60.0, pinned=True)
    assert (m["keep_alive"], m["unload_in_s"]) == ("1m (kept: pinned)", None)
    m = view({"m": {**used["m"], "active": 1}}, ready, placed, 500.0, keep_alive=60.0)
    assert m["unload_in_s"] is None  # in use: the keep-alive counts from the end of the request
    m = view(used, [], {}, 500.0, keep_alive=60.0)  # unloaded: every node says why, coordinator or not
    assert m["state"] == "unplaced" and m["unload_in_s"] is None
    assert m["reason"] == f"idle: no request for 1m (keep_alive); {ka.LOADS_ON_REQUEST}"
