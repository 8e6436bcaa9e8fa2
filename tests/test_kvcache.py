"""KV cache types: sizes and ids (engine/kvcache.py), the per-replica choice (placement/kvchoice.py), and
how the coordinator and the config carry them. Pure functions: table tests, no processes."""

from __future__ import annotations

import dataclasses
import random
import typing

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from aivailable import coordinator as coord
from aivailable.config import KvCacheSetting, load_settings
from aivailable.engine import kvcache
from aivailable.engine.estimate import ggml_row_bytes, kv_cache_bytes, kv_layout
from aivailable.engine.gguf_info import read_model_info
from aivailable.errors import ConfigError
from aivailable.placement import (
    Gpu,
    ModelSpec,
    Problem,
    Replica,
    ScenarioError,
    load_problem,
    validate_result,
)
from aivailable.placement.kvchoice import kv_options, place_kv
from aivailable.placement.model import KV_TYPES
from tests.ggufgen import write_model

# -- engine/kvcache.py -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "ggml", "block", "nbytes", "bits"), [
    ("f16", 1, 1, 2, 16.0),
    ("q8_0", 8, 32, 34, 8.5),
    ("q4_0", 2, 32, 18, 4.5),
])
def test_types_match_ggml(name, ggml, block, nbytes, bits):
    t = kvcache.kv_type(name)
    assert (t.ggml_id, t.block, t.block_bytes, t.bits_per_element) == (ggml, block, nbytes, bits)
    qtype = GGMLQuantizationType[name.upper()]
    assert qtype.value == ggml and GGML_QUANT_SIZES[qtype] == (block, nbytes)  # gguf-py, from ggml.c
    assert kvcache.ggml_id(name) == ggml
    assert kvcache.needs_flash_attn(name) is (name != "f16")
    for n in (1, 31, 32, 64, 1000):
        assert kvcache.row_bytes(name, n) == ggml_row_bytes(name, n)


def test_settings_agree_everywhere():
    assert kvcache.PREFERENCE == KV_TYPES == ("f16", "q8_0", "q4_0")
    assert set(typing.get_args(KvCacheSetting)) == set(kvcache.SETTINGS)


@pytest.mark.parametrize(("setting", "default", "resolved", "options"), [
    (None, "f16", "f16", ("f16",)),
    (None, "auto", "auto", ("f16", "q8_0", "q4_0")),
    ("q8_0", "auto", "q8_0", ("q8_0",)),
    ("auto", "f16", "auto", ("f16", "q8_0", "q4_0")),
    ("q4_0", "f16", "q4_0", ("q4_0",)),
])
def test_resolve_and_candidates(setting, default, resolved, options):
    assert kvcache.resolve(setting, default) == resolved
    assert kvcache.candidates(resolved) == options


def test_unknown_type_names_the_allowed_ones():
    with pytest.raises(ValueError, match="f16, q8_0, q4_0, auto"):
        kvcache.kv_type("q5_1")
    with pytest.raises(ValueError, match="unknown KV cache type"):
        kvcache.resolve("int8")


@pytest.fixture(scope="module")
def small_info(tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("kv") / "m.gguf", "llama", 4, 256, 8, 2, 512, 512, 4096)
    return read_model_info(path)  # head size 32, 2 KV heads, 4 layers


@pytest.mark.parametrize(("kv", "per_cell_layer"), [("f16", 2 * 64 * 2), ("q8_0", 2 * 2 * 34), ("q4_0", 2 * 2 * 18)])
def test_kv_size_formula_per_type(small_info, kv, per_cell_layer):
    """cells * layers * (row(K) + row(V)); with flash attention V is not padded to the widest layer."""
    est = kvcache.estimate_for(small_info, kv, n_ctx=1000, on_cpu=True)
    assert est.kv_cache_mib * (1 << 20) == 1024 * 4 * per_cell_layer
    lay = kv_layout(small_info, n_ctx=1000)
    assert kv_cache_bytes(small_info, lay, kv, kv, flash_attn=kvcache.needs_flash_attn(kv)) == 1024 * 4 * per_cell_layer


def test_needs_by_type_is_best_first_and_shrinks(small_info):
    needs = kvcache.needs_by_type(small_info, "auto", n_ctx=8192, n_parallel=2)
    assert list(needs) == ["f16", "q8_0", "q4_0"]
    assert needs["f16"] > needs["q8_0"] > needs["q4_0"]
    assert list(kvcache.needs_by_type(small_info, "q8_0", n_ctx=8192)) == ["q8_0"]


def test_head_size_not_a_block_multiple_is_unsupported(small_info):
    odd = dataclasses.replace(small_info, head_dim_k=80, head_dim_v=80)
    assert kvcache.unsupported(odd, "f16") is None
    why = kvcache.unsupported(odd, "q8_0")
    assert "head size 80" in why and "use f16" in why
    assert list(kvcache.needs_by_type(odd, "auto", n_ctx=1024)) == ["f16"]


