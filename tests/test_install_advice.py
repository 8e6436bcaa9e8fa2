"""What doctor tells a lab admin to install: per-GPU backend and packages, the exact CMAKE_ARGS for this
machine's cards, and a command that works in the environment aivailable runs in (pipx included); then
the doctor's words for the recorded machines of tests/fixtures/sysfs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aivailable.engine import devices, install_advice
from aivailable.engine.backends import Backend, BackendInfo
from aivailable.engine.devices import Device, ProbeResult
from aivailable.engine.doctor import DoctorReport, format_doctor
from aivailable.engine.install_advice import InstallEnv, advise, environment_kind

SYSFS = Path(__file__).parent / "fixtures/sysfs"
CPU_BUILD = BackendInfo(installed=True, version="0.3.36", loadable=True, gpu_offload=False)
VENV = InstallEnv(kind="venv", python="/srv/ai/.venv/bin/python", llama_version="0.3.36")


def gpu(vendor: str, cc: str | None, name: str = "card", index: int = 0) -> Device:
    return Device(id=f"{vendor}:{index}", index=index, vendor=vendor, name=name, vram_total_mib=8192,  # type: ignore[arg-type]
                  vram_used_mib=0, vram_free_mib=8192, compute_capability=cc)


@pytest.mark.parametrize(
    ("gpus", "env", "backends", "cmake"),
    [
        ([], VENV, [], "-DGGML_NATIVE=OFF"),
        ([gpu("nvidia", "6.1", "GTX 1080")], VENV, [Backend.CUDA],
         "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=61 -DGGML_NATIVE=OFF"),
        ([gpu("nvidia", "7.0", "V100"), gpu("nvidia", "6.1", "P40", 1), gpu("nvidia", "7.5", "T4", 2)], VENV,
         [Backend.CUDA] * 3, "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=61;70;75 -DGGML_NATIVE=OFF"),
        ([gpu("nvidia", None, "NVIDIA GeForce GTX 1080 Ti")], VENV, [Backend.CUDA],
         "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=61 -DGGML_NATIVE=OFF"),
        ([gpu("nvidia", "3.7", "Tesla K80")], VENV, [Backend.VULKAN], "-DGGML_VULKAN=on -DGGML_NATIVE=OFF"),
        ([gpu("amd", "gfx803", "RX 580")], VENV, [Backend.VULKAN], "-DGGML_VULKAN=on -DGGML_NATIVE=OFF"),
        # MI50 / Vega: ROCm when it is installed, Vulkan (no ROCm needed) when not
        ([gpu("amd", "gfx906", "MI50")], VENV, [Backend.VULKAN], "-DGGML_VULKAN=on -DGGML_NATIVE=OFF"),
        ([gpu("amd", "gfx906", "MI50"), gpu("amd", "gfx900", "Vega 64", 1)], InstallEnv(rocm_version="6.2.4"),
         [Backend.ROCM, Backend.ROCM], "-DGGML_HIP=on -DGPU_TARGETS=gfx900;gfx906 -DGGML_NATIVE=OFF"),
        # a lab machine with both vendors: one build with both backends
        ([gpu("nvidia", "6.1", "GTX 1080"), gpu("amd", "gfx803", "RX 580")], VENV, [Backend.CUDA, Backend.VULKAN],
         "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=61 -DGGML_VULKAN=on -DGGML_NATIVE=OFF"),
        ([devices.parse_simulated_gpu("s:64", 0)], VENV, [], "-DGGML_NATIVE=OFF"),
    ],
)  # fmt: skip
def test_cmake_args_per_machine(gpus, env, backends, cmake) -> None:
    advice = advise(gpus, env)
    assert [g.backend for g in advice.gpus] == backends
    assert advice.cmake_args == cmake
    assert f'CMAKE_ARGS="{cmake}"' in advice.command
    assert ("hipconfig" in advice.command) == (Backend.ROCM in backends)


@pytest.mark.parametrize(
    ("env", "command"),
    [
        (VENV, "/srv/ai/.venv/bin/python -m pip install --force-reinstall --no-cache-dir --no-deps "
               "'llama-cpp-python==0.3.36'"),
        (InstallEnv(kind="pipx", pipx_name="aivailable", llama_version="0.3.36"),
         "pipx runpip aivailable install --force-reinstall --no-cache-dir --no-deps 'llama-cpp-python==0.3.36'"),
        (InstallEnv(kind="pipx-run"), "pipx install --force --pip-args=--no-cache-dir ."),
        (InstallEnv(kind="system", python="/usr/bin/python3"), "/usr/bin/python3 -m pip install --force-reinstall"),
    ],
)  # fmt: skip
def test_command_fits_the_environment(env: InstallEnv, command: str) -> None:
    advice = advise([gpu("nvidia", "6.1")], env)
    assert advice.command.startswith('CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=61 -DGGML_NATIVE=OFF" ')
    assert command in advice.command
    assert any("pipx run" in n for n in advice.notes) == (env.kind == "pipx-run")


@pytest.mark.parametrize(
    ("prefix", "base", "kind", "name"),
    [
        ("/root/.local/share/pipx/venvs/aivailable", "/usr", "pipx", "aivailable"),
        ("/home/u/.local/pipx/venvs/aivailable", "/usr", "pipx", "aivailable"),
        ("/root/.local/share/pipx/.cache/3f2a1b9c", "/usr", "pipx-run", ""),
        ("/srv/ai/.venv", "/usr", "venv", ""),
        ("/usr", "/usr", "system", ""),
    ],
)  # fmt: skip
def test_environment_kind(prefix: str, base: str, kind: str, name: str) -> None:
    assert environment_kind(prefix, base) == (kind, name)


@pytest.mark.parametrize(
    ("g", "env", "words"),
    [
        (gpu("nvidia", "6.1", "GTX 1080"), VENV, ["CUDA 13 dropped Pascal (sm_61): build with a CUDA 12.x toolkit"]),
        (gpu("nvidia", "7.0", "V100"), InstallEnv(cuda_version="13.0"), ["CUDA 13 dropped Volta", "toolkit here is 13.0"]),
        (gpu("nvidia", "8.6", "RTX 3090"), InstallEnv(cuda_version="13.0"), []),
        (gpu("amd", "gfx906", "MI50"), VENV, ["faster with ROCm", "-DGPU_TARGETS=gfx906", "Vulkan needs no ROCm"]),
        (gpu("amd", "gfx803", "RX 580"), VENV, ["ROCm dropped gfx803"]),
        (gpu("nvidia", "3.5", "K40"), VENV, ["below llama.cpp's CUDA minimum"]),
    ],
)  # fmt: skip
def test_per_gpu_notes(g: Device, env: InstallEnv, words: list[str]) -> None:
    (one,) = advise([g], env).gpus
    text = " | ".join(one.notes)
    for w in words:
        assert w in text
    if not words:
        assert one.notes == ()
    assert "glslc (shaderc)" in one.packages if one.backend is Backend.VULKAN else "cmake" in one.packages


def _report(machine: str, env: InstallEnv) -> DoctorReport:
    no_libraries = {  # NVML and amdsmi as on a machine without them, whatever this one has
        "nvidia": lambda: ProbeResult("nvidia", "pynvml", False, "NVML not available: no driver library"),
        "amd": lambda: ProbeResult("amd", "amdsmi", False, "amdsmi not available: not installed"),
    }
    probes = devices.probe_all(root=SYSFS / machine, run=lambda argv: None, probes=no_libraries)
    return DoctorReport(probes, (), CPU_BUILD, "test", env)


@pytest.mark.parametrize(
    ("machine", "lines"),
    [
        ("polaris-rx580", [
            "  AMD via sysfs (amdgpu driver): sysfs: 1 AMD GPU(s)",
            "  amd:0      AMD Radeon RX 470/480/570/580: 8192 MiB total, 8169 MiB free (generation Polaris, gfx803, "
            "driver amdgpu (in-kernel), PCI 0000:03:00.0, found through sysfs)",
            "  amd:0      AMD Radeon RX 470/480/570/580: Polaris (gfx803); driven by Vulkan; use Vulkan",
            "sudo apt-get install -y cmake build-essential libvulkan-dev glslc mesa-vulkan-drivers vulkan-tools",
            "    CMAKE_ARGS=\"-DGGML_VULKAN=on -DGGML_NATIVE=OFF\" pipx runpip aivailable install --force-reinstall "
            "--no-cache-dir --no-deps 'llama-cpp-python==0.3.36'",
        ]),
        ("vega64", ["Vega 10 (gfx900); driven by ROCm (HIP), Vulkan; use Vulkan",
                    "-DGGML_HIP=on -DGPU_TARGETS=gfx900"]),
        ("mi50", ["  amd:1      Radeon Instinct MI50 32GB: 32768 MiB total",
                  "Vega 20 (gfx906); driven by ROCm (HIP), Vulkan; use Vulkan"]),
        ("apu-igpu", ["card0 (0000:07:00.0, 1002:1638) ignored: integrated GPU", "GPUs\n  amd:0      AMD Radeon RX"]),
        ("pascal-gtx1080", [
            "  NVIDIA via /proc/driver/nvidia: degraded: NVML not usable",
            "found through procfs, degraded: no NVML)",
            "  nvidia:0   no   VRAM unknown without NVML",
            "Pascal (sm_61); driven by CUDA, Vulkan; use CUDA",
            "note: CUDA 13 dropped Pascal (sm_61): build with a CUDA 12.x toolkit",
            'CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=61 -DGGML_NATIVE=OFF" pipx runpip',
        ]),
    ],
)  # fmt: skip
def test_doctor_on_recorded_machines(machine: str, lines: list[str]) -> None:
    report = _report(machine, InstallEnv(kind="pipx", llama_version="0.3.36"))
    text = format_doctor(report)
    for line in lines:
        assert line in text
    assert report.exit_code == 1  # a CPU-only build drives none of them
    data = json.loads(json.dumps(report.to_dict()))
    assert data["install"]["command"] in text and data["install"]["cmake_args"] in text


def test_current_env_is_this_interpreter() -> None:
    import sys

    env = install_advice.current_env("0.3.36")
    assert env.python == sys.executable and env.kind in ("venv", "system", "pipx", "pipx-run")
