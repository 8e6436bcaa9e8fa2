"""`aivailable doctor`: which GPUs exist, which llama.cpp backend is compiled in, what is usable and why not.

Exit codes (`doctor_command`): 0 when at least one GPU (real or simulated) is usable, 1 when none is
(so `aivailable doctor && aivailable up` works in scripts), 2 for a bad --simulate-gpu value.
Run directly with `python -m aivailable.engine.doctor [--simulate-gpu NAME:VRAM_MIB]... [--json]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aivailable.engine import gpu_families, install_advice
from aivailable.engine.devices import (
    BACKEND_LABEL,
    SIMULATE_FLAG,
    Backend,
    BackendInfo,
    Device,
    ProbeResult,
    detect_backend,
    parse_simulated_gpus,
    probe_all,
    usable,
)
from aivailable.errors import ConfigError

_PINNING = {
    Backend.CUDA: "CUDA_VISIBLE_DEVICES, with CUDA_DEVICE_ORDER=PCI_BUS_ID so the numbers match nvidia-smi",
    Backend.ROCM: "ROCR_VISIBLE_DEVICES picks the GPUs (amd-smi numbers); HIP_VISIBLE_DEVICES then counts from 0",
    Backend.VULKAN: "GGML_VK_VISIBLE_DEVICES, in Vulkan's own numbering "
    "(on machines with GPUs of several vendors, compare with `vulkaninfo --summary`)",
}


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """Everything the doctor found; `format_doctor` words it, `to_dict` is the --json form."""

    probes: tuple[ProbeResult, ...]
    simulated: tuple[Device, ...]
    backend: BackendInfo
    platform: str
    env: install_advice.InstallEnv = install_advice.InstallEnv()

    def advice(self) -> install_advice.Advice:
        """What to install per GPU, and the build command for this machine's cards."""
        return install_advice.advise(self.devices, self.env)

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(d for p in self.probes for d in p.devices) + self.simulated

    def verdicts(self) -> list[tuple[Device, bool, str]]:
        return [(d, *usable(d, self.backend)) for d in self.devices]

    @property
    def usable(self) -> tuple[Device, ...]:
        return tuple(d for d, ok, _ in self.verdicts() if ok)

    @property
    def exit_code(self) -> int:
        return 0 if self.usable else 1

    def verdict(self) -> str:
        """The last line: what the operator can do now."""
        backend, real = self.backend, [d for d in self.devices if not d.simulated]
        hint = self.advice().command
        if not backend.installed:
            return f"llama-cpp-python is not installed, so no model can run here. Install it: {hint}"
        if backend.loadable is False:
            return f"{backend.problem}. Reinstall it: {hint}"
        if self.usable:
            ids = ", ".join(d.id for d in self.usable)
            note = " The node uses only the simulated GPUs." if self.simulated else ""
            return f"{len(self.usable)} of {len(self.devices)} GPU(s) usable: {ids}.{note}"
        if not real:
            return (
                f"no GPU found. To try AIvailable on the CPU, run with {SIMULATE_FLAG} NAME:VRAM_MIB "
                "(e.g. sim0:8192) or --demo."
            )
        return (
            f"{len(real)} GPU(s) found, none usable with this llama.cpp build. "
            f"Rebuild llama-cpp-python: {hint}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "probes": [p.to_dict() for p in self.probes],
            "backend": self.backend.to_dict(),
            "devices": [d.to_dict() | {"usable": ok, "reason": why} for d, ok, why in self.verdicts()],
            "usable": [d.id for d in self.usable],
            "install": _advice_dict(self.advice()),
            "verdict": self.verdict(),
            "exit_code": self.exit_code,
        }


def _advice_dict(a: install_advice.Advice) -> dict[str, Any]:
    return {
        "gpus": [{"id": g.device_id, "family": g.family, "backend": g.backend.value, "packages": list(g.packages),
                  "notes": list(g.notes), "drivable_by": [b.value for b in g.drivers]} for g in a.gpus],
        "cmake_args": a.cmake_args,
        "command": a.command,
        "apt": list(a.apt),
        "notes": list(a.notes),
    }


def doctor_report(
    simulate: Sequence[str] = (),
    *,
    backend: BackendInfo | None = None,
    probes: tuple[ProbeResult, ...] | None = None,
) -> DoctorReport:
    """Probe every vendor library and llama.cpp; ConfigError (naming --simulate-gpu) for a bad spec."""
    simulated = parse_simulated_gpus(simulate)
    backend = detect_backend() if backend is None else backend
    return DoctorReport(
        probes=probe_all() if probes is None else probes,
        simulated=simulated,
        backend=backend,
        platform=f"Python {platform.python_version()} on {platform.system()} {platform.machine()}",
        env=install_advice.current_env(backend.version),
    )


