"""Write small but real, loadable GGUF models with the `gguf` package, for engine tests.

The weights are random (seeded) and the tokenizer is a minimal SentencePiece ("llama") vocabulary:
<unk> <s> </s>, the 256 byte tokens, optional extra control tokens, then filler pieces up to `vocab`.
llama.cpp loads these files like any converted model; what they generate is noise.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

ARCHS = ("llama", "qwen2", "gemma3", "phi3", "starcoder2")
# Control tokens the real vocabularies of these families have. llama.cpp needs some of them: it marks
# phi3's "<|endoftext|>" with token attributes by name and fails to load without it.
ARCH_TOKENS = {
    "phi3": ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "qwen2": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "gemma3": ("<start_of_turn>", "<end_of_turn>"),
}
N_SPECIAL = 3 + 256  # <unk> <s> </s> and the byte tokens


def _filler_pieces() -> Iterator[str]:
    letters = string.ascii_lowercase
    for length in itertools.count(1):
        for combo in itertools.product(letters, repeat=length):
            piece = "".join(combo)
            yield "\u2581" + piece
            yield piece


def tokenizer_vocab(vocab: int, extra_tokens: Sequence[str] = ()) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a minimal SPM vocabulary of exactly `vocab` entries."""
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(extra_tokens)
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.CONTROL] * len(extra_tokens)
    if vocab < len(tokens):
        raise ValueError(f"vocab={vocab} is smaller than the {len(tokens)} special and byte tokens")
    seen = set(tokens)
    for piece in _filler_pieces():
        if len(tokens) == vocab:
            break
        if piece not in seen:
            tokens.append(piece)
            types.append(TokenType.NORMAL)
    scores = [0.0] * N_SPECIAL + [0.0] * len(extra_tokens)
    scores += [-float(i) for i in range(len(tokens) - len(scores))]
    return tokens, scores, [int(t) for t in types]


class _Tensors:
    """Collects named tensors in the numpy (row-major, reversed ggml) shape llama.cpp expects."""

    def __init__(self, writer, rng: np.random.Generator, dtype: str):
        self.writer, self.rng, self.dtype = writer, rng, dtype

    def matrix(self, name: str, n_in: int, n_out: int) -> None:
        """A ggml {n_in, n_out} weight: numpy shape (n_out, n_in)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        data = (self.rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
        if self.dtype == "q8_0":
            qtype = GGMLQuantizationType.Q8_0
            self.writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
        else:
            self.writer.add_tensor(name, data.astype(np.float16 if self.dtype == "f16" else np.float32))

    def vector(self, name: str, n: int, value: float = 1.0) -> None:
        self.writer.add_tensor(name, np.full((n,), value, dtype=np.float32))


def write_model(
    path: str | Path,
    arch: str,
    n_layers: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int | Sequence[int],
    n_ff: int,
    vocab: int,
    ctx_train: int,
    chat_template: str | None = None,
    pooling: int | None = None,
    *,
    head_dim: int | None = None,
    sliding_window: int = 0,
    tied_output: bool | None = None,
    dtype: str = "f16",
    extra_tokens: Sequence[str] = (),
    name: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a loadable `arch` model to `path` and return the path.

    `n_head_kv` may be a per-layer list (for gguf_info tests: llama.cpp's llama loader sizes every
    layer's K/V projections by layer 0, so such a file does not load). `head_dim` defaults to n_embd // n_head; only llama and
    gemma3 accept another value (their q/o projections are sized by heads, not n_embd). gemma3 ties
    its output to token_embd and uses `sliding_window` (512 if 0) with llama.cpp's 5-local:1-global
    pattern. `dtype` is "f16", "f32" or "q8_0" for the 2-D weights (norms stay f32).
    """
    import gguf

    if arch not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; choose from {ARCHS}")
    head_dim = head_dim or n_embd // n_head
    if head_dim * n_head != n_embd and arch not in ("llama", "gemma3"):
        raise ValueError(f"{arch} needs head_dim * n_head == n_embd")
    kv = [n_head_kv] * n_layers if isinstance(n_head_kv, int) else list(n_head_kv)
    if tied_output is None:
        tied_output = arch == "gemma3"
    if arch == "gemma3" and not sliding_window:
        sliding_window = 512

    path = Path(path)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name or f"test-{arch}-{n_layers}l-{n_embd}d")
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[dtype])
    writer.add_block_count(n_layers)
    writer.add_context_length(ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(kv if isinstance(n_head_kv, Sequence) else n_head_kv)
    writer.add_rope_freq_base(10000.0)
    if head_dim * n_head != n_embd:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "starcoder2":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma3":
        writer.add_sliding_window(sliding_window)
    if pooling is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling))

    tokens, scores, types = tokenizer_vocab(vocab, (*ARCH_TOKENS.get(arch, ()), *extra_tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    t = _Tensors(writer, np.random.default_rng(seed), dtype)
    _add_tensors(t, arch, n_layers, n_embd, n_head, kv, head_dim, n_ff, vocab, tied_output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tensors(
    t: _Tensors, arch: str, n_layers: int, n_embd: int, n_head: int, kv: list[int], head_dim: int,
    n_ff: int, vocab: int, tied_output: bool,
) -> None:
    biases = arch == "starcoder2"
    t.matrix("token_embd.weight", n_embd, vocab)
    t.vector("output_norm.weight", n_embd)
    if biases:
        t.vector("output_norm.bias", n_embd, 0.0)
    if not tied_output:
        t.matrix("output.weight", n_embd, vocab)
    n_q = n_head * head_dim
    for il in range(n_layers):
        p = f"blk.{il}."
        n_kv = kv[il] * head_dim
        t.vector(p + "attn_norm.weight", n_embd)
        t.vector(p + "ffn_norm.weight", n_embd)
        if arch == "phi3":
            t.matrix(p + "attn_qkv.weight", n_embd, n_q + 2 * n_kv)
            t.matrix(p + "attn_output.weight", n_q, n_embd)
            t.matrix(p + "ffn_up.weight", n_embd, 2 * n_ff)
            t.matrix(p + "ffn_down.weight", n_ff, n_embd)
            continue
        t.matrix(p + "attn_q.weight", n_embd, n_q)
        t.matrix(p + "attn_k.weight", n_embd, n_kv)
        t.matrix(p + "attn_v.weight", n_embd, n_kv)
        t.matrix(p + "attn_output.weight", n_q, n_embd)
        t.matrix(p + "ffn_up.weight", n_embd, n_ff)
        t.matrix(p + "ffn_down.weight", n_ff, n_embd)
        if arch != "starcoder2":
            t.matrix(p + "ffn_gate.weight", n_embd, n_ff)
        if arch == "qwen2":
            for proj, n in (("q", n_q), ("k", n_kv), ("v", n_kv)):
                t.vector(p + f"attn_{proj}.bias", n, 0.0)
        if biases:
            for vec, n in (("attn_norm", n_embd), ("ffn_norm", n_embd), ("attn_output", n_embd),
                           ("ffn_down", n_embd), ("ffn_up", n_ff), ("attn_q", n_q), ("attn_k", n_kv),
                           ("attn_v", n_kv)):
                t.vector(p + f"{vec}.bias", n, 0.0)
        if arch == "gemma3":
            t.vector(p + "attn_q_norm.weight", head_dim)
            t.vector(p + "attn_k_norm.weight", head_dim)
            t.vector(p + "post_attention_norm.weight", n_embd)
            t.vector(p + "post_ffw_norm.weight", n_embd)
