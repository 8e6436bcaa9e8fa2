"""KV cache types: names, ggml ids, storage sizes, and the VRAM a replica needs with each.

llama.cpp stores K and V in any ggml type; we offer three, in order of preference (quality first):

| type   | ggml id | block (elements) | bytes/block | bits/element | KV size vs f16 |
| ------ | ------- | ---------------- | ----------- | ------------ | -------------- |
| f16    | 1       | 1                | 2           | 16           | 1              |
| q8_0   | 8       | 32               | 34          | 8.5          | 0.53           |
| q4_0   | 2       | 32               | 18          | 4.5          | 0.28           |

A quantized V cache needs flash attention (llama.cpp refuses the context otherwise), and a quantized
type needs every layer's head size to be a multiple of its block (32). K and V always get the same
type here. `auto` is not a type: it lets placement pick one of the three per replica
(placement/kvchoice.py).

The KV size formula is engine.estimate.kv_cache_bytes: per layer, cells * (row(K) + row(V)), with
row(type, n) = ceil(n / block) * bytes_per_block (`row_bytes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from aivailable.engine.estimate import VramEstimate, estimate_vram
from aivailable.engine.gguf_info import ModelInfo

KvCacheType = Literal["f16", "q8_0", "q4_0"]
KvCacheSetting = Literal["f16", "q8_0", "q4_0", "auto"]
AUTO = "auto"
DEFAULT = "f16"


@dataclass(frozen=True, slots=True)
class KvType:
    """One ggml storage type as llama.cpp's ggml.c type traits define it."""

    name: str
    ggml_id: int  # enum ggml_type
    block: int  # elements per block
    block_bytes: int  # bytes per block

    @property
    def quantized(self) -> bool:
        return self.block > 1

    @property
    def bits_per_element(self) -> float:
        return 8 * self.block_bytes / self.block


TYPES: dict[str, KvType] = {
    t.name: t for t in (KvType("f16", 1, 1, 2), KvType("q8_0", 8, 32, 34), KvType("q4_0", 2, 32, 18))
}
PREFERENCE: tuple[str, ...] = ("f16", "q8_0", "q4_0")
"""Best quality first: `auto` tries them in this order."""
SETTINGS: tuple[str, ...] = (*PREFERENCE, AUTO)


class UnsupportedKvType(ValueError):
    """The model cannot store its KV cache in the asked type (`unsupported` says why)."""


def kv_type(name: str) -> KvType:
    """The type called `name`; ValueError naming the allowed ones otherwise."""
    try:
        return TYPES[name]
    except KeyError:
        raise ValueError(f"unknown KV cache type {name!r}: use one of {', '.join(SETTINGS)}") from None


def ggml_id(name: str) -> int:
    """llama.cpp's `type_k`/`type_v` value for this type."""
    return kv_type(name).ggml_id


def row_bytes(name: str, n: int) -> int:
    """Bytes of `n` elements of this type (whole blocks)."""
    t = kv_type(name)
    return -(-n // t.block) * t.block_bytes


def needs_flash_attn(name: str) -> bool:
    """True where llama.cpp must run flash attention: a quantized V cache."""
    return kv_type(name).quantized


def resolve(setting: str | None, node_default: str = DEFAULT) -> str:
    """The setting that applies to a model: its own, else the node's default."""
    out = setting or node_default
    if out not in SETTINGS:
        raise ValueError(f"unknown KV cache type {out!r}: use one of {', '.join(SETTINGS)}")
    return out


def candidates(setting: str) -> tuple[str, ...]:
    """Types a replica may get under `setting`, best first: all three for `auto`, else just it."""
    return PREFERENCE if setting == AUTO else (kv_type(setting).name,)


def unsupported(info: ModelInfo, name: str) -> str | None:
    """Why this model cannot store its KV cache as `name` (None: it can), as llama.cpp checks it."""
    t = kv_type(name)
    if not t.quantized:
        return None
    for what, dim in (("key", info.head_dim_k), ("value", info.head_dim_v)):
        if dim % t.block:
            return (f"kv_cache_type {name}: the model's {what} head size {dim} is not a multiple of the "
                    f"{name} block of {t.block}; use f16")
    return None


def estimate_for(info: ModelInfo, name: str, *, n_ctx: int, n_parallel: int = 1, on_cpu: bool = False,
                 **kw) -> VramEstimate:
    """estimate_vram with K and V stored as `name`, and flash attention where that needs it."""
    return estimate_vram(info, n_ctx=n_ctx, n_parallel=n_parallel, cache_type_k=name, cache_type_v=name,
                         flash_attn=needs_flash_attn(name), on_cpu=on_cpu, **kw)


def needs_by_type(info: ModelInfo, setting: str, *, n_ctx: int, n_parallel: int = 1,
                  on_cpu: bool = False) -> dict[str, float]:
    """Total MiB one replica needs for each type `setting` allows and the model supports, best first."""
    return {t: estimate_for(info, t, n_ctx=n_ctx, n_parallel=n_parallel, on_cpu=on_cpu).total_mib
            for t in candidates(setting) if unsupported(info, t) is None}


_REFUSALS = (
    "requires flash attention", "requires flash_attn", "flash attention not supported",
    "cache type", "does not divide",
)


def kv_refusal(name: str, load_log: str) -> str | None:
    """Why llama.cpp refused a context with a quantized KV cache, from its load log (None: not that).

    llama.cpp resolves flash attention ("auto") by checking that the model's device runs it; when the
    backend cannot (no flash-attention kernel, or none for these K/V types), a quantized V cache is
    refused rather than run elsewhere."""
    if not kv_type(name).quantized:
        return None
    said = [ln.strip() for ln in load_log.splitlines() if any(r in ln.lower() for r in _REFUSALS)]
    if not said:
        return None
    return (f"kv_cache_type {name} needs flash attention with {name} K and V on this model's device, and "
            f"this llama.cpp build refused it ({'; '.join(said[-2:])}). Use kv_cache_type = \"f16\" for this "
            f"model, or a llama.cpp build whose backend runs flash attention for {name} "
            f"(CUDA: GGML_CUDA_FA_ALL_QUANTS=ON covers every K/V type pair)")


_SPLITS = re.compile(r"graph: nodes = \d+, splits = (\d+)")


def graph_splits(load_log: str) -> int | None:
    """Backend splits of the last graph llama.cpp reserved ("sched_reserve: graph: nodes = N, splits = S")."""
    found = _SPLITS.findall(load_log)
    return int(found[-1]) if found else None


def attention_left_device(name: str, base_splits: int | None, splits: int | None, n_layers: int) -> str | None:
    """Why a quantized cache's context runs attention off the GPU (None: it does not, or cannot tell).

    With a quantized V cache llama.cpp forces flash attention on; an op the GPU backend cannot run goes
    to the CPU backend, which adds about two graph splits per layer. `base_splits` is the same model's
    context with f16 and no flash attention, fully offloaded."""
    if not kv_type(name).quantized or base_splits is None or splits is None:
        return None
    if splits <= base_splits + max(2, n_layers // 2):
        return None
    return (f"kv_cache_type {name}: this llama.cpp build's GPU backend cannot run flash attention with {name} "
            f"K and V for this model (the graph splits into {splits} parts instead of {base_splits}: attention "
            f"would run on the CPU). Use kv_cache_type = \"f16\" for this model, or a llama.cpp build whose backend "
            f"runs flash attention for {name} (CUDA: GGML_CUDA_FA_ALL_QUANTS=ON covers every K/V type pair)")