@pytest.mark.parametrize(("kv", "log", "refused"), [
    ("q8_0", "llama_init_from_model: quantized V cache requires flash_attn to be enabled\n", True),
    ("q4_0", "llama_context: V cache type q4_0 with block size 32 does not divide n_embd_head_v=80\n", True),
    ("q8_0", "llama_context: Flash Attention not supported, set to disabled\n", True),
    ("q8_0", "llama_context: n_ctx = 4096\nllama_kv_cache: size = 19 MiB\n", False),
    ("f16", "quantized V cache requires flash_attn\n", False),
])
def test_kv_refusal_from_the_load_log(kv, log, refused):
    why = kvcache.kv_refusal(kv, log)
    assert (why is not None) is refused
    if refused:
        assert f"kv_cache_type {kv}" in why and 'kv_cache_type = "f16"' in why and log.strip() in why


@pytest.mark.parametrize(("kv", "base", "splits", "layers", "off"), [
    ("q8_0", 2, 2, 18, False),  # attention on the GPU: as many splits as the f16 context
    ("q8_0", 2, 4, 18, False),  # a couple more (output, masks) is not attention leaving the device
    ("q8_0", 2, 38, 18, True),  # two per layer: flash attention ran on the CPU backend
    ("q4_0", 1, 9, 4, True),
    ("f16", 2, 38, 18, False),  # f16 runs without flash attention: nothing to check
    ("q8_0", None, 38, 18, False),  # no figure: cannot tell, llama.cpp's own checks stand
])
def test_attention_left_device(kv, base, splits, layers, off):
    why = kvcache.attention_left_device(kv, base, splits, layers)
    assert (why is not None) is off
    if off:
        assert f"{splits} parts instead of {base}" in why and 'kv_cache_type = "f16"' in why


def test_graph_splits_takes_the_last_reserve():
    log = ("sched_reserve: graph: nodes = 817, splits = 1, input objects = 4\n"
           "sched_reserve: graph: nodes = 943, splits = 37, input objects = 4\n")
    assert kvcache.graph_splits(log) == 37
    assert kvcache.graph_splits("nothing here") is None


# -- placement/kvchoice.py ---------------------------------------------------------------------------------

AUTO = {"f16": 600, "q8_0": 450, "q4_0": 380}


def gpu(gid: str, vram: int) -> Gpu:
    return Gpu(id=gid, node=gid.split("/")[0], vendor="nvidia", vram_mib=vram)


def auto(name: str, kv=None, **kw) -> ModelSpec:
    kv = dict(kv or AUTO)
    return ModelSpec(name=name, vram_mib=next(iter(kv.values())), kv_vram_mib=kv, **kw)


def fixed(name: str, mib: int, **kw) -> ModelSpec:
    return ModelSpec(name=name, vram_mib=mib, **kw)


def types(result, name: str) -> list[tuple[tuple[str, ...], str | None]]:
    return [(r.gpus, r.kv_cache_type) for r in result.replicas(name)]


CHOICES = [
    # (case, gpus, models, demand, previous, expected {model: [(gpus, type)]})
    ("f16 when it fits", [gpu("n1/0", 1000)], [auto("a")], {"a": 1}, {}, {"a": [(("n1/0",), "f16")]}),
    ("q8_0 to fit a second model", [gpu("n1/0", 1000)], [fixed("x", 500), auto("a")], {"a": 1, "x": 1}, {},
     {"a": [(("n1/0",), "q8_0")], "x": [(("n1/0",), None)]}),
    ("q4_0 when q8_0 is not enough", [gpu("n1/0", 1000)], [fixed("x", 600), auto("a")], {"a": 1, "x": 1}, {},
     {"a": [(("n1/0",), "q4_0")]}),
    ("two auto models share a card at q8_0", [gpu("n1/0", 1000)], [auto("a"), auto("b")], {"a": 1, "b": 1}, {},
     {"a": [(("n1/0",), "q8_0")], "b": [(("n1/0",), "q8_0")]}),
    ("per replica: f16 where there is room, q8_0 where a second replica needs it",
     [gpu("n1/0", 1000), gpu("n2/0", 1000)], [fixed("x", 500, max_replicas=1), auto("a", max_replicas=2)],
     {"a": 10, "x": 1}, {},
     {"a": [(("n1/0",), "q8_0"), (("n2/0",), "f16")], "x": [(("n1/0",), None)]}),
    ("no quantizing to pack tighter when nothing more is served", [gpu("n1/0", 700), gpu("n2/0", 700)],
     [auto("a", max_replicas=1), auto("b", max_replicas=1)], {"a": 1, "b": 1}, {},
     {"a": [(("n1/0",), "f16")], "b": [(("n2/0",), "f16")]}),
    ("a running replica keeps its type while it fits (no reload)", [gpu("n1/0", 1000)], [auto("a")], {"a": 1},
     {"a": [Replica(("n1/0",), kv_cache_type="q4_0")]}, {"a": [(("n1/0",), "q4_0")]}),
    ("a previous type that no longer fits gives way", [gpu("n1/0", 1000)], [fixed("x", 500), auto("a")],
     {"a": 1, "x": 1}, {"a": [Replica(("n1/0",), kv_cache_type="f16")], "x": [Replica(("n1/0",))]},
     {"a": [(("n1/0",), "q8_0")]}),
    ("only f16 and q8_0 allowed", [gpu("n1/0", 1000)], [fixed("x", 600), auto("a", {"f16": 600, "q8_0": 450})],
     {"a": 1, "x": 5}, {}, {"a": [], "x": [(("n1/0",), None)]}),
    ("one option: labelled with it", [gpu("n1/0", 1000)], [auto("a", {"q8_0": 450})], {"a": 1}, {},
     {"a": [(("n1/0",), "q8_0")]}),
]


