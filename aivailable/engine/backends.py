"""Which llama.cpp backend llama-cpp-python was compiled with, and how a worker is pinned to its GPUs.

`detect_backend` reads the compiled backend libraries and, in a subprocess, asks ggml for the devices it
sees; `visible_devices_env` gives the variables (CUDA_VISIBLE_DEVICES, HIP/ROCR_VISIBLE_DEVICES,
GGML_VK_VISIBLE_DEVICES) that show a worker only its GPUs. engine/devices.py decides which GPU each
backend serves.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

_MIB = 1024 * 1024


class Backend(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    ROCM = "rocm"
    VULKAN = "vulkan"
    METAL = "metal"
    SYCL = "sycl"
    OPENCL = "opencl"


BACKEND_LABEL = {
    Backend.CPU: "CPU",
    Backend.CUDA: "CUDA",
    Backend.ROCM: "ROCm (HIP)",
    Backend.VULKAN: "Vulkan",
    Backend.METAL: "Metal",
    Backend.SYCL: "SYCL",
    Backend.OPENCL: "OpenCL",
}
_GPU_PREFERENCE = (Backend.CUDA, Backend.ROCM, Backend.VULKAN, Backend.SYCL, Backend.METAL, Backend.OPENCL)
# libggml-<x>.so file names and ggml registry names, lower case, to backends.
_BACKEND_NAMES = {
    "cuda": Backend.CUDA,
    "hip": Backend.ROCM,
    "rocm": Backend.ROCM,
    "vulkan": Backend.VULKAN,
    "metal": Backend.METAL,
    "mtl": Backend.METAL,
    "sycl": Backend.SYCL,
    "opencl": Backend.OPENCL,
}
_LIB_BACKEND = re.compile(r"ggml-(?P<name>[a-z]+)\.(?:so|dylib|dll)$", re.IGNORECASE)
_SHARED_LIB = re.compile(r"\.(?:so|dylib|dll)$")  # versioned twins (libggml.so.0) are left out


@dataclass(frozen=True, slots=True)
class GgmlDevice:
    """A device as llama.cpp's ggml registry sees it at run time."""

    name: str
    description: str
    kind: str  # "cpu" | "gpu" | "igpu" | "accel"
    vram_total_mib: int
    vram_free_mib: int


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """Which llama.cpp backend(s) llama-cpp-python was compiled with, and what it sees at run time."""

    installed: bool
    version: str | None = None
    compiled: tuple[Backend, ...] = ()  # GPU backends; empty means CPU only
    gpu_offload: bool | None = None  # llama_supports_gpu_offload(); None: not checked
    lib_dir: str | None = None
    libraries: tuple[str, ...] = ()
    runtime_devices: tuple[GgmlDevice, ...] | None = None  # None: runtime check not run or failed
    problem: str | None = None  # why llama-cpp-python cannot be used, or why the runtime check failed
    loadable: bool | None = None  # None: not checked

    @property
    def primary(self) -> Backend:
        """The backend workers run on: the preferred compiled GPU backend, else CPU."""
        return next((b for b in _GPU_PREFERENCE if b in self.compiled), Backend.CPU)

    def summary(self) -> str:
        """In words: "CPU only", "CUDA", "CUDA + Vulkan", "llama-cpp-python not installed"."""
        if not self.installed:
            return "llama-cpp-python not installed"
        if not self.compiled:
            return "CPU only"
        return " + ".join(BACKEND_LABEL[b] for b in self.compiled)

    def to_dict(self) -> dict[str, Any]:
        return {
            "installed": self.installed,
            "loadable": self.loadable,
            "version": self.version,
            "compiled": [b.value for b in self.compiled],
            "primary": self.primary.value,
            "summary": self.summary(),
            "gpu_offload": self.gpu_offload,
            "lib_dir": self.lib_dir,
            "libraries": list(self.libraries),
            "runtime_devices": None
            if self.runtime_devices is None
            else [
                {
                    "name": d.name,
                    "description": d.description,
                    "kind": d.kind,
                    "vram_total_mib": d.vram_total_mib,
                    "vram_free_mib": d.vram_free_mib,
                }
                for d in self.runtime_devices
            ],
            "problem": self.problem,
            "visibility_vars": list(visibility_vars(self.primary)),
        }


