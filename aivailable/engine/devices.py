"""GPU inventory: NVIDIA through NVML, AMD through amdsmi, or simulated GPUs; one `Device` type for all.

The vendor probes are engine/probe_nvml.py and engine/probe_amdsmi.py (both libraries optional at run
time); `discover(probes=...)` takes others (tests pass fakes). Without the vendor library,
engine/sysfs_probe.py finds AMD GPUs through amdgpu's sysfs files and NVIDIA GPUs through nvidia-smi or
/proc/driver/nvidia (degraded); engine/vulkan_map.py gives each GPU its Vulkan index when the llama.cpp
build has the Vulkan backend.

Every probe returns a `ProbeResult` with the devices it found and a status in plain words; none of them
raises, and none writes to the node's stdout.

`--simulate-gpu NAME:VRAM_MIB` declares GPUs that do not exist: workers placed on them run on the
CPU. When any simulated GPU is given the node uses only simulated GPUs (real ones are not probed),
so a developer machine with a GPU can run a deterministic simulated cluster; `aivailable doctor`
still shows both.

Which llama.cpp backend drives each GPU (`backend_for`, `usable`) and the environment that pins a worker
to its GPUs (`device_env`) are here; the backend detection itself is engine/backends.py, re-exported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from aivailable.engine import gpu_families, probe_amdsmi, probe_nvml, sysfs_probe, vulkan_map
from aivailable.engine.backends import (  # noqa: F401  (re-exported: callers use devices.X)
    BACKEND_LABEL,
    GPU_ENV_VARS,
    HIDE_ALL,
    Backend,
    BackendInfo,
    GgmlDevice,
    detect_backend,
    visibility_vars,
    visible_devices_env,
)
from aivailable.errors import ConfigError

Vendor = Literal["nvidia", "amd", "simulated"]

SIMULATE_FLAG = "--simulate-gpu"
MAX_SIMULATED_VRAM_MIB = 1024 * 1024  # 1 TiB: far above any real card, low enough to catch unit mix-ups
_SIM_SPEC = re.compile(r"(?P<name>[A-Za-z0-9._-]{1,64}):(?P<vram>[0-9]+)")


@dataclass(frozen=True, slots=True)
class Device:
    """One GPU. `id` is stable on this node ("nvidia:0", "amd:1", "sim:0"); `index` is the vendor's
    index, the number a visibility variable such as CUDA_VISIBLE_DEVICES takes."""

    id: str
    index: int
    vendor: Vendor
    name: str
    vram_total_mib: int
    vram_used_mib: int
    vram_free_mib: int  # as the driver reports it; NVML's free + used can be less than total
    uuid: str | None = None
    pci_bus_id: str | None = None
    driver: str | None = None
    compute_capability: str | None = None  # NVIDIA "6.1"; AMD gfx target such as "gfx1030"
    processes: tuple[tuple[int, int], ...] = ()
    """(pid, MiB) of each compute process the driver reports on this GPU (NVIDIA; empty where unknown)."""
    source: str = ""
    """Which probe found it: "nvml", "amdsmi", "sysfs", "nvidia-smi", "procfs" ("" when simulated)."""
    vulkan_index: int | None = None
    """Its index in the Vulkan enumeration (GGML_VK_VISIBLE_DEVICES), where engine/vulkan_map.py matched it."""

    def __post_init__(self) -> None:
        if min(self.vram_total_mib, self.vram_used_mib, self.vram_free_mib) < 0:
            raise ValueError(f"{self.id}: VRAM figures must not be negative")

    @property
    def simulated(self) -> bool:
        """A simulated GPU runs its workers on the CPU and is marked simulated everywhere."""
        return self.vendor == "simulated"

    @property
    def degraded(self) -> bool:
        """Found without the vendor library (NVIDIA without NVML): figures may be missing or stale."""
        return self.source in ("nvidia-smi", "procfs")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "index": self.index,
            "vendor": self.vendor,
            "name": self.name,
            "simulated": self.simulated,
            "vram_total_mib": self.vram_total_mib,
            "vram_used_mib": self.vram_used_mib,
            "vram_free_mib": self.vram_free_mib,
            "uuid": self.uuid,
            "pci_bus_id": self.pci_bus_id,
            "driver": self.driver,
            "compute_capability": self.compute_capability,
            "source": self.source,
            "degraded": self.degraded,
            "vulkan_index": self.vulkan_index,
        }


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one vendor library said. `available`: the library loaded and talked to the driver."""

    vendor: Vendor
    library: str
    available: bool
    status: str
    devices: tuple[Device, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "library": self.library,
            "available": self.available,
            "status": self.status,
            "devices": [d.to_dict() for d in self.devices],
        }


