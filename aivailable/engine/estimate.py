"""How much device memory a model needs, from its GGUF metadata, before llama.cpp loads it.

Three parts, each mirroring what llama.cpp (as bundled with llama-cpp-python 0.3.x) allocates:

* weights: the tensors in the file. With every layer offloaded, llama.cpp keeps the input layer
  (token_embd, position/type embeddings) in host memory and, when the model ties its output to
  token_embd, loads a second copy of token_embd on the GPU as the output layer
  (ModelInfo.gpu_weight_bytes). On a CPU-only build (simulated GPUs) everything is one host buffer.
* KV cache: per layer n_head_kv * head_dim * (K bytes + V bytes) per cell. Cells: n_ctx rounded up to
  256 (per sequence when n_parallel > 1 and the cache is not unified); sliding-window layers get only
  pad(n_swa + n_ubatch, 256) cells unless swa_full (llama.cpp's default context parameter, which
  llama-cpp-python keeps). Encoder-only architectures (NO_KV_ARCHS) have no KV cache.
* compute buffer: the peak of ggml's graph allocator for the worst-case batch (n_ubatch tokens, all
  of them outputs). `compute_buffer_bytes` gives the formula and its calibration.

`overhead_mib` is what llama.cpp does not report: a fixed per-process device context (CUDA/ROCm
runtime, cuBLAS workspace, the backend's scratch pool) plus SAFETY_MARGIN of the buffers.

Not modelled: recurrent and hybrid state (Mamba, RWKV, Qwen3-Next), MoE expert routing buffers, MLA
caches (DeepSeek), and embedding-mode graphs (`Llama(embedding=True)` outputs embeddings, not logits).
"""

from __future__ import annotations

from dataclasses import dataclass

from aivailable.engine.gguf_info import ModelInfo

MIB = 1 << 20
# Architectures llama.cpp runs without a KV cache (llama_model::create_memory returns none).
NO_KV_ARCHS = frozenset({
    "bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert", "eurobert",
    "modern-bert", "gemma-embedding", "dream", "llada", "llada-moe", "rnd1",
})
KV_PAD = 256  # llama.cpp rounds n_ctx, n_ctx per sequence and the SWA cache up to this (llama-context.cpp)

# Fraction added to weights + KV + compute to cover what the formulas miss: allocator fragmentation
# and graph differences between backends. Weights and KV match llama.cpp to the byte; the compute
# buffer formula stays within about 8% of what llama.cpp reports (CPU and CUDA builds, see
# compute_buffer_bytes), and the compute buffer is rarely over a third of the total, so 5% of the
# total keeps the estimate on the safe side without wasting much VRAM.
SAFETY_MARGIN = 0.05
# Device memory a llama.cpp worker process uses besides its buffers: the CUDA context with lazily
# loaded kernels, cuBLAS handle and workspace, ggml-cuda's scratch pool. Measured with NVML on an
# H100 (CUDA 13.0, driver 580, llama.cpp of llama-cpp-python 0.3.36): 530 MiB after loading, 700 MiB
# after the first full batch, whatever the model size (25 MiB to 1.3 GiB of buffers). Older GPUs and
# CUDA versions need less; pass the figure measured on the node as `context_mib` when it is known.
GPU_CONTEXT_MIB = 700

# Calibrated coefficients of the compute-buffer peak (see compute_buffer_bytes): how many f32
# activations of n_ubatch tokens, of each width, are alive at the peak of a phase besides its large
# tensor. Fitted on about 200 loads of 30 generated model shapes and the real Gemma (CPU build; the
# largest error without flash attention is 8%) and checked against 10 fully offloaded CUDA loads.
ATTN_EMBD_WIDE = 2.5  # residual stream, normed input (n_embd wide)
ATTN_Q_WIDE = 3  # Q, KQV and merged heads (n_head * head_dim wide)
ATTN_KV_WIDE = 1  # K/V projections before they are stored in the cache (0 with a fused QKV)
FFN_EMBD_WIDE = 4  # residual, normed input, down projection, sum
OUT_EMBD_WIDE = 1  # final norm output


