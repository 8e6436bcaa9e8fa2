"""Real legacy GPUs and real GGUF models for the placement benchmark, with where each figure comes from.

VRAM of a GPU: the vendor's spec sheet, in MiB (1 GB of GDDR/HBM on these cards = 1024 MiB).
`reserved_mib` is our assumption for the CUDA/ROCm context and driver (nvidia-smi typically shows
250-450 MiB used by an idle CUDA context on Pascal/Volta; ROCm contexts are similar).

VRAM of a model replica = GGUF file size + KV cache at its context + compute buffer:
- file sizes: the "Download a file" tables of the Hugging Face repos named per model (bartowski/*-GGUF,
  nomic-ai/nomic-embed-text-v1.5-GGUF), given there in GB (10^9 bytes); transcribed, and spot-checked
  against stored copies of some of those READMEs (e.g. gemma-2-27b-it Q8_0 28.93 GB), so expect +-1%;
- KV cache (f16): 2 * n_layers * n_kv_heads * head_dim * ctx * 2 bytes, with n_layers / n_kv_heads /
  head_dim from each base model's config.json on Hugging Face;
- compute buffer: an estimate (llama.cpp logs "compute buffer size" of roughly 0.2-0.8 GiB for these models
  at n_batch 512); see COMPUTE_MIB.
Per-replica throughput (for the secondary "served at capacity" metric only) is a rough assumption:
decoding is memory-bound, so tokens/s ~ ASSUMED_BANDWIDTH_GBPS / weights GB, and a request is
ASSUMED_TOKENS_PER_REQUEST output tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
ASSUMED_BANDWIDTH_GBPS = 400.0  # typical of these cards: P40 346, 1080 Ti 484, T4 320, RX 580 256, MI50 1024
ASSUMED_TOKENS_PER_REQUEST = 250.0
EMBEDDING_RPS = 20.0  # an embedding request is one short forward pass


@dataclass(frozen=True)
class GpuType:
    name: str
    vendor: str
    vram_mib: int
    reserved_mib: int
    source: str


GPU_TYPES: dict[str, GpuType] = {
    g.name: g
    for g in [
        GpuType("GTX 1070", "nvidia", 8 * 1024, 300, "NVIDIA GeForce GTX 1070 spec sheet: 8 GB GDDR5"),
        GpuType("GTX 1080", "nvidia", 8 * 1024, 300, "NVIDIA GeForce GTX 1080 spec sheet: 8 GB GDDR5X"),
        GpuType(
            "GTX 1080 Ti", "nvidia", 11 * 1024, 300, "NVIDIA GeForce GTX 1080 Ti spec sheet: 11 GB GDDR5X"
        ),
        GpuType(
            "RTX 2080 Ti", "nvidia", 11 * 1024, 300, "NVIDIA GeForce RTX 2080 Ti spec sheet: 11 GB GDDR6"
        ),
        GpuType("Tesla P4", "nvidia", 8 * 1024, 300, "NVIDIA Tesla P4 datasheet: 8 GB GDDR5"),
        GpuType("Tesla P40", "nvidia", 24 * 1024, 300, "NVIDIA Tesla P40 datasheet: 24 GB GDDR5"),
        GpuType("Tesla P100 16GB", "nvidia", 16 * 1024, 300, "NVIDIA Tesla P100 PCIe datasheet: 16 GB HBM2"),
        GpuType("Tesla V100 16GB", "nvidia", 16 * 1024, 300, "NVIDIA Tesla V100 datasheet: 16 GB HBM2"),
        GpuType("Tesla V100 32GB", "nvidia", 32 * 1024, 300, "NVIDIA Tesla V100 datasheet: 32 GB HBM2"),
        GpuType("Tesla T4", "nvidia", 16 * 1024, 300, "NVIDIA T4 datasheet: 16 GB GDDR6"),
        GpuType("Tesla M40 24GB", "nvidia", 24 * 1024, 300, "NVIDIA Tesla M40 24 GB datasheet: 24 GB GDDR5"),
        GpuType("RX 580", "amd", 8 * 1024, 400, "AMD Radeon RX 580 spec sheet: 8 GB GDDR5"),
        GpuType("Radeon VII", "amd", 16 * 1024, 400, "AMD Radeon VII spec sheet: 16 GB HBM2"),
        GpuType("Instinct MI25", "amd", 16 * 1024, 400, "AMD Radeon Instinct MI25 datasheet: 16 GB HBM2"),
        GpuType(
            "Instinct MI50 16GB", "amd", 16 * 1024, 400, "AMD Radeon Instinct MI50 datasheet: 16 GB HBM2"
        ),
        GpuType(
            "Instinct MI50 32GB", "amd", 32 * 1024, 400, "AMD Radeon Instinct MI50 datasheet: 32 GB HBM2"
        ),
    ]
}


@dataclass(frozen=True)
class Arch:
    """Attention shape from the base model's config.json (layers, KV heads, head_dim)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int


