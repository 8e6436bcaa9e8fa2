"""Device layer: vendor probes without drivers, simulated GPUs, llama.cpp backend, visibility, doctor."""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from dataclasses import replace
from pathlib import Path

import pytest

from aivailable.engine import backends, devices, probe_amdsmi, probe_nvml
from aivailable.engine.devices import (
    Backend,
    BackendInfo,
    Device,
    GgmlDevice,
    ProbeResult,
    detect_backend,
    device_env,
    discover,
    parse_simulated_gpu,
    parse_simulated_gpus,
    usable,
    visible_devices_env,
)
from aivailable.engine.doctor import DoctorReport, doctor_report, format_doctor
from aivailable.engine.probe_amdsmi import captured_stdout, probe_amd
from aivailable.engine.probe_nvml import probe_nvidia
from aivailable.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HIDE_ALL = {
    "CUDA_VISIBLE_DEVICES": "-1",
    "HIP_VISIBLE_DEVICES": "-1",
    "ROCR_VISIBLE_DEVICES": "-1",
    "GGML_VK_VISIBLE_DEVICES": "",
}
CPU_BUILD = BackendInfo(installed=True, version="0.3.36", loadable=True, gpu_offload=False)
CUDA_BUILD = BackendInfo(
    installed=True, version="0.3.36", loadable=True, compiled=(Backend.CUDA,), gpu_offload=True
)
ROCM_BUILD = BackendInfo(installed=True, loadable=True, compiled=(Backend.ROCM,), gpu_offload=True)
VULKAN_BUILD = BackendInfo(installed=True, loadable=True, compiled=(Backend.VULKAN,), gpu_offload=True)
NO_LLAMA = BackendInfo(installed=False, loadable=False, problem="llama-cpp-python not installed")


def gpu(vendor: str = "nvidia", index: int = 0, name: str = "GTX 1080", cc: str | None = "6.1") -> Device:
    return Device(
        id=f"{vendor}:{index}", index=index, vendor=vendor, name=name,  # type: ignore[arg-type]
        vram_total_mib=8192, vram_used_mib=200, vram_free_mib=7992, compute_capability=cc,
    )  # fmt: skip


