"""parse_load_log over real llama.cpp logs, and capture_load_log around a real load.

The log excerpts are llama.cpp's own lines (llama-cpp-python 0.3.36), with the per-tensor and
per-layer debug lines left out: a CPU-only load of the real Gemma 3 270M, and CUDA loads on an H100
of generated models (tests/ggufgen.py shapes) fully and partially offloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aivailable.engine.loadlog import LoadReport, is_host_buffer, parse_load_log

CPU_GEMMA = """\
load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
done_getting_tensors: tensor 'token_embd.weight' (q8_0) (and 209 others) cannot be used with preferred buffer type CPU_REPACK, using CPU instead
load_tensors:   CPU_Mapped model buffer size =   235.16 MiB
load_tensors:   CPU_REPACK model buffer size =    12.66 MiB
llama_context: constructing llama_context
llama_context: n_ctx                 = 1024
llama_context: n_ubatch              = 512
llama_context: flash_attn            = disabled
llama_context:        CPU  output buffer size =     1.00 MiB
llama_kv_cache_iswa: creating non-SWA KV cache, size = 1024 cells
llama_kv_cache:        CPU KV buffer size =     3.00 MiB
llama_kv_cache: size =    3.00 MiB (  1024 cells,   3 layers,  1/1 seqs), K (f16):    1.50 MiB, V (f16):    1.50 MiB
llama_kv_cache: attn_rot_k = 0, n_embd_head_k_all = 256
llama_kv_cache_iswa: creating     SWA KV cache, size = 1024 cells
llama_kv_cache:        CPU KV buffer size =    15.00 MiB
llama_kv_cache: size =   15.00 MiB (  1024 cells,  15 layers,  1/1 seqs), K (f16):    7.50 MiB, V (f16):    7.50 MiB
llama_kv_cache: attn_rot_k = 0, n_embd_head_k_all = 256
sched_reserve: reserving ...
sched_reserve:        CPU compute buffer size =   514.50 MiB
sched_reserve: graph: nodes = 817, splits = 1, input objects = 4, input tensors = 9
~llama_context:        CPU compute buffer size is 514.5000 MiB, matches expectation of 514.5000 MiB
"""

CUDA_FULL = """\
ggml_cuda_init: found 1 CUDA devices (Total VRAM: 81079 MiB):
  Device 0: NVIDIA H100 80GB HBM3, compute capability 9.0, VMM: yes, VRAM: 81079 MiB
llama_prepare_model_devices: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:00:06.0) - 80552 MiB free
load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
done_getting_tensors: tensor 'token_embd.weight' (f16) (and 0 others) cannot be used with preferred buffer type CUDA_Host, using CPU instead
load_tensors: offloading output layer to GPU
load_tensors: offloading 3 repeating layers to GPU
load_tensors: offloaded 5/5 layers to GPU
load_tensors:   CPU_Mapped model buffer size =     0.25 MiB
load_tensors:        CUDA0 model buffer size =     4.51 MiB
llama_context: constructing llama_context
llama_context: n_ctx                 = 1024
llama_context: n_ubatch              = 512
llama_context: flash_attn            = disabled
llama_context:  CUDA_Host  output buffer size =     0.00 MiB
llama_kv_cache:      CUDA0 KV buffer size =     1.00 MiB
llama_kv_cache: size =    1.00 MiB (  1024 cells,   4 layers,  1/1 seqs), K (f16):    0.50 MiB, V (f16):    0.50 MiB
llama_kv_cache: attn_rot_k = 0, n_embd_head_k_all = 32
sched_reserve: reserving ...
sched_reserve:      CUDA0 compute buffer size =    20.26 MiB
sched_reserve:  CUDA_Host compute buffer size =     3.26 MiB
sched_reserve: graph: nodes = 150, splits = 2, input objects = 4, input tensors = 6
"""

CUDA_PARTIAL = """\
ggml_cuda_init: found 1 CUDA devices (Total VRAM: 81079 MiB):
  Device 0: NVIDIA H100 80GB HBM3, compute capability 9.0, VMM: yes, VRAM: 81079 MiB