# ---------------------------------------------------------------------------------------- simulated


def parse_simulated_gpu(spec: str, index: int, *, param: str = SIMULATE_FLAG) -> Device:
    """Parse "NAME:VRAM_MIB" into a simulated Device "sim:INDEX"; ConfigError naming `param` if bad."""
    expected = (
        "expected NAME:VRAM_MIB, e.g. sim0:8192 (NAME: 1-64 letters, digits, '.', '_' or '-'; "
        f"VRAM_MIB: a whole number of MiB from 1 to {MAX_SIMULATED_VRAM_MIB})"
    )
    match = _SIM_SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ConfigError(f"{param}: invalid value {spec!r}: {expected}", param=param)
    vram = int(match["vram"])
    if not 1 <= vram <= MAX_SIMULATED_VRAM_MIB:
        raise ConfigError(f"{param}: invalid VRAM {vram} MiB in {spec!r}: {expected}", param=param)
    return Device(
        id=f"sim:{index}",
        index=index,
        vendor="simulated",
        name=match["name"],
        vram_total_mib=vram,
        vram_used_mib=0,
        vram_free_mib=vram,
    )


def parse_simulated_gpus(specs: Sequence[str], *, param: str = SIMULATE_FLAG) -> tuple[Device, ...]:
    """Parse every spec; names must be unique (case-insensitive)."""
    devices = tuple(parse_simulated_gpu(spec, i, param=param) for i, spec in enumerate(specs))
    seen: dict[str, str] = {}
    for spec, dev in zip(specs, devices, strict=True):
        key = dev.name.lower()
        if key in seen:
            raise ConfigError(
                f"{param}: duplicate GPU name {dev.name!r} ({seen[key]!r} and {spec!r}); give each a unique NAME",
                param=param,
            )
        seen[key] = spec
    return devices


# --------------------------------------------------------------------------------------- vendor probes

VendorProbes = Mapping[str, Callable[[], ProbeResult]]
"""Vendor ("nvidia", "amd") -> the probe of its library, in the order they run."""

VENDOR_PROBES: VendorProbes = {"nvidia": probe_nvml.probe_nvidia, "amd": probe_amdsmi.probe_amd}


# ----------------------------------------------------------------------------------------- llama.cpp


def device_env(backend: BackendInfo | Backend, devices: Sequence[Device]) -> dict[str, str]:
    """Visibility environment for a worker placed on `devices`: all simulated (every GPU hidden), or
    real GPUs that one backend serves (ValueError otherwise). Given a `BackendInfo`, each GPU gets the
    compiled backend that serves its vendor (`backend_for`); given a `Backend`, that one."""
    if all(d.simulated for d in devices):
        return dict(HIDE_ALL)
    if isinstance(backend, Backend):
        runs_on: set[Backend | None] = {None if d.simulated else backend for d in devices}
        runs_on |= {None} if len({d.vendor for d in devices}) > 1 else set()
    else:
        runs_on = {None if d.simulated else backend_for(d, backend) for d in devices}
    chosen = runs_on.pop() if len(runs_on) == 1 else None
    if chosen is None:
        raise ValueError(f"no single llama.cpp backend serves GPUs {[d.id for d in devices]}")
    if chosen is Backend.VULKAN:  # Vulkan's own numbering where engine/vulkan_map.py matched the GPU
        return visible_devices_env(chosen, [d.index if d.vulkan_index is None else d.vulkan_index for d in devices])
    return visible_devices_env(chosen, [d.index for d in devices])


_MIN_CUDA_CC = (5, 0)  # llama.cpp's CUDA backend (and CUDA 12) start at Maxwell
_REBUILD = {"nvidia": "-DGGML_CUDA=on", "amd": "-DGGML_HIP=on"}
_SERVES = {"nvidia": (Backend.CUDA, Backend.VULKAN), "amd": (Backend.ROCM, Backend.VULKAN)}


def _rebuild_flag(device: Device) -> str:
    family = gpu_families.family_of(device.vendor, device.compute_capability, device.name)
    if family is not None and family.backends == (Backend.VULKAN,):
        return "CMAKE_ARGS=-DGGML_VULKAN=on (its generation has no CUDA/ROCm support)"
    return f"CMAKE_ARGS={_REBUILD[device.vendor]} (or -DGGML_VULKAN=on)"