def _llama_cpp_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("llama_cpp")  # finds without importing
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# Run in a child: a CUDA or ROCm build may crash or hang while it initialises, and must not leave a
# GPU context in the node. ggml functions are reached through llama-cpp-python's own libggml handle.
_RUNTIME_PROBE = r"""
import ctypes, json, sys
out = {}
try:
    import llama_cpp
    out["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    try:
        from llama_cpp._ggml import libggml as lib
    except ImportError:  # dlsym on libllama's handle also finds its libggml dependency's symbols
        lib = llama_cpp.llama_cpp._lib
    c_p, c_s, c_str = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    for fn, res, args in [("ggml_backend_reg_count", c_s, []), ("ggml_backend_reg_get", c_p, [c_s]),
                          ("ggml_backend_reg_name", c_str, [c_p]), ("ggml_backend_dev_count", c_s, []),
                          ("ggml_backend_dev_get", c_p, [c_s]), ("ggml_backend_dev_name", c_str, [c_p]),
                          ("ggml_backend_dev_description", c_str, [c_p]), ("ggml_backend_dev_type", ctypes.c_int, [c_p]),
                          ("ggml_backend_dev_memory", None, [c_p, ctypes.POINTER(c_s), ctypes.POINTER(c_s)])]:
        f = getattr(lib, fn); f.restype = res; f.argtypes = args
    out["registries"] = [lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode()
                         for i in range(lib.ggml_backend_reg_count())]
    devs = []
    for i in range(lib.ggml_backend_dev_count()):
        d = lib.ggml_backend_dev_get(i)
        free, total = c_s(0), c_s(0)
        lib.ggml_backend_dev_memory(d, ctypes.byref(free), ctypes.byref(total))
        devs.append([lib.ggml_backend_dev_name(d).decode(errors="replace"),
                     (lib.ggml_backend_dev_description(d) or b"").decode(errors="replace"),
                     lib.ggml_backend_dev_type(d), total.value, free.value])
    out["devices"] = devs
except BaseException as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
sys.stdout.write("\n@@AIVAILABLE@@" + json.dumps(out) + "\n")
"""
# enum ggml_backend_dev_type as of llama-cpp-python 0.3.36 (before mid-2025 ggml had no IGPU: 2 was ACCEL)
_GGML_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