@pytest.mark.parametrize(("case", "gpus", "models", "demand", "previous", "want"), CHOICES,
                         ids=[c[0] for c in CHOICES])
def test_kv_choice(case, gpus, models, demand, previous, want):
    problem = Problem(gpus=gpus, models=models, demand=demand, previous=previous)
    result = place_kv(problem)
    for name, expected in want.items():
        assert types(result, name) == expected, case
    assert validate_result(problem, result) == []  # per-type needs fit every GPU


def test_kv_choice_is_deterministic_whatever_the_input_order():
    rng = random.Random(7)
    gpus = [gpu(f"n{i}/0", rng.choice([4096, 8192, 11264])) for i in range(6)]
    models = [auto(f"m{i}", {"f16": 2000 + 300 * i, "q8_0": 1200 + 150 * i, "q4_0": 800 + 100 * i}, max_replicas=3)
              for i in range(5)] + [fixed("big", 7000)]
    demand = {m.name: rng.uniform(0.1, 5) for m in models}
    first = place_kv(Problem(gpus=gpus, models=models, demand=demand))
    for _ in range(3):
        rng.shuffle(gpus)
        rng.shuffle(models)
        assert place_kv(Problem(gpus=gpus, models=models, demand=demand)) == first
    assert {r.kv_cache_type for m in first.placement for r in first.replicas(m) if m != "big"} <= set(KV_TYPES)


def test_scenario_json_carries_kv_needs_and_choices():
    problem = load_problem({
        "gpus": [{"id": "n1/0", "node": "n1", "vendor": "nvidia", "vram_mib": 1000}],
        "models": [{"name": "x", "vram_mib": 500}, {"name": "a", "vram_mib": 600, "kv_vram_mib": AUTO}],
        "demand": {"a": 1, "x": 1},
        "previous": {"a": [{"gpus": ["n1/0"], "kv_cache_type": "q8_0"}]},
    })
    assert kv_options(problem.model("a")) == ("f16", "q8_0", "q4_0") and kv_options(problem.model("x")) == ()
    out = place_kv(problem).to_dict()
    assert out["placement"]["a"] == [{"gpus": ["n1/0"], "kv_cache_type": "q8_0"}]
    assert out["placement"]["x"] == [{"gpus": ["n1/0"]}]  # unchanged shape for models without a choice
    with pytest.raises(ScenarioError, match=r"models\[0\].kv_vram_mib: unknown KV cache type 'q5_0'"):
        load_problem({"gpus": [], "models": [{"name": "a", "vram_mib": 9, "kv_vram_mib": {"q5_0": 5}}]})
    with pytest.raises(ScenarioError, match=r"previous.a\[0\].kv_cache_type"):
        load_problem({"gpus": [{"id": "g", "node": "n", "vendor": "v", "vram_mib": 9}],
                      "models": [{"name": "a", "vram_mib": 9}], "previous": {"a": [{"gpus": ["g"], "kv_cache_type": "x"}]}})


# -- coordinator and config ------------------------------------------------------------------------------


def _facts(kv_setting: str, replicas=()) -> list[coord.NodeFacts]:
    return [coord.NodeFacts(
        node_id="n1", address="127.0.0.1:1",
        devices=[{"id": "sim0", "vendor": "simulated", "vram_total_mib": 1000, "simulated": True}],
        catalog=[{"name": "x", "path": "/x.gguf"}, {"name": "a", "path": "/a.gguf", "kv_cache_type": kv_setting}],
        needs_mib={"x": 500.0, "a": 600.0},
        kv_needs_mib={"a": dict(AUTO)} if kv_setting == "auto" else {}, replicas=list(replicas))]


