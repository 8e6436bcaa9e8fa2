"""The OpenAI API of a real node process serving the real Gemma 3 270M model, via the official client."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from tests.nodeproc import serving

MODEL = "gemma-3-270m"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("api")
    with serving(tmp, "--model", f"{MODEL}={gemma_path}:2048", "--simulate-gpu", "testgpu:4096", models=(MODEL,)) as n:
        yield n


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=node.api, api_key="unused", max_retries=0, timeout=120)


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_non_streaming_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    # The rendered Gemma prompt: <bos><start_of_turn>user\n ... <end_of_turn>\n<start_of_turn>model\n
    assert 10 <= u.prompt_tokens <= 30
    assert 1 <= u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if choice.finish_reason == "length":
        assert u.completion_tokens == 12


def test_max_completion_tokens_wins(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=50, max_completion_tokens=3,
                                       temperature=0)
    assert r.usage.completion_tokens <= 3


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert 1 <= usage.completion_tokens <= 16
    # Same prompt, same greedy decoding: the stream and the plain response agree exactly.
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert plain.choices[0].message.content == text
    assert plain.usage.completion_tokens == usage.completion_tokens
    assert plain.usage.prompt_tokens == usage.prompt_tokens


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True))
    assert all(c.choices for c in chunks)
    assert all(getattr(c, "usage", None) is None for c in chunks)


def test_seed_makes_sampling_repeatable(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_stop_sequence_not_in_output(client):
    # Greedy output without a stop, then cut at a character that occurs in it.
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert "," in text, text
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[","])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text.split(",")[0]


def test_completions_plain_and_stream(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens >= 5
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_json_mode_gives_json(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give a JSON object with a key 'color'."}],
        response_format={"type": "json_object"}, max_tokens=30, temperature=0)
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_system_message_reaches_gemma_prompt(client):
    """Gemma has no system role; the system text is folded into the first user turn, not dropped."""
    with_sys = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "You are terse."}, *CHAT], max_tokens=1)
    without = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    assert with_sys.usage.prompt_tokens > without.usage.prompt_tokens


def test_async_concurrent_streams(node):
    async def one(aclient, i):
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=10,
            stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        return chunks[-1].usage

    async def main():
        async with openai.AsyncOpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=180) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(4)))

    usages = asyncio.run(main())
    assert len(usages) == 4
    assert all(u is not None and 1 <= u.completion_tokens <= 10 for u in usages)


def test_context_overflow_is_400(client):
    long_prompt = "word " * 3000
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert "context length" in e.value.message


def test_status_api_shape(node):
    view = node.cluster()
    assert view["node_id"] and view["leader"] == view["node_id"]
    gpu = view["nodes"][0]["gpus"][0]
    assert gpu["name"] == "testgpu" and gpu["simulated"] is True and gpu["vram_total_mib"] == 4096
    assert 100 < gpu["vram_used_mib"] < 4096
    assert [m["name"] for m in gpu["models"]] == [MODEL]
    model = view["models"][0]
    assert model["state"] == "ready" and model["replicas"][0]["state"] == "ready"
    assert model["requests"] >= 1
