"""The batch engine with images, in process: the real Gemma 3 270M and a generated projector whose images
sway the model (tests/mmprojgen.py, proj_scale=1). A slot's cached prefix is reused only up to the first
image and never changes an answer; text-only and image requests batch together."""

from __future__ import annotations

import base64
import threading

import pytest

from aivailable.engine.batch import PROMPT_CHUNK
from aivailable.engine.chatplan import plan_chat
from aivailable.engine.runner import GenParams, Runner
from aivailable.engine.spec import WorkerSpec
from aivailable.errors import InvalidRequest
from aivailable.wire.schemas import parse_request
from tests.mmprojgen import image_tokens, png, write_mmproj

LONG = " ".join(f"word{i}" for i in range(150))  # > PROMPT_CHUNK tokens before the image


@pytest.fixture(scope="module")
def runner(tmp_path_factory, gemma_path):
    mmproj = write_mmproj(tmp_path_factory.mktemp("mmproj") / "p.gguf", proj_scale=1.0)
    r = Runner(WorkerSpec(model="g", path=str(gemma_path), n_ctx=2048, parallel=2, n_threads=2, mmproj=str(mmproj),
                          socket="/nonexistent"))
    r.load()
    yield r
    r.close()


def url(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(32, 32, seed=seed)).decode()


def prompt(runner: Runner, *parts: str):
    content = [{"type": "image_url", "image_url": {"url": p}} if p.startswith("data:") else {"type": "text", "text": p}
               for p in parts]
    req = parse_request("chat", {"model": "g", "messages": [{"role": "user", "content": content}]})
    return runner.chat_prompt(plan_chat(req, runner.tool_format))


def submit(runner: Runner, parts: tuple[str, ...], max_tokens: int = 6):
    tokens, _, media = prompt(runner, *parts)
    out: list = []
    fut = runner.submit(tokens, GenParams(max_tokens=max_tokens, temperature=0, logprobs=3), threading.Event(),
                        lambda text, lps=None: out.append((text, [(e["token"], e["logprob"]) for e in lps or []])),
                        media)
    return fut, out, tokens, media


def generate(runner: Runner, *parts: str):
    fut, out, tokens, media = submit(runner, parts)
    return fut.result(timeout=300), out, tokens, media


def test_image_prompt_layout(runner):
    tokens, _, media = prompt(runner, "Look:", url(1), "What is it?")
    (start, chunk), = media.items()
    assert chunk.n_tokens == image_tokens(64, 8, 2)
    assert tokens[start:start + chunk.n_tokens] == [chunk.pseudo_token] * chunk.n_tokens
    assert chunk.pseudo_token < 0 and all(t >= 0 for t in tokens[:start] + tokens[start + chunk.n_tokens:])
    vocab = runner.llm
    around = vocab.detokenize([tokens[start - 1], tokens[start + chunk.n_tokens]], special=True).decode()
    assert around == "<start_of_image><end_of_image>"
    _, _, other = prompt(runner, "Look:", url(2), "What is it?")
    assert next(iter(other.values())).pseudo_token != chunk.pseudo_token
    assert prompt(runner, "no image")[2] is None


def test_cache_is_reused_only_before_the_image_and_never_changes_an_answer(runner):
    a, out_a, tokens, media = generate(runner, LONG, url(1), "What is it?")
    first_image = min(media)
    assert first_image > PROMPT_CHUNK
    b, out_b, _, _ = generate(runner, LONG, url(2), "What is it?")
    assert out_b != out_a  # the image matters to this projector
    assert 0 < b.cached_tokens <= first_image  # the text before the image came from the cache
    a2, out_a2, _, _ = generate(runner, LONG, url(1), "What is it?")
    assert out_a2 == out_a  # bit for bit: no KV of image 2 was kept for image 1
    assert a2.cached_tokens <= first_image
    assert a.prompt_tokens == b.prompt_tokens == a2.prompt_tokens == len(tokens)


def test_text_and_image_requests_batch_together(runner):
    alone, out_alone, _, _ = generate(runner, "Name three colors.")
    fut_img, out_img, _, _ = submit(runner, ("Describe", url(3), "please."), max_tokens=12)
    fut_txt, out_txt, _, _ = submit(runner, ("Name three colors.",))
    img, txt = fut_img.result(timeout=300), fut_txt.result(timeout=300)
    assert img.completion_tokens >= 1 and txt.completion_tokens >= 1
    assert [t for t, _ in out_txt] == [t for t, _ in out_alone]


def test_a_prompt_must_end_in_text(runner):
    tokens, _, media = prompt(runner, "Look:", url(1))
    (start, chunk), = media.items()
    with pytest.raises(InvalidRequest):
        runner.submit(tokens[:start + chunk.n_tokens], GenParams(max_tokens=2), threading.Event(), lambda *a: None,
                      media)
