"""estimate_vram against the buffers llama.cpp itself reports when it loads the model.

Generated models of five architectures and the real Gemma 3 270M are loaded in one subprocess
(llama.cpp's logging and backend state are process-global); each load's log is parsed with
parse_load_log and every part of the estimate must be within 10% of it. CUDA figures recorded on an
H100 check the GPU side (weights without the host-resident token embedding) without a GPU here.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aivailable.engine import kvcache
from aivailable.engine.estimate import (
    GPU_CONTEXT_MIB,
    SAFETY_MARGIN,
    estimate_vram,
    ggml_row_bytes,
    kv_cache_bytes,
    kv_layout,
)
from aivailable.engine.gguf_info import read_model_info, swa_layer_pattern
from tests.ggufgen import write_model

TOLERANCE = 0.10
ROOT = Path(__file__).parent.parent

# name -> write_model arguments (ctx_train 8192 for all)
MODELS = {
    "llama_gqa": dict(arch="llama", n_layers=4, n_embd=256, n_head=8, n_head_kv=2, n_ff=512, vocab=512),
    "llama_q8_hd128": dict(arch="llama", n_layers=2, n_embd=512, n_head=8, n_head_kv=4, n_ff=1536, vocab=2048,
                           dtype="q8_0", head_dim=128),
    "qwen2": dict(arch="qwen2", n_layers=3, n_embd=384, n_head=6, n_head_kv=2, n_ff=1024, vocab=1024),
    "gemma3_swa": dict(arch="gemma3", n_layers=7, n_embd=256, n_head=4, n_head_kv=1, n_ff=768, vocab=2048,
                       head_dim=64, sliding_window=256),
    "phi3": dict(arch="phi3", n_layers=3, n_embd=256, n_head=8, n_head_kv=8, n_ff=512, vocab=512),
    "starcoder2": dict(arch="starcoder2", n_layers=3, n_embd=256, n_head=8, n_head_kv=2, n_ff=1024, vocab=512),
    "llama_vocab32k_f32": dict(arch="llama", n_layers=2, n_embd=256, n_head=4, n_head_kv=4, n_ff=512,
                               vocab=32000, dtype="f32"),
}
# (model, n_ctx, Llama keyword arguments); "gemma" is the real Gemma 3 270M Q4_K_M
CASES = [
    *[(m, n_ctx, {}) for m in MODELS for n_ctx in (512, 2048)],
    ("llama_gqa", 1000, {"n_ubatch": 128}),
    ("llama_q8_hd128", 4096, {"n_batch": 256, "n_ubatch": 256}),
    ("gemma3_swa", 4096, {"swa_full": False}),
    ("gemma3_swa", 300, {}),
    ("qwen2", 4096, {"type_k": "q8_0"}),
    ("gemma", 512, {}),
    ("gemma", 2048, {}),
    ("gemma", 8192, {"swa_full": False}),
    ("gemma", 2048, {"n_ubatch": 128}),
    # kv_cache_type: K and V quantized alike, flash attention on (engine/kvcache.py)
    ("gemma", 2048, {"kv": "q8_0"}),
    ("gemma", 2048, {"kv": "q4_0"}),
    ("gemma", 8192, {"kv": "q8_0", "swa_full": False}),
    ("gemma", 4096, {"kv": "q4_0", "n_ubatch": 128}),
    ("llama_gqa", 2048, {"kv": "q4_0"}),
    ("qwen2", 1024, {"kv": "q8_0"}),
]

LOADER = textwrap.dedent("""
    import json, sys
    import llama_cpp
    from aivailable.engine.loadlog import capture_load_log

    from aivailable.engine import kvcache

    for case in json.loads(sys.argv[1]):
        kw = dict(case["kw"])
        for key in ("type_k", "type_v"):
            if key in kw:
                kw[key] = kvcache.ggml_id(kw[key])
        kv = kw.pop("kv", None)
        if kv is not None:  # what the worker's BatchEngine asks for
            kw.update(type_k=kvcache.ggml_id(kv), type_v=kvcache.ggml_id(kv), flash_attn=kvcache.needs_flash_attn(kv))
        with capture_load_log(passthrough=False) as cap:
            llm = llama_cpp.Llama(case["path"], n_ctx=case["n_ctx"], n_threads=1, verbose=False, **kw)
        r = cap.report()
        text = None
        if case.get("generate"):
            text = llm("Hello", max_tokens=3, temperature=0.0)["choices"][0]["text"]
        del llm
        print(json.dumps({"id": case["id"], "weights": r.weights_mib, "kv": r.kv_total_mib,
                          "compute": r.compute_total_mib, "cells": r.kv_cells, "text": text}), flush=True)
