"""A stream whose worker is killed (kill -9) mid-way goes on from the other replica, through the official
openai client; and `continue_final_message`, which the resume uses, works on the real model."""

from __future__ import annotations

import os
import signal
import time

import openai
import pytest

from tests.nodeproc import serving

MODEL = "gemma-3-270m"
PROMPT = "Here is a long story about a dragon who lived in a cave by the sea. Once upon a time"


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = tmp / "node.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 1024\n'
                   "min_replicas = 2\nmax_replicas = 2\n")
    with serving(tmp, "--config", str(cfg), "--simulate-gpu", "g0:2048", "--simulate-gpu", "g1:2048",
                 models=(MODEL,)) as n:
        both_ready(n)
        yield n


def both_ready(node, timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reps = node.cluster()["models"][0]["replicas"]
        if len(reps) == 2 and all(r["state"] == "ready" for r in reps):
            return reps
        time.sleep(0.2)
    raise TimeoutError(f"two ready replicas: {node.cluster()['models'][0]['replicas']}")


def kill_replica_midway(node, create, pieces_before_kill: int = 6):
    """Start a stream, kill -9 the worker serving it after a few pieces, read the rest."""
    reps = {f"{r['node']}/{r['key']}": r for r in both_ready(node)}
    with create() as raw:
        served_by = raw.headers["X-AIvailable-Replica"]
        pieces, finish, usage = [], None, None
        killed_after = None
        for chunk in raw.parse():
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                piece = c.text if hasattr(c, "text") else c.delta.content
                if piece:
                    pieces.append(piece)
                finish = c.finish_reason or finish
            if killed_after is None and len(pieces) >= pieces_before_kill:
                killed_after = "".join(pieces)
                os.kill(reps[served_by]["pid"], signal.SIGKILL)
    assert killed_after is not None, "the stream ended before the kill"
    return killed_after, "".join(pieces), finish, usage, served_by


def test_completion_stream_survives_kill_9_of_its_worker(node):
    client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0)
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
    whole = client.completions.create(**args)
    killed_after, text, finish, usage, served_by = kill_replica_midway(
        node, lambda: client.completions.with_streaming_response.create(
            **args, stream=True, stream_options={"include_usage": True}))
    assert text.startswith(killed_after) and len(text) > len(killed_after)
    assert finish == whole.choices[0].finish_reason
    assert text == whole.choices[0].text  # greedy: the other replica continues exactly where it broke
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert abs(usage.completion_tokens - whole.usage.completion_tokens) <= 2
    assert "the stream goes on from" in node.log() and served_by in node.log()


def test_chat_stream_survives_kill_9_of_its_worker(node):
    client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    killed_after, text, finish, _, _ = kill_replica_midway(
        node, lambda: client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=messages, max_tokens=40, temperature=0, stream=True))
    assert text.startswith(killed_after) and len(text) > len(killed_after) and finish in ("stop", "length")


def test_continue_final_message_continues_the_assistant_turn(node):
    client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0)
    both_ready(node)
    messages = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=30, temperature=0, stream=True)
        if c.choices and c.choices[0].delta.content]
    head = "".join(pieces[:12])  # cut between tokens, as a broken stream is
    rest = client.chat.completions.create(
        model=MODEL, messages=[*messages, {"role": "assistant", "content": head}], max_tokens=30 - 12,
        temperature=0, extra_body={"continue_final_message": True})
    assert head + rest.choices[0].message.content == "".join(pieces)


def test_continue_final_message_needs_an_assistant_message_last(node):
    client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"continue_final_message": True})
    assert err.value.body["param"] == "continue_final_message"
    assert "last message to be from the assistant" in err.value.body["message"]