def backend_for(device: Device, backend: BackendInfo) -> Backend | None:
    """The compiled llama.cpp backend that drives this real GPU (vendor's own first, where its generation
    supports it: Polaris has no ROCm, Kepler no CUDA; gpu_families.py), or None."""
    family = gpu_families.family_of(device.vendor, device.compute_capability, device.name)
    serves = _SERVES.get(device.vendor, ())
    if family is not None:
        serves = tuple(b for b in serves if b in family.backends)
    return next((b for b in serves if b in backend.compiled), None)


def usable(device: Device, backend: BackendInfo) -> tuple[bool, str]:
    """Whether llama.cpp as installed can run models on `device`, and why (plain words)."""
    if not backend.installed:
        return False, "llama-cpp-python is not installed"
    if backend.loadable is False:
        return False, backend.problem or "llama-cpp-python fails to load"
    if device.simulated:
        return True, "simulated GPU: its workers run on the CPU"
    if device.vram_total_mib == 0 and device.degraded:
        return False, ("VRAM unknown without NVML (found through /proc/driver/nvidia): install the driver's "
                       "NVML library (libnvidia-ml.so.1) so VRAM can be measured")
    runs_on = backend_for(device, backend)
    if runs_on is None and device.vendor == "nvidia" and Backend.CUDA in backend.compiled:
        runs_on = Backend.CUDA  # below the CUDA minimum: said below, in words about its compute capability
    if runs_on is None:
        built = "CPU only" if not backend.compiled else f"{backend.summary()} only"
        return False, (
            f"llama.cpp here was built for {built}; rebuild llama-cpp-python with "
            f"{_rebuild_flag(device)} to use this {device.name} (`aivailable doctor` prints the command)"
        )
    if runs_on is Backend.CUDA and device.compute_capability:
        major, _, minor = device.compute_capability.partition(".")
        if major.isdigit() and minor.isdigit() and (int(major), int(minor)) < _MIN_CUDA_CC:
            return False, (
                f"compute capability {device.compute_capability} is older than llama.cpp's CUDA backend "
                "supports (5.0); a Vulkan build (CMAKE_ARGS=-DGGML_VULKAN=on) may run it"
            )
    seen, prefix = backend.runtime_devices, runs_on.value  # ggml names devices CUDA0, ROCm0, Vulkan0
    if seen is not None and not any(
        d.kind in ("gpu", "igpu") and d.name.lower().startswith(prefix) for d in seen
    ):
        return False, f"llama.cpp's {BACKEND_LABEL[runs_on]} backend finds no GPU at run time"
    return True, f"runs with llama.cpp's {BACKEND_LABEL[runs_on]} backend"


# ---------------------------------------------------------------------------------------- inventory


@dataclass(frozen=True, slots=True)
class Inventory:
    """This node's GPUs, the llama.cpp backend, and what each vendor probe said."""

    devices: tuple[Device, ...]
    backend: BackendInfo
    probes: tuple[ProbeResult, ...] = ()  # empty when the GPUs are simulated
    root: Path = Path("/")
    """Where the sysfs/procfs fallbacks read (tests: a recorded tree)."""
    vendor_probes: VendorProbes = field(default_factory=lambda: VENDOR_PROBES, compare=False, repr=False)
    """The vendor probes `refresh` re-measures with (those `discover` was given)."""

    @property
    def simulated(self) -> bool:
        return bool(self.devices) and all(d.simulated for d in self.devices)

    def get(self, device_id: str) -> Device:
        """The device with this id; KeyError if there is none."""
        for d in self.devices:
            if d.id == device_id:
                return d
        raise KeyError(device_id)

    def usable_devices(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if usable(d, self.backend)[0])

    def with_usage(self, used_mib: Mapping[str, int]) -> Inventory:
        """Set simulated GPUs' used VRAM to what the engine has claimed on them (device id -> MiB;
        absent: 0). Real GPUs keep their measured figures; `refresh` re-measures them."""
        if any(v < 0 for v in used_mib.values()):
            raise ValueError(f"claimed VRAM must not be negative: {dict(used_mib)}")
        devices = tuple(
            replace(
                d, vram_used_mib=(u := int(used_mib.get(d.id, 0))), vram_free_mib=max(0, d.vram_total_mib - u)
            )
            if d.simulated
            else d
            for d in self.devices
        )
        return replace(self, devices=devices)

    def refresh(self, claims: Mapping[str, int]) -> Inventory:
        """Re-measure real GPUs' used/free VRAM through their vendor library; apply `claims` to
        simulated ones. A real GPU that no longer answers (or changed its index) keeps its last figures."""
        vendors = tuple(v for v in ("nvidia", "amd") if any(d.vendor == v for d in self.devices))
        probed = probe_all(vendors, root=self.root, probes=self.vendor_probes) if vendors else ()
        fresh = {d.id: d for p in probed for d in p.devices}
        devices = tuple(
            replace(d, vram_used_mib=f.vram_used_mib, vram_free_mib=f.vram_free_mib, processes=f.processes)
            if (f := fresh.get(d.id)) is not None and (f.uuid, f.pci_bus_id) == (d.uuid, d.pci_bus_id)
            else d
            for d in self.devices
        )
        return replace(self, devices=devices).with_usage(claims)

    def to_dict(self) -> dict[str, Any]:
        def row(d: Device) -> dict[str, Any]:
            ok, reason = usable(d, self.backend)
            return d.to_dict() | {"usable": ok, "reason": reason}

        return {
            "devices": [row(d) for d in self.devices],
            "backend": self.backend.to_dict(),
            "probes": [p.to_dict() for p in self.probes],
        }


