"""NVIDIA GPUs through NVML (pynvml, distribution nvidia-ml-py; optional at run time).

`probe_nvidia` never raises and keeps NVML initialised between calls for the life of the process (nvmlInit
can take a second without persistence mode).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aivailable.engine.devices import Device, ProbeResult

__all__ = ["probe_nvidia"]

_MIB = 1024 * 1024

_NVML_REASONS = {
    "NVMLError_LibraryNotFound": "the NVIDIA driver library libnvidia-ml.so.1 was not found (no NVIDIA driver installed)",
    "NVMLError_DriverNotLoaded": "the NVIDIA kernel driver is not loaded",
    "NVMLError_NoPermission": "no permission to talk to the NVIDIA driver",
    "NVMLError_LibRmVersionMismatch": "the NVIDIA driver and its library differ in version (reboot after a driver update)",
    "NVMLError_GpuIsLost": "a GPU has fallen off the bus",
}


def _nvml_reason(exc: BaseException) -> str:
    return _NVML_REASONS.get(type(exc).__name__, f"{type(exc).__name__}: {exc}")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


_nvml_ready = False  # NVML stays initialised: nvmlInit can take a second without persistence mode


def probe_nvidia() -> ProbeResult:
    """NVIDIA GPUs through pynvml (distribution nvidia-ml-py). Never raises."""
    from aivailable.engine.devices import ProbeResult

    global _nvml_ready
    try:
        library = f"pynvml (nvidia-ml-py {importlib.metadata.version('nvidia-ml-py')})"
    except importlib.metadata.PackageNotFoundError:
        library = "pynvml"
    try:
        import pynvml
    except ImportError:
        why = "NVML not available: pynvml is not installed (pip install nvidia-ml-py)"
        return ProbeResult("nvidia", library, False, why)
    try:
        if not _nvml_ready:
            pynvml.nvmlInit()
            _nvml_ready = True
    except Exception as exc:
        return ProbeResult("nvidia", library, False, f"NVML not available: {_nvml_reason(exc)}")
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        devices, problems = [], []
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                devices.append(_nvidia_device(pynvml, i, driver))
            except Exception as exc:
                problems.append(f"GPU {i} skipped: {_nvml_reason(exc)}")
        status = f"NVML driver {driver}: {len(devices)} NVIDIA GPU(s)"
        return ProbeResult("nvidia", library, True, "; ".join([status, *problems]), tuple(devices))
    except Exception as exc:
        return ProbeResult("nvidia", library, False, f"NVML failed: {_nvml_reason(exc)}")


def _nvidia_device(pynvml: Any, i: int, driver: str) -> Device:
    from aivailable.engine.devices import Device

    handle = pynvml.nvmlDeviceGetHandleByIndex(i)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    cc = None
    with contextlib.suppress(Exception):
        cc = "{}.{}".format(*pynvml.nvmlDeviceGetCudaComputeCapability(handle))
    uuid = bus = None
    processes: tuple[tuple[int, int], ...] = ()
    with contextlib.suppress(Exception):  # usedGpuMemory is None where the driver hides it (some containers)
        processes = tuple((int(p.pid), int(p.usedGpuMemory) // _MIB)
                          for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.usedGpuMemory)
    with contextlib.suppress(Exception):
        uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
    with contextlib.suppress(Exception):
        bus = _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)
    return Device(
        id=f"nvidia:{i}",
        index=i,
        vendor="nvidia",
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        vram_total_mib=int(mem.total) // _MIB,
        vram_used_mib=int(mem.used) // _MIB,
        vram_free_mib=int(mem.free) // _MIB,
        uuid=uuid,
        pci_bus_id=bus,
        driver=driver,
        compute_capability=cc,
        processes=processes,
        source="nvml",
    )
