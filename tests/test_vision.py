"""Images through real nodes: the real Gemma 3 270M with a generated Gemma 3 projector (tests/mmprojgen.py)
loaded by llama.cpp's libmtmd, via the official openai client; the 400s; a projector fetched with its model
by a second node that then serves a request entering through the first."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request

import openai
import pytest

from tests.mmprojgen import image_tokens, png, write_mmproj
from tests.nodeproc import free_port, serving, start_node
from tests.test_cluster import wait_for

VISION, TEXT = "gemma-vision", "gemma-text"
N_IMAGE = image_tokens(64, 8, 2)  # what write_mmproj's defaults make of any image
WRAP = 2  # Gemma 3 puts <start_of_image> and <end_of_image> around an image's embeddings
IMG = "data:image/png;base64," + base64.b64encode(png(48, 40)).decode()
IMG2 = "data:image/png;base64," + base64.b64encode(png(30, 70, seed=7)).decode()


def ask(*parts):
    content = [({"type": "image_url", "image_url": {"url": p}} if p.startswith(("data:", "https:")) else
                {"type": "text", "text": p}) for p in parts]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("vision")
    mmproj = write_mmproj(tmp / "gemma3-mmproj.gguf")
    cfg = tmp / "vision.toml"
    cfg.write_text(f'[[models]]\nname = "{VISION}"\npath = "{gemma_path}"\nmmproj = "{mmproj}"\nctx = 2048\n'
                   f'parallel = 2\npinned = true\n\n'
                   f'[[models]]\nname = "{TEXT}"\npath = "{gemma_path}"\nctx = 2048\nparallel = 2\n')
    with serving(tmp, "--config", str(cfg), "--simulate-gpu", "g0:4096", models=(VISION,)) as n:
        yield n


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=node.api, api_key="unused", max_retries=0, timeout=180)


def test_chat_with_an_image_generates_and_counts_the_image_tokens(client):
    text_only = client.chat.completions.create(model=VISION, messages=ask("Describe", " this picture."),
                                               max_tokens=6, temperature=0)
    r = client.chat.completions.create(model=VISION, messages=ask("Describe", IMG, " this picture."),
                                       max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens >= 1
    assert r.usage.prompt_tokens == text_only.usage.prompt_tokens + N_IMAGE + WRAP
    # the same request again gives the same answer (greedy; the image is evaluated the same way)
    again = client.chat.completions.create(model=VISION, messages=ask("Describe", IMG, " this picture."),
                                           max_tokens=6, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content
    # two images in one message: both counted
    two = client.chat.completions.create(model=VISION, messages=ask("Compare", IMG, "with", IMG2),
                                         max_tokens=4, temperature=0)
    base = client.chat.completions.create(model=VISION, messages=ask("Compare", "with"), max_tokens=1)
    assert two.usage.prompt_tokens == base.usage.prompt_tokens + 2 * (N_IMAGE + WRAP)


def test_streamed_image_chat_matches_and_reports_usage(client):
    whole = client.chat.completions.create(model=VISION, messages=ask(IMG, "What is it?"), max_tokens=8,
                                           temperature=0)
    stream = client.chat.completions.create(model=VISION, messages=ask(IMG, "What is it?"), max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_n2_and_a_detail_field_with_an_image(client):
    r = client.chat.completions.create(
        model=VISION, max_tokens=4, temperature=0.9, seed=3, n=2,
        messages=[{"role": "system", "content": "You describe images."},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMG2, "detail": "low"}},
                                               {"type": "text", "text": "What do you see?"}]}])
    assert len(r.choices) == 2
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)


def test_responses_api_input_image(client):
    r = client.responses.create(model=VISION, max_output_tokens=5, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": IMG, "detail": "auto"}]}])
    assert r.status in ("completed", "incomplete")
    assert r.usage.input_tokens > N_IMAGE
    for model, image, words in ((TEXT, IMG, "does not accept images"),
                                (VISION, "data:image/webp;base64,UklGRgAAAABXRUJQ", "unsupported image type")):
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model=model, max_output_tokens=5, input=[
                {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                             {"type": "input_image", "image_url": image}]}])
        assert err.value.body["param"].startswith("input[0]"), err.value.body
        assert words in err.value.body["message"]


@pytest.mark.parametrize("model, messages, param, words", [
    (TEXT, ask("What is this?", IMG), "messages[0].content[1]", f"model '{TEXT}' does not accept images"),
    (VISION, ask("What is this?", "https://example.com/cat.png"), "messages[0].content[1].image_url.url",
     "allow_image_urls is off"),
    (VISION, ask("data:image/png;base64,@@@notbase64"), "messages[0].content[0].image_url.url", "not valid base64"),
    (VISION, ask("data:image/webp;base64,UklGRgAAAABXRUJQ"), "messages[0].content[0].image_url.url",
     "unsupported image type 'image/webp'"),
    (VISION, [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": IMG}}]},
              {"role": "user", "content": "and?"}], "messages[1].content[0]", "not in assistant messages"),
])
def test_unusable_images_are_400_naming_the_part(client, model, messages, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    body = err.value.body
    assert err.value.status_code == 400
    assert body["param"] == param, body
    assert words in body["message"], body


def test_an_image_over_max_image_bytes_is_400(node):
    big = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(11 << 20)).decode()
    req = urllib.request.Request(node.api + "/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": VISION, "messages": ask(big), "max_tokens": 1}).encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 400
    body = json.load(err.value)["error"]
    assert body["param"] == "messages[0].content[0].image_url.url" and "at most 10485760" in body["message"]


def test_models_say_which_accept_images_and_the_projector_counts_in_the_estimate(node, client):
    models = {m["name"]: m for m in node.cluster()["models"]}
    assert models[VISION]["vision"] is True and models[TEXT]["vision"] is False
    # same file, ctx and parallel: the vision model's estimate is larger by the projector's (mmproj_info)
    assert models[VISION]["vram_estimate_mib"] > models[TEXT]["vram_estimate_mib"]
    listed = {m.id: m.model_extra for m in client.models.list().data}
    assert listed[VISION]["vision"] is True and listed[TEXT]["vision"] is False


def image_server(files: dict[str, bytes]):
    """A local HTTP server (in a thread) answering GET PATH with files[PATH], else 404; `.shutdown()` it."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            data = files.get(self.path)
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


