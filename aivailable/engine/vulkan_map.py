"""Which Vulkan device index each discovered GPU has, so GGML_VK_VISIBLE_DEVICES pins the right card.

ggml's Vulkan backend reads GGML_VK_VISIBLE_DEVICES as indices into the Vulkan loader's enumeration
(vkEnumeratePhysicalDevices), whose order is neither NVML's nor amdgpu's: the loader lists drivers in
its own order, Mesa's device-select layer may move the boot display first, and llvmpipe (a CPU device)
can sit anywhere. `vulkaninfo` prints that enumeration; `parse_vulkaninfo` reads it and
`vulkan_indices` (pure) matches it to the GPUs:

1. by PCI bus id, where Vulkan reports it (VK_EXT_pci_bus_info: pciDomain/pciBus/pciDevice/pciFunction);
2. otherwise per vendor in order: the k-th GPU of a vendor (PCI bus order) is the k-th Vulkan GPU with
   that vendor id and no PCI address, leaving out CPU and integrated devices (the probes ignore iGPUs),
   only when both counts agree (else that vendor's GPUs stay unmatched).

An unmatched GPU keeps its vendor index, which is right on single-vendor machines without llvmpipe.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aivailable.engine.devices import Device

VENDOR_IDS = {"amd": 0x1002, "nvidia": 0x10DE}
_BLOCK = re.compile(r"^GPU(\d+):\s*$", re.MULTILINE)
_KEY = re.compile(r"^\s*(\w+)\s*=\s*(.*?)\s*$")
_BDF = re.compile(r"^(?:([0-9a-fA-F]+):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")

PciAddress = tuple[int, int, int, int]  # domain, bus, device, function


@dataclass(frozen=True, slots=True)
class VulkanDevice:
    """One entry of the Vulkan enumeration. `kind`: "discrete", "integrated", "cpu", "virtual", "other"."""

    index: int
    name: str
    vendor_id: int
    device_id: int
    kind: str
    pci: PciAddress | None = None


def pci_address(bus_id: str | None) -> PciAddress | None:
    """ "0000:03:00.0" or NVML's "00000000:03:00.0" as numbers; None if it is not a PCI address."""
    m = _BDF.match((bus_id or "").strip())
    if m is None:
        return None
    return int(m[1] or "0", 16), int(m[2], 16), int(m[3], 16), int(m[4])


def _num(text: str) -> int | None:
    token = text.split()[0] if text.split() else ""
    try:
        return int(token, 16) if token.lower().startswith("0x") else int(token)
    except ValueError:
        return None


def parse_vulkaninfo(text: str) -> list[VulkanDevice]:
    """The devices in `vulkaninfo` or `vulkaninfo --summary` output, in enumeration order."""
    marks = list(_BLOCK.finditer(text))
    devices: dict[int, VulkanDevice] = {}
    for i, m in enumerate(marks):
        index = int(m[1])
        if index in devices:
            continue
        body = text[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(text)]
        keys: dict[str, str] = {}
        for line in body.splitlines():
            km = _KEY.match(line)
            if km and km[1] not in keys:
                keys[km[1]] = km[2]
        vendor, device = _num(keys.get("vendorID", "")), _num(keys.get("deviceID", ""))
        if vendor is None or device is None:
            continue
        kind = keys.get("deviceType", "").upper()
        kind = next((k.lower() for k in ("DISCRETE", "INTEGRATED", "CPU", "VIRTUAL") if k in kind), "other")
        parts = [_num(keys.get(k, "")) for k in ("pciDomain", "pciBus", "pciDevice", "pciFunction")]
        pci = tuple(parts) if all(p is not None for p in parts) else None
        devices[index] = VulkanDevice(index, keys.get("deviceName", ""), vendor, device, kind, pci)  # type: ignore[arg-type]
    return [devices[k] for k in sorted(devices)]


def vulkan_indices(gpus: Sequence[Device], enumeration: Sequence[VulkanDevice]) -> dict[str, int]:
    """Device id -> Vulkan index for every GPU that can be matched (rules in the module doc)."""
    out: dict[str, int] = {}
    taken: set[int] = set()
    by_pci = {v.pci: v.index for v in enumeration if v.pci is not None}
    for d in gpus:
        addr = pci_address(d.pci_bus_id)
        if addr is not None and addr in by_pci:
            out[d.id] = by_pci[addr]
            taken.add(by_pci[addr])
    for vendor, vid in VENDOR_IDS.items():
        left = sorted((d for d in gpus if d.vendor == vendor and d.id not in out),
                      key=lambda d: (pci_address(d.pci_bus_id) or (1 << 16, 0, 0, 0), d.index))
        cards = [v.index for v in enumeration  # a card Vulkan gave a PCI address for matched above, or is not ours
                 if v.vendor_id == vid and v.kind not in ("cpu", "integrated") and v.pci is None and v.index not in taken]
        if left and len(left) == len(cards):
            out.update({d.id: idx for d, idx in zip(left, cards, strict=True)})
    return out