ARCHS = {
    "llama-3.2-1b": Arch(16, 8, 64),  # meta-llama/Llama-3.2-1B-Instruct config.json
    "llama-3.2-3b": Arch(28, 8, 128),  # meta-llama/Llama-3.2-3B-Instruct
    "llama-3.1-8b": Arch(32, 8, 128),  # meta-llama/Llama-3.1-8B-Instruct
    "llama-3.3-70b": Arch(80, 8, 128),  # meta-llama/Llama-3.3-70B-Instruct
    "qwen2.5-0.5b": Arch(24, 2, 64),  # Qwen/Qwen2.5-0.5B-Instruct
    "qwen2.5-7b": Arch(28, 4, 128),  # Qwen/Qwen2.5-7B-Instruct
    "qwen2.5-14b": Arch(48, 8, 128),  # Qwen/Qwen2.5-14B-Instruct
    "qwen2.5-32b": Arch(64, 8, 128),  # Qwen/Qwen2.5-32B-Instruct
    "mistral-7b": Arch(32, 8, 128),  # mistralai/Mistral-7B-Instruct-v0.3
    "mistral-nemo-12b": Arch(40, 8, 128),  # mistralai/Mistral-Nemo-Instruct-2407
    "gemma-2-9b": Arch(42, 8, 256),  # google/gemma-2-9b-it
    "gemma-2-27b": Arch(46, 16, 128),  # google/gemma-2-27b-it
    "phi-3.5-mini": Arch(32, 32, 96),  # microsoft/Phi-3.5-mini-instruct (no GQA)
    "nomic-embed-v1.5": Arch(12, 12, 64),  # nomic-ai/nomic-embed-text-v1.5 (BERT-style encoder)
}


@dataclass(frozen=True)
class GgufFile:
    name: str
    arch: str
    quant: str
    file_gb: float  # as listed by the repo (10^9 bytes)
    repo: str
    default_ctx: int = 8192
    embedding: bool = False


GGUF_FILES: list[GgufFile] = [
    GgufFile("llama-3.2-1b", "llama-3.2-1b", "Q4_K_M", 0.81, "bartowski/Llama-3.2-1B-Instruct-GGUF"),
    GgufFile("llama-3.2-1b", "llama-3.2-1b", "Q8_0", 1.32, "bartowski/Llama-3.2-1B-Instruct-GGUF"),
    GgufFile("llama-3.2-3b", "llama-3.2-3b", "Q4_K_M", 2.02, "bartowski/Llama-3.2-3B-Instruct-GGUF"),
    GgufFile("llama-3.2-3b", "llama-3.2-3b", "Q8_0", 3.42, "bartowski/Llama-3.2-3B-Instruct-GGUF"),
    GgufFile("llama-3.1-8b", "llama-3.1-8b", "Q4_K_M", 4.92, "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"),
    GgufFile("llama-3.1-8b", "llama-3.1-8b", "Q8_0", 8.54, "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"),
    GgufFile("llama-3.3-70b", "llama-3.3-70b", "Q4_K_M", 42.52, "bartowski/Llama-3.3-70B-Instruct-GGUF"),
    GgufFile("qwen2.5-0.5b", "qwen2.5-0.5b", "Q8_0", 0.53, "bartowski/Qwen2.5-0.5B-Instruct-GGUF"),
    GgufFile("qwen2.5-7b", "qwen2.5-7b", "Q4_K_M", 4.68, "bartowski/Qwen2.5-7B-Instruct-GGUF"),
    GgufFile("qwen2.5-7b", "qwen2.5-7b", "Q8_0", 8.10, "bartowski/Qwen2.5-7B-Instruct-GGUF"),
    GgufFile("qwen2.5-coder-7b", "qwen2.5-7b", "Q4_K_M", 4.68, "bartowski/Qwen2.5-Coder-7B-Instruct-GGUF"),
    GgufFile("qwen2.5-14b", "qwen2.5-14b", "Q4_K_M", 8.99, "bartowski/Qwen2.5-14B-Instruct-GGUF"),
    GgufFile("qwen2.5-14b", "qwen2.5-14b", "Q8_0", 15.70, "bartowski/Qwen2.5-14B-Instruct-GGUF"),
    GgufFile("qwen2.5-32b", "qwen2.5-32b", "Q4_K_M", 19.85, "bartowski/Qwen2.5-32B-Instruct-GGUF"),
    GgufFile("qwen2.5-32b", "qwen2.5-32b", "Q8_0", 34.82, "bartowski/Qwen2.5-32B-Instruct-GGUF"),
    GgufFile(
        "deepseek-r1-distill-llama-8b",
        "llama-3.1-8b",
        "Q4_K_M",
        4.92,
        "bartowski/DeepSeek-R1-Distill-Llama-8B-GGUF",
    ),
    GgufFile(
        "deepseek-r1-distill-qwen-14b",
        "qwen2.5-14b",
        "Q4_K_M",
        8.99,
        "bartowski/DeepSeek-R1-Distill-Qwen-14B-GGUF",
    ),
    GgufFile(
        "deepseek-r1-distill-qwen-32b",
        "qwen2.5-32b",
        "Q4_K_M",
        19.85,
        "bartowski/DeepSeek-R1-Distill-Qwen-32B-GGUF",
    ),
    GgufFile("mistral-7b-v0.3", "mistral-7b", "Q4_K_M", 4.37, "bartowski/Mistral-7B-Instruct-v0.3-GGUF"),
    GgufFile("mistral-7b-v0.3", "mistral-7b", "Q8_0", 7.70, "bartowski/Mistral-7B-Instruct-v0.3-GGUF"),
    GgufFile(
        "mistral-nemo-12b", "mistral-nemo-12b", "Q4_K_M", 7.48, "bartowski/Mistral-Nemo-Instruct-2407-GGUF"
    ),
    GgufFile(
        "mistral-nemo-12b", "mistral-nemo-12b", "Q8_0", 13.02, "bartowski/Mistral-Nemo-Instruct-2407-GGUF"
    ),
    GgufFile("gemma-2-9b", "gemma-2-9b", "Q4_K_M", 5.76, "bartowski/gemma-2-9b-it-GGUF"),
    GgufFile("gemma-2-9b", "gemma-2-9b", "Q8_0", 9.83, "bartowski/gemma-2-9b-it-GGUF"),
    GgufFile("gemma-2-27b", "gemma-2-27b", "Q4_K_M", 16.65, "bartowski/gemma-2-27b-it-GGUF"),
    GgufFile("gemma-2-27b", "gemma-2-27b", "Q8_0", 28.93, "bartowski/gemma-2-27b-it-GGUF"),
    GgufFile("phi-3.5-mini", "phi-3.5-mini", "Q4_K_M", 2.39, "bartowski/Phi-3.5-mini-instruct-GGUF", 4096),
    GgufFile("phi-3.5-mini", "phi-3.5-mini", "Q8_0", 4.06, "bartowski/Phi-3.5-mini-instruct-GGUF", 4096),
    GgufFile(
        "nomic-embed-text-v1.5",
        "nomic-embed-v1.5",
        "Q8_0",
        0.146,
        "nomic-ai/nomic-embed-text-v1.5-GGUF",
        2048,
        embedding=True,
    ),
]


