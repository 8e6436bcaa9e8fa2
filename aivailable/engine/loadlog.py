"""Capture llama.cpp's log while a model loads, and read the memory it reports out of it.

A worker wraps `Llama(...)` in `capture_load_log()`, then `parse_load_log(capture.text)` tells how many
layers went to the GPU and how many MiB each backend buffer holds. The worker refuses a model that is
not `fully_offloaded` on a real GPU and reports `gpu_mib` as the model's measured VRAM.

The parser understands llama.cpp as bundled with llama-cpp-python 0.3.x (2025-2026) and the older
`llm_load_tensors` / `KV self size` spellings; lines it does not know are ignored.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

# enum ggml_log_level (ggml.h). llama_cpp/_logger.py still carries the older numbering.
LOG_NONE, LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_CONT = range(6)
# CPU "extra" buffer types: weights repacked for the CPU's matmul kernels. They duplicate tensors the
# CPU_Mapped buffer already covers (the mapping spans the file), so they are not model size.
REPACK_BUFFERS = ("CPU_REPACK", "AMX", "KLEIDIAI", "CPU_AARCH64")

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
# "load_tensors:   CPU_Mapped model buffer size =   212.34 MiB"; old builds: "llm_load_tensors: CPU buffer size = ..."
_MODEL_BUF = re.compile(r"(?:load_tensors|llm_load_tensors):\s+(\S+)\s+(?:model )?buffer size\s*=\s*" + _NUM + r"\s*MiB")
# "llama_kv_cache:        CPU KV buffer size =    18.00 MiB"; recurrent models: "... RS buffer size = ..."
_KV_BUF = re.compile(r"\s(\S+)\s+(?:KV|RS) buffer size\s*=\s*" + _NUM + r"\s*MiB")
# "llama_kv_cache: size =   18.00 MiB (  1024 cells,   3 layers,  1/1 seqs), K (f16): ..."
_KV_SIZE = re.compile(r"llama_kv_cache\w*: size =\s*" + _NUM + r" MiB \(\s*(\d+) cells")
# very old builds print only a total: "llama_new_context_with_model: KV self size  =  256.00 MiB"
_KV_SELF = re.compile(r"KV self size\s*=\s*" + _NUM + r"\s*MiB")
_COMPUTE_BUF = re.compile(r"\s(\S+)\s+compute buffer size\s*=\s*" + _NUM + r"\s*MiB")
_OUTPUT_BUF = re.compile(r"\s(\S+)\s+output buffer size\s*=\s*" + _NUM + r"\s*MiB")
# "llama_model_load_from_file_impl: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:00:05.0) - 80537 MiB free"
_DEVICE = re.compile(r"using device (\S+) \((.*)\) \(.*\) - (\d+) MiB free")

UNKNOWN_BACKEND = "unknown"


def is_host_buffer(name: str) -> bool:
    """True for buffers in host RAM: CPU, CPU_Mapped, CPU_REPACK, AMX, CUDA_Host, Vulkan_Host, ...

    Metal buffers count as GPU memory (Apple's unified memory is what the GPU can use). A buffer whose
    backend the log did not name (UNKNOWN_BACKEND) counts as host: it can never prove GPU residency.
    """
    upper = name.upper()
    return (
        upper.startswith("CPU")
        or upper.endswith("_HOST")
        or upper in ("AMX", "KLEIDIAI", "ACCEL", UNKNOWN_BACKEND.upper())
    )


def _add(into: dict[str, float], name: str, mib: float) -> None:
    into[name] = round(into.get(name, 0.0) + mib, 4)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """Buffers llama.cpp allocated for one model and context, in MiB per backend buffer name."""

    offloaded_layers: int | None = None  # None: the build has no GPU backend (the line is not printed)
    total_layers: int | None = None  # repeating layers + the output layer
    model_mib: dict[str, float] = field(default_factory=dict)
    kv_mib: dict[str, float] = field(default_factory=dict)
    compute_mib: dict[str, float] = field(default_factory=dict)
    output_mib: dict[str, float] = field(default_factory=dict)
    kv_cells: tuple[int, ...] = ()  # one entry per KV cache (two for sliding-window models)
    devices: tuple[tuple[str, str, int], ...] = ()  # (backend name, description, free MiB at load)

    def _buffers(self) -> Iterator[tuple[str, float]]:
        for group in (self.model_mib, self.kv_mib, self.compute_mib, self.output_mib):
            yield from group.items()

    @property
    def weights_total_mib(self) -> float:
        """Every model buffer, repacked CPU copies included."""
        return sum(self.model_mib.values())

    @property
    def weights_mib(self) -> float:
        """Model buffers without REPACK_BUFFERS: the size of the weights as loaded."""
        return sum(mib for name, mib in self.model_mib.items() if name.upper() not in REPACK_BUFFERS)

    @property
    def kv_total_mib(self) -> float:
        return sum(self.kv_mib.values())

    @property
    def compute_total_mib(self) -> float:
        return sum(self.compute_mib.values())

    @property
    def gpu_mib(self) -> float:
        """Device memory of every non-host buffer: the model's measured VRAM (without the driver's context)."""
        return sum(mib for name, mib in self._buffers() if not is_host_buffer(name))

    @property
    def host_mib(self) -> float:
        return sum(mib for name, mib in self._buffers() if is_host_buffer(name))

    @property
    def gpu_weights_mib(self) -> float:
        return sum(mib for name, mib in self.model_mib.items() if not is_host_buffer(name))

    @property
    def fully_offloaded(self) -> bool:
        """Every layer, the output layer included, on a GPU, with the KV cache there too."""
        return (
            self.offloaded_layers is not None
            and self.total_layers is not None
            and self.total_layers > 0
            and self.offloaded_layers >= self.total_layers
            and any(not is_host_buffer(name) for name in self.model_mib)
            and all(not is_host_buffer(name) for name in self.kv_mib)
        )


def parse_load_log(text: str) -> LoadReport:
    """Read a LoadReport out of the log text of one model load plus one context creation."""
    offloaded = total = None
    model: dict[str, float] = {}
    kv: dict[str, float] = {}
    compute: dict[str, float] = {}
    output: dict[str, float] = {}
    cells: list[int] = []
    devices: list[tuple[str, str, int]] = []
    kv_size_total = 0.0
    for line in text.splitlines():
        if m := _OFFLOADED.search(line):
            offloaded, total = int(m[1]), int(m[2])
        elif m := _MODEL_BUF.search(line):
            _add(model, m[1], float(m[2]))
        elif m := _KV_BUF.search(line):
            _add(kv, m[1], float(m[2]))
        elif m := _KV_SIZE.search(line):
            kv_size_total += float(m[1])
            cells.append(int(m[2]))
        elif m := _KV_SELF.search(line):
            kv_size_total += float(m[1])
        elif m := _COMPUTE_BUF.search(line):
            _add(compute, m[1], float(m[2]))
        elif m := _OUTPUT_BUF.search(line):
            _add(output, m[1], float(m[2]))
        elif m := _DEVICE.search(line):
            devices.append((m[1], m[2], int(m[3])))
    if not kv and kv_size_total:
        kv[UNKNOWN_BACKEND] = round(kv_size_total, 4)
    return LoadReport(offloaded, total, model, kv, compute, output, tuple(cells), tuple(devices))


# --- capture -------------------------------------------------------------------------------------

_CAPTURE_LOCK = threading.RLock()  # one capture at a time per process (llama.cpp's logger is global)
_KEEP_ALIVE: list[Any] = []  # ctypes callbacks must outlive any C thread that may still call them


class LogCapture:
    """Log records collected by `capture_load_log`: (ggml level, text) in arrival order."""

    def __init__(self) -> None:
        self.records: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def append(self, level: int, text: str) -> None:
        with self._lock:
            self.records.append((level, text))

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(text for _, text in self.records)

    def lines(self, *levels: int) -> list[str]:
        """Non-empty lines logged at any of `levels` (continuations count with the record they extend)."""
        out: list[str] = []
        last = LOG_NONE
        with self._lock:
            for level, text in self.records:
                level = last if level == LOG_CONT else level
                last = level
                if level in levels:
                    out.extend(line for line in text.splitlines() if line.strip())
        return out

    @property
    def problems(self) -> list[str]:
        """Warning and error lines, e.g. why a load failed."""
        return self.lines(LOG_WARN, LOG_ERROR)

    def report(self) -> LoadReport:
        return parse_load_log(self.text)


def _previous_callback(llama_cpp: Any) -> tuple[Any, Any]:
    get = getattr(llama_cpp, "llama_log_get", None)
    if get is None:  # bindings without llama_log_get: llama-cpp-python's own logger is the one to restore
        from llama_cpp import _logger

        return _logger.llama_log_callback, ctypes.c_void_p(0)
    callback = llama_cpp.llama_log_callback()
    user_data = ctypes.c_void_p()
    get(ctypes.byref(callback), ctypes.byref(user_data))
    return callback, user_data


@contextmanager
def capture_load_log(*, passthrough: bool = True) -> Iterator[LogCapture]:
    """Route llama.cpp's (and ggml's) log into a LogCapture for the duration of the block.

    With `passthrough`, each record is also handed to the callback that was installed before (for
    llama-cpp-python's own, that prints to stderr when the Llama was made with verbose=True). The
    previous callback is restored on exit, also when loading raises.
    """
    import llama_cpp

    with _CAPTURE_LOCK:
        previous, previous_data = _previous_callback(llama_cpp)
        forward: Callable[[int, bytes, Any], None] | None = previous if passthrough and previous else None
        capture = LogCapture()

        def on_log(level: int, text: bytes | None, user_data: Any) -> None:
            with suppress(Exception):  # an exception must never unwind into C
                capture.append(level, (text or b"").decode("utf-8", errors="replace"))
                if forward is not None:
                    forward(level, text, previous_data)

        callback = llama_cpp.llama_log_callback(on_log)
        _KEEP_ALIVE.append(callback)
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        try:
            yield capture
        finally:
            llama_cpp.llama_log_set(previous, previous_data)