def run_py(
    args: list[str], *, extra_path: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(extra_path or ""), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def llama_cpp_installed() -> bool:
    return backends._llama_cpp_dir() is not None


# ----------------------------------------------------------------------------------- simulated GPUs


@pytest.mark.parametrize(
    ("spec", "name", "vram"),
    [
        ("sim0:8192", "sim0", 8192),
        ("a:1", "a", 1),
        ("GTX-1080_Ti.x:11264", "GTX-1080_Ti.x", 11264),
        ("  big:1048576 ", "big", 1048576),
        ("n" * 64 + ":4096", "n" * 64, 4096),
    ],
)
def test_simulated_spec_parsed(spec: str, name: str, vram: int) -> None:
    dev = parse_simulated_gpu(spec, 3)
    assert (dev.id, dev.index, dev.vendor, dev.name, dev.simulated) == ("sim:3", 3, "simulated", name, True)
    assert (dev.vram_total_mib, dev.vram_used_mib, dev.vram_free_mib) == (vram, 0, vram)


@pytest.mark.parametrize(
    "spec",
    ["", "sim0", "sim0:", ":8192", "sim0:0", "sim0:-1", "sim0:8G", "sim0:8.5", "sim 0:8192", "sim0:8192:1",
     "sim0:1048577", "gpü:10", "n" * 65 + ":1", "sim0=8192"],
)  # fmt: skip
def test_bad_simulated_spec_names_the_flag(spec: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_simulated_gpus([spec])
    assert err.value.param == "--simulate-gpu"
    assert str(err.value).startswith("--simulate-gpu:")
    assert repr(spec) in str(err.value) and "NAME:VRAM_MIB" in str(err.value)


def test_param_is_configurable_for_the_config_file() -> None:
    with pytest.raises(ConfigError) as err:
        parse_simulated_gpus(["nope"], param="node.simulate_gpus")
    assert err.value.param == "node.simulate_gpus" and "node.simulate_gpus" in str(err.value)


def test_duplicate_simulated_names_rejected() -> None:
    assert [d.id for d in parse_simulated_gpus(["a:1", "b:2"])] == ["sim:0", "sim:1"]
    with pytest.raises(ConfigError, match="duplicate GPU name") as err:
        parse_simulated_gpus(["sim0:100", "x:5", "SIM0:200"])
    assert err.value.param == "--simulate-gpu"


def test_device_rejects_negative_vram() -> None:
    with pytest.raises(ValueError):
        Device(
            id="x", index=0, vendor="nvidia", name="x", vram_total_mib=1, vram_used_mib=-1, vram_free_mib=0
        )


# --------------------------------------------------------------------------------------- NVIDIA


@pytest.mark.skipif(bool(ctypes.util.find_library("nvidia-ml")), reason="an NVIDIA driver is installed here")
def test_nvml_without_driver_is_clean(capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pynvml")
    result = probe_nvidia()  # the real pynvml raises NVMLError_LibraryNotFound inside
    assert (result.vendor, result.available, result.devices) == ("nvidia", False, ())
    assert result.status.startswith("NVML not available:") and "libnvidia-ml.so.1" in result.status
    assert "nvidia-ml-py" in result.library
    assert capfd.readouterr().out == ""


def test_pynvml_missing_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    result = probe_nvidia()
    assert not result.available and result.devices == ()
    assert "pynvml is not installed" in result.status and "nvidia-ml-py" in result.status


class FakeNvml:
    """pynvml's surface that probe_nvidia uses, for one GPU with two compute processes (no driver here)."""

    def __init__(self, processes: list[tuple[int, int | None]]) -> None:
        self.processes = processes

    def nvmlInit(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: return "580.159.04"
    def nvmlDeviceGetCount(self) -> int: return 1
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int: return i
    def nvmlDeviceGetName(self, h: int) -> bytes: return b"NVIDIA H100 80GB HBM3"
    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]: return (9, 0)
    def nvmlDeviceGetUUID(self, h: int) -> str: return "GPU-1"
    def nvmlDeviceGetPciInfo(self, h: int) -> types.SimpleNamespace: return types.SimpleNamespace(busId="00:06.0")

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        mib = 1024 * 1024
        return types.SimpleNamespace(total=81559 * mib, used=4872 * mib, free=76687 * mib)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[types.SimpleNamespace]:
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=None if mib is None else mib * 1024 * 1024)
                for pid, mib in self.processes]


def test_nvml_devices_and_worker_processes_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Figures as NVML gave them on the H100 of bench/results/gpu_h100.json; a process whose memory the
    driver hides (None) is left out rather than counted as 0."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([(4939, 4384), (77, None)]))
    monkeypatch.setattr(probe_nvml, "_nvml_ready", False)
    result = probe_nvidia()
    assert result.available and result.status == "NVML driver 580.159.04: 1 NVIDIA GPU(s)"
    (dev,) = result.devices
    assert (dev.id, dev.name, dev.vram_total_mib, dev.vram_used_mib, dev.compute_capability) == (
        "nvidia:0", "NVIDIA H100 80GB HBM3", 81559, 4872, "9.0")
    assert dev.processes == ((4939, 4384),)
    # A refresh carries the processes over to the node's inventory (same uuid and bus id).
    inv = devices.Inventory((replace(dev, processes=(), vram_used_mib=0),), CUDA_BUILD)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([(4939, 4400)]))
    fresh = inv.refresh({}).get("nvidia:0")
    assert (fresh.vram_used_mib, fresh.processes) == (4872, ((4939, 4400),))


# ------------------------------------------------------------------------------------------ AMD


def test_amdsmi_absent_is_clean(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(probe_amdsmi, "_amdsmi_session", None)
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    result = probe_amd()
    assert (result.vendor, result.available, result.devices) == ("amd", False, ())
    assert "amdsmi is not installed" in result.status
    assert capfd.readouterr().out == ""


# Stands in for amdsmi on a machine without ROCm (it cannot run here): prints from Python and from the
# file descriptor (as its C library does), then raises KeyError, as the real package does.
BROKEN_AMDSMI = """
import os
print("Unable to find amdsmi library try installing amd-smi-lib from your package manager")
os.write(1, b"libamd_smi.so: cannot open shared object file\\n")
raise KeyError("ROCM_PATH")
"""


def fake_package(tmp_path: Path, source: str) -> Path:
    pkg = tmp_path / "amdsmi"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(source))
    return tmp_path


