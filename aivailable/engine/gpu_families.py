"""GPU generations: a PCI device id, gfx target or compute capability to a family, and which llama.cpp
backends can drive that family.

Pure tables and lookups, no I/O. `amd_family(device_id)` and `nvidia_family(cc=..., name=...)` return
a `Family` or None (unknown card); `gfx_from_kfd(version)` decodes KFD's `gfx_target_version`.

What each backend needs:
- CUDA: llama.cpp's CUDA backend starts at Maxwell (sm_50). CUDA 13 dropped Maxwell, Pascal and Volta
  (sm_50..sm_70), so those cards need a CUDA 12.x toolkit; Turing (sm_75) and newer build with 12 or 13.
- ROCm (HIP): only the gfx targets a ROCm release still ships kernels for. Polaris (gfx803) lost ROCm
  support years ago; Vega 10 (gfx900) and Vega 20 (gfx906) are in maintenance or dropped in current
  releases, so they need an older ROCm (5.7 to 6.x), and are listed with `rocm_note`.
- Vulkan: any card with a Vulkan 1.2 driver (Mesa RADV for AMD GCN 3 and newer, NVIDIA's own driver
  from Kepler on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from aivailable.engine.backends import Backend

Vendor = Literal["nvidia", "amd"]


@dataclass(frozen=True, slots=True)
class Family:
    """One GPU generation. `arch`: "gfx906" (AMD) or "sm_61" (NVIDIA); `backends`: the llama.cpp
    backends that can drive it, best first."""

    vendor: Vendor
    name: str
    arch: str
    backends: tuple[Backend, ...]
    integrated: bool = False
    rocm_note: str = ""
    """AMD: which ROCm releases support this target (empty: current releases do)."""

    @property
    def cuda_arch(self) -> str | None:
        """The number CMAKE_CUDA_ARCHITECTURES takes ("61"), NVIDIA only."""
        return self.arch.removeprefix("sm_") if self.vendor == "nvidia" else None

    @property
    def needs_cuda12(self) -> bool:
        """CUDA 13 cannot build for this card (Maxwell, Pascal, Volta): use a CUDA 12.x toolkit."""
        return self.vendor == "nvidia" and self.cuda_arch is not None and int(self.cuda_arch) < 75


_V = (Backend.VULKAN,)
_RV = (Backend.ROCM, Backend.VULKAN)
_OLD_ROCM = "ROCm 5.7 to 6.x (in maintenance since 5.7; check your release's GPU support list)"
_VEGA10_ROCM = "ROCm 5.x (dropped from official support since; builds for gfx900 may still work)"


def _amd(name: str, arch: str, backends: tuple[Backend, ...] = _RV, *, igpu: bool = False,
         rocm: str = "") -> Family:
    return Family("amd", name, arch, backends, igpu, rocm)


_POLARIS = _amd("Polaris", "gfx803", _V, rocm="none (ROCm dropped gfx803; use Vulkan)")
_FIJI = _amd("Fiji", "gfx803", _V, rocm="none (ROCm dropped gfx803; use Vulkan)")
_TONGA = _amd("Tonga", "gfx802", _V, rocm="none (never supported; use Vulkan)")
_VEGA10 = _amd("Vega 10", "gfx900", rocm=_VEGA10_ROCM)
_VEGA20 = _amd("Vega 20", "gfx906", rocm=_OLD_ROCM)
_ARCTURUS = _amd("CDNA 1 (MI100)", "gfx908")
_ALDEBARAN = _amd("CDNA 2 (MI200)", "gfx90a")
_NAVI10 = _amd("RDNA 1 (Navi 10)", "gfx1010", _V, rocm="none officially (use Vulkan)")
_NAVI21 = _amd("RDNA 2 (Navi 21)", "gfx1030")
_NAVI22 = _amd("RDNA 2 (Navi 22)", "gfx1031", _V, rocm="unofficial (HSA_OVERRIDE_GFX_VERSION=10.3.0)")
_NAVI23 = _amd("RDNA 2 (Navi 23)", "gfx1032", _V, rocm="unofficial (HSA_OVERRIDE_GFX_VERSION=10.3.0)")
_NAVI31 = _amd("RDNA 3 (Navi 31)", "gfx1100")
_NAVI32 = _amd("RDNA 3 (Navi 32)", "gfx1101")
_NAVI33 = _amd("RDNA 3 (Navi 33)", "gfx1102")
_NAVI48 = _amd("RDNA 4 (Navi 48)", "gfx1201")

# PCI device ids (vendor 0x1002) of the discrete cards a lab is likely to hold, with a marketing name.
AMD_DEVICES: dict[int, tuple[Family, str]] = {
    0x67DF: (_POLARIS, "Radeon RX 470/480/570/580"),
    0x6FDF: (_POLARIS, "Radeon RX 580 2048SP"),
    0x67EF: (_POLARIS, "Radeon RX 460/560"),
    0x67FF: (_POLARIS, "Radeon RX 550/560"),
    0x699F: (_POLARIS, "Radeon RX 540/550"),
    0x67C4: (_POLARIS, "Radeon Pro WX 7100"),
    0x67C7: (_POLARIS, "Radeon Pro WX 5100"),
    0x7300: (_FIJI, "Radeon R9 Fury/Nano"),
    0x6938: (_TONGA, "Radeon R9 380X"),
    0x6939: (_TONGA, "Radeon R9 285/380"),
    0x687F: (_VEGA10, "Radeon RX Vega 56/64"),
    0x6863: (_VEGA10, "Radeon Vega Frontier Edition"),
    0x6860: (_VEGA10, "Radeon Instinct MI25"),
    0x6861: (_VEGA10, "Radeon Pro WX 9100"),
    0x6862: (_VEGA10, "Radeon Pro SSG"),
    0x686C: (_VEGA10, "Radeon Instinct MI25 MxGPU"),
    0x66A0: (_VEGA20, "Radeon Instinct MI60"),
    0x66A1: (_VEGA20, "Radeon Instinct MI50"),
    0x66A2: (_VEGA20, "Radeon Pro Vega 20"),
    0x66A3: (_VEGA20, "Radeon Pro Vega II"),
    0x66AF: (_VEGA20, "Radeon VII"),
    0x738C: (_ARCTURUS, "Instinct MI100"),
    0x7408: (_ALDEBARAN, "Instinct MI250X"),
    0x740C: (_ALDEBARAN, "Instinct MI250/MI250X"),
    0x740F: (_ALDEBARAN, "Instinct MI210"),
    0x731F: (_NAVI10, "Radeon RX 5600/5700"),
    0x73BF: (_NAVI21, "Radeon RX 6800/6900"),
    0x73A5: (_NAVI21, "Radeon RX 6950 XT"),
    0x73A1: (_NAVI21, "Radeon Pro V620"),
    0x73DF: (_NAVI22, "Radeon RX 6700/6750"),
    0x73FF: (_NAVI23, "Radeon RX 6600/6650"),
    0x744C: (_NAVI31, "Radeon RX 7900"),
    0x7448: (_NAVI31, "Radeon Pro W7900"),
    0x747E: (_NAVI32, "Radeon RX 7700/7800"),
    0x7480: (_NAVI33, "Radeon RX 7600"),
    0x7550: (_NAVI48, "Radeon RX 9070"),
}

# APUs (integrated GPUs): their "VRAM" is a carve-out of system memory. sysfs_probe ignores them.
AMD_APUS: dict[int, tuple[Family, str]] = {
    0x15DD: (_amd("Raven Ridge / Picasso APU", "gfx902", _V, igpu=True), "Radeon Vega (integrated)"),
    0x15D8: (_amd("Picasso APU", "gfx902", _V, igpu=True), "Radeon Vega (integrated)"),
    0x1636: (_amd("Renoir APU", "gfx90c", _V, igpu=True), "Radeon Graphics (integrated)"),
    0x1638: (_amd("Cezanne APU", "gfx90c", _V, igpu=True), "Radeon Graphics (integrated)"),
    0x164C: (_amd("Lucienne APU", "gfx90c", _V, igpu=True), "Radeon Graphics (integrated)"),
    0x1681: (_amd("Rembrandt APU", "gfx1035", _V, igpu=True), "Radeon 680M (integrated)"),
    0x163F: (_amd("Van Gogh APU", "gfx1033", _V, igpu=True), "Steam Deck GPU (integrated)"),
    0x164E: (_amd("Raphael iGPU", "gfx1036", _V, igpu=True), "Radeon Graphics (integrated)"),
    0x15BF: (_amd("Phoenix APU", "gfx1103", _V, igpu=True), "Radeon 780M (integrated)"),
    0x1900: (_amd("Hawk Point APU", "gfx1103", _V, igpu=True), "Radeon 780M (integrated)"),
    0x150E: (_amd("Strix Point APU", "gfx1150", _V, igpu=True), "Radeon 890M (integrated)"),
    0x9874: (_amd("Carrizo APU", "gfx801", _V, igpu=True), "Radeon R7 (integrated)"),
}

_GFX_FAMILIES: dict[str, Family] = {}
for _family, _ in (*AMD_DEVICES.values(), *AMD_APUS.values()):
    _GFX_FAMILIES.setdefault(_family.arch, _family)  # the first card listed names a shared target (gfx803: Polaris)


def amd_family(device_id: int) -> tuple[Family, str] | None:
    """(family, marketing name) of an AMD PCI device id, or None when the table does not know it."""
    return AMD_DEVICES.get(device_id) or AMD_APUS.get(device_id)


def gfx_from_kfd(version: int) -> str | None:
    """KFD's `gfx_target_version` (major*10000 + minor*100 + stepping) as a gfx name: 90006 -> "gfx906",
    90010 -> "gfx90a", 100300 -> "gfx1030"; None for 0 (a CPU node)."""
    if version <= 0:
        return None
    major, rest = divmod(version, 10000)
    minor, stepping = divmod(rest, 100)
    return f"gfx{major}{minor:x}{stepping:x}"


def amd_family_for_gfx(gfx: str) -> Family:
    """The family of a gfx target; an unknown one is assumed drivable by Vulkan and by a ROCm that lists it."""
    return _GFX_FAMILIES.get(gfx) or _amd(f"AMD {gfx}", gfx, rocm="check your ROCm release's GPU support list")


# NVIDIA: compute capability -> generation. Kepler is below llama.cpp's CUDA minimum (Vulkan only).
_NV_GENERATIONS: dict[int, str] = {3: "Kepler", 5: "Maxwell", 6: "Pascal", 7: "Volta", 8: "Ampere",
                                   9: "Hopper", 10: "Blackwell", 12: "Blackwell"}
# Marketing names to compute capability, for when no library reports it (/proc/driver/nvidia only).
_NV_NAMES: tuple[tuple[str, str], ...] = (
    (r"\bP100\b", "6.0"),
    (r"GTX 10[5-8]0|TITAN Xp?\b|\bP(4|6|40)\b|Quadro P\d", "6.1"),
    (r"\bV100\b|TITAN V\b|Quadro GV100", "7.0"),
    (r"GTX 16\d0|RTX 20[6-8]0|TITAN RTX|\bT4\b|Quadro RTX|\bT(4|6|10)00\b", "7.5"),
    (r"\bA100\b|\bA30\b", "8.0"),
    (r"RTX 30[5-9]0|\bA(2|10|16|40)\b|RTX A\d", "8.6"),
    (r"RTX 40[5-9]0|\bL4\b|\bL40S?\b|RTX \d000 Ada", "8.9"),
    (r"\bH100\b|\bH200\b|\bGH200\b", "9.0"),
    (r"\bB200\b", "10.0"),
    (r"RTX 50[6-9]0|RTX PRO \d000", "12.0"),
    (r"GTX (9[5-8]0|TITAN X)\b|\bM(40|60)\b", "5.2"),
    (r"GTX 7[5-9]0|\bK(20|40|80)\b", "3.5"),
)


def nvidia_cc_from_name(name: str) -> str | None:
    """Compute capability from a marketing name ("NVIDIA GeForce GTX 1080" -> "6.1"), or None."""
    return next((cc for pattern, cc in _NV_NAMES if re.search(pattern, name, re.IGNORECASE)), None)


def nvidia_family(cc: str | None = None, name: str = "") -> Family | None:
    """The family of an NVIDIA GPU from its compute capability ("6.1"), else from its name; None if neither
    says. Below sm_50 only Vulkan drives it."""
    cc = cc or nvidia_cc_from_name(name)
    if cc is None:
        return None
    major, _, minor = cc.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        return None
    generation = _NV_GENERATIONS.get(int(major), f"compute {cc}")
    if int(major) == 7 and int(minor) >= 5:
        generation = "Turing"
    elif int(major) == 8 and int(minor) == 9:
        generation = "Ada Lovelace"
    backends = _V if int(major) < 5 else (Backend.CUDA, Backend.VULKAN)
    return Family("nvidia", generation, f"sm_{major}{minor}", backends)


def family_of(vendor: str, arch: str | None, name: str = "", device_id: int | None = None) -> Family | None:
    """The family of a discovered GPU: AMD by device id, else gfx target; NVIDIA by compute capability
    ("6.1"), else name. None for simulated GPUs and unknown cards."""
    if vendor == "amd":
        if device_id is not None and (known := amd_family(device_id)) is not None:
            return known[0]
        return amd_family_for_gfx(arch) if arch and arch.startswith("gfx") else None
    if vendor == "nvidia":
        return nvidia_family(arch, name)
    return None