SECRET = "vision-cluster-secret-0123456789abcdef"


def test_a_second_node_fetches_model_and_projector_and_serves_a_forwarded_image_request(tmp_path):
    """n1 defines a small model with a projector pinned to n2: n2 fetches both files by sha256, loads them
    with libmtmd, and a request with an image entering through n1 (no replica there) is forwarded and
    answered."""
    from tests.ggufgen import write_model

    model = write_model(tmp_path / "tiny.gguf", "gemma3", 2, 256, 4, 1, 512, 8000, 2048)
    mmproj = write_mmproj(tmp_path / "tiny-mmproj.gguf", n_embd_text=256, seed=2)
    cfg = tmp_path / "n1.toml"
    cfg.write_text(f'[[models]]\nname = "tinyv"\npath = "{model}"\nmmproj = "{mmproj}"\nctx = 512\n'
                   'pinned = true\naffinity = { nodes = ["n2"] }\n')
    ports = {i: free_port(f"127.0.0.{i}") for i in (1, 2)}
    common = ["--cluster-secret", SECRET]
    n1 = start_node(tmp_path, "--config", str(cfg), "--simulate-gpu", "card1:2000", *common, "--node-id", "n1",
                    "--allow-image-urls", host="127.0.0.1", port=ports[1], name="n1")
    nodes = [n1]
    web = image_server({"/cat.png": png(20, 20, seed=5), "/cat.webp": b"RIFF\x00\x00\x00\x00WEBPVP8 "})
    try:
        n1.wait_healthy()
        n2 = start_node(tmp_path, "--simulate-gpu", "card2:2000", *common, "--node-id", "n2", "--join",
                        f"127.0.0.1:{ports[1]}", host="127.0.0.2", port=ports[2], name="n2")
        nodes.append(n2)
        n2.wait_healthy()

        def ready() -> bool:
            m = next((m for m in n1.cluster()["models"] if m["name"] == "tinyv"), {})
            return any(r["state"] == "ready" and r["node"] == "n2" for r in m.get("replicas", []))

        wait_for(ready, 180, "tinyv fetched with its projector and ready on n2")
        fetched = n2.state_dir / "models" / "fetched"
        sha_p = hashlib.sha256(mmproj.read_bytes()).hexdigest()
        assert (fetched / f"{sha_p}.gguf").read_bytes() == mmproj.read_bytes()
        assert (fetched / f"{hashlib.sha256(model.read_bytes()).hexdigest()}.gguf").exists()
        client = openai.OpenAI(base_url=n1.api, api_key="x", max_retries=0, timeout=120)
        raw = client.chat.completions.with_raw_response.create(
            model="tinyv", messages=ask("What is", IMG, "?"), max_tokens=3, temperature=0)
        assert raw.headers.get("X-AIvailable-Replica", "").startswith("n2")
        out = raw.parse()
        assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens > N_IMAGE
        # n1 allows image URLs: it fetches the image and forwards its bytes to n2
        base = f"http://127.0.0.1:{web.server_port}"
        by_url = client.chat.completions.create(model="tinyv", messages=ask("What is", IMG, "?"), max_tokens=1)
        fetched_answer = client.chat.completions.create(
            model="tinyv", max_tokens=1, messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is"}, {"type": "image_url", "image_url": {"url": base + "/cat.png"}},
                {"type": "text", "text": "?"}]}])
        assert fetched_answer.usage.prompt_tokens == by_url.usage.prompt_tokens
        for path, words in (("/cat.webp", "not PNG, JPEG, GIF or BMP"), ("/missing.png", "HTTP 404")):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model="tinyv", max_tokens=1, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": base + path}}]}])
            assert err.value.body["param"] == "messages[0].content[0].image_url.url"
            assert words in err.value.body["message"], err.value.body
    finally:
        web.shutdown()
        for n in nodes:
            n.stop(timeout=15)
