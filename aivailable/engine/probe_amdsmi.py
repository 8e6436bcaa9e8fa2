"""AMD GPUs through amdsmi (ROCm; optional at run time), opened once per process with stdout captured.

Importing or initialising amdsmi without ROCm prints to stdout, partly from C, and may raise anything
(SystemExit included): `open_amdsmi` diverts file descriptor 1 while it does (`captured_stdout`) and
reports why it failed. `probe_amd` never raises and never writes to stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aivailable.engine.devices import Device, ProbeResult

__all__ = ["captured_stdout", "open_amdsmi", "probe_amd"]


@contextlib.contextmanager
def captured_stdout() -> Iterator[list[str]]:
    """Divert stdout, Python's and the C library's (file descriptor 1), into a list of one string.

    Importing amdsmi without ROCm prints to stdout, partly from C; the node's stdout must stay clean.
    Process-wide while active: other threads' stdout is diverted too, so use it only at start-up.
    """
    captured: list[str] = []
    for stream in (sys.stdout, sys.__stdout__):
        with contextlib.suppress(Exception):
            stream.flush()  # type: ignore[union-attr]
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 at all: only Python-level output can be diverted
        saved = -1
    buf = io.StringIO()
    with tempfile.TemporaryFile() as tmp, contextlib.redirect_stdout(buf):
        if saved >= 0:
            os.dup2(tmp.fileno(), 1)
        try:
            yield captured
        finally:
            with contextlib.suppress(Exception):
                sys.__stdout__.flush()  # type: ignore[union-attr]
            with contextlib.suppress(Exception):
                ctypes.CDLL(None).fflush(None)  # C stdio buffers still point at the temporary file
            if saved >= 0:
                os.dup2(saved, 1)
                os.close(saved)
            tmp.seek(0)
            captured.append(buf.getvalue() + tmp.read().decode(errors="replace"))


_amdsmi_session: tuple[Any, str] | None = None  # (initialised module, "") or (None, why not)


def open_amdsmi() -> tuple[Any, str]:
    """Import and initialise amdsmi once per process, with stdout captured: both print without ROCm."""
    global _amdsmi_session
    if _amdsmi_session is None:
        if importlib.util.find_spec("amdsmi") is None:
            _amdsmi_session = (
                None,
                "amdsmi is not installed (on a ROCm machine: pip install 'aivailable[amd]')",
            )
            return _amdsmi_session
        with captured_stdout() as out:
            module, why = _import_amdsmi()
        said = " ".join(out[0].split())
        _amdsmi_session = (module, why + (f"; it printed: {said[:300]}" if module is None and said else ""))
    return _amdsmi_session


def _import_amdsmi() -> tuple[Any, str]:
    # amdsmi without ROCm raises KeyError, OSError or worse, even SystemExit: none may stop the node.
    try:
        module = importlib.import_module("amdsmi")
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        return None, f"amdsmi is installed but fails to load (ROCm missing?): {type(exc).__name__}: {exc}"
    try:
        module.amdsmi_init()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        return None, f"amdsmi cannot talk to the driver (amdgpu not loaded?): {type(exc).__name__}: {exc}"
    return module, ""


def probe_amd() -> ProbeResult:
    """AMD GPUs through amdsmi (ROCm). Never raises; never writes to stdout."""
    from aivailable.engine.devices import ProbeResult

    amdsmi, why = open_amdsmi()
    if amdsmi is None:
        return ProbeResult("amd", "amdsmi", False, f"amdsmi not available: {why}")
    try:
        devices, problems = [], []
        for i, handle in enumerate(amdsmi.amdsmi_get_processor_handles()):
            try:
                devices.append(_amd_device(amdsmi, i, handle))
            except Exception as exc:
                problems.append(f"GPU {i} skipped: {type(exc).__name__}: {exc}")
        status = f"amdsmi: {len(devices)} AMD GPU(s)"
        return ProbeResult("amd", "amdsmi", True, "; ".join([status, *problems]), tuple(devices))
    except Exception as exc:
        return ProbeResult("amd", "amdsmi", False, f"amdsmi failed: {type(exc).__name__}: {exc}")


def _amd_device(amdsmi: Any, i: int, handle: Any) -> Device:
    from aivailable.engine.devices import Device

    def opt(fn: str, *keys: str) -> Any:
        with contextlib.suppress(Exception):
            value = getattr(amdsmi, fn)(handle)
            for key in keys:
                value = value[key]
            return value
        return None

    vram = amdsmi.amdsmi_get_gpu_vram_usage(handle)  # MB
    asic = opt("amdsmi_get_gpu_asic_info") or {}
    target = asic.get("target_graphics_version")
    return Device(
        id=f"amd:{i}",
        index=i,
        vendor="amd",
        name=str(asic.get("market_name") or f"AMD GPU {i}"),
        vram_total_mib=int(vram["vram_total"]),
        vram_used_mib=int(vram["vram_used"]),
        vram_free_mib=max(0, int(vram["vram_total"]) - int(vram["vram_used"])),
        uuid=opt("amdsmi_get_gpu_device_uuid"),
        pci_bus_id=opt("amdsmi_get_gpu_device_bdf"),
        driver=opt("amdsmi_get_gpu_driver_info", "driver_version"),
        compute_capability=str(target) if target else None,
        source="amdsmi",
    )