def test_broken_amdsmi_keeps_stdout_clean(tmp_path: Path) -> None:
    site = fake_package(tmp_path, BROKEN_AMDSMI)
    code = (
        "import json, sys\nfrom aivailable.engine.probe_amdsmi import probe_amd\n"
        "r = probe_amd(); r2 = probe_amd()\nsys.stderr.write(json.dumps([r.to_dict(), r2 == r]))"
    )
    proc = run_py(["-c", code], extra_path=site)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    result, same_again = json.loads(proc.stderr)
    assert result["available"] is False and result["devices"] == [] and same_again
    assert "fails to load" in result["status"] and "KeyError" in result["status"]
    assert "Unable to find amdsmi library" in result["status"] and "libamd_smi.so" in result["status"]


def test_doctor_with_broken_amdsmi_says_why(tmp_path: Path) -> None:
    proc = run_py(["-m", "aivailable.engine.doctor"], extra_path=fake_package(tmp_path, BROKEN_AMDSMI))
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr
    assert proc.stdout.startswith("AIvailable doctor\n")
    amd_line = next(line for line in proc.stdout.splitlines() if line.startswith("  AMD via amdsmi:"))
    assert "KeyError" in amd_line and "ROCm missing?" in amd_line


# Stands in for a working amdsmi (no AMD GPU here), including its habit of printing during init.
WORKING_AMDSMI = """
def amdsmi_init(): print("amdsmi: initialised")
def amdsmi_shut_down(): pass
def amdsmi_get_processor_handles(): return ["h0", "h1"]
def amdsmi_get_gpu_vram_usage(h): return {"vram_total": 16368, "vram_used": 12}
def amdsmi_get_gpu_asic_info(h):
    return {"market_name": "Radeon RX 6800", "target_graphics_version": "gfx1030"} if h == "h0" else {}
def amdsmi_get_gpu_device_bdf(h): return "0000:0%s:00.0" % h[1]
def amdsmi_get_gpu_device_uuid(h): raise RuntimeError("not supported")
def amdsmi_get_gpu_driver_info(h): return {"driver_version": "6.8.5"}
"""


def test_amdsmi_devices_are_read(tmp_path: Path) -> None:
    code = (
        "import json, sys\nfrom aivailable.engine.probe_amdsmi import probe_amd\n"
        "sys.stderr.write(json.dumps(probe_amd().to_dict()))"
    )
    proc = run_py(["-c", code], extra_path=fake_package(tmp_path, WORKING_AMDSMI))
    assert proc.returncode == 0 and proc.stdout == ""
    result = json.loads(proc.stderr)
    assert result["available"] is True and result["status"] == "amdsmi: 2 AMD GPU(s)"
    first, second = result["devices"]
    assert first | {"vram_free_mib": 0} == {
        "id": "amd:0", "index": 0, "vendor": "amd", "name": "Radeon RX 6800", "simulated": False,
        "vram_total_mib": 16368, "vram_used_mib": 12, "vram_free_mib": 0, "uuid": None,
        "pci_bus_id": "0000:00:00.0", "driver": "6.8.5", "compute_capability": "gfx1030", "source": "amdsmi", "degraded": False, "vulkan_index": None,
    }  # fmt: skip
    assert first["vram_free_mib"] == 16356
    assert (second["id"], second["name"], second["compute_capability"]) == ("amd:1", "AMD GPU 1", None)


def test_captured_stdout_takes_python_and_fd_output(capfd: pytest.CaptureFixture[str]) -> None:
    with captured_stdout() as out:
        print("from python")
        os.write(1, b"from the fd\n")
    print("after")
    assert "from python" in out[0] and "from the fd" in out[0]
    assert capfd.readouterr().out == "after\n"


# ------------------------------------------------------------------------------------ llama.cpp


def test_backend_when_llama_cpp_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    info = detect_backend()
    assert (info.installed, info.loadable, info.primary, info.summary()) == (
        False, False, Backend.CPU, "llama-cpp-python not installed",
    )  # fmt: skip
    assert usable(parse_simulated_gpu("s:1", 0), info) == (False, "llama-cpp-python is not installed")


