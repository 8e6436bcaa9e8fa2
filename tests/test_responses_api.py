"""The Responses API (`POST /v1/responses`): its conversions to and from chat completions, checked against
the official client's types, and end to end on a real node with the official `openai` client."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from aivailable.api.responses_api import (
    SSEDecoder,
    StreamConverter,
    StreamError,
    chat_body,
    client_param,
    renamed_error,
    response_from_chat,
    sse_event,
)
from aivailable.api.responses_endpoint import loopback_url
from aivailable.api.responses_schema import parse_responses_request
from aivailable.errors import InvalidRequest
from tests.nodeproc import free_port, serving, start_node

MODEL = "gemma-3-270m"
EVENT = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}, "strict": True}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}


def ids():
    """Deterministic ids: msg_1, fc_2, ..."""
    counter = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(counter)}"


def req(**body):
    return parse_responses_request({"model": MODEL, **body})


# ---- request -> chat body ----------------------------------------------------------------------------


def test_string_input_with_instructions_and_sampling():
    body, origins = chat_body(req(input="Hello", instructions="Be brief.", temperature=0.2, top_p=0.9,
                                  max_output_tokens=7, user="u1", store=True, metadata={"k": "v"},
                                  reasoning={"effort": "low"}, truncation="disabled", stream=True))
    assert body == {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hello"}],
                    "temperature": 0.2, "top_p": 0.9, "max_completion_tokens": 7, "user": "u1",
                    "stream": True, "stream_options": {"include_usage": True}}
    assert origins == ["instructions", "input"]


def test_items_with_function_calls_and_their_outputs_become_chat_turns():
    replayed = {"id": "msg_9", "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "Let me look.", "annotations": [], "logprobs": []}]}
    body, origins = chat_body(req(
        input=[{"role": "developer", "content": "Use tools."},
               {"type": "message", "role": "user", "content": [
                   {"type": "input_text", "text": "Weather and time in Oslo?"},
                   {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]},
               replayed,
               {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "get_weather",
                "arguments": '{"city":"Oslo"}', "status": "completed"},
               {"type": "function_call", "call_id": "call_b", "name": "get_time", "arguments": "{}"},
               {"type": "function_call_output", "call_id": "call_a", "output": "12 C"},
               {"type": "function_call_output", "call_id": "call_b",
                "output": [{"type": "input_text", "text": "10:"}, {"type": "input_text", "text": "00"}]}],
        tools=[WEATHER, TIME], tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}}))
    assert body["messages"] == [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "Weather and time in Oslo?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                                         "detail": "low"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}], "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "12 C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "10:00"}]
    assert origins == ["input[0]", "input[1]", "input[2]", "input[5]", "input[6]"]
    assert body["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                          "parameters": WEATHER["parameters"], "strict": True}},
        {"type": "function", "function": {"name": "get_time", "parameters": TIME["parameters"]}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object"}, "strict": True}}
    assert "stream" not in body


def test_a_function_call_without_a_preceding_answer_opens_an_assistant_turn():
    body, _ = chat_body(req(input=[{"role": "user", "content": "t?"},
                                   {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{}"},
                                   {"type": "function_call_output", "call_id": "c1", "output": "noon"},
                                   {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"}],
                            tools=[TIME], tool_choice="auto"))
    assert [(m["role"], m.get("content"), len(m.get("tool_calls", []))) for m in body["messages"]] == [
        ("user", "t?", 0), ("assistant", None, 1), ("tool", "noon", 0), ("assistant", None, 1)]
    assert body["tool_choice"] == "auto"


def test_without_tools_tool_settings_are_left_out_or_refused():
    body, _ = chat_body(req(input="hi", tools=[], tool_choice="auto", parallel_tool_calls=True,
                            text={"format": {"type": "text"}}))
    assert set(body) == {"model", "messages"}
    with pytest.raises(InvalidRequest) as e:
        chat_body(req(input="hi", tool_choice="required"))
    assert e.value.param == "tool_choice"
    with pytest.raises(InvalidRequest) as e:
        chat_body(req(input="hi", tools=[TIME], tool_choice={"type": "function", "name": "get_weather"}))
    assert e.value.param == "tool_choice.name" and "get_time" in e.value.message
    body, _ = chat_body(req(input="hi", text={"format": {"type": "json_object"}}))
    assert body["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize("body,param,words", [
    ({"input": "x", "temprature": 1}, "temprature", "Unrecognized request argument supplied: temprature"),
    ({"input": [{"role": "user", "content": "x", "nmae": "a"}]}, "input[0].nmae", "Unrecognized"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "txt": "x"}]}]}, "input[0].content[0].text",
     "Missing"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "message, function_call"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "'user'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
     "input[0].content[0].file_id", "no Files API"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
    ({"input": "x", "conversation": "conv_1"}, "conversation", "stateless"),
    ({"input": "x", "truncation": "auto"}, "truncation", "'disabled'"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type", "'function'"),
    ({"input": "x", "tools": [TIME, TIME]}, "tools", "unique"),
    ({"input": "x", "tool_choice": {"type": "function"}}, "tool_choice.name", "Missing"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}}, "text.format.name",
     "pattern"),
    ({"input": []}, "input", "empty"),
    ({}, "input", "Missing required parameter: 'input'"),
])
def test_bad_requests_name_the_field(body, param, words):
    with pytest.raises(InvalidRequest) as e:
        parse_responses_request({"model": MODEL, **body})
    assert e.value.param == param and words in e.value.message, e.value.message


def test_chat_error_params_are_renamed_to_the_clients_fields():
    origins = ["instructions", "input[0]", "input[2]"]
    assert client_param("messages[2].content", origins) == "input[2].content"
    assert client_param("messages[0]", origins) == "instructions"
    assert client_param("response_format.type", origins) == "text.format.type"
    assert client_param("max_completion_tokens", origins) == "max_output_tokens"
    assert client_param("tools", origins) == "tools" and client_param(None, origins) is None
    assert client_param("messages[9].content", origins) == "messages[9].content"


def test_chat_error_bodies_come_back_with_the_clients_names():
    raw = json.dumps({"error": {"message": "Invalid value for 'response_format.type': Input should be 'text' or "
                                           "'json_object' (got 'json_schema').", "type": "invalid_request_error",
                                "param": "response_format.type", "code": None}}).encode()
    assert renamed_error(raw, ["input"]) == {"error": {
        "message": "Invalid value for 'text.format.type': Input should be 'text' or 'json_object' (got 'json_schema').",
        "type": "invalid_request_error", "param": "text.format.type", "code": None}}
    raw = json.dumps({"error": {"message": "no", "type": "service_unavailable", "param": None,
                                "code": "model_not_ready"}}).encode()
    assert renamed_error(raw, []) == json.loads(raw)
    assert renamed_error(b"<html>bad gateway</html>", []) is None and renamed_error(b'{"error": 1}', []) is None


def test_loopback_url_of_wildcard_and_ipv6_listeners():
    assert loopback_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert loopback_url("::", 8000) == "http://[::1]:8000"
    assert loopback_url("127.0.0.3", 1) == "http://127.0.0.3:1"
    assert loopback_url("fe80::1", 2) == "http://[fe80::1]:2"


# ---- chat completion -> Response ---------------------------------------------------------------------


def test_chat_completion_with_tool_calls_becomes_function_call_items():
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL, "choices": [{
        "index": 0, "finish_reason": "tool_calls", "logprobs": None,
        "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "call_y", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42,
                  "prompt_tokens_details": {"cached_tokens": 16}}}
    r = response_from_chat(req(input="w?", tools=[WEATHER, TIME], tool_choice="required", metadata={"a": "b"}),
                           completion, resp_id="resp_1", created_at=100, completed_at=101, ids=ids())
    assert r["output"] == [
        {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_x", "name": "get_weather",
         "arguments": '{"city":"Oslo"}'},
        {"id": "fc_2", "type": "function_call", "status": "completed", "call_id": "call_y", "name": "get_time",
         "arguments": "{}"}]
    assert r["status"] == "completed" and r["incomplete_details"] is None and r["completed_at"] == 101
    assert r["usage"] == {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 16, "cache_write_tokens": 0},
                          "output_tokens": 12, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 42}
    assert r["tools"][0] == {**WEATHER} and r["tool_choice"] == "required" and r["metadata"] == {"a": "b"}
    assert "output_text" not in r and r["store"] is False and r["previous_response_id"] is None
    parsed = Response.model_validate(r)  # the official client's type, validated
    assert [o.call_id for o in parsed.output] == ["call_x", "call_y"] and parsed.output_text == ""


def test_chat_completion_cut_by_length_is_incomplete():
    completion = {"choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant",
                                                                                  "content": "Red, gr"}}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    r = response_from_chat(req(input="colors", max_output_tokens=3, instructions="x"), completion, resp_id="resp_2",
                           created_at=1, completed_at=2, ids=ids())
    assert r["status"] == "incomplete" and r["incomplete_details"] == {"reason": "max_output_tokens"}
    assert r["output"] == [{"id": "msg_1", "type": "message", "status": "incomplete", "role": "assistant",
                            "content": [{"type": "output_text", "text": "Red, gr", "annotations": [], "logprobs": []}]}]
    parsed = Response.model_validate(r)
    assert parsed.output_text == "Red, gr" and parsed.instructions == "x" and parsed.max_output_tokens == 3


# ---- chat stream -> Responses events -----------------------------------------------------------------

# Recorded from a node (Gemma 3 270M, "Say hi.", max_completion_tokens 5, include_usage); ids shortened.
RECORDED_TEXT = b"".join(b"data: " + line.encode() + b"\n\n" for line in [
    '{"id":"chatcmpl-66","object":"chat.completion.chunk","created":1796404260,"model":"gemma-3-270m",'
    '"system_fingerprint":null,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    '"finish_reason":null}],"usage":null}',
    *('{"id":"chatcmpl-66","object":"chat.completion.chunk","created":1796404260,"model":"gemma-3-270m",'
      '"system_fingerprint":null,"choices":[{"index":0,"delta":{"content":"TOKEN"},"logprobs":null,'
      '"finish_reason":null}],"usage":null}'.replace('"TOKEN"', json.dumps(t))
      for t in ["Say", " hi", ".", " mendatang", "user"]),
    '{"id":"chatcmpl-66","object":"chat.completion.chunk","created":1796404260,"model":"gemma-3-270m",'
    '"system_fingerprint":null,"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}],'
    '"usage":null}',
    '{"id":"chatcmpl-66","object":"chat.completion.chunk","created":1796404260,"model":"gemma-3-270m",'
    '"system_fingerprint":null,"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}',
    "[DONE]"])


def run_stream(raw: bytes, request, piece: int = 7) -> list[dict]:
    """Feed `raw` SSE bytes in `piece`-byte slices through the decoder and the converter."""
    conv = StreamConverter(request, "resp_s", 50, ids=ids())
    dec = SSEDecoder()
    events = conv.start()
    for i in range(0, len(raw), piece):
        for payload in dec.feed(raw[i:i + piece]):
            if payload == "[DONE]":
                events += conv.finish(60)
            elif "error" in (chunk := json.loads(payload)):
                events += conv.fail(chunk["error"]["message"], chunk["error"]["code"])
            else:
                events += conv.feed(chunk)
    assert conv.ended
    for e in events:
        EVENT.validate_python(e)  # every event parses as the official client's type
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_recorded_text_stream_gives_the_documented_event_sequence():
    events = run_stream(RECORDED_TEXT, req(input="Say hi.", max_output_tokens=5, stream=True))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 5, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.incomplete"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    added = events[2]
    assert added["item"] == {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant",
                             "content": []}
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(d["item_id"] == "msg_1" and d["output_index"] == 0 and d["content_index"] == 0
               and d["logprobs"] == [] for d in deltas)
    text = "".join(d["delta"] for d in deltas)
    assert text == "Say hi. mendatanguser" == events[9]["text"] == events[10]["part"]["text"]
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"] == [events[11]["item"]] and events[11]["item"]["status"] == "incomplete"
    assert final["usage"]["input_tokens"] == 12 and final["usage"]["output_tokens"] == 5
    assert Response.model_validate(final).output_text == text
    # As bytes on the wire: `event: TYPE` then the JSON.
    assert sse_event(events[4]).startswith(b"event: response.output_text.delta\ndata: {")


def _chunk(delta: dict, finish: str | None = None) -> str:
    return json.dumps({"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})


def _sse(*payloads: str) -> bytes:
    return b"".join(f"data: {p}\n\n".encode() for p in payloads)


TOOL_STREAM = _sse(
    _chunk({"role": "assistant", "content": "Checking."}),
    _chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]}),
    _chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"}}]}),
    _chunk({}, "tool_calls"),
    json.dumps({"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "choices": [],
                "usage": {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60}}),
    "[DONE]")


def test_streamed_tool_call_deltas_give_function_call_events():
    events = run_stream(TOOL_STREAM, req(input="w?", tools=[WEATHER, TIME], stream=True), piece=11)
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.created", None), ("response.in_progress", None),
        ("response.output_item.added", 0), ("response.content_part.added", 0), ("response.output_text.delta", 0),
        ("response.output_text.done", 0), ("response.content_part.done", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.delta", 1), ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2), ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2), ("response.output_item.done", 2),
        ("response.completed", None)]
    assert events[8]["item"] == {"id": "fc_2", "type": "function_call", "status": "in_progress", "call_id": "call_a",
                                 "name": "get_weather", "arguments": ""}
    assert events[11]["arguments"] == '{"city":"Oslo"}' and events[11]["item_id"] == "fc_2"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["completed_at"] == 60
    assert [(o["type"], o.get("call_id"), o.get("arguments"), o["status"]) for o in final["output"]] == [
        ("message", None, None, "completed"), ("function_call", "call_a", '{"city":"Oslo"}', "completed"),
        ("function_call", "call_b", "{}", "completed")]
    assert final["output"][1:] == [events[12]["item"], events[16]["item"]]
    assert final["usage"]["total_tokens"] == 60


def test_error_mid_stream_gives_error_then_response_failed():
    raw = _sse(_chunk({"role": "assistant", "content": "Hel"}),
               json.dumps({"error": {"message": "the replica failed", "type": "server_error", "param": None,
                                     "code": "upstream_failed"}}))
    events = run_stream(raw, req(input="x", stream=True))
    assert [e["type"] for e in events][-3:] == ["response.output_text.delta", "error", "response.failed"]
    assert events[-2]["message"] == "the replica failed" and events[-2]["code"] == "upstream_failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {"code": "server_error",
                                                                "message": "the replica failed"}
    assert failed["output"][0]["status"] == "incomplete" and failed["output"][0]["content"][0]["text"] == "Hel"


def test_empty_answer_is_still_a_message():
    raw = _sse(_chunk({"role": "assistant", "content": ""}), _chunk({}, "stop"), "[DONE]")
    events = run_stream(raw, req(input="x", stream=True))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "" and events[-1]["response"]["usage"] is None


def test_a_tool_call_continued_after_the_next_began_is_a_protocol_error():
    conv = StreamConverter(req(input="x", tools=[TIME, WEATHER]), "resp_e", 1, ids=ids())
    conv.feed(json.loads(_chunk({"tool_calls": [{"index": 0, "id": "c0", "function": {"name": "get_time"}}]})))
    conv.feed(json.loads(_chunk({"tool_calls": [{"index": 1, "id": "c1", "function": {"name": "get_weather"}}]})))
    with pytest.raises(StreamError):
        conv.feed(json.loads(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})))
    with pytest.raises(StreamError):
        conv.feed(json.loads(_chunk({"tool_calls": [{"index": 2, "function": {"arguments": "{}"}}]})))


# ---- end to end: a real node, the official client ------------------------------------------------------

PROMPT = "Say hi."


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("responses")
    with serving(tmp, "--model", f"{MODEL}={gemma_path}:1024", "--simulate-gpu", "testgpu:4096",
                 models=(MODEL,)) as n:
        yield n


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=node.api, api_key="unused", max_retries=0, timeout=120)


def test_non_streamed_response_matches_the_chat_answer(client):
    r = client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=24, temperature=0)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                          max_completion_tokens=24, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text and r.output_text == chat.choices[0].message.content
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert r.usage.input_tokens == chat.usage.prompt_tokens and 1 <= r.usage.output_tokens <= 24
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.temperature == 0 and r.max_output_tokens == 24 and r.previous_response_id is None


def test_streamed_events_in_order_and_deltas_make_the_final_text(client):
    stream = client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=24, temperature=0, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          events[-1].type] and events[-1].type in ("response.completed", "response.incomplete")
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text and final.output_text == text == events[-4].text
    assert final.id == events[0].response.id and final.usage.output_tokens <= 24
    plain = client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=24, temperature=0)
    assert plain.output_text == text and plain.usage.input_tokens == final.usage.input_tokens


def test_stream_helper_accepts_the_event_stream(client):
    """The SDK's helper checks item identities and indexes as it assembles the Response."""
    with client.responses.stream(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "Say"}, {"type": "input_text", "text": " hi."}]}],
            max_output_tokens=12, temperature=0) as stream:
        events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas and done.text == deltas
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete") and last.response.output_text == deltas


