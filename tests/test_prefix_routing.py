"""Prefix-aware routing on three real nodes: every entry node sends a conversation to the same replica,
a hot conversation overflows to others, and cached prompt tokens are counted exactly."""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import time
import urllib.request

import openai
import pytest

from aivailable.engine.batch import PROMPT_CHUNK
from tests.nodeproc import NodeProc, start_cluster

MODEL = "gemma-3-270m"
SECRET = "prefix-routing-test-secret-0123456789"
SYSTEM = "You are a helpful travel agent. Answer in one short sentence. " * 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, gemma_path):
    """Three nodes, one replica of the model on each (2 slots)."""
    tmp = tmp_path_factory.mktemp("prefix")
    cfg = tmp / "models.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 2048\nparallel = 2\n'
                   "min_replicas = 3\nmax_replicas = 3\n")
    nodes = start_cluster(tmp, cfg, SECRET)
    try:
        yield nodes
    finally:
        for n in nodes:
            with contextlib.suppress(Exception):
                n.kill_group()


def client(n: NodeProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=n.api, api_key="x", max_retries=0, timeout=240)


def ask(n: NodeProc, messages: list, max_tokens: int = 4):
    raw = client(n).chat.completions.with_raw_response.create(model=MODEL, messages=messages,
                                                               max_tokens=max_tokens, temperature=0)
    return raw.headers["X-AIvailable-Replica"], raw.parse()


def conversation(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Trip number {i}: where to?"}]


@pytest.mark.timeout(900)  # 24 requests on a shared CPU
def test_every_entry_node_sends_a_conversation_to_the_same_replica(cluster):
    replicas = set()
    for i in range(6):
        msgs = conversation(i)
        seen = {ask(n, msgs)[0] for n in cluster}
        assert len(seen) == 1, f"conversation {i} went to {seen}"
        # The next turn (history appended, content as text parts) through another node: same replica.
        turn2 = [*msgs, {"role": "assistant", "content": "Lisbon."},
                 {"role": "user", "content": [{"type": "text", "text": "And after that?"}]}]
        assert ask(cluster[(i + 1) % 3], turn2)[0] in seen
        replicas |= seen
    assert len(replicas) >= 2, "six conversations all hashed to one replica"


@pytest.mark.timeout(600)
def test_a_hot_conversation_overflows_past_its_full_replica(cluster):
    msgs = conversation(100)
    home = ask(cluster[0], msgs)[0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        used = list(pool.map(lambda _: ask(cluster[0], msgs, max_tokens=24)[0], range(8)))
    assert home in used and len(set(used)) >= 2, used  # 2 slots per replica: 8 at once cannot all stay home


def metric(n: NodeProc, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(n.url + "/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_cached_prompt_tokens_are_counted_exactly(cluster):
    msgs = [{"role": "system", "content": SYSTEM * 3 + " Also mention the weather."},  # > 2 reuse chunks
            {"role": "user", "content": "Where should I go in May?"}]
    home, first = ask(cluster[1], msgs)
    node = next(n for n in cluster if home.startswith(n.cluster()["node_id"] + "/"))
    before = metric(node, "aivailable_prompt_tokens_cached_total", model=MODEL)
    again_home, again = ask(cluster[2], msgs)
    assert again_home == home
    n_prompt = first.usage.prompt_tokens
    assert n_prompt > PROMPT_CHUNK
    # The engine reuses whole chunks of the prompt it computed, never the last token (engine/batch.py).
    want = min(n_prompt // PROMPT_CHUNK * PROMPT_CHUNK, n_prompt - 1) // PROMPT_CHUNK * PROMPT_CHUNK
    assert again.usage.prompt_tokens == n_prompt
    assert again.usage.prompt_tokens_details.cached_tokens == want
    deadline = time.monotonic() + 10
    while metric(node, "aivailable_prompt_tokens_cached_total", model=MODEL) < before + want:
        assert time.monotonic() < deadline, "the cached-token metric did not count the reuse"
        time.sleep(0.3)
    view = cluster[0].cluster()
    deadline = time.monotonic() + 10
    while not (view["models"][0].get("cached_tokens") or 0) >= want:
        assert time.monotonic() < deadline, f"/api/cluster shows no cached tokens: {view['models'][0]}"
        time.sleep(0.5)
        view = cluster[0].cluster()
    assert 0 < view["models"][0]["cache_hit_rate"] <= 1


def test_routing_choices_are_exported(cluster):
    text = urllib.request.urlopen(cluster[0].url + "/metrics", timeout=5).read().decode()
    prefix = re.search(r'^aivailable_routing_choices_total\{how="prefix"\} (\S+)$', text, re.M)
    assert prefix and float(prefix.group(1)) > 0
