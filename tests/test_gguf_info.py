"""read_model_info on generated GGUFs, the real Gemma file and broken files."""

from __future__ import annotations

import time

import pytest

from aivailable.engine.gguf_info import GGUFError, read_model_info, swa_layer_pattern
from tests.ggufgen import write_model

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-info")


def _write(model_dir, fname, arch="llama", **kw):
    args = dict(n_layers=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, vocab=300, ctx_train=4096)
    args.update(kw)
    return write_model(model_dir / f"{fname}.gguf", arch, **args)


def test_shapes_and_sizes_match_the_gguf_reader(model_dir):
    from gguf import GGUFReader

    path = _write(model_dir, "plain", n_layers=3, dtype="q8_0", n_embd=256, n_ff=512)
    info = read_model_info(path)
    reader = GGUFReader(path)
    assert info.weight_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert info.n_tensors == len(reader.tensors)
    assert info.file_size == path.stat().st_size
    assert info.file_type == "MOSTLY_Q8_0"
    assert (info.architecture, info.n_layers, info.n_embd, info.n_ff) == ("llama", 3, 256, 512)
    assert info.n_head == (4, 4, 4) and info.n_head_kv == (2, 2, 2)
    assert info.head_dim_k == info.head_dim_v == 64  # n_embd / n_head: no key_length key
    assert info.context_length == 4096 and info.vocab_size == 300
    assert (info.bos_token_id, info.bos_token, info.eos_token) == (1, "<s>", "</s>")
    assert not info.tied_output and not info.fused_qkv and info.ffn_gated
    assert info.input_bytes == info.tok_embd_bytes == 256 * 300 * 34 // 32  # q8_0 rows
    assert info.gpu_weight_bytes == info.weight_bytes - info.input_bytes
    assert info.sliding_window == 0 and not any(info.swa_layers)
    assert info.pooling_type is None and info.chat_template is None


def test_per_layer_kv_heads_and_explicit_head_dim(model_dir):
    # llama.cpp's llama loader sizes K/V by layer 0, so this file is for reading only
    info = read_model_info(_write(model_dir, "perlayer", n_layers=4, n_head_kv=[4, 2, 1, 2], head_dim=48))
    assert info.n_head_kv == (4, 2, 1, 2)
    assert info.head_dim_k == info.head_dim_v == 48


def test_gemma3_sliding_window_and_tied_output(model_dir):
    info = read_model_info(_write(model_dir, "g3", "gemma3", n_layers=7, head_dim=64, sliding_window=256))
    assert info.sliding_window == 256
    assert info.swa_layers == (True, True, True, True, True, False, True)  # every 6th layer is global
    assert info.tied_output and info.gpu_weight_bytes == info.weight_bytes  # token_embd copied as output


def test_swa_pattern_rules():
    assert swa_layer_pattern("gemma2", 4, 4096, None) == (True, False, True, False)
    assert swa_layer_pattern("gemma3", 3, 512, [False, True, True]) == (False, True, True)
    assert swa_layer_pattern("gemma3", 3, 0, None) == (False, False, False)  # no window, no SWA
    assert swa_layer_pattern("phi3", 3, 2047, None) == (False, False, False)  # llama.cpp disables it


def test_fused_and_ungated_layouts(model_dir):
    phi = read_model_info(_write(model_dir, "phi", "phi3", n_head_kv=4))
    assert phi.fused_qkv and phi.ffn_gated  # attn_qkv, ffn_up holds gate and up
    sc = read_model_info(_write(model_dir, "sc", "starcoder2"))
    assert not sc.fused_qkv and not sc.ffn_gated


def test_chat_template_is_read(model_dir):
    info = read_model_info(_write(model_dir, "tmpl", chat_template=TEMPLATE, pooling=1))
    assert info.has_chat_template and info.chat_template == TEMPLATE
    assert info.pooling_type == 1


@pytest.mark.parametrize(
    ("arch", "extra", "name", "hint"),
    [
        ("gemma3", (), None, "gemma"),
        ("qwen2", (), None, "chatml"),
        ("llama", ("<|eot_id|>",), None, "llama-3"),
        ("llama", ("[INST]", "[/INST]"), None, "mistral-instruct"),
        ("llama", (), "Mistral-7B-v0.1", "mistral-instruct"),
        ("llama", (), None, "llama-2"),
        ("phi3", (), None, None),  # llama-cpp-python has no phi-3 format: refuse chat
        ("starcoder2", (), None, None),
    ],
)
def test_chat_format_hint(model_dir, arch, extra, name, hint):
    kw = {"head_dim": 32} if arch == "gemma3" else {}
    info = read_model_info(_write(model_dir, f"hint-{arch}-{len(extra)}-{name}", arch, extra_tokens=extra,
                                  name=name, **kw))
    assert not info.has_chat_template
    assert info.chat_format_hint == hint


def test_every_hint_is_a_llama_cpp_python_chat_format():
    from llama_cpp import llama_chat_format

    from aivailable.engine.gguf_info import CHAT_FORMAT_BY_ARCH

    registry = llama_chat_format.LlamaChatCompletionHandlerRegistry()
    for fmt in {*CHAT_FORMAT_BY_ARCH.values(), "llama-2", "llama-3", "mistral-instruct"}:
        registry.get_chat_completion_handler_by_name(fmt)  # raises for an unknown name


def test_real_gemma(gemma_path):
    start = time.monotonic()
    info = read_model_info(gemma_path)
    assert time.monotonic() - start < 5  # a 262k-token vocabulary; gguf.GGUFReader needs over 10 s
    assert info.architecture == "gemma3" and info.n_layers == 18 and info.n_embd == 640
    assert info.vocab_size == 262144 and info.context_length == 32768
    assert info.n_head == (4,) * 18 and info.n_head_kv == (1,) * 18 and info.head_dim_k == 256
    assert info.sliding_window == 512 and info.n_swa_layers == 15
    assert info.tied_output and info.file_type == "MOSTLY_Q4_K_M"
    assert not info.has_chat_template and info.chat_format_hint == "gemma"
    assert (info.bos_token, info.eos_token) == ("<bos>", "<eos>")


def _broken(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_bad_files_raise_gguf_error_naming_the_path(tmp_path, model_dir):
    good = _write(model_dir, "forcut").read_bytes()
    cases = {
        "text.gguf": b"this is not a model at all, just some text that is long enough\n",
        "empty.gguf": b"",
        "header-cut.gguf": good[:200],
        "data-cut.gguf": good[: len(good) // 2],
        "bad-version.gguf": b"GGUF" + (99).to_bytes(4, "little") + good[8:],
    }
    for name, data in cases.items():
        path = _broken(tmp_path, name, data)
        with pytest.raises(GGUFError) as err:
            read_model_info(path)
        assert str(path) in str(err.value) and err.value.path == path
    with pytest.raises(GGUFError, match="truncated"):
        read_model_info(tmp_path / "data-cut.gguf")
    with pytest.raises(GGUFError, match="magic"):
        read_model_info(tmp_path / "text.gguf")
    with pytest.raises(GGUFError, match="missing.gguf"):
        read_model_info(tmp_path / "missing.gguf")
    assert issubclass(GGUFError, ValueError)
