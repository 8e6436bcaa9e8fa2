"""The first five minutes: `--demo` chats, serves several requests at once, and ends runaway generations.

Real node processes and the official openai client; the token-budget rules also as table tests.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest

from aivailable.config import (
    DEFAULT_MAX_TOKENS,
    ModelConfig,
    NodeConfig,
    Settings,
    load_settings,
    token_budget,
)
from aivailable.demo import DEMO_CHAT_MODEL_NAME, DEMO_GPU_SPEC, DEMO_MODEL_NAME, with_demo
from aivailable.engine.runner import GenParams
from aivailable.engine.spec import SamplingDefaults, generation_limit
from aivailable.errors import ConfigError
from tests.nodeproc import serving

CHAT = DEMO_CHAT_MODEL_NAME
BASE = DEMO_MODEL_NAME
COUNTING = "1, 2, 3, 4, 5,"
"""A prompt a base model continues for as long as it is let."""


# -- the rules --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("entry", "node_default", "expected"), [
    ({}, 512, (512, None)),
    ({"max_tokens_default": 100}, 512, (100, None)),
    ({"max_tokens_ceiling": 50}, 512, (50, 50)),
    ({"max_tokens_default": 20, "max_tokens_ceiling": 50}, 512, (20, 50)),
])
def test_token_budget(entry, node_default, expected):
    assert token_budget(entry, node_default) == expected


@pytest.mark.parametrize(("asked", "default", "ceiling", "expected"), [
    (None, 512, None, 512),     # unset: the default
    (7, 512, None, 7),          # asked: what was asked
    (2000, 512, 1000, 1000),    # above the ceiling: clamped, not refused
    (None, None, 300, 300),
    (None, None, None, None),   # no bound at all: the engine stops at the slot's context
])
def test_generation_limit(asked, default, ceiling, expected):
    assert generation_limit(asked, default, ceiling) == expected


def test_sampling_defaults_fill_only_what_the_request_left_unset():
    params = GenParams(temperature=0.0, top_k=5)
    SamplingDefaults(temperature=0.2, top_p=0.9, repeat_penalty=1.1).fill(params)
    assert (params.temperature, params.top_p, params.top_k, params.repeat_penalty) == (0.0, 0.9, 5, 1.1)


def test_config_keys_are_checked(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('[[models]]\nname = "m"\npath = "/x.gguf"\nmax_tokens_default = 600\nmax_tokens_ceiling = 500\n')
    with pytest.raises(ConfigError, match=r"models\[0\].*max_tokens_default \(600\) exceeds max_tokens_ceiling"):
        load_settings(str(cfg), {}, [])
    cfg.write_text('[[models]]\nname = "m"\npath = "/x.gguf"\nsampling = { temprature = 0.2 }\n')
    with pytest.raises(ConfigError, match=r"models\[0\]\.sampling\.temprature: unknown key"):
        load_settings(str(cfg), {}, [])
    cfg.write_text("[node]\nmax_tokens_default = 0\n")
    with pytest.raises(ConfigError, match=r"node\.max_tokens_default"):
        load_settings(str(cfg), {}, [])


def test_demo_settings_fit_and_bound_every_answer(gemma_path):
    """Both demo models, each with 4 slots of 2048 tokens or more and the documented default budget, fit the
    demo's simulated GPU by the same estimate the node places them with."""
    from aivailable.engine.estimate import estimate_vram
    from aivailable.engine.gguf_info import read_model_info

    state_dir = gemma_path.parent.parent  # the fixture's state dir: the assembled model is reused
    s = with_demo(Settings(node=NodeConfig(state_dir=str(state_dir)), models=()))
    assert s.node.simulate_gpus == [DEMO_GPU_SPEC]
    models = {m.name: m for m in s.models}
    assert set(models) == {CHAT, BASE}
    need = 0.0
    for m in models.values():
        assert m.parallel >= 4 and m.ctx // m.parallel >= 2048
        default, _ceiling = token_budget(m.model_dump(exclude_none=True), s.node.max_tokens_default)
        assert default == DEFAULT_MAX_TOKENS == 512
        need += estimate_vram(read_model_info(m.path), n_ctx=m.ctx, n_parallel=m.parallel, on_cpu=True).total_mib
    assert need < int(DEMO_GPU_SPEC.rsplit(":", 1)[1])
    # A model the operator defines under a demo name is kept as defined.
    mine = ModelConfig(name=BASE, path=str(gemma_path), ctx=512)
    again = with_demo(Settings(node=NodeConfig(state_dir=str(state_dir)), models=(mine,)))
    assert [m for m in again.models if m.name == BASE] == [mine]


