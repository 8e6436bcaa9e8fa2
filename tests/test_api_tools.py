"""Tools, structured outputs, logprobs, n, logit_bias and echo on a real node, through the official client.

The node serves the real Gemma 3 270M (no chat template of its own: the generic tool format) and a copy
of it whose GGUF carries a Hermes/Qwen-style template with tools (the native `<tool_call>` format). The
model is tiny: tests check shapes, grammars and protocol, never what it says.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import openai
import pytest

from tests.nodeproc import serving

MODEL, NATIVE = "gemma-3-270m", "gemma-hermes"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["c", "f"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                           "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}]

# A Qwen 2.5-style template (tools in <tools>, calls in <tool_call>, results in <tool_response>) with
# Gemma's turn tokens, so the Gemma weights see their own control tokens.
HERMES_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<start_of_turn>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}</tools>\nFor each call return <tool_call>\n{\"name\": <name>, \"arguments\": <args>}\n"
    "</tool_call><end_of_turn>\n{% endif %}{% for m in messages %}"
    "{% if m.role == 'assistant' %}<start_of_turn>model\n{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
    "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n"
    "</tool_call>{% endfor %}<end_of_turn>\n"
    "{% elif m.role == 'tool' %}<start_of_turn>user\n<tool_response>\n{{ m.content }}\n</tool_response><end_of_turn>\n"
    "{% else %}<start_of_turn>user\n{{ m.content }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("tools")
    hermes = tmp / "gemma-hermes.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(gemma_path), str(hermes),
                    "--chat-template", HERMES_TEMPLATE, "--force"], check=True, capture_output=True)
    with serving(tmp, "--model", f"{MODEL}={gemma_path}:2048", "--model", f"{NATIVE}={hermes}:2048",
                 "--simulate-gpu", "testgpu:4096", models=(MODEL, NATIVE)) as n:
        yield n


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=node.api, api_key="unused", max_retries=0, timeout=300)


def _assert_weather_call(call):
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


@pytest.mark.parametrize("model", [MODEL, NATIVE])
def test_named_function_is_enforced_with_schema_valid_arguments(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert len(c.message.tool_calls) == 1
    _assert_weather_call(c.message.tool_calls[0])


def test_required_call_streams_like_openai_and_matches_the_whole_answer(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              max_tokens=60, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    first_pieces = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        d = chunk.choices[0]
        finish = d.finish_reason or finish
        for tc in d.delta.tool_calls or []:
            if tc.index not in calls:
                first_pieces.append(tc)
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
            else:
                assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments
    assert finish == "tool_calls"
    assert all(p.id and p.id.startswith("call_") and p.type == "function" for p in first_pieces)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in whole]


@pytest.mark.parametrize("model", [MODEL, NATIVE])
def test_tool_round_trip(client, model):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'}]
    r = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 20


def test_auto_and_none_answer(client):
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                           max_tokens=10, temperature=0)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length", "tool_calls")
        assert (c.message.content is not None) or c.message.tool_calls
        if choice == "none":
            assert not c.message.tool_calls


def test_json_schema_output_validates(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "tags", "size"],
              "properties": {"name": {"type": "string", "maxLength": 16},
                             "tags": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/tag"}},
                             "size": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
              "$defs": {"tag": {"enum": ["red", "blue"]}}}
    for temperature in (0, 0.9):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe a ball."}], max_tokens=80,
            temperature=temperature, seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "ball", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_bad_requests_name_the_field(client):
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "patternProperties": {}}}}), "response_format.json_schema.schema"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}}}),
         "response_format.json_schema.schema.properties.n"),
        (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools[0].function.name"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "launch"}}), "tool_choice"),
        (dict(messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]),
         "messages[0].content[1]"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**{"model": MODEL, "messages": ASK, "max_tokens": 2, **extra})
        body = err.value.body
        assert body["param"] == param, body
        assert err.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hello " * 3000, max_tokens=2)
    assert err.value.body["param"] == "prompt" and "context length" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, extra_body={"tool_choise": "auto"})
    assert "tool_choise" in err.value.body["message"]


def test_accepted_and_ignored_parameters(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, store=False, metadata={"a": "b"},
                                       service_tier="auto", user="u1", reasoning_effort="low",
                                       modalities=["text"], prediction={"type": "content", "content": "x"},
                                       parallel_tool_calls=True, tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    text = ""
    for e in lp:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.token == e.top_logprobs[0].token  # temperature 0 picks the most likely token
        assert abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert sum(2.718281828 ** t.logprob for t in e.top_logprobs) <= 1.0 + 1e-6
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        text += e.token
    assert text == r.choices[0].message.content
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0,
                                                logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += [e.token for e in chunk.choices[0].logprobs.content]
    assert streamed == [e.token for e in lp]


def test_completions_echo_scores_the_prompt(client):
    prompt = "The capital of France is Paris."
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text == prompt and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == r.usage.prompt_tokens == len(lp.text_offset)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    g = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=0, temperature=0)
    assert g.choices[0].text.startswith(prompt)
    assert len(g.choices[0].logprobs.tokens) == g.usage.prompt_tokens + g.usage.completion_tokens


def test_n_choices_and_seed(client):
    kw = dict(model=MODEL, messages=ASK, max_tokens=6, temperature=1.0, n=2, seed=11)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    seen = set()
    for chunk in client.chat.completions.create(**kw, stream=True):
        seen |= {c.index for c in chunk.choices}
    assert seen == {0, 1}


def test_logit_bias_is_applied(client):
    kw = dict(model=MODEL, prompt="Hello, my name is", max_tokens=3, temperature=0)
    assert client.completions.create(**kw).usage.completion_tokens == 3
    # Token 1 is Gemma's <eos>: pushed to the top, the answer ends at once.
    r = client.completions.create(**kw, logit_bias={"1": 100})
    assert r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "stop"


def test_user_text_cannot_forge_turns(client):
    forged = "<start_of_turn>" * 50
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": forged}], max_tokens=1)
    # As control tokens these would be 50 tokens; as text each is several.
    assert r.usage.prompt_tokens > 150
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "<eos>a" * 40_000}],
                                       max_tokens=1)
    assert err.value.body["param"] == "messages"


def test_openai_sdk_parse_helper(client):
    """The SDK's pydantic helper: a strict json_schema request, parsed back into the model."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str
        coastal: bool

    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe Lisbon."}],
                                      response_format=City, max_tokens=60, temperature=0)
    assert isinstance(r.choices[0].message.parsed, City)


def test_langchain_structured_output_and_tools(node):
    """LangChain's ChatOpenAI, as agents and extraction code use it."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        """A person mentioned in the text."""

        name: str = Field(description="full name")
        job: str

    llm = ChatOpenAI(model=MODEL, base_url=node.api, api_key="unused", temperature=0, max_tokens=60,
                     max_retries=0, timeout=300)
    got = llm.with_structured_output(Person, method="json_schema", strict=True).invoke(
        "Ada Lovelace was a mathematician.")
    assert isinstance(got, Person)

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    msg = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False).invoke(
        "Weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert isinstance(msg.tool_calls[0]["args"]["city"], str)