llama_prepare_model_devices: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:00:06.0) - 80552 MiB free
load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
done_getting_tensors: tensor 'token_embd.weight' (f16) (and 27 others) cannot be used with preferred buffer type CUDA_Host, using CPU instead
load_tensors: offloading output layer to GPU
load_tensors: offloading 1 repeating layers to GPU
load_tensors: offloaded 2/5 layers to GPU
load_tensors:   CPU_Mapped model buffer size =     3.69 MiB
load_tensors:        CUDA0 model buffer size =     1.32 MiB
llama_context: constructing llama_context
llama_context: n_ctx                 = 1024
llama_context: n_ubatch              = 512
llama_context: flash_attn            = disabled
llama_context:  CUDA_Host  output buffer size =     0.00 MiB
llama_kv_cache:        CPU KV buffer size =     0.75 MiB
llama_kv_cache:      CUDA0 KV buffer size =     0.25 MiB
llama_kv_cache: size =    1.00 MiB (  1024 cells,   4 layers,  1/1 seqs), K (f16):    0.50 MiB, V (f16):    0.50 MiB
llama_kv_cache: attn_rot_k = 0, n_embd_head_k_all = 32
sched_reserve: reserving ...
sched_reserve:      CUDA0 compute buffer size =    20.63 MiB
sched_reserve:  CUDA_Host compute buffer size =     3.26 MiB
sched_reserve: graph (pp bs=512, tg bs=1): nodes = 150 / 150, splits = 35 / 2, input objects = 4 / 4, input tensors = 6 / 6
"""

CUDA_GEMMA_LIKE_ISWA = """\
ggml_cuda_init: found 1 CUDA devices (Total VRAM: 81079 MiB):
  Device 0: NVIDIA H100 80GB HBM3, compute capability 9.0, VMM: yes, VRAM: 81079 MiB
