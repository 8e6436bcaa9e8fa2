"""GPU discovery without vendor libraries, on recorded-style trees (tests/fixtures/sysfs/MACHINE/...) and
vulkaninfo outputs (tests/fixtures/vulkaninfo/): the AMD sysfs probe, the NVIDIA /proc and nvidia-smi
fallback, GPU generations, Vulkan index matching, and the inventory built from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from aivailable.engine import gpu_families, sysfs_probe, vulkan_map
from aivailable.engine.backends import Backend, BackendInfo
from aivailable.engine.devices import (
    Device,
    ProbeResult,
    device_env,
    discover,
    probe_all,
    usable,
    with_vulkan_indices,
)

FIXTURES = Path(__file__).parent / "fixtures"
SYSFS = FIXTURES / "sysfs"
CPU_BUILD = BackendInfo(installed=True, version="0.3.36", loadable=True, gpu_offload=False)
VULKAN_BUILD = BackendInfo(installed=True, loadable=True, compiled=(Backend.VULKAN,), gpu_offload=True)
ROCM_VULKAN_BUILD = BackendInfo(installed=True, loadable=True, compiled=(Backend.ROCM, Backend.VULKAN), gpu_offload=True)
CUDA_BUILD = BackendInfo(installed=True, loadable=True, compiled=(Backend.CUDA,), gpu_offload=True)


def no_commands(argv):
    return None


NO_VENDOR_LIBRARIES = {  # NVML and amdsmi as on a machine without them, whatever this one has
    "nvidia": lambda: ProbeResult("nvidia", "pynvml", False, "NVML not available: no driver library"),
    "amd": lambda: ProbeResult("amd", "amdsmi", False, "amdsmi not available: not installed"),
}


def amd(machine: str) -> tuple[Device, ...]:
    result = sysfs_probe.probe_amd_sysfs(SYSFS / machine)
    assert result.available and result.vendor == "amd" and result.library == "sysfs (amdgpu driver)"
    return result.devices


# ------------------------------------------------------------------------------------------- AMD


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("polaris-rx580", [("amd:0", "AMD Radeon RX 470/480/570/580", 8192, 23, "gfx803", "0000:03:00.0")]),
        ("vega64", [("amd:0", "AMD Radeon RX Vega 56/64", 8192, 14, "gfx900", "0000:0b:00.0")]),
        ("mi50", [("amd:0", "Radeon Instinct MI50 32GB", 32768, 11, "gfx906", "0000:03:00.0"),
                  ("amd:1", "Radeon Instinct MI50 32GB", 32768, 11, "gfx906", "0000:83:00.0")]),
        ("apu-igpu", [("amd:0", "AMD Radeon RX 470/480/570/580", 8192, 9, "gfx803", "0000:01:00.0")]),
        ("pascal-gtx1080", []),
    ],
)  # fmt: skip
def test_amd_sysfs_probe(machine: str, expected: list[tuple]) -> None:
    got = [(d.id, d.name, d.vram_total_mib, d.vram_used_mib, d.compute_capability, d.pci_bus_id) for d in amd(machine)]
    assert got == expected
    for d in amd(machine):
        assert d.vendor == "amd" and d.source == "sysfs" and not d.degraded
        assert d.vram_free_mib == d.vram_total_mib - d.vram_used_mib


def test_amd_sysfs_ignores_integrated_gpus_and_says_why() -> None:
    status = sysfs_probe.probe_amd_sysfs(SYSFS / "apu-igpu").status
    assert "card0 (0000:07:00.0, 1002:1638) ignored: integrated GPU (Cezanne APU)" in status  # by device id
    assert "card2 (0000:08:00.0, 1002:15e7) ignored: 512 MiB of VRAM, below 1024 MiB" in status  # by carve-out
    assert "DP-1" not in status  # connectors are not cards


def test_amd_sysfs_mi50_details_from_kfd_and_driver() -> None:
    first = amd("mi50")[0]
    assert first.driver == "amdgpu 6.7.0" and first.uuid == "0x2d7a8c51e1b0a9f3"
    assert sysfs_probe._kfd_targets(SYSFS / "mi50") == {"0000:03:00.0": "gfx906", "0000:83:00.0": "gfx906"}


def test_amd_sysfs_without_drm_or_with_odd_files(tmp_path: Path) -> None:
    assert not sysfs_probe.probe_amd_sysfs(tmp_path).available
    dev = tmp_path / "sys/class/drm/card0/device"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x1002\n")
    (dev / "device").write_text("garbage\n")
    (dev / "uevent").write_text("DRIVER=radeon\nPCI_SLOT_NAME=0000:02:00.0\n")
    result = sysfs_probe.probe_amd_sysfs(tmp_path)  # the radeon driver has no mem_info files
    assert result.available and result.devices == () and "skipped: no VRAM figures from the radeon driver" in result.status
    (dev / "mem_info_vram_total").write_text("not a number\n")
    assert sysfs_probe.probe_amd_sysfs(tmp_path).devices == ()
    (dev / "mem_info_vram_total").write_text(f"{4 << 30}\n")  # unknown id, no used file: still a GPU
    (d,) = sysfs_probe.probe_amd_sysfs(tmp_path).devices
    assert (d.name, d.vram_total_mib, d.vram_used_mib, d.compute_capability) == ("AMD GPU 1002:0000", 4096, 0, None)


# ---------------------------------------------------------------------------------------- NVIDIA

SMI_OUT = "0, NVIDIA GeForce GTX 1080, 8192, 310, 7715, 00000000:01:00.0, GPU-5f8d2a53, 535.183.01, 6.1\n"


def test_nvidia_from_proc_is_degraded_and_unplaceable() -> None:
    result = sysfs_probe.probe_nvidia_driver(SYSFS / "pascal-gtx1080", no_commands, "NVML: library not found")
    assert result is not None and result.library == "/proc/driver/nvidia"
    assert result.status.startswith("degraded: NVML not usable (NVML: library not found); 1 NVIDIA GPU(s)")
    (d,) = result.devices
    assert (d.id, d.name, d.pci_bus_id, d.driver, d.compute_capability) == (
        "nvidia:0", "NVIDIA GeForce GTX 1080", "0000:01:00.0", "535.183.01", "6.1")
    assert d.uuid == "GPU-5f8d2a53-0c1e-7b4e-9d1a-3e2c4b5a6f70" and d.degraded and d.source == "procfs"
    ok, why = usable(d, CUDA_BUILD)
    assert not ok and "VRAM unknown without NVML" in why


def test_nvidia_from_nvidia_smi_has_vram() -> None:
    calls = []

    def smi(argv):
        calls.append(argv)
        return SMI_OUT

    result = sysfs_probe.probe_nvidia_driver(SYSFS / "pascal-gtx1080", smi)
    assert calls[0][0] == "nvidia-smi" and result.library == "nvidia-smi" and result.status.startswith("degraded")
    (d,) = result.devices
    assert (d.vram_total_mib, d.vram_used_mib, d.vram_free_mib, d.compute_capability) == (8192, 310, 7715, "6.1")
    assert d.degraded and usable(d, CUDA_BUILD) == (True, "runs with llama.cpp's CUDA backend")


def test_nvidia_smi_without_compute_cap_column_falls_back_to_older_query() -> None:
    def old_driver(argv):
        return None if "compute_cap" in argv[1] else SMI_OUT.rsplit(",", 1)[0] + "\n"

    (d,) = sysfs_probe.probe_nvidia_driver(SYSFS / "pascal-gtx1080", old_driver).devices
    assert d.compute_capability == "6.1"  # from the name


def test_no_nvidia_driver_means_no_fallback() -> None:
    assert sysfs_probe.probe_nvidia_driver(SYSFS / "mi50", no_commands) is None


# ------------------------------------------------------------------------------------- families


@pytest.mark.parametrize(
    ("vendor", "arch", "name", "family", "backends"),
    [
        ("amd", "gfx803", "", "Polaris", (Backend.VULKAN,)),
        ("amd", "gfx900", "", "Vega 10", (Backend.ROCM, Backend.VULKAN)),
        ("amd", "gfx906", "", "Vega 20", (Backend.ROCM, Backend.VULKAN)),
        ("amd", "gfx1030", "", "RDNA 2 (Navi 21)", (Backend.ROCM, Backend.VULKAN)),
        ("amd", "gfx1010", "", "RDNA 1 (Navi 10)", (Backend.VULKAN,)),
        ("nvidia", "6.1", "", "Pascal", (Backend.CUDA, Backend.VULKAN)),
        ("nvidia", "7.0", "", "Volta", (Backend.CUDA, Backend.VULKAN)),
        ("nvidia", "7.5", "", "Turing", (Backend.CUDA, Backend.VULKAN)),
        ("nvidia", "8.9", "", "Ada Lovelace", (Backend.CUDA, Backend.VULKAN)),
        ("nvidia", "3.7", "", "Kepler", (Backend.VULKAN,)),
        ("nvidia", None, "Tesla P40", "Pascal", (Backend.CUDA, Backend.VULKAN)),
        ("nvidia", None, "Tesla V100-PCIE-16GB", "Volta", (Backend.CUDA, Backend.VULKAN)),
        ("nvidia", None, "NVIDIA GeForce RTX 3090", "Ampere", (Backend.CUDA, Backend.VULKAN)),
    ],
)  # fmt: skip
def test_families(vendor, arch, name, family, backends) -> None:
    f = gpu_families.family_of(vendor, arch, name)
    assert f is not None and (f.name, f.backends) == (family, backends)


@pytest.mark.parametrize(
    ("device_id", "name", "arch", "integrated"),
    [(0x67DF, "Radeon RX 470/480/570/580", "gfx803", False), (0x687F, "Radeon RX Vega 56/64", "gfx900", False),
     (0x66A1, "Radeon Instinct MI50", "gfx906", False), (0x66AF, "Radeon VII", "gfx906", False),
     (0x1638, "Radeon Graphics (integrated)", "gfx90c", True)],
)  # fmt: skip
def test_amd_device_ids(device_id: int, name: str, arch: str, integrated: bool) -> None:
    family, marketing = gpu_families.amd_family(device_id)
    assert (marketing, family.arch, family.integrated) == (name, arch, integrated)


def test_family_details() -> None:
    assert [gpu_families.gfx_from_kfd(v) for v in (80003, 90000, 90006, 90010, 100300, 110000, 0)] == [
        "gfx803", "gfx900", "gfx906", "gfx90a", "gfx1030", "gfx1100", None]
    pascal, turing = gpu_families.nvidia_family("6.1"), gpu_families.nvidia_family("7.5")
    assert (pascal.cuda_arch, pascal.needs_cuda12, turing.cuda_arch, turing.needs_cuda12) == ("61", True, "75", False)
    assert gpu_families.nvidia_family(None, "Some Unknown Card") is None and gpu_families.amd_family(0x1234) is None
    assert gpu_families.family_of("amd", "gfx942").backends == (Backend.ROCM, Backend.VULKAN)  # unknown gfx: both


def test_backend_follows_the_generation() -> None:
    rx580 = amd("polaris-rx580")[0]
    assert usable(rx580, ROCM_VULKAN_BUILD) == (True, "runs with llama.cpp's Vulkan backend")  # no ROCm for gfx803
    ok, why = usable(rx580, BackendInfo(installed=True, loadable=True, compiled=(Backend.ROCM,)))
    assert not ok and "-DGGML_VULKAN=on (its generation has no CUDA/ROCm support)" in why
    assert usable(amd("mi50")[0], ROCM_VULKAN_BUILD) == (True, "runs with llama.cpp's ROCm (HIP) backend")


# --------------------------------------------------------------------------------------- Vulkan


def test_parse_vulkaninfo_full_and_summary() -> None:
    full = vulkan_map.parse_vulkaninfo((FIXTURES / "vulkaninfo/apu-igpu.txt").read_text())
    assert [(v.index, v.vendor_id, v.device_id, v.kind, v.pci) for v in full] == [
        (0, 0x1002, 0x1638, "integrated", (0, 7, 0, 0)),
        (1, 0x1002, 0x67DF, "discrete", (0, 1, 0, 0)),
        (2, 0x10005, 0, "cpu", None),
    ]
    summary = vulkan_map.parse_vulkaninfo((FIXTURES / "vulkaninfo/nvidia-amd-summary.txt").read_text())
    assert [(v.name, v.kind, v.pci) for v in summary] == [
        ("AMD Radeon RX Vega (RADV VEGA10)", "discrete", None),
        ("NVIDIA GeForce GTX 1080", "discrete", None),
        ("llvmpipe (LLVM 17.0.6, 256 bits)", "cpu", None),
    ]
    assert vulkan_map.parse_vulkaninfo("") == [] and vulkan_map.parse_vulkaninfo("GPU0:\n\tdeviceName = x\n") == []


def _dev(vendor: str, index: int, bus: str | None) -> Device:
    return Device(id=f"{vendor}:{index}", index=index, vendor=vendor, name="g", vram_total_mib=8192,  # type: ignore[arg-type]
                  vram_used_mib=0, vram_free_mib=8192, pci_bus_id=bus)


VK = vulkan_map.VulkanDevice


@pytest.mark.parametrize(
    ("gpus", "enumeration", "expected"),
    [
        # by PCI bus id: the iGPU Mesa put first is not ours, the RX 580 is Vulkan 1 (NVML-style address too)
        ([_dev("amd", 0, "0000:01:00.0")], [VK(0, "igpu", 0x1002, 0x1638, "integrated", (0, 7, 0, 0)),
                                            VK(1, "rx580", 0x1002, 0x67DF, "discrete", (0, 1, 0, 0))], {"amd:0": 1}),
        ([_dev("nvidia", 0, "00000000:65:00.0")], [VK(0, "cpu", 0x10005, 0, "cpu", None),
                                                   VK(1, "p40", 0x10DE, 0x1B38, "discrete", (0, 0x65, 0, 0))],
         {"nvidia:0": 1}),
        # no PCI info (summary): per vendor in order, CPU devices skipped
        ([_dev("amd", 0, "0000:0b:00.0"), _dev("nvidia", 0, "0000:01:00.0")],
         [VK(0, "vega", 0x1002, 0x687F, "discrete"), VK(1, "1080", 0x10DE, 0x1B80, "discrete"), VK(2, "cpu", 0x10005, 0, "cpu")],
         {"amd:0": 0, "nvidia:0": 1}),
        # two NVIDIA cards without PCI info: PCI order of the GPUs pairs with Vulkan order
        ([_dev("nvidia", 1, "0000:02:00.0"), _dev("nvidia", 0, "0000:01:00.0")],
         [VK(0, "a", 0x10DE, 1, "discrete"), VK(1, "b", 0x10DE, 1, "discrete")], {"nvidia:0": 0, "nvidia:1": 1}),
        # counts disagree (a card Vulkan does not show): left unmatched rather than guessed
        ([_dev("amd", 0, "0000:01:00.0"), _dev("amd", 1, "0000:02:00.0")], [VK(0, "a", 0x1002, 1, "discrete")], {}),
        ([_dev("amd", 0, "0000:01:00.0")], [], {}),
    ],
)  # fmt: skip
def test_vulkan_indices(gpus, enumeration, expected) -> None:
    assert vulkan_map.vulkan_indices(gpus, enumeration) == expected


def test_vulkan_index_pins_the_right_card() -> None:
    """The APU machine: vulkaninfo lists the iGPU first, so the RX 580 (amd:0) is Vulkan device 1."""
    text = (FIXTURES / "vulkaninfo/apu-igpu.txt").read_text()
    inv = discover([], backend=VULKAN_BUILD, root=SYSFS / "apu-igpu",
                   run=lambda argv: text if argv == ["vulkaninfo"] else None, probes=NO_VENDOR_LIBRARIES)
    (rx580,) = [d for d in inv.devices if d.vendor == "amd"]
    assert rx580.vulkan_index == 1 and rx580.to_dict()["vulkan_index"] == 1
    assert device_env(VULKAN_BUILD, [rx580])["GGML_VK_VISIBLE_DEVICES"] == "1"
    assert device_env(VULKAN_BUILD, [with_vulkan_indices([rx580], None)[0]])["GGML_VK_VISIBLE_DEVICES"] == "0"


# ------------------------------------------------------------------------------------ inventory


def test_discover_uses_the_fallbacks_without_vendor_libraries() -> None:
    """Neither NVML's library nor amdsmi answers: the fallbacks find the recorded GPUs."""
    inv = discover([], backend=CPU_BUILD, root=SYSFS / "mi50", run=no_commands, probes=NO_VENDOR_LIBRARIES)
    assert [(p.vendor, p.library, p.available) for p in inv.probes][-2:] == [
        ("amd", "amdsmi", False), ("amd", "sysfs (amdgpu driver)", True)]
    assert [d.id for d in inv.devices if d.vendor == "amd"] == ["amd:0", "amd:1"]
    again = inv.refresh({})
    assert again.devices == inv.devices  # re-measured from the same tree
    pascal = probe_all(root=SYSFS / "pascal-gtx1080", run=no_commands, probes=NO_VENDOR_LIBRARIES)
    assert ("nvidia", "/proc/driver/nvidia") in [(p.vendor, p.library) for p in pascal]


def test_refresh_reads_new_usage_from_sysfs(tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "root"
    shutil.copytree(SYSFS / "vega64", root)
    inv = discover([], backend=CPU_BUILD, root=root, run=no_commands, probes=NO_VENDOR_LIBRARIES)
    (root / "sys/class/drm/card0/device/mem_info_vram_used").write_text(f"{3000 << 20}\n")
    assert inv.refresh({}).get("amd:0").vram_used_mib == 3000