def _mib(d: Device) -> str:
    return f"{d.vram_total_mib} MiB total, {d.vram_free_mib} MiB free"


def _device_line(d: Device) -> str:
    extra = [
        f"{label} {value}"
        for label, value in (
            ("generation", _family(d)),
            ("compute capability", None if (d.compute_capability or "").startswith("gfx") else d.compute_capability),
            ("driver", d.driver),
            ("PCI", d.pci_bus_id),
            ("Vulkan index", d.vulkan_index),
            ("found through", d.source if d.source not in ("", "nvml", "amdsmi") else None),
        )
        if value is not None and value != ""
    ]
    if d.degraded:
        extra.append("degraded: no NVML")
    kind = " (simulated)" if d.simulated else ""
    return f"  {d.id:<10} {d.name}{kind}: {_mib(d)}" + (f" ({', '.join(extra)})" if extra else "")


def _family(d: Device) -> str | None:
    family = gpu_families.family_of(d.vendor, d.compute_capability, d.name)
    return f"{family.name}, {family.arch}" if family else None


def _backend_lines(b: BackendInfo) -> list[str]:
    if not b.installed:
        return ["  llama-cpp-python is not installed"]
    offload = {True: "yes", False: "no", None: "unknown"}[b.gpu_offload]
    lines = [
        f"  llama-cpp-python {b.version or '(version unknown)'}: built for {b.summary()} (GPU offload: {offload})"
    ]
    if b.problem:
        lines.append(f"  problem: {b.problem}")
    if b.libraries:
        lines.append(f"  libraries in {b.lib_dir}: {', '.join(b.libraries)}")
    if b.runtime_devices is not None:
        seen = [f"{g.name} ({g.kind}, {g.description}, {g.vram_total_mib} MiB)" for g in b.runtime_devices]
        lines.append(f"  llama.cpp sees at run time: {'; '.join(seen) or 'no device'}")
    if b.primary in _PINNING:
        lines.append(f"  workers are pinned to their GPUs with {_PINNING[b.primary]}")
    elif b.primary is Backend.CPU:
        lines.append(
            "  workers run on the CPU, with every GPU hidden from them: CUDA_VISIBLE_DEVICES=-1, "
            'HIP_VISIBLE_DEVICES=-1, ROCR_VISIBLE_DEVICES=-1, GGML_VK_VISIBLE_DEVICES=""'
        )
    else:
        lines.append(f"  AIvailable cannot pin workers to GPUs with the {BACKEND_LABEL[b.primary]} backend")
    return lines


def format_doctor(report: DoctorReport) -> str:
    """The report in plain words for an operator."""
    names = {"nvidia": "NVIDIA", "amd": "AMD"}  # a fallback probe (sysfs, nvidia-smi) follows its vendor's
    lines = ["AIvailable doctor", f"  {report.platform}", "", "Vendor libraries"]
    lines += [f"  {names.get(p.vendor, p.vendor)} via {p.library}: {p.status}" for p in report.probes]
    lines += ["", "GPUs"]
    lines += [_device_line(d) for d in report.devices] or ["  none found"]
    lines += ["", "llama.cpp", *_backend_lines(report.backend), "", "Usable"]
    lines += [f"  {d.id:<10} {'yes' if ok else 'no '}  {why}" for d, ok, why in report.verdicts()] or [
        "  nothing to use"
    ]
    lines += ["", "What to install", *install_advice.format_advice(report.advice())]
    lines += ["", f"Verdict: {report.verdict()}"]
    return "\n".join(lines)


def doctor_command(simulate: Sequence[str], as_json: bool) -> int:
    """Print the doctor's report (plain words, or JSON) and return the exit code (see module doc)."""
    try:
        report = doctor_report(simulate)
    except ConfigError as exc:
        print(f"aivailable doctor: error: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if as_json else format_doctor(report), flush=True)
    return report.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aivailable doctor",
        description="GPUs, vendor libraries, llama.cpp backend, what is usable and why not.",
    )
    parser.add_argument(SIMULATE_FLAG, action="append", default=[], metavar="NAME:VRAM_MIB", dest="simulate")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    return doctor_command(args.simulate, args.json)


if __name__ == "__main__":
    sys.exit(main())