def test_instructions_become_the_system_turn(client):
    r = client.responses.create(model=MODEL, input=PROMPT, instructions="Answer in French.", max_output_tokens=8,
                                temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_completion_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": PROMPT}])
    assert r.instructions == "Answer in French."
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == chat.choices[0].message.content


def test_max_output_tokens_gives_an_incomplete_response(client):
    r = client.responses.create(model=MODEL, input="Count from one to fifty.", max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"


def test_stateless_and_unknown_fields_are_400s_naming_them(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id" and "stateless" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", extra_body={"max_tokens": 5})
    assert e.value.body == {"message": "Unrecognized request argument supplied: max_tokens",
                            "type": "invalid_request_error", "param": "max_tokens", "code": None}
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="no-such-model", input="x")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"


def test_a_client_leaving_mid_stream_cancels_the_generation(node, client):
    def cancelled() -> int:
        return sum(r["cancelled"] for m in node.cluster()["models"] for r in m["replicas"])

    before = cancelled()
    stream = client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=1000, stream=True)
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    stream.close()  # ~1000 tokens would take minutes here; the loopback chat request goes with the client
    deadline = time.monotonic() + 60
    while cancelled() == before:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.5)


def test_tool_calls_round_trip_when_the_node_serves_tools(client):
    """A forced call, its output sent back as function_call_output, and the same call streamed."""
    r = client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=64, temperature=0)
    call = next(o for o in r.output if o.type == "function_call")
    assert call.name == "get_weather" and call.call_id and isinstance(json.loads(call.arguments)["city"], str)
    follow = client.responses.create(model=MODEL, max_output_tokens=16, temperature=0, tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Oslo?"}, *[o.to_dict() for o in r.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "12 C, cloudy"}])
    assert follow.status in ("completed", "incomplete") and follow.usage.input_tokens > r.usage.input_tokens
    with client.responses.stream(model=MODEL, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=64, temperature=0) as stream:
        args = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
        final = stream.get_final_response()
    streamed = next(o for o in final.output if o.type == "function_call")
    assert args == streamed.arguments == call.arguments


def test_a_replica_dying_mid_stream_ends_the_response_as_failed(tmp_path, gemma_path):
    """No other replica can continue the stream: the client gets `error`, then `response.failed` with the
    text produced so far, and the node serves on once the worker is back."""
    with serving(tmp_path, "--model", f"{MODEL}={gemma_path}:512", "--simulate-gpu", "g:4096",
                 models=(MODEL,)) as n:
        c = openai.OpenAI(base_url=n.api, api_key="x", max_retries=0, timeout=120)
        pid = next(r["pid"] for m in n.cluster()["models"] for r in m["replicas"])
        events = []
        for event in c.responses.create(model=MODEL, input=PROMPT, max_output_tokens=400, stream=True):
            events.append(event)
            if event.type == "response.output_text.delta" and len(events) == 5:
                os.kill(pid, signal.SIGKILL)
        kinds = [e.type for e in events]
        assert kinds[-2:] == ["error", "response.failed"], kinds
        failed = events[-1].response
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert failed.status == "failed" and failed.error.code == "server_error" and failed.error.message
        assert failed.output[0].content[0].text == text and failed.output[0].status == "incomplete"
        n.wait_model(MODEL)
        assert c.responses.create(model=MODEL, input=PROMPT, max_output_tokens=2).usage.output_tokens <= 2


# ---- API keys: required, and charged once (not again for the loopback chat call) -----------------------

KEY = "sk-responses-0123456789"
BURST = 3


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("responses-keys")
    cfg = tmp / "node.toml"
    cfg.write_text(f"[node]\nrate_limit_rpm = 1\nrate_limit_burst = {BURST}\n\n"
                   f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 256\n')
    with serving(tmp, "--config", str(cfg), "--simulate-gpu", "g0:4096", "--api-key", KEY, models=(MODEL,)) as n:
        yield n


def test_api_key_is_required_and_charged_once_per_response(keyed):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.api, api_key="sk-wrong-000", max_retries=0).responses.create(
            model=MODEL, input="x", max_output_tokens=1)
    good = openai.OpenAI(base_url=keyed.api, api_key=KEY, max_retries=0, timeout=120)
    t0 = time.monotonic()
    # A bucket of BURST that refills one a minute: BURST responses pass only if each is charged once
    # (the loopback chat call carries a signed hop), and the next one is refused.
    good.responses.create(model=MODEL, input="hi", max_output_tokens=1)
    events = list(good.responses.create(model=MODEL, input="hi", max_output_tokens=1, stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    good.responses.create(model=MODEL, input="hi", max_output_tokens=1)
    with pytest.raises(openai.RateLimitError):
        good.responses.create(model=MODEL, input="hi", max_output_tokens=1)
    assert time.monotonic() - t0 < 55, "a token refilled during the test; it proves nothing"
    limited = keyed.cluster()["security"]["rate_limited"]  # fingerprints are keyed with the cluster secret
    assert list(limited.values()) == [1] and next(iter(limited)).startswith("key-") and KEY not in next(iter(limited))


# ---- a 2-node cluster: the request enters at the node without the model ---------------------------------


def test_response_through_a_node_without_the_model(tmp_path, gemma_path):
    cfg = tmp_path / "models.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 512\nmax_replicas = 1\n')
    secret = "responses-cluster-secret-0123456789"
    p1, p2 = free_port("127.0.0.1"), free_port("127.0.0.2")
    holder = start_node(tmp_path, "--config", str(cfg), "--simulate-gpu", "g1:4096", "--cluster-secret", secret,
                        "--node-id", "n1", host="127.0.0.1", port=p1, name="n1")
    entry = start_node(tmp_path, "--config", str(cfg), "--cluster-secret", secret, "--node-id", "n2",
                       "--join", f"127.0.0.1:{p1}", host="127.0.0.2", port=p2, name="n2")
    try:
        holder.wait_healthy()
        entry.wait_healthy()
        entry.wait_model(MODEL, timeout=180)
        c = openai.OpenAI(base_url=entry.api, api_key="x", max_retries=0, timeout=120)
        raw = c.responses.with_raw_response.create(model=MODEL, input=PROMPT, max_output_tokens=8, temperature=0)
        assert raw.headers["X-AIvailable-Replica"].startswith("n1")  # served by the other node's replica
        r = raw.parse()
        assert r.output_text and r.usage.output_tokens <= 8
        events = list(c.responses.create(model=MODEL, input=PROMPT, max_output_tokens=8, temperature=0,
                                         stream=True))
        assert events[-1].response.output_text == r.output_text
    finally:
        for n in (entry, holder):
            n.stop(timeout=15)
