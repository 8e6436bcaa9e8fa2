"""Every client error is an OpenAI-shaped JSON error with the right status; never a traceback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from tests.nodeproc import serving

MODEL = "gemma-3-270m"
KEY = "sk-test-0123456789"


def post(url: str, body: bytes | str, headers: dict | None = None, method: str = "POST") -> tuple[int, dict, dict]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.load(r)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, dict(e.headers), json.loads(raw)
        except json.JSONDecodeError:
            raise AssertionError(f"non-JSON error body for {e.code}: {raw[:300]!r}") from None


def assert_openai_error(body: dict, *, param: str | None = None, contains: str = "") -> None:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert contains in err["message"], err


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("errors")
    cfg = tmp / "node.toml"
    cfg.write_text(f'[node]\nmax_body_bytes = 65536\n\n[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\n'
                   f'ctx = 1024\n')
    with serving(tmp, "--config", str(cfg), "--simulate-gpu", "g0:4096", "--api-key", KEY, models=(MODEL,)) as n:
        yield n


def chat_url(node) -> str:
    return node.api + "/chat/completions"


AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_missing_and_wrong_api_key_is_401(node):
    status, _, body = post(chat_url(node), json.dumps(GOOD))
    assert status == 401
    assert_openai_error(body, contains="Missing API key")
    status, _, body = post(chat_url(node), json.dumps(GOOD), {"Authorization": "Bearer nope"})
    assert status == 401
    assert_openai_error(body, contains="Incorrect API key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=node.api, api_key="wrong", max_retries=0).models.list()


def test_right_key_works_with_official_client(node):
    c = openai.OpenAI(base_url=node.api, api_key=KEY, max_retries=0)
    r = c.chat.completions.create(**GOOD)
    assert r.usage.completion_tokens <= 2


def test_unknown_model_is_404(node):
    c = openai.OpenAI(base_url=node.api, api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=GOOD["messages"])
    assert e.value.body["code"] == "model_not_found"
    assert MODEL in e.value.message  # tells the user what exists
    status, _, body = post(node.api + "/models/nope", b"", AUTH, method="GET")
    assert status == 404
    assert_openai_error(body, param="model")


@pytest.mark.parametrize("payload,param,contains", [
    ("{not json", None, "not valid JSON"),
    ("", None, "empty"),
    ("[1, 2]", None, "JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "model", "Missing required parameter"),
    (json.dumps({**GOOD, "messages": []}), "messages", "at least 1"),
    (json.dumps({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}), "messages[0].role", "wizard"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": 42}]}), "messages[0].content", ""),
    (json.dumps({**GOOD, "temperature": "hot"}), "temperature", ""),
    (json.dumps({**GOOD, "temperature": 7}), "temperature", "less than or equal to 2"),
    (json.dumps({**GOOD, "max_tokens": 0}), "max_tokens", ""),
    (json.dumps({**GOOD, "max_tokens": "ten"}), "max_tokens", ""),
    (json.dumps({**GOOD, "n": 17}), "n", "less than or equal to 16"),
    (json.dumps({**GOOD, "stop": ["a", "b", "c", "d", "e"]}), "stop", "at most 4"),
    (json.dumps({**GOOD, "stream_options": {"include_usage": True}}), "stream_options", "stream is true"),
    (json.dumps({**GOOD, "response_format": {"type": "xml"}}), "response_format.type", ""),
    (json.dumps({**GOOD, "frobnicate": True}), "frobnicate", "Unrecognized request argument"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": "x", "mood": "happy"}]}),
     "messages[0].mood", "Unrecognized"),
])
def test_bad_chat_bodies_are_400_naming_the_field(node, payload, param, contains):
    status, _, body = post(chat_url(node), payload, AUTH)
    assert status == 400, body
    assert_openai_error(body, param=param, contains=contains)
    assert body["error"]["type"] == "invalid_request_error"


def test_bad_completion_and_embedding_bodies(node):
    status, _, body = post(node.api + "/completions", json.dumps({"model": MODEL, "prompt": ["a", "b"]}), AUTH)
    assert status == 400
    assert_openai_error(body, param="prompt", contains="one prompt")
    status, _, body = post(node.api + "/embeddings", json.dumps({"model": MODEL, "input": "hello"}), AUTH)
    assert status == 400
    assert_openai_error(body, param="model", contains="not an embedding model")
    status, _, body = post(node.api + "/embeddings", json.dumps({"model": MODEL, "input": []}), AUTH)
    assert status == 400
    assert_openai_error(body, param="input")


def test_huge_body_is_413(node):
    big = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 200_000}]})
    status, _, body = post(chat_url(node), big, AUTH)
    assert status == 413
    assert_openai_error(body, contains="too large")


def test_unknown_path_and_method(node):
    status, _, body = post(node.url + "/v1/nope", "{}", AUTH)
    assert status == 404
    assert_openai_error(body)
    status, _, body = post(chat_url(node), b"", AUTH, method="GET")
    assert status == 405
    assert_openai_error(body)


def test_health_and_metrics_are_open_and_secret_free(node):
    with urllib.request.urlopen(node.url + "/health", timeout=5) as r:
        assert json.load(r)["status"] == "ok"
    with urllib.request.urlopen(node.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "aivailable_requests_total" in text
    assert 'aivailable_gpu_vram_total_mib{gpu="sim:0"' in text
    assert "aivailable_request_duration_seconds_bucket" in text
    for path in ("/", "/api/cluster", "/metrics"):
        with urllib.request.urlopen(node.url + path, timeout=5) as r:
            assert KEY not in r.read().decode()
    assert KEY not in node.log()
