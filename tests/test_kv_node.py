"""Quantized KV caches on a real node: the real llama.cpp engine, the demo Gemma, the official client.

One node with two simulated GPUs. "fixed8" asks for q8_0 outright; "longctx" (16k context) asks for
"auto" on a card where its f16 cache does not fit beside fixed8, so placement quantizes it; "oddhead"
(a generated model whose 48-wide heads are not a multiple of the q4_0 block) asks for q4_0 and its
worker refuses with a message naming the setting.
"""

from __future__ import annotations

import openai

from aivailable.engine import kvcache
from aivailable.engine.gguf_info import read_model_info
from tests.ggufgen import write_model
from tests.nodeproc import serving


def test_quantized_replicas_serve_and_auto_quantizes_to_fit(tmp_path, gemma_path):
    info = read_model_info(gemma_path)
    fixed = kvcache.needs_by_type(info, "q8_0", n_ctx=1024, on_cpu=True)["q8_0"]
    auto = kvcache.needs_by_type(info, "auto", n_ctx=16384, on_cpu=True)
    card = int(fixed + (auto["f16"] + auto["q8_0"]) / 2)  # f16 does not fit beside fixed8; q8_0 does
    assert fixed + auto["f16"] > card >= fixed + auto["q8_0"]
    odd = write_model(tmp_path / "odd.gguf", "llama", 2, 384, 8, 2, 512, 512, 4096)  # head size 48
    cfg = tmp_path / "kv.toml"
    cfg.write_text(
        f'[[models]]\nname = "fixed8"\npath = "{gemma_path}"\nctx = 1024\nkv_cache_type = "q8_0"\nmax_replicas = 1\n'
        f'affinity = {{ gpu_names = ["small"] }}\n\n'
        f'[[models]]\nname = "longctx"\npath = "{gemma_path}"\nctx = 16384\nkv_cache_type = "auto"\nmax_replicas = 1\n'
        f'affinity = {{ gpu_names = ["small"] }}\n\n'
        f'[[models]]\nname = "oddhead"\npath = "{odd}"\nctx = 512\nkv_cache_type = "q4_0"\nmax_replicas = 1\n'
        f'affinity = {{ gpu_names = ["spare"] }}\n')
    with serving(tmp_path, "--config", str(cfg), "--simulate-gpu", f"small:{card}", "--simulate-gpu", "spare:2000",
                 models=("fixed8", "longctx")) as node:
        models = {m["name"]: m for m in node.cluster()["models"]}
        (f8,), (lc,) = models["fixed8"]["replicas"], models["longctx"]["replicas"]
        assert f8["kv_cache_type"] == "q8_0"
        assert lc["kv_cache_type"] == "q8_0", lc  # auto: f16 would not fit beside fixed8
        assert models["longctx"]["placed_on"][0]["kv_cache_type"] == "q8_0"
        assert (models["longctx"]["kv_cache_type"], models["fixed8"]["kv_cache_type"]) == ("auto", "q8_0")  # settings
        # llama.cpp's own KV buffer of each worker is the q8_0 size (the type reached the engine)
        assert abs(f8["kv_cache_mib"] - kvcache.estimate_for(info, "q8_0", n_ctx=1024, on_cpu=True).kv_cache_mib) < 0.1
        assert abs(lc["kv_cache_mib"] - kvcache.estimate_for(info, "q8_0", n_ctx=16384, on_cpu=True).kv_cache_mib) < 0.1

        client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=120)
        for name in ("fixed8", "longctx"):
            chat = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0)
            assert chat.choices[0].finish_reason in ("stop", "length")
            assert chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens > 3
            stream = client.completions.create(model=name, prompt="The sky is", max_tokens=6, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
            chunks = list(stream)
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

        bad = node.wait_model("oddhead", "failed", timeout=120)
        assert "kv_cache_type q4_0" in bad["reason"] and 'kv_cache_type = "f16"' in bad["reason"], bad


def test_embedding_model_runs_its_own_context_quantized(gemma_path):
    """An embedding model serves from the Llama object's context, which gets the type (and flash attention) too."""
    from aivailable.engine.runner import Runner
    from aivailable.engine.spec import WorkerSpec

    sizes = {}
    for kv in ("f16", "q8_0"):
        runner = Runner(WorkerSpec(model="emb", path=str(gemma_path), n_ctx=512, n_threads=2, embedding=True,
                                   socket="/tmp/unused.sock", kv_cache_type=kv))
        runner.load()
        try:
            vectors, tokens = runner.embed(["hello world", "the sky is blue"])
            assert len(vectors) == 2 and len(vectors[0]) == 640 and tokens > 4
            sizes[kv] = runner.load_report.kv_total_mib
        finally:
            runner.close()
    assert abs(sizes["q8_0"] - sizes["f16"] * 34 / 64) < 0.05