llama_prepare_model_devices: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:00:06.0) - 80552 MiB free
load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
done_getting_tensors: tensor 'token_embd.weight' (f16) (and 0 others) cannot be used with preferred buffer type CUDA_Host, using CPU instead
load_tensors: offloading output layer to GPU
load_tensors: offloading 17 repeating layers to GPU
load_tensors: offloaded 19/19 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   320.00 MiB
load_tensors:        CUDA0 model buffer size =   511.46 MiB
llama_context: constructing llama_context
llama_context: n_ctx                 = 2048
llama_context: n_ubatch              = 512
llama_context: flash_attn            = disabled
llama_context:  CUDA_Host  output buffer size =     1.00 MiB
llama_kv_cache_iswa: creating non-SWA KV cache, size = 2048 cells
llama_kv_cache:      CUDA0 KV buffer size =     6.00 MiB
llama_kv_cache: size =    6.00 MiB (  2048 cells,   3 layers,  1/1 seqs), K (f16):    3.00 MiB, V (f16):    3.00 MiB
llama_kv_cache: attn_rot_k = 0, n_embd_head_k_all = 256
llama_kv_cache_iswa: creating     SWA KV cache, size = 2048 cells
llama_kv_cache:      CUDA0 KV buffer size =    30.00 MiB
llama_kv_cache: size =   30.00 MiB (  2048 cells,  15 layers,  1/1 seqs), K (f16):   15.00 MiB, V (f16):   15.00 MiB
llama_kv_cache: attn_rot_k = 0, n_embd_head_k_all = 256
sched_reserve: reserving ...
sched_reserve:      CUDA0 compute buffer size =   513.25 MiB
sched_reserve:  CUDA_Host compute buffer size =    12.51 MiB
sched_reserve: graph: nodes = 817, splits = 2, input objects = 4, input tensors = 9
"""

# Spellings of older llama.cpp builds (2024): no "model" in the weights line, a single KV total.
OLD_CUDA = """\
llm_load_tensors: offloaded 33/33 layers to GPU
llm_load_tensors:        CPU buffer size =    70.31 MiB
llm_load_tensors:      CUDA0 buffer size =  3847.55 MiB
llama_kv_cache_init:      CUDA0 KV buffer size =   256.00 MiB
llama_new_context_with_model: KV self size  =  256.00 MiB, K (f16):  128.00 MiB, V (f16):  128.00 MiB
llama_new_context_with_model:  CUDA_Host  output buffer size =     0.12 MiB
llama_new_context_with_model:      CUDA0 compute buffer size =   164.01 MiB
llama_new_context_with_model:  CUDA_Host compute buffer size =    12.01 MiB
"""


def test_cpu_only_load_of_real_gemma():
    r = parse_load_log(CPU_GEMMA)
    assert r.offloaded_layers is None and r.total_layers is None  # CPU builds do not print the line
    assert r.model_mib == {"CPU_Mapped": 235.16, "CPU_REPACK": 12.66}
    assert r.weights_mib == pytest.approx(235.16)  # repacked copies are not model size
    assert r.weights_total_mib == pytest.approx(247.82)
    assert r.kv_mib == {"CPU": 18.0}  # the non-SWA and the SWA cache, summed
    assert r.kv_cells == (1024, 1024)
    assert r.compute_mib == {"CPU": 514.5}  # the destructor's "size is ... matches" line is not counted
    assert r.output_mib == {"CPU": 1.0}
    assert r.gpu_mib == 0 and r.host_mib == pytest.approx(235.16 + 12.66 + 18 + 514.5 + 1)
    assert not r.fully_offloaded
    assert r.devices == ()


def test_cuda_full_offload():
    r = parse_load_log(CUDA_FULL)
    assert (r.offloaded_layers, r.total_layers) == (5, 5)
    assert r.fully_offloaded
    assert r.model_mib == {"CPU_Mapped": 0.25, "CUDA0": 4.51}  # token_embd stays on the host
    assert r.gpu_weights_mib == pytest.approx(4.51)
    assert r.kv_mib == {"CUDA0": 1.0}
    assert r.compute_mib == {"CUDA0": 20.26, "CUDA_Host": 3.26}
    assert r.gpu_mib == pytest.approx(4.51 + 1.0 + 20.26)
    assert r.host_mib == pytest.approx(0.25 + 3.26)
    assert r.devices == (("CUDA0", "NVIDIA H100 80GB HBM3", 80552),)


def test_cuda_partial_offload_is_refused():
    r = parse_load_log(CUDA_PARTIAL)
    assert (r.offloaded_layers, r.total_layers) == (2, 5)
    assert not r.fully_offloaded
    assert r.kv_mib == {"CPU": 0.75, "CUDA0": 0.25}
    assert r.gpu_mib == pytest.approx(1.32 + 0.25 + 20.63)


def test_cuda_sliding_window_model_sums_both_caches():
    r = parse_load_log(CUDA_GEMMA_LIKE_ISWA)
    assert r.fully_offloaded
    assert r.kv_mib == {"CUDA0": 36.0}
    assert r.kv_cells == (2048, 2048)
    assert r.gpu_mib == pytest.approx(511.46 + 36 + 513.25)
    assert r.host_mib == pytest.approx(320 + 12.51 + 1.0)


def test_older_log_spellings():
    r = parse_load_log(OLD_CUDA)
    assert (r.offloaded_layers, r.total_layers) == (33, 33)
    assert r.model_mib == {"CPU": 70.31, "CUDA0": 3847.55}
    assert r.kv_mib == {"CUDA0": 256.0}  # per-backend line wins over the "KV self size" total
    assert r.fully_offloaded
    assert r.gpu_mib == pytest.approx(3847.55 + 256 + 164.01)


def test_kv_total_without_backend_counts_as_host():
    r = parse_load_log("llm_load_tensors: offloaded 33/33 layers to GPU\n"
                       "llm_load_tensors:      CUDA0 buffer size =  3847.55 MiB\n"
                       "llama_new_context_with_model: KV self size  =  256.00 MiB\n")
    assert r.kv_mib == {"unknown": 256.0}
    assert not r.fully_offloaded  # nothing proves the cache is on the GPU


def test_empty_or_foreign_text():
    assert parse_load_log("") == LoadReport()
    r = parse_load_log("hello\nllama_context: n_ctx = 4096\nCUDA0 says hi = 3 MiB\n")
    assert r == LoadReport()
    assert not r.fully_offloaded and r.gpu_mib == 0


@pytest.mark.parametrize(
    ("name", "host"),
    [("CPU", True), ("CPU_Mapped", True), ("CPU_REPACK", True), ("CUDA_Host", True), ("Vulkan_Host", True),
     ("AMX", True), ("unknown", True), ("CUDA0", False), ("ROCm1", False), ("Vulkan0", False), ("Metal", False),
     ("RPC0[10.0.0.2:50052]", False)],
)
def test_is_host_buffer(name, host):
    assert is_host_buffer(name) is host


CAPTURE_SCRIPT = textwrap.dedent("""
    import ctypes, json, sys
    import llama_cpp
    from aivailable.engine.loadlog import capture_load_log

    def current():
        cb, ud = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(cb), ctypes.byref(ud))
        return ctypes.cast(cb, ctypes.c_void_p).value

    before = current()
    with capture_load_log() as cap:  # passthrough: llama-cpp-python still prints with verbose=True
        inside = current()
        llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=1, verbose=True)
    after = current()
    out = llm("hi", max_tokens=2)
    failed = None
    try:
        with capture_load_log(passthrough=False) as cap2:
            llama_cpp.Llama(sys.argv[2], n_ctx=512, verbose=False)
    except ValueError:
        failed = cap2.problems
    r = cap.report()
    print(json.dumps({
        "restored": before == after == current(), "replaced": inside != before,
        "model": r.model_mib, "kv": r.kv_mib, "compute": r.compute_mib, "cells": r.kv_cells,
        "text_after_capture": len(cap.text), "failed": failed, "choices": len(out["choices"]),
    }))
""")


def test_capture_around_a_real_load(tmp_path):
    from tests.ggufgen import write_model

    model = write_model(tmp_path / "m.gguf", "llama", 2, 128, 4, 2, 256, 300, 1024)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(model.read_bytes()[:5000])
    proc = subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT, str(model), str(broken)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["replaced"] and res["restored"]
    assert "CPU_Mapped model buffer size" in proc.stderr  # handed on to the previous callback
    assert set(res["model"]) == {"CPU_Mapped"} and res["model"]["CPU_Mapped"] > 0
    assert res["kv"] == {"CPU": 0.25}  # 2 layers * 2 kv heads * 32 dims * 2 B * (K + V) * 512 cells
    assert res["cells"] == [512]
    assert res["compute"]["CPU"] > 0
    assert res["choices"] == 1
    assert res["failed"] and any("error" in line.lower() or "fail" in line.lower() for line in res["failed"])
