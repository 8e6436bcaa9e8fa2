"""What to install for each GPU, and the exact llama-cpp-python build command for this machine's cards.

Pure: `advise(gpus, env)` takes the GPUs (engine/devices.py `Device`s) and what is known about the Python
environment and toolkits (`InstallEnv`, gathered by `current_env`), and returns per-GPU advice and one
command. The backend per GPU: CUDA for NVIDIA from Maxwell on; for AMD, ROCm (HIP) where the card's
generation has ROCm support *and* ROCm is installed, else Vulkan (no ROCm needed; Polaris and RDNA 1
have no ROCm at all); Vulkan for everything older. One build can hold several backends
(`-DGGML_CUDA=on -DGGML_VULKAN=on`), and engine/devices.py gives each GPU the one that fits it.

The command fits the environment: `pipx runpip` for a `pipx install`ed aivailable, `pipx install --force`
for a `pipx run` environment (pipx reuses that one by spec whatever CMAKE_ARGS say), the interpreter's
own `-m pip` otherwise. `--no-cache-dir` because pip caches built wheels by version, not by CMake flags.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from aivailable.engine import gpu_families
from aivailable.engine.backends import BACKEND_LABEL, Backend

if TYPE_CHECKING:
    from aivailable.engine.devices import Device

EnvKind = Literal["pipx", "pipx-run", "venv", "system"]

PACKAGES: dict[Backend, tuple[str, ...]] = {
    Backend.CUDA: ("the NVIDIA driver", "a CUDA toolkit (NVIDIA's cuda-toolkit-12-x, or Debian/Ubuntu nvidia-cuda-toolkit)",
                   "cmake", "build-essential"),
    Backend.ROCM: ("ROCm with its HIP SDK (AMD's repository: `amdgpu-install --usecase=rocm`, or rocm-hip-sdk)",
                   "hipblas-dev", "rocblas-dev", "cmake", "build-essential"),
    Backend.VULKAN: ("libvulkan-dev", "glslc (shaderc)", "mesa-vulkan-drivers (AMD/Intel; NVIDIA brings its own)",
                     "vulkan-tools (vulkaninfo)", "cmake", "build-essential"),
    Backend.CPU: ("cmake", "build-essential"),
}
APT: dict[Backend, str] = {
    Backend.CUDA: "sudo apt-get install -y cmake build-essential nvidia-cuda-toolkit",
    Backend.ROCM: "sudo apt-get install -y cmake build-essential rocm-hip-sdk hipblas-dev rocblas-dev",
    Backend.VULKAN: "sudo apt-get install -y cmake build-essential libvulkan-dev glslc mesa-vulkan-drivers vulkan-tools",
    Backend.CPU: "sudo apt-get install -y cmake build-essential",
}
HIP_ENV = 'HIPCXX="$(hipconfig -l)/clang" HIP_PATH="$(hipconfig -R)" '
"""llama.cpp's HIP build needs ROCm's clang as the HIP compiler."""


@dataclass(frozen=True, slots=True)
class InstallEnv:
    """The Python environment and toolkits doctor found (`current_env`)."""

    kind: EnvKind = "venv"
    python: str = "python3"
    pipx_name: str = "aivailable"
    llama_version: str | None = None
    cuda_version: str | None = None  # nvcc's release, "12.4"
    rocm_version: str | None = None  # "6.2.4"; None: ROCm not installed


@dataclass(frozen=True, slots=True)
class GpuAdvice:
    device_id: str
    name: str
    family: str  # "Pascal (sm_61)"
    backend: Backend
    packages: tuple[str, ...]
    notes: tuple[str, ...] = ()
    drivers: tuple[Backend, ...] = ()
    """Every llama.cpp backend that can drive this generation; `backend` is the one advised."""


@dataclass(frozen=True, slots=True)
class Advice:
    gpus: tuple[GpuAdvice, ...]
    cmake_args: str
    command: str
    apt: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())


def environment_kind(prefix: str, base_prefix: str) -> tuple[EnvKind, str]:
    """What kind of environment `sys.prefix` is, and its pipx name: ~/.local/share/pipx/venvs/NAME is a
    `pipx install`, ~/.local/share/pipx/.cache/HASH a `pipx run`."""
    p = Path(prefix)
    if "pipx" in prefix and p.parent.name == "venvs":
        return "pipx", p.name
    if "pipx" in prefix and p.parent.name == ".cache":
        return "pipx-run", ""
    return ("venv" if prefix != base_prefix else "system"), ""


def _backend(gpu: Device, family: gpu_families.Family | None, env: InstallEnv) -> Backend:
    backends = family.backends if family else (Backend.VULKAN,)
    if gpu.vendor == "nvidia" and Backend.CUDA in backends:
        return Backend.CUDA
    if gpu.vendor == "amd" and Backend.ROCM in backends and env.rocm_version:
        return Backend.ROCM
    return Backend.VULKAN


def _gpu_advice(gpu: Device, env: InstallEnv) -> GpuAdvice:
    family = gpu_families.family_of(gpu.vendor, gpu.compute_capability, gpu.name)
    backend = _backend(gpu, family, env)
    label = f"{family.name} ({family.arch})" if family else "unknown generation"
    notes: list[str] = []
    if family is None:
        notes.append("generation not known to AIvailable: Vulkan is the safe choice")
    elif backend is Backend.CUDA and family.needs_cuda12:
        notes.append(f"CUDA 13 dropped {family.name} ({family.arch}): build with a CUDA 12.x toolkit")
        if env.cuda_version and env.cuda_version.split(".")[0].isdigit() and int(env.cuda_version.split(".")[0]) >= 13:
            notes.append(f"the CUDA toolkit here is {env.cuda_version}: install 12.x (e.g. cuda-toolkit-12-8) "
                         "and put its nvcc first on PATH (CUDACXX=/usr/local/cuda-12.8/bin/nvcc)")
    elif gpu.vendor == "amd" and backend is Backend.VULKAN and Backend.ROCM in family.backends:
        notes.append(f"faster with ROCm: install ROCm ({family.rocm_note or 'a current release'}) and build with "
                     f"-DGGML_HIP=on -DGPU_TARGETS={family.arch}; Vulkan needs no ROCm")
    elif gpu.vendor == "amd" and family.rocm_note and backend is Backend.VULKAN:
        notes.append(f"ROCm: {family.rocm_note}")
    elif backend is Backend.ROCM and family.rocm_note:
        notes.append(f"ROCm support for {family.arch}: {family.rocm_note}")
    if gpu.vendor == "nvidia" and backend is Backend.VULKAN:
        notes.append("below llama.cpp's CUDA minimum (sm_50): Vulkan with NVIDIA's driver")
    drivers = family.backends if family else (Backend.VULKAN,)
    return GpuAdvice(gpu.id, gpu.name, label, backend, PACKAGES[backend], tuple(notes), drivers)


def cmake_args(gpus: Sequence[GpuAdvice], gpu_archs: Sequence[str]) -> str:
    """CMAKE_ARGS for all these GPUs: each backend once, with CUDA architectures / HIP targets listed."""
    backends = {g.backend for g in gpus}
    args: list[str] = []
    cuda = sorted({a.removeprefix("sm_") for a, g in zip(gpu_archs, gpus, strict=True)
                   if g.backend is Backend.CUDA and a.startswith("sm_")}, key=int)
    hip = sorted({a for a, g in zip(gpu_archs, gpus, strict=True) if g.backend is Backend.ROCM and a.startswith("gfx")})
    if Backend.CUDA in backends:
        args += ["-DGGML_CUDA=on"] + ([f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(cuda)}"] if cuda else [])
    if Backend.ROCM in backends:
        args += ["-DGGML_HIP=on"] + ([f"-DGPU_TARGETS={';'.join(hip)}"] if hip else [])
    if Backend.VULKAN in backends:
        args.append("-DGGML_VULKAN=on")
    return " ".join([*args, "-DGGML_NATIVE=OFF"])  # portable: one wheel for a lab, and no AMX crash


def install_command(args: str, env: InstallEnv, *, hip: bool = False) -> str:
    """The command that (re)builds llama-cpp-python with CMAKE_ARGS=`args` in this environment."""
    pin = f"llama-cpp-python=={env.llama_version}" if env.llama_version else "llama-cpp-python"
    prefix = (HIP_ENV if hip else "") + f'CMAKE_ARGS="{args}" '
    if env.kind == "pipx":
        return f"{prefix}pipx runpip {env.pipx_name} install --force-reinstall --no-cache-dir --no-deps '{pin}'"
    if env.kind == "pipx-run":  # pipx run's cache is keyed by spec, not CMAKE_ARGS: install instead
        return f"{prefix}pipx install --force --pip-args=--no-cache-dir .   # from your clone; then: aivailable up"
    return f"{prefix}{shlex.quote(env.python)} -m pip install --force-reinstall --no-cache-dir --no-deps '{pin}'"


def advise(gpus: Sequence[Device], env: InstallEnv) -> Advice:
    """Per-GPU advice and one build command for all real GPUs in `gpus` (CPU-only when there are none)."""
    real = [g for g in gpus if not g.simulated]
    per = tuple(_gpu_advice(g, env) for g in real)
    archs = [(gpu_families.family_of(g.vendor, g.compute_capability, g.name) or _UNKNOWN).arch for g in real]
    args = cmake_args(per, archs)
    backends = sorted({a.backend for a in per}, key=list(Backend).index) or [Backend.CPU]
    notes: list[str] = []
    if env.kind == "pipx-run":
        notes.append("this is a `pipx run` environment: pipx reuses it for the same spec whatever CMAKE_ARGS "
                     "say, so a GPU build needs `pipx install --force` (see README, Installing on GPU machines)")
    if Backend.ROCM in backends and env.rocm_version:
        notes.append(f"ROCm {env.rocm_version} found")
    return Advice(per, args, install_command(args, env, hip=Backend.ROCM in backends),
                  tuple(APT[b] for b in backends), tuple(notes))


_UNKNOWN = gpu_families.Family("amd", "unknown", "", (Backend.VULKAN,))


def format_advice(advice: Advice) -> list[str]:
    """The doctor's "What to install" section, one block per GPU then the command."""
    lines: list[str] = []
    for g in advice.gpus:
        can = ", ".join(BACKEND_LABEL[b] for b in g.drivers)
        lines.append(f"  {g.device_id:<10} {g.name}: {g.family}; driven by {can}; use {BACKEND_LABEL[g.backend]}")
        lines.append(f"             needs: {', '.join(g.packages)}")
        lines += [f"             note: {n}" for n in g.notes]
    lines.append(f"  packages (Debian/Ubuntu names): {' ; '.join(advice.apt)}")
    lines.append(f"  build llama-cpp-python for {'these cards' if advice.gpus else 'the CPU'}:")
    lines.append(f"    {advice.command}")
    lines += [f"  note: {n}" for n in advice.notes]
    return lines


# ------------------------------------------------------------------------------------------- I/O


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return ""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def current_env(llama_version: str | None) -> InstallEnv:
    """This process's environment and the toolkits on this machine (nvcc, ROCm)."""
    import re

    kind, name = environment_kind(sys.prefix, sys.base_prefix)
    nvcc = re.search(r"release (\d+\.\d+)", _first_line(["nvcc", "--version"]))
    rocm = None
    for path in (os.environ.get("ROCM_PATH", ""), "/opt/rocm"):
        if path and (v := Path(path, ".info/version")).is_file():
            rocm = v.read_text(errors="replace").strip().split("-")[0] or None
            break
    return InstallEnv(kind=kind, python=sys.executable, pipx_name=name or "aivailable",
                      llama_version=llama_version, cuda_version=nvcc[1] if nvcc else None, rocm_version=rocm)