""")


def _case_id(model: str, n_ctx: int, kw: dict) -> str:
    return f"{model}-{n_ctx}" + "".join(f"-{k}={v}" for k, v in sorted(kw.items()))


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory, gemma_path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("estimate-models")
    paths = {"gemma": gemma_path}
    for name, spec in MODELS.items():
        spec = dict(spec)
        paths[name] = write_model(folder / f"{name}.gguf", spec.pop("arch"), ctx_train=8192, **spec)
    return paths


@pytest.fixture(scope="module")
def reported(model_paths) -> dict[str, dict]:
    """Load every case once, in one subprocess, and return llama.cpp's figures by case id."""
    seen: set[str] = set()
    cases = []
    for model, n_ctx, kw in CASES:
        cases.append({"id": _case_id(model, n_ctx, kw), "path": str(model_paths[model]), "n_ctx": n_ctx,
                      "kw": kw, "generate": model not in seen})
        seen.add(model)
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases)], capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    results = {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert proc.returncode == 0 and len(results) == len(cases), proc.stderr[-3000:]
    return results


def _estimate(info, n_ctx: int, kw: dict, **extra):
    if "kv" in kw:
        return kvcache.estimate_for(info, kw["kv"], n_ctx=n_ctx, n_batch=kw.get("n_batch", 512),
                                    n_ubatch=kw.get("n_ubatch", 512), swa_full=kw.get("swa_full", True), **extra)
    return estimate_vram(
        info, n_ctx=n_ctx, n_batch=kw.get("n_batch", 512), n_ubatch=kw.get("n_ubatch", 512),
        swa_full=kw.get("swa_full", True), cache_type_k=kw.get("type_k", "f16"),
        cache_type_v=kw.get("type_v", "f16"), **extra,
    )


def _within(estimate: float, actual: float) -> bool:
    return abs(estimate - actual) <= TOLERANCE * actual


@pytest.mark.parametrize(("model", "n_ctx", "kw"), CASES, ids=[_case_id(*c) for c in CASES])
def test_estimate_matches_llama_cpp(model_paths, reported, model, n_ctx, kw):
    got = reported[_case_id(model, n_ctx, kw)]
    est = _estimate(read_model_info(model_paths[model]), n_ctx, kw, on_cpu=True)
    table = (f"weights {got['weights']:.2f}/{est.weights_mib:.2f} kv {got['kv']:.2f}/{est.kv_cache_mib:.2f} "
             f"compute {got['compute']:.2f}/{est.compute_mib:.2f} (llama.cpp/estimate MiB)")
    assert _within(est.weights_mib, got["weights"]), table
    assert _within(est.kv_cache_mib, got["kv"]), table
    assert _within(est.compute_mib, got["compute"]), table
    buffers = got["weights"] + got["kv"] + got["compute"]
    assert _within(est.buffers_mib, buffers), table
    assert _within(est.total_mib, buffers), table
    assert est.total_mib >= buffers, table  # the safety margin covers the formula's error
    assert est.n_ctx == max(got["cells"])
    if got["text"] is not None:
        assert isinstance(got["text"], str)  # the model generated without crashing


# Fully offloaded loads on an NVIDIA H100 (CUDA 13.0), logs parsed with parse_load_log, of the same
# generated shapes (ctx_train 32768): CUDA0 model / KV / compute buffers and the CPU_Mapped input layer.
H100 = [
    # (write_model args, n_ctx, kw, cuda0 model, cuda0 kv, cuda0 compute, cpu mapped)
    (("llama", 4, 256, 8, 2, 512, 512, {}), 1024, {}, 4.51, 1.0, 20.26, 0.25),
    (("llama", 4, 256, 8, 2, 512, 512, {}), 4096, {}, 4.51, 4.0, 74.26, 0.25),
    (("qwen2", 3, 384, 6, 2, 1024, 1024, {}), 2048, {}, 9.77, 3.0, 31.51, 0.75),
    (("gemma3", 6, 256, 4, 1, 512, 512, {"head_dim": 64}), 2048, {}, 6.65, 3.0, 26.51, 0.25),
    (("gemma3", 6, 256, 4, 1, 512, 512, {"head_dim": 64}), 2048, {"swa_full": False}, 6.65, 1.75, 23.01, 0.25),
    (("phi3", 3, 256, 8, 8, 512, 512, {}), 1024, {}, 4.01, 3.0, 20.01, 0.25),
    (("starcoder2", 3, 256, 8, 2, 1024, 512, {}), 1024, {}, 4.22, 0.75, 20.26, 0.25),
]


@pytest.mark.parametrize(("spec", "n_ctx", "kw", "model", "kv", "compute", "mapped"), H100)
def test_gpu_estimate_matches_recorded_cuda_loads(tmp_path, spec, n_ctx, kw, model, kv, compute, mapped):
    arch, n_layers, n_embd, n_head, n_head_kv, n_ff, vocab, extra = spec
    path = write_model(tmp_path / "m.gguf", arch, n_layers, n_embd, n_head, n_head_kv, n_ff, vocab, 32768,
                       **extra)
    est = _estimate(read_model_info(path), n_ctx, kw)
    assert est.weights_mib == pytest.approx(model, abs=0.01)  # token_embd excluded (tied: copied as output)
    assert est.host_mib == pytest.approx(mapped, abs=0.01)
    assert est.kv_cache_mib == pytest.approx(kv, abs=0.01)
    assert _within(est.compute_mib, compute)
    assert est.overhead_mib == pytest.approx(GPU_CONTEXT_MIB + SAFETY_MARGIN * est.buffers_mib)


@pytest.mark.parametrize(
    ("shape", "n_ctx", "kw", "kv", "compute"),
    [
        # Gemma 3 270M's shape (18 layers, 640 wide, 262k vocabulary): logits dominate the compute buffer
        ("gemma270m", 2048, {}, 36.0, 513.25),
        ("gemma270m", 8192, {"swa_full": False}, 39.0, 513.25),
        # Llama 3.2 1B's attention and vocabulary (2 of its 16 layers): KQ scores dominate at 8k
        ("llama1b", 8192, {}, 32.0, 546.01),
        ("llama1b", 2048, {"n_batch": 256, "n_ubatch": 256}, 8.0, 127.25),
    ],
)
def test_compute_of_real_model_shapes_on_h100(model_paths, shape, n_ctx, kw, kv, compute):
    base = read_model_info(model_paths["llama_gqa"])
    if shape == "gemma270m":
        n = 18
        info = dataclasses.replace(
            base, architecture="gemma3", n_layers=n, n_embd=640, n_ff=2048, n_head=(4,) * n, n_head_kv=(1,) * n,
            head_dim_k=256, head_dim_v=256, vocab_size=262144, sliding_window=512,
            swa_layers=swa_layer_pattern("gemma3", n, 512, None))
    else:
        info = dataclasses.replace(base, n_layers=2, n_embd=2048, n_ff=8192, n_head=(32, 32), n_head_kv=(8, 8),
                                   head_dim_k=64, head_dim_v=64, vocab_size=128256, swa_layers=(False, False))
    est = _estimate(info, n_ctx, kw)
    assert est.kv_cache_mib == pytest.approx(kv)
    assert _within(est.compute_mib, compute)


def test_kv_layout_mirrors_llama_cpp_padding(model_paths):
    info = read_model_info(model_paths["gemma3_swa"])  # sliding window 256
    lay = kv_layout(info, n_ctx=1000)
    assert (lay.n_ctx, lay.n_ctx_seq, lay.n_stream, lay.swa_cells, lay.n_ubatch) == (1024, 1024, 1, 1024, 512)
    lay = kv_layout(info, n_ctx=8192, swa_full=False)
    assert lay.swa_cells == 768  # pad(256 + 512, 256)
    lay = kv_layout(info, n_ctx=300, n_batch=512)
    assert lay.n_ubatch == 300  # llama-cpp-python and llama.cpp clamp the batch to n_ctx
    lay = kv_layout(info, n_ctx=4000, n_parallel=4, swa_full=False)
    assert (lay.n_ctx, lay.n_ctx_seq, lay.n_stream, lay.swa_cells) == (4096, 1024, 4, 768)
    lay = kv_layout(info, n_ctx=4000, n_parallel=4, kv_unified=True, swa_full=False)
    assert (lay.n_ctx, lay.n_ctx_seq, lay.n_stream, lay.swa_cells) == (4096, 4096, 1, 1536)
    assert kv_layout(info, n_ctx=0).n_ctx == 8192  # 0 = the trained context
    with pytest.raises(ValueError):
        kv_layout(info, n_ctx=512, n_parallel=0)


def test_kv_bytes_by_cache_type_and_variable_v_width(model_paths):
    info = read_model_info(model_paths["llama_gqa"])  # 4 layers, 2 kv heads of 32
    lay = kv_layout(info, n_ctx=1024)
    assert kv_cache_bytes(info, lay) == 4 * 1024 * 64 * 2 * 2
    assert kv_cache_bytes(info, lay, "q8_0", "q8_0") == 4 * 1024 * (2 * 34) * 2
    assert ggml_row_bytes("q4_0", 64) == 36 and ggml_row_bytes("f32", 3) == 12
    with pytest.raises(ValueError, match="cache type"):
        ggml_row_bytes("f12", 64)
    varied = dataclasses.replace(info, n_head_kv=(2, 1, 1, 1))
    k = 1024 * 2 * (64 + 32 * 3)
    assert kv_cache_bytes(varied, lay, flash_attn=True) == 2 * k
    assert kv_cache_bytes(varied, lay) == k + 1024 * 2 * 64 * 4  # V padded to the widest layer


def test_cpu_and_gpu_views_and_explain(model_paths):
    info = read_model_info(model_paths["gemma"])
    gpu = estimate_vram(info, n_ctx=4096)
    cpu = estimate_vram(info, n_ctx=4096, on_cpu=True)
    assert gpu.weights_mib == cpu.weights_mib  # tied output: token_embd goes to the GPU as the output layer
    assert gpu.host_mib == pytest.approx(170.0) and cpu.host_mib == 0
    assert gpu.total_mib == pytest.approx(cpu.total_mib + GPU_CONTEXT_MIB)
    small = estimate_vram(info, n_ctx=4096, context_mib=300)
    assert small.total_mib == pytest.approx(gpu.total_mib - GPU_CONTEXT_MIB + 300)
    assert estimate_vram(info, n_ctx=4096, swa_full=False).kv_cache_mib < gpu.kv_cache_mib
    line = gpu.explain()
    assert "\n" not in line and f"{gpu.total_mib:.0f} MiB" in line and "n_ctx 4096" in line
    assert "host RAM" in line and "host RAM" not in cpu.explain()


@pytest.mark.parametrize(("kv", "ratio"), [("q8_0", 34 / 64), ("q4_0", 18 / 64)])
def test_quantized_kv_buffer_is_exact_and_scales_by_block_size(model_paths, reported, kv, ratio):
    """llama.cpp's KV buffer of the real Gemma with q8_0/q4_0 is the f16 one times bytes per element, and the
    estimate gives it to 0.05 MiB (the KV formula is exact; only the compute buffer is approximate)."""
    f16 = reported[_case_id("gemma", 2048, {})]["kv"]
    got = reported[_case_id("gemma", 2048, {"kv": kv})]["kv"]
    assert got == pytest.approx(f16 * ratio, rel=0.01)
    est = _estimate(read_model_info(model_paths["gemma"]), 2048, {"kv": kv}, on_cpu=True)
    assert est.kv_cache_mib == pytest.approx(got, abs=0.05)
