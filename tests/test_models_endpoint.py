"""`/v1/models` on a real node: `context_length` is what one request can use (the replica's ctx split
over its parallel slots), with the replica's total and its slot count beside it; a prompt longer than
`context_length` (but shorter than the total) is refused, so the number is the real limit."""

from __future__ import annotations

import openai
import pytest

from tests.nodeproc import serving

MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("models-endpoint")
    cfg = tmp / "node.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 2048\nparallel = 4\n'
                   f'[[models]]\nname = "one-slot"\npath = "{gemma_path}"\nctx = 1024\n')
    with serving(tmp, "--config", str(cfg), "--simulate-gpu", "g:4096", models=(MODEL, "one-slot")) as n:
        yield n


def test_context_length_is_per_request(node) -> None:
    client = openai.OpenAI(base_url=node.api, api_key="unused", max_retries=0, timeout=120)
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert cards[MODEL]["context_length"] == 512
    assert (cards[MODEL]["context_length_total"], cards[MODEL]["parallel"]) == (2048, 4)
    assert (cards["one-slot"]["context_length"], cards["one-slot"]["context_length_total"],
            cards["one-slot"]["parallel"]) == (1024, 1024, 1)

    fits = client.completions.create(model=MODEL, prompt="word " * 200, max_tokens=2)
    assert fits.usage.prompt_tokens < 512
    with pytest.raises(openai.BadRequestError) as err:  # over one slot, under the replica's total
        client.completions.create(model=MODEL, prompt="word " * 700, max_tokens=2)
    assert "maximum context length is 512 tokens" in str(err.value)