@pytest.mark.skipif(not llama_cpp_installed(), reason="llama-cpp-python not installed")
def test_backend_on_this_machine_is_cpu() -> None:
    info = detect_backend()
    assert info.installed and info.loadable and info.problem is None, info
    gpu_libs = [
        lib for lib in info.libraries if re.search(r"ggml-(cuda|hip|vulkan|metal|sycl|opencl)\.", lib)
    ]
    if gpu_libs:
        pytest.skip(f"llama.cpp here is a GPU build: {gpu_libs}")
    assert (info.compiled, info.primary, info.summary(), info.gpu_offload) == (
        (),
        Backend.CPU,
        "CPU only",
        False,
    )
    assert info.version and any(lib.startswith("libllama") for lib in info.libraries)
    assert info.runtime_devices and {d.kind for d in info.runtime_devices} == {"cpu"}


@pytest.mark.skipif(not llama_cpp_installed(), reason="llama-cpp-python not installed")
def test_backend_that_fails_to_load_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(tmp_path))  # llama_cpp looks for libllama.so there
    info = detect_backend()
    assert info.installed and info.loadable is False and info.libraries == ()
    assert info.problem and info.problem.startswith("llama-cpp-python fails to load:")
    assert usable(parse_simulated_gpu("s:1", 0), info)[0] is False


# ----------------------------------------------------------------------------------- visibility