def kv_cache_mib(arch: Arch, ctx: int) -> float:
    """f16 KV cache: 2 (K and V) * n_layers * n_kv_heads * head_dim * ctx * 2 bytes."""
    return 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * ctx * 2 / MIB


def compute_mib(file_gb: float) -> int:
    """Estimated llama.cpp compute buffer (grows with the vocabulary and hidden size, so with the model)."""
    return 256 if file_gb < 3 else 512 if file_gb < 20 else 768


@dataclass(frozen=True)
class CatalogModel:
    name: str
    vram_mib: int
    replica_rps: float
    embedding: bool
    source: str


def catalog_model(f: GgufFile, ctx: int | None = None) -> CatalogModel:
    """One servable model: file + KV cache at `ctx` (default: the file's default) + compute buffer."""
    ctx = ctx or f.default_ctx
    file_mib = f.file_gb * 1e9 / MIB
    need = file_mib + kv_cache_mib(ARCHS[f.arch], ctx) + compute_mib(f.file_gb)
    rps = EMBEDDING_RPS if f.embedding else ASSUMED_BANDWIDTH_GBPS / f.file_gb / ASSUMED_TOKENS_PER_REQUEST
    suffix = "" if ctx == f.default_ctx else f"-ctx{ctx // 1024}k"
    name = f"{f.name}-{f.quant.lower()}{suffix}"
    return CatalogModel(name, int(round(need)), rps, f.embedding, f"{f.repo} ({f.quant}, {f.file_gb} GB)")


def base_catalog() -> list[CatalogModel]:
    """Every GGUF file at its default context (29 models, 0.6 GiB to 45 GiB per replica)."""
    return [catalog_model(f) for f in GGUF_FILES]


def extended_catalog(n: int) -> list[CatalogModel]:
    """`n` models: every file at its default context, then at 4k/16k/32k contexts (more KV cache)."""
    out = base_catalog()
    for ctx in (16384, 4096, 32768):
        for f in GGUF_FILES:
            if len(out) >= n:
                return out[:n]
            if not f.embedding and ctx != f.default_ctx:
                out.append(catalog_model(f, ctx))
    return out[:n]