def ggml_row_bytes(type_name: str, n: int) -> int:
    """Bytes of `n` elements of a ggml type ("f16", "q8_0", ...), with its block size."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType[type_name.upper()]
    except KeyError:
        raise ValueError(f"unknown cache type {type_name!r}") from None
    block, size = GGML_QUANT_SIZES[qtype]
    return -(-n // block) * size


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True, slots=True)
class KvLayout:
    """KV cache cells as llama.cpp sizes them for one context."""

    n_ctx: int  # after padding (what llama.cpp calls n_ctx)
    n_ctx_seq: int  # cells per stream of the full-attention cache
    n_stream: int  # 1 when unified or n_parallel == 1, else n_parallel
    swa_cells: int  # cells per stream of the sliding-window cache (== n_ctx_seq when swa_full)
    n_ubatch: int  # the worst-case batch the compute graph is reserved for


def kv_layout(
    info: ModelInfo, *, n_ctx: int, n_parallel: int = 1, n_batch: int = 512, n_ubatch: int = 512,
    kv_unified: bool = False, swa_full: bool = True,
) -> KvLayout:
    """Mirror llama_context's n_ctx/n_batch/n_ubatch clamping and the KV caches' cell counts."""
    if n_parallel < 1:
        raise ValueError("n_parallel must be >= 1")
    n_ctx = n_ctx if n_ctx > 0 else info.context_length
    if n_ctx <= 0:
        raise ValueError("n_ctx is 0 and the model has no trained context length")
    batch = min(n_ctx, n_batch)  # causal attention: batch limited by the context (and by llama-cpp-python)
    ubatch = min(batch, n_ubatch)
    padded = _pad(n_ctx, KV_PAD)
    if kv_unified or n_parallel == 1:
        n_ctx_seq, n_stream = padded, 1
        window = info.sliding_window * n_parallel + ubatch
    else:  # one stream of n_ctx / n_parallel cells per sequence
        n_ctx_seq, n_stream = _pad(padded // n_parallel, KV_PAD), n_parallel
        padded = n_ctx_seq * n_parallel
        window = info.sliding_window + ubatch
    swa = n_ctx_seq if swa_full else _pad(min(n_ctx_seq, window), KV_PAD)
    return KvLayout(padded, n_ctx_seq, n_stream, swa, min(padded, ubatch))


def kv_cache_bytes(
    info: ModelInfo, layout: KvLayout, cache_type_k: str = "f16", cache_type_v: str = "f16", *,
    flash_attn: bool = False,
) -> int:
    """K and V tensors of every layer: n_head_kv * head_dim elements per cell.

    Without flash attention V is stored transposed, and when its width varies across layers every
    layer gets the widest (llama-kv-cache.cpp, TAG_V_CACHE_VARIABLE).
    """
    if info.architecture in NO_KV_ARCHS:
        return 0
    v_widths = [n * info.head_dim_v for n in info.n_head_kv]
    if not flash_attn and len(set(v_widths)) > 1:
        v_widths = [max(v_widths)] * len(v_widths)
    total = 0
    for il in range(info.n_layers):
        cells = (layout.swa_cells if info.swa_layers[il] else layout.n_ctx_seq) * layout.n_stream
        k = ggml_row_bytes(cache_type_k, info.n_head_kv[il] * info.head_dim_k)
        v = ggml_row_bytes(cache_type_v, v_widths[il])
        total += (k + v) * cells
    return total


def compute_buffer_bytes(info: ModelInfo, layout: KvLayout, *, flash_attn: bool = False) -> int:
    """Peak of the worst-case graph (n_ubatch tokens, all outputs), as ggml-alloc reserves it.

    The allocator reuses memory, so the peak is the largest of three phases, all over U = n_ubatch
    tokens of f32 activations:

    * attention: KQ scores K*H*U (not materialized with flash attention) plus ATTN_*_WIDE
      activations, plus the KQ masks (K*U each, f16 with flash attention; a second one over the
      SWA cells for sliding-window models), which live from the first layer to the last;
    * feed-forward: gate, up and their product (3 * n_ff, 2 for an ungated FFN) plus FFN_EMBD_WIDE
      activations, plus the masks;
    * output: the logits V*U plus OUT_EMBD_WIDE activations (the masks are freed by then).

    Calibrated against llama.cpp's reported compute buffer on generated llama, qwen2, gemma3, phi3
    and starcoder2 models (n_embd 256-3072, vocab 512-262k, n_ctx 256-8192, n_ubatch 100-512) and the
    real Gemma 3 270M: within 8% of the CPU buffer and of the CUDA0 buffer of a fully offloaded load
    (H100). With flash attention the CPU figure wanders up to about 20% around the formula (the CUDA
    flash-attention path was not measured).
    """
    u = layout.n_ubatch
    # cells one sequence attends to (per stream), in full-attention and in sliding-window layers
    cells = {swa: layout.swa_cells if swa else layout.n_ctx_seq for swa in info.swa_layers}
    cells = cells or {False: layout.n_ctx_seq}
    k = max(cells.values())
    h = max(info.n_head, default=0)
    e, eq = info.n_embd, h * info.head_dim_k
    ekv = max(info.n_head_kv, default=0) * max(info.head_dim_k, info.head_dim_v)
    masks = (2 if flash_attn else 4) * u * sum(cells.values())  # one mask per kind of layer present
    kv_wide = 0 if info.fused_qkv else ATTN_KV_WIDE
    wide = ATTN_EMBD_WIDE * e + ATTN_Q_WIDE * eq + kv_wide * ekv
    attn = masks + 4 * u * ((0 if flash_attn else k * h) + wide)
    ffn = masks + 4 * u * ((3 if info.ffn_gated else 2) * info.n_ff + FFN_EMBD_WIDE * e)
    out = 4 * u * (info.vocab_size + OUT_EMBD_WIDE * e)
    return int(max(attn, ffn, out))


@dataclass(frozen=True, slots=True)
class VramEstimate:
    """Device memory for one model replica, in MiB. total = weights + KV + compute + overhead."""

    weights_mib: float
    kv_cache_mib: float
    compute_mib: float
    overhead_mib: float
    n_ctx: int  # padded context llama.cpp will allocate
    host_mib: float = 0.0  # weights llama.cpp keeps in host RAM (the input layer), not counted above

    @property
    def buffers_mib(self) -> float:
        """What llama.cpp itself reports for its device buffers (model + KV + compute)."""
        return self.weights_mib + self.kv_cache_mib + self.compute_mib

    @property
    def total_mib(self) -> float:
        return self.buffers_mib + self.overhead_mib

    def explain(self) -> str:
        return (
            f"{self.total_mib:.0f} MiB = weights {self.weights_mib:.0f} + KV cache {self.kv_cache_mib:.0f} "
            f"(n_ctx {self.n_ctx}) + compute {self.compute_mib:.0f} + overhead {self.overhead_mib:.0f}"
            + (f"; {self.host_mib:.0f} MiB of input embeddings stay in host RAM" if self.host_mib else "")
        )


def estimate_vram(
    info: ModelInfo,
    *,
    n_ctx: int,
    n_parallel: int = 1,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    n_batch: int = 512,
    n_ubatch: int = 512,
    flash_attn: bool = False,
    kv_unified: bool = False,
    swa_full: bool = True,
    on_cpu: bool = False,
    context_mib: float = GPU_CONTEXT_MIB,
) -> VramEstimate:
    """Estimate the memory llama.cpp allocates for `info` with these context parameters.

    Defaults are llama-cpp-python's (`Llama(n_ctx=..., n_gpu_layers=-1)`). `n_ctx` 0 means the
    trained context. `on_cpu` estimates a CPU-only build (a simulated GPU): all weights in one host
    buffer and no device context; otherwise the figures are those of a fully offloaded GPU load, and
    `context_mib` is the per-process device overhead added to `overhead_mib`.
    """
    layout = kv_layout(
        info, n_ctx=n_ctx, n_parallel=n_parallel, n_batch=n_batch, n_ubatch=n_ubatch,
        kv_unified=kv_unified, swa_full=swa_full,
    )
    weights = info.weight_bytes if on_cpu else info.gpu_weight_bytes
    kv = kv_cache_bytes(info, layout, cache_type_k, cache_type_v, flash_attn=flash_attn)
    compute = compute_buffer_bytes(info, layout, flash_attn=flash_attn)
    buffers = (weights + kv + compute) / MIB
    overhead = SAFETY_MARGIN * buffers + (0.0 if on_cpu else context_mib)
    return VramEstimate(
        weights_mib=weights / MIB,
        kv_cache_mib=kv / MIB,
        compute_mib=compute / MIB,
        overhead_mib=overhead,
        n_ctx=layout.n_ctx,
        host_mib=0.0 if on_cpu else info.input_bytes / MIB,
    )