@pytest.mark.parametrize(
    ("backend", "indices", "env"),
    [
        (Backend.CUDA, [0, 2], HIDE_ALL | {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0,2"}),
        (Backend.CUDA, [1], HIDE_ALL | {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}),
        (Backend.ROCM, [1], {"ROCR_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "0", "GGML_VK_VISIBLE_DEVICES": ""}),
        (Backend.ROCM, [0, 3], {"ROCR_VISIBLE_DEVICES": "0,3", "HIP_VISIBLE_DEVICES": "0,1", "GGML_VK_VISIBLE_DEVICES": ""}),
        (Backend.VULKAN, [2, 0], HIDE_ALL | {"GGML_VK_VISIBLE_DEVICES": "2,0"}),
        (Backend.CPU, [0], HIDE_ALL),
        (Backend.CUDA, [], HIDE_ALL),
        (Backend.VULKAN, [], HIDE_ALL),
        (Backend.METAL, [], HIDE_ALL),
    ],
)  # fmt: skip
def test_visible_devices_env(backend: Backend, indices: list[int], env: dict[str, str]) -> None:
    got = visible_devices_env(backend, indices)
    assert got == env and set(got) <= set(devices.GPU_ENV_VARS)


@pytest.mark.parametrize(
    ("backend", "indices"), [(Backend.CUDA, [0, 0]), (Backend.CUDA, [-1]), (Backend.METAL, [0])]
)
def test_visible_devices_env_rejects(backend: Backend, indices: list[int]) -> None:
    with pytest.raises(ValueError):
        visible_devices_env(backend, indices)


def test_device_env() -> None:
    sims = parse_simulated_gpus(["a:1", "b:2"])
    assert device_env(CUDA_BUILD, sims) == HIDE_ALL
    assert device_env(CUDA_BUILD, [gpu(index=0), gpu(index=3)])["CUDA_VISIBLE_DEVICES"] == "0,3"
    both = BackendInfo(installed=True, loadable=True, compiled=(Backend.CUDA, Backend.VULKAN))
    amd_env = device_env(both, [gpu("amd", 1)])  # the AMD GPU runs on Vulkan; CUDA's GPUs are hidden
    assert amd_env["GGML_VK_VISIBLE_DEVICES"] == "1" and amd_env["CUDA_VISIBLE_DEVICES"] == "-1"
    for backend, placed in (
        (VULKAN_BUILD, [sims[0], gpu()]),
        (both, [gpu(), gpu("amd", 1)]),
        (CPU_BUILD, [gpu()]),
    ):
        with pytest.raises(ValueError):
            device_env(backend, placed)


# --------------------------------------------------------------------------------------- usable

RUNTIME_CPU_ONLY = (GgmlDevice("CPU", "some CPU", "cpu", 64000, 60000),)
RUNTIME_CUDA = (GgmlDevice("CUDA0", "NVIDIA GeForce GTX 1080", "gpu", 8192, 8000), *RUNTIME_CPU_ONLY)


@pytest.mark.parametrize(
    ("device", "backend", "ok", "words"),
    [
        (gpu(), CPU_BUILD, False, ["built for CPU only", "CMAKE_ARGS=-DGGML_CUDA=on", "this GTX 1080"]),
        (gpu(), CUDA_BUILD, True, ["CUDA backend"]),
        (gpu(), VULKAN_BUILD, True, ["Vulkan backend"]),
        (gpu(), ROCM_BUILD, False, ["built for ROCm (HIP) only", "-DGGML_CUDA=on"]),
        (gpu(cc="3.7", name="Tesla K80"), CUDA_BUILD, False, ["compute capability 3.7", "Vulkan"]),
        (gpu(cc=None), CUDA_BUILD, True, ["CUDA backend"]),
        (gpu("amd", name="RX 6800", cc="gfx1030"), ROCM_BUILD, True, ["ROCm (HIP) backend"]),
        (gpu("amd", name="RX 6800"), CUDA_BUILD, False, ["built for CUDA only", "-DGGML_HIP=on", "RX 6800"]),
        (gpu("amd"), VULKAN_BUILD, True, ["Vulkan backend"]),
        (parse_simulated_gpu("s:10", 0), CPU_BUILD, True, ["simulated", "CPU"]),
        (parse_simulated_gpu("s:10", 0), CUDA_BUILD, True, ["simulated"]),
        (gpu(), NO_LLAMA, False, ["not installed"]),
        (gpu(), BackendInfo(installed=True, loadable=False, problem="boom"), False, ["boom"]),
        (gpu(), BackendInfo(installed=True, loadable=True, compiled=(Backend.CUDA,), runtime_devices=RUNTIME_CPU_ONLY),
         False, ["finds no GPU at run time"]),
        (gpu(), BackendInfo(installed=True, loadable=True, compiled=(Backend.CUDA,), runtime_devices=RUNTIME_CUDA),
         True, ["CUDA backend"]),
    ],
)  # fmt: skip
def test_usable(device: Device, backend: BackendInfo, ok: bool, words: list[str]) -> None:
    got_ok, reason = usable(device, backend)
    assert got_ok is ok
    for word in words:
        assert word in reason


# ------------------------------------------------------------------------------------ inventory


def test_discover_simulated_uses_only_simulated_gpus() -> None:
    inv = discover(["sim0:8192", "sim1:4096"], backend=CPU_BUILD)
    assert [d.id for d in inv.devices] == ["sim:0", "sim:1"] and inv.probes == () and inv.simulated
    assert inv.usable_devices() == inv.devices
    used = inv.with_usage({"sim:0": 5000})
    assert (used.get("sim:0").vram_used_mib, used.get("sim:0").vram_free_mib) == (5000, 3192)
    assert used.get("sim:1").vram_used_mib == 0
    assert used.with_usage({}).get("sim:0").vram_free_mib == 8192  # a released claim frees the VRAM
    assert used.refresh({"sim:1": 9999}).get("sim:1").vram_free_mib == 0  # over-claimed: none free
    with pytest.raises(ValueError):
        inv.with_usage({"sim:0": -1})
    with pytest.raises(KeyError):
        inv.get("nvidia:0")
    row = inv.to_dict()["devices"][0]
    assert row["simulated"] is True and row["usable"] is True and row["vram_total_mib"] == 8192


def test_discover_bad_spec_is_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        discover(["sim0:lots"], backend=CPU_BUILD)
    assert err.value.param == "--simulate-gpu"


def test_discover_real_on_this_machine_is_clean(capfd: pytest.CaptureFixture[str]) -> None:
    inv = discover([], backend=CPU_BUILD)
    vendors = [p.vendor for p in inv.probes]  # each vendor library, then its fallback where it is missing
    assert vendors[0] == "nvidia" and "amd" in vendors and vendors == sorted(vendors, key=["nvidia", "amd"].index)
    assert all(p.status for p in inv.probes)
    assert capfd.readouterr().out == ""
    if not any(p.available for p in inv.probes):
        assert inv.devices == () and inv.usable_devices() == () and not inv.simulated


def test_discover_runs_the_given_probes_in_order_and_refreshes_with_them() -> None:
    """Injected vendor probes replace NVML and amdsmi: run in the given order, their fallbacks only where
    a probe is unavailable, and the inventory's `refresh` re-measures through the same probes."""
    calls: list[str] = []
    used = iter([200, 3000])

    def amd() -> ProbeResult:
        calls.append("amd")
        d = replace(gpu("amd", 0, "Radeon RX 6800", "gfx1030"), vram_used_mib=(u := next(used)),
                    vram_free_mib=8192 - u, uuid="u0", source="amdsmi")
        return ProbeResult("amd", "fake amdsmi", True, "fake: 1 AMD GPU(s)", (d,))

    def nvidia() -> ProbeResult:
        calls.append("nvidia")
        return ProbeResult("nvidia", "fake pynvml", False, "NVML not available: fake")

    inv = discover([], backend=ROCM_BUILD, root=Path("/nonexistent"), run=lambda argv: None,
                   probes={"amd": amd, "nvidia": nvidia})
    assert calls == ["amd", "nvidia"]  # no amd fallback (available); no nvidia one under an empty root
    assert [(p.vendor, p.library) for p in inv.probes] == [("amd", "fake amdsmi"), ("nvidia", "fake pynvml")]
    assert [d.id for d in inv.usable_devices()] == ["amd:0"]
    fresh = inv.refresh({})
    assert calls == ["amd", "nvidia", "amd"]  # only the vendors the inventory has GPUs of
    assert fresh.get("amd:0").vram_used_mib == 3000


def test_real_device_keeps_measured_usage() -> None:
    inv = devices.Inventory((gpu(),), CUDA_BUILD)
    assert inv.with_usage({"nvidia:0": 4000}).get("nvidia:0").vram_used_mib == 200


# --------------------------------------------------------------------------------------- doctor


def report_with(
    devs: tuple[Device, ...], backend: BackendInfo, sims: tuple[Device, ...] = ()
) -> DoctorReport:
    probe = devices.ProbeResult("nvidia", "pynvml", bool(devs), "NVML driver 535.0: test", devs)
    return DoctorReport(probes=(probe,), simulated=sims, backend=backend, platform="test")


@pytest.mark.parametrize(
    ("report", "code", "verdict"),
    [
        (report_with((), CPU_BUILD), 1, "no GPU found. To try AIvailable on the CPU, run with --simulate-gpu"),
        (report_with((gpu(),), CPU_BUILD), 1, 'none usable with this llama.cpp build. Rebuild llama-cpp-python: CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=61 -DGGML_NATIVE=OFF"'),
        (report_with((gpu(),), CUDA_BUILD), 0, "1 of 1 GPU(s) usable: nvidia:0."),
        (report_with((gpu(),), CPU_BUILD, parse_simulated_gpus(["s:64"])), 0, "1 of 2 GPU(s) usable: sim:0. The node uses only the simulated"),
        (report_with((), NO_LLAMA), 1, "llama-cpp-python is not installed"),
    ],
)  # fmt: skip
def test_doctor_verdicts(report: DoctorReport, code: int, verdict: str) -> None:
    assert report.exit_code == code
    assert verdict in report.verdict()
    text = format_doctor(report)
    assert text.endswith(f"Verdict: {report.verdict()}")
    assert json.loads(json.dumps(report.to_dict()))["exit_code"] == code


def test_doctor_words_for_a_cpu_build_with_a_gpu() -> None:
    text = format_doctor(report_with((gpu(),), CPU_BUILD))
    assert "nvidia:0   GTX 1080: 8192 MiB total, 7992 MiB free (generation Pascal, sm_61, compute capability 6.1)" in text
    assert "built for CPU only" in text and "with every GPU hidden from them: CUDA_VISIBLE_DEVICES=-1" in text
    assert "  nvidia:0   no   llama.cpp here was built for CPU only" in text
    cuda = format_doctor(report_with((gpu(),), CUDA_BUILD))
    assert "pinned to their GPUs with CUDA_VISIBLE_DEVICES, with CUDA_DEVICE_ORDER=PCI_BUS_ID" in cuda


def test_doctor_report_rejects_bad_spec() -> None:
    with pytest.raises(ConfigError):
        doctor_report(["bad"], backend=CPU_BUILD, probes=())


def test_doctor_subprocess_plain_words() -> None:
    proc = run_py(["-m", "aivailable.engine.doctor"])
    assert proc.stderr == "" and proc.returncode in (0, 1)
    out = proc.stdout
    for heading in ("AIvailable doctor", "Vendor libraries", "  NVIDIA via pynvml", "  AMD via amdsmi", "GPUs",
                    "llama.cpp", "Usable", "Verdict: "):  # fmt: skip
        assert heading in out
    if not ctypes.util.find_library("nvidia-ml") and llama_cpp_installed():
        assert proc.returncode == 1 and "built for CPU only" in out and "Verdict: no GPU found." in out


def test_doctor_subprocess_simulated_json() -> None:
    proc = run_py(["-m", "aivailable.engine.doctor", "--simulate-gpu", "sim0:4096", "--json"])
    report = json.loads(proc.stdout)
    assert proc.returncode == report["exit_code"] and proc.stderr == ""
    sim = next(d for d in report["devices"] if d["id"] == "sim:0")
    assert sim["simulated"] is True and sim["vram_total_mib"] == 4096
    if llama_cpp_installed():
        assert proc.returncode == 0 and report["usable"][-1] == "sim:0"


@pytest.mark.parametrize("value", ["sim0", "sim0:0", "x:12GB"])
def test_doctor_subprocess_bad_simulate_gpu(value: str) -> None:
    proc = run_py(["-m", "aivailable.engine.doctor", "--simulate-gpu", value])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("aivailable doctor: error: --simulate-gpu:") and repr(value) in proc.stderr


def test_default_threads_counts_physical_cores(tmp_path):
    """Hyper-thread siblings share a core: 4 logical CPUs on 2 cores give 2 worker threads."""
    from aivailable.engine.manager import default_threads

    siblings = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}
    for cpu, cores in siblings.items():
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_cpus_list").write_text(cores + "\n")
    assert default_threads({0, 1, 2, 3}, sysfs=str(tmp_path)) == 2
    assert default_threads({0, 2}, sysfs=str(tmp_path)) == 1  # affinity limited to one core's threads
    assert default_threads({7, 8, 9}, sysfs=str(tmp_path)) == 3  # no topology: each CPU counts
    assert default_threads() >= 1


def test_ready_workers_take_their_vram_from_the_driver(tmp_path: Path) -> None:
    """The driver's per-process figure replaces llama.cpp's buffer sum for a ready worker on a real GPU
    (it includes the CUDA context); simulated, loading and unreported workers keep theirs."""
    from aivailable.engine.manager import Assignment, WorkerHandle, WorkerManager

    m = WorkerManager(socket_dir=str(tmp_path), n_threads=1)

    def handle(key: str, devs: tuple[str, ...], pid: int, state: str = "ready", simulated: bool = False):
        a = Assignment(model=key, path="/m.gguf", device_ids=devs, n_ctx=512, simulated=simulated)
        h = WorkerHandle(a, socket="s", state=state, pid=pid, vram_mib=3860.4)  # type: ignore[arg-type]
        m.workers[a.key] = h
        return h

    one = handle("one", ("nvidia:0",), 10)
    split = handle("split", ("nvidia:0", "nvidia:1"), 11)
    half = handle("half", ("nvidia:0", "nvidia:1"), 12)
    loading = handle("loading", ("nvidia:0",), 13, state="loading")
    sim = handle("sim", ("sim:0",), 14, simulated=True)
    gone = handle("gone", ("nvidia:1",), 15)
    m.measure_vram({"nvidia:0": {10: 4384, 11: 2000, 12: 900, 13: 50, 14: 1},
                    "nvidia:1": {11: 2100}, "sim:0": {14: 1}})
    assert one.vram_mib == 4384 and split.vram_mib == 4100
    assert half.vram_mib == loading.vram_mib == sim.vram_mib == gone.vram_mib == 3860.4
    assert m.vram_claims()["nvidia:1"] == 4100 / 2 + 3860.4 / 2 + 3860.4
