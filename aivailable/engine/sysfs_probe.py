"""GPU discovery without vendor libraries: AMD through the amdgpu driver's sysfs files, NVIDIA through
`nvidia-smi` or /proc/driver/nvidia when NVML cannot be used.

Used by engine/devices.py when amdsmi (ROCm) or NVML is absent: an RX 580 on a machine without ROCm,
which only Vulkan can drive, is found here. Every path is read below `root` (the machine's "/" by
default), so tests run on recorded trees in tests/fixtures/sysfs/; `run` (a command to its stdout, or
None when it fails) is injected the same way. Nothing here raises for a missing or odd file.

AMD (`probe_amd_sysfs`): each /sys/class/drm/cardN/device with vendor 0x1002 and amdgpu's
mem_info_vram_total. The gfx target comes from KFD's topology (/sys/class/kfd/kfd/topology/nodes/*/
properties, matched by PCI location) when ROCm's kernel part is loaded, else from the device id table
(engine/gpu_families.py).

Integrated GPUs are ignored, by this rule: a GPU whose PCI device id is a known APU's
(gpu_families.AMD_APUS), or that has less than `MIN_DISCRETE_VRAM_MIB` of VRAM. An APU's "VRAM" is a
BIOS carve-out of system memory (usually 512 MiB; `boot_vga` says nothing, a discrete card can be the
boot display too), and no card with less than 1 GiB can hold a model worth serving.

NVIDIA (`probe_nvidia_driver`): `nvidia-smi --query-gpu` when it answers (VRAM known), else
/proc/driver/nvidia/gpus/*/information (name, UUID, PCI bus id; VRAM unknown). Either way the result is
reported as degraded: VRAM is not re-measured by NVML, and without it nothing is placed on the GPU.
GPUs are numbered in PCI bus order, as CUDA numbers them with CUDA_DEVICE_ORDER=PCI_BUS_ID.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from aivailable.engine import gpu_families

if TYPE_CHECKING:
    from aivailable.engine.devices import Device, ProbeResult

Run = Callable[[Sequence[str]], str | None]
"""Runs a command; its stdout, or None when it is missing, fails or times out."""

MIN_DISCRETE_VRAM_MIB = 1024
AMD_VENDOR = 0x1002
NVIDIA_VENDOR = 0x10DE
_MIB = 1024 * 1024
_NVSMI_FIELDS = "index,name,memory.total,memory.used,memory.free,pci.bus_id,uuid,driver_version,compute_cap"


def run_command(argv: Sequence[str], timeout: float = 10.0) -> str | None:
    """The default `Run`: the command's stdout, or None."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _int(text: str | None, base: int = 10) -> int | None:
    if text is None:
        return None
    try:
        return int(text.split()[0], base) if text.split() else None
    except ValueError:
        return None


def _keyvals(text: str | None, sep: str) -> dict[str, str]:
    """KEY=VALUE (uevent) or "key value" (kfd properties) / "Key: value" (nvidia information) lines."""
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, found, value = line.partition(sep)
        if found:
            out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------- AMD


def _kfd_targets(root: Path) -> dict[str, str]:
    """PCI slot ("0000:03:00.0") -> gfx target, from KFD's topology (empty without KFD)."""
    targets: dict[str, str] = {}
    for props in sorted((root / "sys/class/kfd/kfd/topology/nodes").glob("*/properties")):
        kv = _keyvals(_read(props), " ")
        gfx = gpu_families.gfx_from_kfd(_int(kv.get("gfx_target_version")) or 0)
        location = _int(kv.get("location_id"))
        if gfx is None or location is None:
            continue
        domain = _int(kv.get("domain")) or 0
        bus, devfn = divmod(location, 256)
        targets[f"{domain:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}"] = gfx
    return targets


def _pci_slot(dev: Path, uevent: dict[str, str]) -> str | None:
    slot = uevent.get("PCI_SLOT_NAME")
    if slot:
        return slot.lower()
    with contextlib.suppress(OSError):
        name = dev.resolve().name  # a real tree: device -> ../../../0000:03:00.0
        if re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", name):
            return name
    return None