# -- a real `--demo` node ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("demo")
    # Reuse the session's assembled Gemma (the demo would otherwise assemble it again in its state dir).
    models = tmp / "node-state" / "models"
    models.mkdir(parents=True)
    for f in (gemma_path, gemma_path.with_suffix(".sha256")):
        (models / f.name).symlink_to(f)
    with serving(tmp, "--demo", models=(CHAT, BASE)) as n:
        yield n


@pytest.fixture(scope="module")
def client(demo):
    return openai.OpenAI(base_url=demo.api, api_key="unused", max_retries=0, timeout=280)


def test_demo_lists_and_places_both_models(demo, client):
    assert sorted(m.id for m in client.models.list()) == sorted([BASE, CHAT])
    view = demo.cluster()
    gpus = view["nodes"][0]["gpus"]
    assert len(gpus) == 1 and gpus[0]["simulated"] is True
    for m in view["models"]:
        assert m["state"] == "ready", m
        [replica] = m["replicas"]
        assert replica["state"] == "ready" and replica["vram_mib"] > 0


def test_demo_chat_model_answers_and_stops(client):
    """No max_tokens, no sampling parameters: what a chat UI sends. The answer ends on its own."""
    r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "What is the capital of France?"}])
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    assert choice.message.content.strip()
    assert 0 < r.usage.completion_tokens < DEFAULT_MAX_TOKENS


def test_demo_replica_runs_four_requests_at_once(client):
    """Four streams on the one replica of the base model: every first token arrives before any stream
    ends (one slot would run them one after another)."""
    n, first, end, errors = 4, {}, {}, []

    def run(i: int) -> None:
        try:
            stream = client.completions.create(model=BASE, prompt=COUNTING, max_tokens=16, temperature=0,
                                               stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text and i not in first:
                    first[i] = time.monotonic()
            end[i] = time.monotonic()
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(first) == len(end) == n
    assert max(first.values()) < min(end.values()), (first, end)


# -- the budget on a node that sets it --------------------------------------------------------------
@pytest.fixture(scope="module")
def budget_node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("budget")
    cfg = tmp / "node.toml"
    cfg.write_text(f"""
[node]
max_tokens_default = 12

[[models]]
name = "{BASE}"
path = "{gemma_path}"
ctx = 512

[[models]]
name = "capped"
path = "{gemma_path}"
ctx = 512
max_tokens_default = 6
max_tokens_ceiling = 9
""")
    with serving(tmp, "--config", str(cfg), "--simulate-gpu", "g0:4096", models=(BASE, "capped")) as n:
        yield openai.OpenAI(base_url=n.api, api_key="unused", max_retries=0, timeout=280)


def test_request_without_max_tokens_ends_by_the_default(budget_node):
    """The base model never stops on its own: without max_tokens it writes exactly the node's default."""
    r = budget_node.completions.create(model=BASE, prompt=COUNTING, max_tokens=None, temperature=0)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (12, "length")
    chat = budget_node.chat.completions.create(model=BASE, messages=[{"role": "user", "content": COUNTING}],
                                               temperature=0)
    assert chat.usage.completion_tokens <= 12
    assert chat.choices[0].finish_reason == "stop" or chat.usage.completion_tokens == 12


def test_model_default_and_ceiling(budget_node):
    r = budget_node.completions.create(model="capped", prompt=COUNTING, max_tokens=None, temperature=0)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (6, "length")
    r = budget_node.completions.create(model="capped", prompt=COUNTING, max_tokens=1000, temperature=0)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (9, "length")  # clamped, not refused
    r = budget_node.completions.create(model="capped", prompt=COUNTING, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