def probe_all(
    vendors: Sequence[str] = ("nvidia", "amd"),
    *,
    root: Path = Path("/"),
    run: sysfs_probe.Run | None = None,
    probes: VendorProbes | None = None,
) -> tuple[ProbeResult, ...]:
    """Every vendor probe in `vendors`, in the order of `probes` (default `VENDOR_PROBES`: NVIDIA first);
    where the vendor library is not available, its fallback in engine/sysfs_probe.py too (reading below
    `root`, running commands through `run`)."""
    results: list[ProbeResult] = []
    for vendor, probe in (VENDOR_PROBES if probes is None else probes).items():
        if vendor not in vendors:
            continue
        result = probe()
        results.append(result)
        if result.available:
            continue
        if vendor == "nvidia":
            if (fallback := sysfs_probe.probe_nvidia_driver(root, run, result.status)) is not None:
                results.append(fallback)
        elif vendor == "amd":
            results.append(sysfs_probe.probe_amd_sysfs(root))
    return tuple(results)


def vulkaninfo(run: sysfs_probe.Run | None = None) -> list[vulkan_map.VulkanDevice] | None:
    """The Vulkan enumeration as `vulkaninfo` (package vulkan-tools) prints it; None without it."""
    out = (run or sysfs_probe.run_command)(["vulkaninfo"])
    return vulkan_map.parse_vulkaninfo(out) if out else None


def with_vulkan_indices(devices: Sequence[Device], enumeration: Sequence[vulkan_map.VulkanDevice] | None
                        ) -> tuple[Device, ...]:
    """`devices` with `vulkan_index` set where the enumeration matches them (engine/vulkan_map.py)."""
    found = vulkan_map.vulkan_indices([d for d in devices if not d.simulated], enumeration or ())
    return tuple(replace(d, vulkan_index=found.get(d.id)) for d in devices)


def discover(
    simulate: Sequence[str] = (),
    *,
    backend: BackendInfo | None = None,
    param: str = SIMULATE_FLAG,
    root: Path = Path("/"),
    run: sysfs_probe.Run | None = None,
    probes: VendorProbes | None = None,
) -> Inventory:
    """This node's inventory: only the simulated GPUs when any are given, else the real ones. `probes` are
    the vendor probes (default `VENDOR_PROBES`), `root` and `run` the fallback probes' file-system root
    and command runner (tests inject fakes and recorded ones); with a Vulkan build, `vulkaninfo` run
    through `run` numbers the GPUs for GGML_VK_VISIBLE_DEVICES.

    Raises ConfigError naming `param` (--simulate-gpu, or the config key the specs came from) for a
    bad spec; anything else is reported in the inventory, not raised.
    """
    simulated = parse_simulated_gpus(simulate, param=param)
    backend = backend if backend is not None else detect_backend()
    if simulated:
        return Inventory(simulated, backend)
    vendor_probes = VENDOR_PROBES if probes is None else probes
    results = probe_all(root=root, run=run, probes=vendor_probes)
    devices = tuple(d for p in results for d in p.devices)
    if devices and Backend.VULKAN in backend.compiled:
        devices = with_vulkan_indices(devices, vulkaninfo(run))
    return Inventory(devices, backend, results, root, vendor_probes)
