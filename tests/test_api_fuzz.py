"""GET /openapi.json is a valid OpenAPI document, and schemathesis fuzzing a live node with it (valid and
invalid bodies, real model) gets no 5xx, no crash, and every 4xx in OpenAI's error shape."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate as validate_spec
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from aivailable.api.openapi import openapi_document
from tests.nodeproc import get_json, serving

MODEL = "gemma-3-270m"
TOKEN_CAP = 3
"""Generated requests that ask for more completion tokens are capped to this (real model, 2 cores);
huge values themselves are covered by test_huge_numbers_are_clean_errors_or_work."""
EXAMPLES = {"positive": {"POST": 10, "GET": 4}, "negative": {"POST": 20}}
"""Per operation and generation mode. Most positive POSTs reach the real model (a few seconds each on
2 busy cores); negative ones mostly end in a 400 at the node."""


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = tmp / "node.toml"
    cfg.write_text(f'[node]\nmax_body_bytes = 65536\n\n[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\n'
                   f'ctx = 256\nmax_queue = 64\n')
    with serving(tmp, "--config", str(cfg), "--simulate-gpu", "g0:4096", models=(MODEL,)) as n:
        yield n


def test_served_document_is_valid_openapi_from_the_models(node):
    doc = get_json(node.url + "/openapi.json")
    validate_spec(doc)
    assert doc == json.loads(json.dumps(openapi_document()))
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False and "messages" in chat["required"]
    assert set(doc["paths"]) >= {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                 "/v1/responses"}


@schemathesis.check
def openai_error_shape(ctx, response, case):
    """Every 4xx/5xx is `{"error": {"message", "type", "param", "code"}}` with a non-empty message."""
    if response.status_code < 400:
        return None
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "Traceback (most recent" not in err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    return True


def _cap_tokens(case) -> None:
    body = case.body
    limits = {"/v1/chat/completions": ("max_tokens", "max_completion_tokens"), "/v1/completions": ("max_tokens",),
              "/v1/responses": ("max_output_tokens",)}.get(case.path)
    if not isinstance(body, dict) or limits is None:
        return
    for key in limits:
        v = body.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > TOKEN_CAP:
            body[key] = TOKEN_CAP  # ints and integral floats (pydantic accepts 7.0 as 7)
    if all(body.get(key) is None for key in limits):
        body[limits[0]] = TOKEN_CAP  # absent or null: the model would run to the end of its context
    if isinstance(body.get("model"), str) and body.get("model") != MODEL and len(body) > 2:
        body["model"] = MODEL  # mostly reach the worker; unknown models still get fuzzed by the rest


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_live_node(node, mode):
    api = schemathesis.openapi.from_url(node.url + "/openapi.json")
    checks = [not_a_server_error, openai_error_shape, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    seen: Counter[tuple[str, int]] = Counter()

    def call(case) -> None:
        _cap_tokens(case)
        response = case.call(timeout=120)
        seen[(case.path, response.status_code)] += 1
        case.validate_response(response, checks=checks)

    for result in api.get_all_operations():
        op = result.ok()
        if mode == "negative" and op.method.upper() == "GET":
            continue  # no query, and any string is a valid model id: nothing to make invalid
        run = settings(max_examples=EXAMPLES[mode][op.method.upper()], deadline=None, database=None,
                       suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
                       derandomize=True)(given(op.as_strategy(GenerationMode(mode)))(call))
        run()
    print(mode, sorted(seen.items()))
    assert not any(status >= 500 for _, status in seen)
    # The run reached the model and the validator: it can fail.
    served = seen[("/v1/chat/completions", 200)] + seen[("/v1/completions", 200)] + seen[("/v1/responses", 200)]
    rejected = sum(n for (_, status), n in seen.items() if status == 400)
    assert rejected > 0 and (served > 0 or mode == "negative"), seen
    # No crash: the node and its worker still serve, and nothing was logged as an internal error.
    assert node.proc.poll() is None and get_json(node.url + "/health")["models_ready"] == [MODEL]
    log = node.log()
    assert "Traceback (most recent" not in log and "internal error" not in log, log[-3000:]


@pytest.mark.parametrize("field,value", [("seed", 2**70), ("seed", -(2**70)), ("max_tokens", 2**70),
                                         ("top_k", 2**70), ("repeat_penalty", 1e308), ("seed", -1)])
def test_huge_numbers_are_clean_errors_or_work(node, field, value):
    """Numbers past C int ranges reach llama.cpp only if they fit; else a 400 naming the field."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2,
            field: value}
    req = urllib.request.Request(node.api + "/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and json.load(r)["usage"]["completion_tokens"] <= 2  # the cap wins
    except urllib.error.HTTPError as e:
        err = json.loads(e.read())["error"]
        assert e.code == 400 and err["param"] == field, (e.code, err)
