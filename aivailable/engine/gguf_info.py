"""What a GGUF file says about its model: shapes, sizes, tokenizer and chat template.

Reads only the header (metadata and tensor infos) from a memory map, with the `gguf` package's
type tables: a multi-GB model costs its header, not its size (about 0.5 s for a 262k-token vocabulary).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Tensors llama.cpp always keeps in host memory, even with every layer offloaded: the input layer
# ("there is very little benefit to offloading the input layer", llama-model.cpp).
INPUT_TENSORS = ("token_embd.weight", "position_embd.weight", "token_types.weight")

# Default sliding-window patterns of llama.cpp (models/*.cpp `load_swa_pattern(ml, N)`), used when the
# GGUF has no `{arch}.attention.sliding_window_pattern`. With period N, layer il is SWA unless
# il % N == N - 1 (or il % N == 0 for dense-first models). Phi-3 carries a window but llama.cpp
# disables SWA for it, so it is absent here.
SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "cohere2": (4, False),
    "exaone4": (4, False),
    "olmo2": (4, False),
    "gpt-oss": (2, False),
}
# gemma2 has SWA even without the key: llama.cpp defaults its window to 4096.
SWA_DEFAULT_WINDOW = {"gemma2": 4096}

# llama-cpp-python `chat_format` for GGUFs without a template. An architecture not listed here
# gets None: the worker must refuse chat completions (plain completions still work) rather than
# guess a turn format. Phi-3 is absent on purpose: llama-cpp-python has no "phi-3" format.
CHAT_FORMAT_BY_ARCH = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "qwen": "qwen",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "mistral3": "mistral-instruct",
}


class GGUFError(ValueError):
    """The file is not a readable GGUF model (wrong magic, truncated, or missing required keys)."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        super().__init__(f"{path}: not a usable GGUF model: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Facts about one GGUF model. Per-layer values are tuples with one entry per block."""

    path: Path
    architecture: str
    name: str | None
    file_size: int
    file_type: str | None  # e.g. "MOSTLY_Q4_K_M", from general.file_type
    n_tensors: int
    weight_bytes: int  # sum of every tensor's data size
    input_bytes: int  # the part of weight_bytes llama.cpp keeps on the host (INPUT_TENSORS)
    tok_embd_bytes: int
    tied_output: bool  # no output.weight: llama.cpp loads token_embd a second time as the output layer
    fused_qkv: bool  # one attn_qkv projection instead of attn_q/attn_k/attn_v (phi3)
    ffn_gated: bool  # gate and up projections (SwiGLU/GeGLU), separate or fused as one 2*n_ff up
    n_layers: int
    n_embd: int
    n_ff: int  # largest feed-forward width (0 when absent)
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    context_length: int  # trained context (0 when absent)
    sliding_window: int  # 0 = no sliding-window attention
    swa_layers: tuple[bool, ...]
    pooling_type: int | None
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None = field(repr=False)
    chat_format_hint: str | None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def n_swa_layers(self) -> int:
        return sum(self.swa_layers)

    @property
    def gpu_weight_bytes(self) -> int:
        """Weights on the GPU when every layer is offloaded: all but the input layer, plus the
        duplicate of token_embd that serves as the output layer when the model ties them."""
        return self.weight_bytes - self.input_bytes + (self.tok_embd_bytes if self.tied_output else 0)


def _per_layer(value: Any, n_layers: int, what: str, path: Path) -> tuple[int, ...]:
    if isinstance(value, list):
        if len(value) != n_layers:
            raise GGUFError(path, f"{what} has {len(value)} entries for {n_layers} layers")
        return tuple(int(v) for v in value)
    return (int(value),) * n_layers


def swa_layer_pattern(arch: str, n_layers: int, window: int, pattern: Any) -> tuple[bool, ...]:
    """Which layers use sliding-window attention, as llama.cpp 0.3.x decides it."""
    if window <= 0 or arch not in SWA_PATTERNS:
        return (False,) * n_layers
    if isinstance(pattern, list):
        return (tuple(bool(v) for v in pattern) + (False,) * n_layers)[:n_layers]
    period, dense_first = SWA_PATTERNS[arch]
    if pattern is not None:
        period = int(pattern)
    if period == 0:
        return (True,) * n_layers
    if dense_first:
        return tuple(il % period != 0 for il in range(n_layers))
    return tuple(il % period < period - 1 for il in range(n_layers))


def chat_format_for(arch: str, name: str | None, tokens: Sequence[str]) -> str | None:
    """The llama-cpp-python chat_format for a model without a chat template, or None (refuse chat)."""
    if arch in CHAT_FORMAT_BY_ARCH:
        return CHAT_FORMAT_BY_ARCH[arch]
    if arch == "llama":
        vocab = set(tokens)
        if "<|eot_id|>" in vocab:
            return "llama-3"
        if "[INST]" in vocab or "mistral" in (name or "").lower():
            return "mistral-instruct"
        return "llama-2"
    return None


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Read a GGUF header. Raises GGUFError naming the path for anything that is not a usable model."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(path, f"truncated: {size} bytes")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                meta, tensors = _Header(buf, path).parse()
    except OSError as exc:
        raise GGUFError(path, exc.strerror or str(exc)) from exc
    return _info_from_header(path, size, meta, tensors)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type_name: str  # ggml type, e.g. "Q4_K"
    n_bytes: int
    offset: int  # absolute file offset of the data


class _Header:
    """A GGUF v2/v3 header parser that reads only what it must.

    gguf.GGUFReader builds one numpy view per array element, which takes over 10 s for a 262k-token
    vocabulary; this parser decodes the same header in well under a second, using the gguf package's
    type tables for tensor sizes.
    """

    _SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos, self.order = buf, path, 0, "<"

    def _take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise GGUFError(self.path, f"truncated: header needs bytes up to {start + n}, file has {len(self.buf)}")
        self.pos += n
        return start

    def _unpack(self, code: str) -> Any:
        fmt = self.order + code
        return struct.unpack_from(fmt, self.buf, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        n = self._unpack("Q")
        start = self._take(n)
        return self.buf[start:start + n].decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype in self._SCALARS:
            return self._unpack(self._SCALARS[vtype])
        if vtype == self._STRING:
            return self._string()
        if vtype == self._ARRAY:
            itype, count = self._unpack("I"), self._unpack("Q")
            if itype in self._SCALARS:
                code = self.order + self._SCALARS[itype]
                start = self._take(count * struct.calcsize(code))
                return list(struct.unpack_from(f"{self.order}{count}{code[1:]}", self.buf, start))
            if count > len(self.buf):
                raise GGUFError(self.path, f"array of {count} items in a {len(self.buf)}-byte file")
            return [self._value(itype) for _ in range(count)]
        raise GGUFError(self.path, f"unknown metadata value type {vtype} at byte {self.pos}")

    def parse(self) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        magic = bytes(self.buf[:4])
        if magic != b"GGUF":
            raise GGUFError(self.path, f"bad magic {magic!r} (expected b'GGUF')")
        self.pos = 4
        version = self._unpack("I")
        if version & 0xFFFF == 0:  # written on a big-endian machine
            self.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise GGUFError(self.path, f"unsupported GGUF version {version}")
        n_tensors, n_kv = self._unpack("Q"), self._unpack("Q")
        meta = {}
        for _ in range(n_kv):
            key = self._string()
            meta[key] = self._value(self._unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = self._string(), self._unpack("I")
            shape = tuple(self._unpack("Q") for _ in range(n_dims))
            infos.append((name, shape, self._unpack("I"), self._unpack("Q")))
        align = int(meta.get("general.alignment", 32))
        data_start = -(-self.pos // align) * align
        tensors = {}
        for name, shape, ttype, offset in infos:
            try:
                qtype = GGMLQuantizationType(ttype)
                block, size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise GGUFError(self.path, f"tensor {name} has a ggml type ({ttype}) unknown to gguf") from None
            n_bytes = math.prod(shape) // block * size
            tensors[name] = TensorInfo(name, shape, qtype.name, n_bytes, data_start + offset)
        return meta, tensors


def _info_from_header(path: Path, size: int, meta: dict[str, Any], tensors: dict[str, TensorInfo]) -> ModelInfo:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(key)
        return default if value is None else value

    arch = get("general.architecture")
    if not arch:
        raise GGUFError(path, "no general.architecture")

    def need(key: str) -> Any:
        value = get(f"{arch}.{key}")
        if value is None:
            raise GGUFError(path, f"missing {arch}.{key}")
        return value

    end = max((t.offset + t.n_bytes for t in tensors.values()), default=0)
    if end > size:
        raise GGUFError(path, f"truncated: tensor data ends at byte {end}, file has {size}")
    weight_bytes = sum(t.n_bytes for t in tensors.values())

    n_layers = int(need("block_count"))
    n_embd = int(need("embedding_length"))
    n_head = _per_layer(need("attention.head_count"), n_layers, "head_count", path)
    n_head_kv = _per_layer(get(f"{arch}.attention.head_count_kv", list(n_head)), n_layers, "head_count_kv", path)
    head_max = max(n_head, default=0)
    default_dim = n_embd // head_max if head_max else 0
    head_dim_k = int(get(f"{arch}.attention.key_length", default_dim))
    head_dim_v = int(get(f"{arch}.attention.value_length", head_dim_k if head_dim_k else default_dim))
    n_ff_raw = get(f"{arch}.feed_forward_length", 0)
    n_ff = max(n_ff_raw) if isinstance(n_ff_raw, list) else int(n_ff_raw)

    window = int(get(f"{arch}.attention.sliding_window", SWA_DEFAULT_WINDOW.get(arch, 0)) or 0)
    swa = swa_layer_pattern(arch, n_layers, window, get(f"{arch}.attention.sliding_window_pattern"))

    tokens: list[str] = get("tokenizer.ggml.tokens", []) or []
    tok_embd = tensors.get("token_embd.weight")
    vocab = len(tokens) or int(get(f"{arch}.vocab_size", 0)) or (tok_embd.shape[-1] if tok_embd is not None else 0)
    name = get("general.name")
    bos_id, eos_id = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
    file_type = get("general.file_type")
    return ModelInfo(
        path=path,
        architecture=arch,
        name=name,
        file_size=size,
        file_type=_file_type_name(file_type),
        n_tensors=len(tensors),
        weight_bytes=weight_bytes,
        input_bytes=sum(tensors[n].n_bytes for n in INPUT_TENSORS if n in tensors),
        tok_embd_bytes=tok_embd.n_bytes if tok_embd is not None else 0,
        tied_output="output.weight" not in tensors,
        fused_qkv="blk.0.attn_qkv.weight" in tensors,
        ffn_gated=_ffn_gated(tensors, n_ff),
        n_layers=n_layers,
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        context_length=int(get(f"{arch}.context_length", 0)),
        sliding_window=window if any(swa) else 0,
        swa_layers=swa,
        pooling_type=get(f"{arch}.pooling_type"),
        vocab_size=vocab,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        bos_token=_token(tokens, bos_id),
        eos_token=_token(tokens, eos_id),
        chat_template=get("tokenizer.chat_template") or None,
        chat_format_hint=chat_format_for(arch, name, tokens),
    )


def _ffn_gated(tensors: dict[str, TensorInfo], n_ff: int) -> bool:
    if "blk.0.ffn_gate.weight" in tensors or "blk.0.ffn_gate_exps.weight" in tensors:
        return True
    up = tensors.get("blk.0.ffn_up.weight")  # phi3 fuses gate and up into one 2 * n_ff projection
    return up is not None and len(up.shape) > 1 and n_ff > 0 and up.shape[1] == 2 * n_ff


def _token(tokens: list[str], idx: int | None) -> str | None:
    return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None


def _file_type_name(value: int | None) -> str | None:
    if value is None:
        return None
    from gguf import LlamaFileType

    try:
        return LlamaFileType(value).name
    except ValueError:
        return str(value)
