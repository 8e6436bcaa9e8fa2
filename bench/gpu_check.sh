#!/usr/bin/env bash
# Real-GPU check for a lent NVIDIA machine (no network there): carry `.whl` (wheels + a trimmed
# llama-cpp-python sdist, see bench/README.md), then: bash bench/gpu_check.sh
# 1. builds llama-cpp-python with CUDA (the test model is generated meanwhile),
# 2. bench/gpu_diag.py: direct llama-cpp-python, then our Runner, each in its own process (a native
#    crash gets a cuda-gdb backtrace),
# 3. bench/gpu_check.py: doctor, a node without --simulate-gpu, VRAM vs NVML, tokens/s vs direct.
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
nvcc --version | tail -2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -c "
import sys; sys.path.insert(0, '.')
from tests.ggufgen import write_model
write_model('/tmp/gen-1b.gguf', 'llama', n_layers=24, n_embd=2048, n_head=16, n_head_kv=8, n_ff=5632, vocab=2048, ctx_train=8192)
" > "$OUT/gen.log" 2>&1 &
gen=$!
t0=$(date +%s)
CMAKE_ARGS="-DGGML_CUDA=on -DGGML_CUDA_FA=OFF -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
  --target /tmp/site .whl/llama_cpp_python-*.tar.gz > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "llama-cpp-python CUDA build: $(( $(date +%s) - t0 )) s"
wait $gen || { cat "$OUT/gen.log"; exit 1; }
ls -la /tmp/gen-1b.gguf
python3 -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'gpu offload:', llama_cpp.llama_supports_gpu_offload())"
timeout 420 python3 bench/gpu_diag.py /tmp/gen-1b.gguf > "$OUT/gpu_diag.txt" 2>&1
echo "gpu_diag exit $?"; tail -c 6000 "$OUT/gpu_diag.txt"
PYTHONFAULTHANDLER=1 timeout 300 python3 bench/gpu_check.py /tmp/gen-1b.gguf > "$OUT/gpu_check.txt" 2>&1
rc=$?
tail -c 3500 "$OUT/gpu_check.txt"
cp /tmp/gpu-node.log "$OUT/node.log"; tail -25 "$OUT/node.log"
exit $rc
