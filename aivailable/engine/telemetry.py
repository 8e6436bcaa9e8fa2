"""GPU utilisation, temperature and power: NVML for NVIDIA, amdsmi for AMD, else Linux sysfs (amdgpu's
hwmon and `gpu_busy_percent`, by PCI bus id). Each figure is None where no source gives it; simulated
GPUs give none. Never raises: a GPU that stops answering reads as all None.

`Telemetry` takes its readers as arguments, so tests (and machines with unusual drivers) can inject them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("aivailable.telemetry")


@dataclass(frozen=True, slots=True)
class GpuTelemetry:
    """What the driver says about one GPU right now (None: not reported)."""

    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def merged(self, other: GpuTelemetry) -> GpuTelemetry:
        """Self's figures, with other's where self has none."""
        return GpuTelemetry(*(a if a is not None else b for a, b in
                              zip(asdict(self).values(), asdict(other).values(), strict=True)))


NONE = GpuTelemetry()
Reader = Callable[[Any], GpuTelemetry]
"""Reads one device (an engine.devices.Device); may raise, which reads as NONE."""


def read_nvml(device: Any) -> GpuTelemetry:
    """NVIDIA through pynvml (already initialised by engine.probe_nvml)."""
    import pynvml

    h = pynvml.nvmlDeviceGetHandleByIndex(device.index)
    util = temp = power = None
    with contextlib.suppress(Exception):
        util = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
    with contextlib.suppress(Exception):
        temp = float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
    with contextlib.suppress(Exception):
        power = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0  # mW
    return GpuTelemetry(util, temp, power)


def read_amdsmi(device: Any) -> GpuTelemetry:
    """AMD through amdsmi (ROCm), when engine.probe_amdsmi opened it."""
    from aivailable.engine import probe_amdsmi

    amdsmi, _why = probe_amdsmi.open_amdsmi()
    if amdsmi is None:
        return NONE
    h = amdsmi.amdsmi_get_processor_handles()[device.index]
    util = temp = power = None
    with contextlib.suppress(Exception):
        util = float(amdsmi.amdsmi_get_gpu_activity(h)["gfx_activity"])
    with contextlib.suppress(Exception):
        temp = float(amdsmi.amdsmi_get_temp_metric(h, amdsmi.AmdSmiTemperatureType.EDGE,
                                                   amdsmi.AmdSmiTemperatureMetric.CURRENT))
    with contextlib.suppress(Exception):
        info = amdsmi.amdsmi_get_power_info(h)
        watts = info.get("current_socket_power") or info.get("average_socket_power")
        power = float(watts) if isinstance(watts, int | float) else None
    return GpuTelemetry(util, temp, power)


def _number(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read_sysfs(device: Any, root: Path | str = "/sys") -> GpuTelemetry:
    """The PCI device's own sysfs files: amdgpu's `gpu_busy_percent`, and its hwmon's `temp1_input`
    (millidegrees C) and `power1_average` or `power1_input` (microwatts)."""
    bus = (getattr(device, "pci_bus_id", None) or "").lower()
    if not bus:
        return NONE
    if bus.count(":") == 2 and len(bus.split(":")[0]) == 8:  # NVML's 00000000:01:00.0
        bus = bus[4:]
    dev = Path(root) / "bus" / "pci" / "devices" / bus
    if not dev.is_dir():
        return NONE
    util = _number(dev / "gpu_busy_percent")
    temp = power = None
    for hw in sorted((dev / "hwmon").glob("hwmon*")):
        t = _number(hw / "temp1_input")
        temp = temp if t is None else t / 1000.0
        p = _number(hw / "power1_average")
        p = p if p is not None else _number(hw / "power1_input")
        power = power if p is None else p / 1e6
        if temp is not None or power is not None:
            break
    return GpuTelemetry(util, temp, power)


class Telemetry:
    """Reads every device with its vendor's reader, filling gaps from sysfs. Simulated GPUs: all None."""

    def __init__(self, readers: Mapping[str, Reader] | None = None, sysfs: Reader | None = read_sysfs):
        self.readers = dict(readers) if readers is not None else {"nvidia": read_nvml, "amd": read_amdsmi}
        self.sysfs = sysfs
        self._failed: set[tuple[str, str]] = set()

    def read(self, device: Any) -> GpuTelemetry:
        if device.simulated:
            return NONE
        got = NONE
        reader = self.readers.get(device.vendor)
        if reader is not None:
            got = self._try(reader, device, device.vendor)
        if self.sysfs is not None and None in (got.utilization_pct, got.temperature_c, got.power_w):
            got = got.merged(self._try(self.sysfs, device, "sysfs"))
        return got

    def read_all(self, devices: list[Any]) -> dict[str, GpuTelemetry]:
        return {d.id: self.read(d) for d in devices}

    def _try(self, reader: Reader, device: Any, source: str) -> GpuTelemetry:
        try:
            return reader(device)
        except Exception as exc:  # a driver that stops answering must not stop the node
            if (device.id, source) not in self._failed:
                self._failed.add((device.id, source))
                log.info("no %s telemetry for GPU %s: %s: %s", source, device.id, type(exc).__name__, exc)
            return NONE