def _runtime_probe(timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RUNTIME_PROBE],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"llama.cpp did not answer within {timeout:g} s"}
    except OSError as exc:
        return {"error": f"could not start Python: {exc}"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@AIVAILABLE@@"):
            with contextlib.suppress(ValueError):
                return json.loads(line.removeprefix("@@AIVAILABLE@@"))
    tail = " ".join(proc.stderr.split()[-40:])
    return {"error": f"llama.cpp check exited with code {proc.returncode}: {tail}"}


def detect_backend(*, runtime: bool = True, timeout: float = 60.0) -> BackendInfo:
    """Find llama-cpp-python's compiled backends from its libraries, then (if `runtime`) load it in a
    child process and ask ggml which backends and devices it has. Never raises."""
    pkg = _llama_cpp_dir()
    if pkg is None:
        return BackendInfo(installed=False, problem="llama-cpp-python not installed", loadable=False)
    version = None
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        version = importlib.metadata.version("llama_cpp_python")
    lib_dir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or pkg / "lib")
    libraries = tuple(
        sorted(p.name for p in lib_dir.glob("*") if _SHARED_LIB.search(p.name)) if lib_dir.is_dir() else ()
    )
    found = {_BACKEND_NAMES.get(m["name"].lower()) for lib in libraries if (m := _LIB_BACKEND.search(lib))}
    info = BackendInfo(installed=True, version=version, lib_dir=str(lib_dir), libraries=libraries)
    if not runtime:
        return replace(info, compiled=tuple(b for b in _GPU_PREFERENCE if b in found))
    probe = _runtime_probe(timeout)
    found |= {_BACKEND_NAMES.get(r.lower()) for r in probe.get("registries", ())}
    devices = None
    if "devices" in probe:
        devices = tuple(
            GgmlDevice(name, desc, _GGML_KINDS.get(kind, str(kind)), total // _MIB, free // _MIB)
            for name, desc, kind, total, free in probe["devices"]
        )
    loadable, error = "gpu_offload" in probe, probe.get("error")
    if error:
        error = (
            f"llama-cpp-python fails to load: {error}" if not loadable else f"llama.cpp check failed: {error}"
        )
    return replace(
        info,
        compiled=tuple(b for b in _GPU_PREFERENCE if b in found),
        gpu_offload=probe.get("gpu_offload"),
        runtime_devices=devices,
        problem=error,
        loadable=loadable,
    )


# ------------------------------------------------------------------------------------- visibility

# Every variable AIvailable sets on a worker. A worker's environment should start from the node's with
# these removed, then take `visible_devices_env`/`device_env` on top.
GPU_ENV_VARS = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "GGML_VK_VISIBLE_DEVICES",
)
HIDE_ALL = {
    "CUDA_VISIBLE_DEVICES": "-1",  # HIP honours this one too
    "HIP_VISIBLE_DEVICES": "-1",
    "ROCR_VISIBLE_DEVICES": "-1",
    "GGML_VK_VISIBLE_DEVICES": "",  # ggml reads a list of numbers; an empty one selects no device
}


def visibility_vars(backend: Backend) -> tuple[str, ...]:
    """The environment variables that pin a worker to its GPUs under `backend` (empty: none)."""
    return {
        Backend.CUDA: ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"),
        Backend.ROCM: ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"),
        Backend.VULKAN: ("GGML_VK_VISIBLE_DEVICES",),
    }.get(backend, ())


def visible_devices_env(backend: Backend, indices: Sequence[int]) -> dict[str, str]:
    """Environment for a worker that may use only the GPUs `indices` (vendor indices) under `backend`;
    GPUs of every other backend are hidden, so a build with two GPU backends cannot double-count.

    No indices, or the CPU backend: every GPU is hidden, so a worker for a simulated GPU cannot touch
    a real one. CUDA numbers GPUs fastest-first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, which makes them
    match NVML's (and nvidia-smi's) numbers. ROCR_VISIBLE_DEVICES picks the physical GPUs and HIP then
    numbers them from 0, so HIP_VISIBLE_DEVICES lists 0..n-1 (setting both to the physical indices
    would hide GPU 1 and up); CUDA_VISIBLE_DEVICES is left out there because HIP honours it too.
    Vulkan uses its own enumeration order, which matches the vendor's on single-vendor machines.
    """
    if len(set(indices)) != len(indices) or any(not isinstance(i, int) or i < 0 for i in indices):
        raise ValueError(f"GPU indices must be distinct non-negative integers, got {list(indices)}")
    if not indices or backend is Backend.CPU:
        return dict(HIDE_ALL)
    joined = ",".join(str(i) for i in indices)
    if backend is Backend.CUDA:
        return HIDE_ALL | {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": joined}
    if backend is Backend.ROCM:
        hip = ",".join(str(i) for i in range(len(indices)))
        return {"GGML_VK_VISIBLE_DEVICES": "", "ROCR_VISIBLE_DEVICES": joined, "HIP_VISIBLE_DEVICES": hip}
    if backend is Backend.VULKAN:
        return HIDE_ALL | {"GGML_VK_VISIBLE_DEVICES": joined}
    raise ValueError(f"AIvailable cannot pin a worker to GPUs with the {BACKEND_LABEL[backend]} backend")