def probe_amd_sysfs(root: Path = Path("/")) -> ProbeResult:
    """AMD GPUs from amdgpu's sysfs files below `root`. Never raises."""
    from aivailable.engine.devices import Device, ProbeResult

    library = "sysfs (amdgpu driver)"
    drm = root / "sys/class/drm"
    if not drm.is_dir():
        return ProbeResult("amd", library, False, f"{drm} does not exist (not Linux, or no DRM driver)")
    kfd = _kfd_targets(root)
    driver = _read(root / "sys/module/amdgpu/version")
    found: list[tuple[str, Device]] = []
    notes: list[str] = []
    seen: set[str] = set()
    for card in sorted(drm.glob("card*"), key=lambda p: _int(p.name[4:]) or 0):
        if not re.fullmatch(r"card\d+", card.name):
            continue  # connectors: card0-DP-1
        dev = card / "device"
        if _int(_read(dev / "vendor"), 16) != AMD_VENDOR:
            continue
        uevent = _keyvals(_read(dev / "uevent"), "=")
        slot = _pci_slot(dev, uevent)
        if slot is None or slot in seen:
            continue
        seen.add(slot)
        device_id = _int(_read(dev / "device"), 16) or 0
        label = f"{card.name} ({slot}, 1002:{device_id:04x})"
        total = _int(_read(dev / "mem_info_vram_total"))
        if total is None:
            drv = uevent.get("DRIVER", "no driver")
            notes.append(f"{label} skipped: no VRAM figures from the {drv} driver (amdgpu is needed)")
            continue
        known = gpu_families.amd_family(device_id)
        total_mib = total // _MIB
        if known is not None and known[0].integrated:
            notes.append(f"{label} ignored: integrated GPU ({known[0].name}), its VRAM is system memory")
            continue
        if total_mib < MIN_DISCRETE_VRAM_MIB:
            notes.append(f"{label} ignored: {total_mib} MiB of VRAM, below {MIN_DISCRETE_VRAM_MIB} MiB "
                         "(an integrated GPU's carve-out)")
            continue
        used_mib = (_int(_read(dev / "mem_info_vram_used")) or 0) // _MIB
        gfx = kfd.get(slot) or (known[0].arch if known else None)
        name = _read(dev / "product_name") or (f"AMD {known[1]}" if known else f"AMD GPU 1002:{device_id:04x}")
        found.append((slot, Device(
            id="", index=0, vendor="amd", name=name,
            vram_total_mib=total_mib, vram_used_mib=used_mib, vram_free_mib=max(0, total_mib - used_mib),
            uuid=_read(dev / "unique_id") or None, pci_bus_id=slot,
            driver=f"amdgpu {driver}" if driver else "amdgpu (in-kernel)",
            compute_capability=gfx, source="sysfs",
        )))
    devices = tuple(replace(d, id=f"amd:{i}", index=i) for i, (_, d) in enumerate(sorted(found, key=lambda x: x[0])))
    status = f"sysfs: {len(devices)} AMD GPU(s) (amdsmi/ROCm not used: VRAM from amdgpu's mem_info files)"
    return ProbeResult("amd", library, True, "; ".join([status, *notes]), devices)


# ------------------------------------------------------------------------------------------- NVIDIA


def _nvidia_driver_version(root: Path) -> str | None:
    text = _read(root / "proc/driver/nvidia/version") or ""
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m[1] if m else None


def _from_nvidia_smi(out: str) -> list[Device]:
    from aivailable.engine.devices import Device

    devices = []
    for line in out.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 8 or not cols[0].isdigit():
            continue
        total, used, free = (_int(c) for c in cols[2:5])
        if total is None:
            continue
        cc = cols[8] if len(cols) > 8 and re.fullmatch(r"\d+\.\d+", cols[8]) else None
        i = int(cols[0])
        devices.append(Device(
            id=f"nvidia:{i}", index=i, vendor="nvidia", name=cols[1], vram_total_mib=total,
            vram_used_mib=used or 0, vram_free_mib=free if free is not None else max(0, total - (used or 0)),
            uuid=cols[6] or None, pci_bus_id=cols[5] or None, driver=cols[7] or None,
            compute_capability=cc or gpu_families.nvidia_cc_from_name(cols[1]), source="nvidia-smi",
        ))
    return devices


def _from_procfs(root: Path) -> list[Device]:
    from aivailable.engine.devices import Device

    driver = _nvidia_driver_version(root)
    rows = []
    for info in (root / "proc/driver/nvidia/gpus").glob("*/information"):
        kv = _keyvals(_read(info), ":")
        name = kv.get("Model", "NVIDIA GPU")
        rows.append((kv.get("Bus Location", info.parent.name).lower(), name, kv.get("GPU UUID")))
    return [
        Device(id=f"nvidia:{i}", index=i, vendor="nvidia", name=name, vram_total_mib=0, vram_used_mib=0,
               vram_free_mib=0, uuid=uuid if uuid and "?" not in uuid else None, pci_bus_id=bus, driver=driver,
               compute_capability=gpu_families.nvidia_cc_from_name(name), source="procfs")
        for i, (bus, name, uuid) in enumerate(sorted(rows))
    ]


def probe_nvidia_driver(root: Path = Path("/"), run: Run | None = None, why_not_nvml: str = "") -> ProbeResult | None:
    """NVIDIA GPUs without NVML (see module doc), or None when no NVIDIA driver is loaded. Never raises."""
    from aivailable.engine.devices import ProbeResult

    run = run or run_command
    if not (root / "proc/driver/nvidia").is_dir():
        return None
    smi = run(["nvidia-smi", f"--query-gpu={_NVSMI_FIELDS}", "--format=csv,noheader,nounits"])
    if smi is None:  # drivers before 510 do not know compute_cap
        smi = run(["nvidia-smi", f"--query-gpu={_NVSMI_FIELDS.rsplit(',', 1)[0]}", "--format=csv,noheader,nounits"])
    devices = _from_nvidia_smi(smi) if smi else []
    why = f" ({why_not_nvml})" if why_not_nvml else ""
    if devices:
        status = (f"degraded: NVML not usable{why}; {len(devices)} NVIDIA GPU(s) from nvidia-smi, "
                  "VRAM re-measured by running it")
        return ProbeResult("nvidia", "nvidia-smi", True, status, tuple(devices))
    devices = _from_procfs(root)
    status = (f"degraded: NVML not usable{why}; {len(devices)} NVIDIA GPU(s) from /proc/driver/nvidia "
              f"(driver {_nvidia_driver_version(root) or 'version unknown'}), VRAM unknown: nothing is "
              "placed on them until NVML works (install the driver's libnvidia-ml.so.1 and nvidia-ml-py)")
    return ProbeResult("nvidia", "/proc/driver/nvidia", True, status, tuple(devices))