def test_coordinator_places_auto_model_quantized_and_the_node_reads_its_type():
    new, reasons = coord.decide(_facts("auto"), {})
    assert reasons == {}
    assert new["a"] == [{"node": "n1", "gpus": ["sim0"], "split": None, "kv_cache_type": "q8_0"}]
    assert "kv_cache_type" not in new["x"][0]
    assert coord.kv_cache_type_of(new, "n1", "a", ("sim0",), {"kv_cache_type": "auto"}) == "q8_0"
    assert coord.kv_cache_type_of(new, "n1", "x", ("sim0",), {"name": "x"}) == "f16"
    assert coord.kv_cache_type_of({}, "n1", "a", ("sim0",), {"kv_cache_type": "auto"}) == "f16"
    assert coord.kv_cache_type_of({}, "n1", "a", ("sim0",), {"kv_cache_type": "q4_0"}) == "q4_0"
    again, _ = coord.decide(_facts("auto"), new)
    assert again == new  # stable round after round


def test_coordinator_without_auto_places_as_before():
    new, reasons = coord.decide(_facts("f16"), {})
    assert sorted(new) == ["x"] and "no room" in reasons["a"]


def test_measured_replica_shifts_every_type_by_the_same_amount():
    measured = [{"model": "a", "gpus": ["sim0"], "state": "ready", "vram_mib": 470.0, "kv_cache_type": "q8_0"}]
    problem = coord.build_problem(_facts("auto", measured), {})
    assert problem.model("a").kv_vram_mib == {"f16": 620, "q8_0": 470, "q4_0": 400}
    assert problem.model("a").vram_mib == 620


def test_node_default_applies_to_models_that_set_none(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nkv_cache_type = "auto"\n[[models]]\nname = "a"\npath = "/a.gguf"\n'
                   '[[models]]\nname = "b"\npath = "/b.gguf"\nkv_cache_type = "q4_0"\n')
    s = load_settings(str(cfg), {}, ["c=/c.gguf"])
    assert [m.kv_cache_type for m in s.models] == ["auto", "q4_0", "auto"]
    plain = load_settings(None, {}, ["c=/c.gguf"])
    assert plain.node.kv_cache_type == "f16" and plain.models[0].kv_cache_type is None  # f16, not gossiped
    cfg.write_text('[[models]]\nname = "a"\npath = "/a.gguf"\nkv_cache_type = "q5"\n')
    with pytest.raises(ConfigError, match=r"models\[0\].kv_cache_type"):
        load_settings(str(cfg), {}, [])
    with pytest.raises(ConfigError, match=r"node.kv_cache_type"):
        load_settings(None, {"kv_cache_type": "int8"}, [])


def test_a_kv_type_change_is_a_placement_event():
    old = {"a": [{"node": "n1", "gpus": ["0"], "split": None, "kv_cache_type": "q4_0"}]}
    new = {"a": [{"node": "n1", "gpus": ["0"], "split": None, "kv_cache_type": "q8_0"}]}
    assert coord.describe_changes(old, new, "why") == ["a: + n1:0 KV q8_0 (why)", "a: - n1:0 KV q4_0 (why)"]
    plain = {"a": [{"node": "n1", "gpus": ["0"], "split": None}]}
    assert coord.describe_changes({}, plain, "why") == ["a: + n1:0 (why)"]


def test_cli_flag_and_place_command(tmp_path):
    """`up --kv-cache-type` refuses a bad value naming the flag (exit 2); `place` answers with the chosen types."""
    import json
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "aivailable", "up", "--kv-cache-type", "int8"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--kv-cache-type" in bad.stderr and "auto" in bad.stderr
    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps({
        "gpus": [{"id": "n1/0", "node": "n1", "vendor": "nvidia", "name": "GTX 1080", "vram_mib": 8192,
                  "reserved_mib": 300}],
        "models": [{"name": "chat-32k", "vram_mib": 9300, "kv_vram_mib": {"f16": 9300, "q8_0": 7380, "q4_0": 6330}},
                   {"name": "embed", "vram_mib": 500}],
        "demand": {"chat-32k": 3.0, "embed": 1.0}}))
    out = subprocess.run([sys.executable, "-m", "aivailable", "place", "--scenario", str(scenario)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    placement = json.loads(out.stdout)["placement"]
    # f16 (9300) fits nowhere; q8_0 (7380) fits beside embed in 7892 usable MiB, so q4_0 is not needed
    assert placement == {"chat-32k": [{"gpus": ["n1/0"], "kv_cache_type": "q8_0"}], "embed": [{"gpus": ["n1/0"]}]}
