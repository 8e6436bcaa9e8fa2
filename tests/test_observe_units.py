"""Table tests of the pure parts of observability: histograms and the per-model book (engine/latency.py),
the last hour's rates (history.py), GPU telemetry readers on recorded sysfs trees (engine/telemetry.py),
and JSON log lines (logfmt.py)."""

from __future__ import annotations

import json
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from aivailable.engine.latency import ITL_BUCKETS, TTFT_BUCKETS, Histo, LatencyRecorder, ModelBook, token_gaps
from aivailable.engine.telemetry import NONE, GpuTelemetry, Telemetry, read_nvml, read_sysfs
from aivailable.history import History, ModelTotals, interval_point
from aivailable.logfmt import JsonFormatter


# -- histograms ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, counts", [
    ([], [0, 0, 0, 0]),
    ([0.1], [1, 0, 0, 0]),          # on a bound: counted as <= that bound (Prometheus `le`)
    ([0.1000001, 0.5], [0, 2, 0, 0]),
    ([0.2, 1.0, 1.5, 99], [0, 1, 1, 2]),
])
def test_histo_buckets(values, counts):
    h = Histo((0.1, 0.5, 1.0))
    h.observe_many(values)
    assert h.counts == counts
    assert h.count == len(values)
    assert h.total == pytest.approx(sum(values))
    cum = h.cumulative()
    assert [le for le, _ in cum] == ["0.1", "0.5", "1.0", "+Inf"]
    assert cum[-1][1] == len(values) and [n for _, n in cum] == sorted(n for _, n in cum)


def test_token_gaps():
    assert token_gaps([]) == [] and token_gaps([1.0]) == []
    assert token_gaps([1.0, 1.25, 1.75]) == [0.25, 0.5]


def _report(pid, ttft=(), itl=(), requests=0, tokens=0):
    r = LatencyRecorder()
    for t in ttft:
        r.record(t, [])
    r.record(None, itl)
    return {"pid": pid, "requests": requests, "completion_tokens": tokens, **r.report()}


@pytest.mark.parametrize("steps, ttft_count, itl_count, requests", [
    # (key, model, report) in order; the expected totals of model "m" after all of them
    ([("m@0", "m", _report(1, [0.1], [0.01], 1, 5))], 1, 1, 1),
    # the same report twice (no new requests): counted once
    ([("m@0", "m", _report(1, [0.1], [0.01], 1, 5)), ("m@0", "m", _report(1, [0.1], [0.01], 1, 5))], 1, 1, 1),
    # growth: only the difference is added
    ([("m@0", "m", _report(1, [0.1], [0.01], 1, 5)), ("m@0", "m", _report(1, [0.1, 0.2], [0.01, 0.02], 2, 9))],
     2, 2, 2),
    # a restarted worker (new pid) starts from zero: its whole report is new
    ([("m@0", "m", _report(1, [0.1, 0.2], [], 2, 9)), ("m@0", "m", _report(2, [0.3], [], 1, 3))], 3, 0, 3),
    # same pid but counts went down (a report from a fresh process that reused the pid): from zero
    ([("m@0", "m", _report(1, [0.1, 0.2], [], 2, 9)), ("m@0", "m", _report(1, [0.3], [], 1, 3))], 3, 0, 3),
    # two replicas of one model add up; another model stays apart
    ([("m@0", "m", _report(1, [0.1], [], 1, 1)), ("m@1", "m", _report(2, [0.1, 0.1], [], 2, 2)),
      ("x@0", "x", _report(3, [0.5], [], 7, 7))], 3, 0, 3),
    # a report without latency fields (an older or stub worker) adds nothing but its counters
    ([("m@0", "m", {"pid": 1, "requests": 4})], 0, 0, 4),
])
def test_model_book_folds_reports(steps, ttft_count, itl_count, requests):
    book = ModelBook()
    for key, model, report in steps:
        book.fold(key, model, report)
    assert book.ttft["m"].count == ttft_count
    assert book.itl["m"].count == itl_count
    assert book.counters["m"]["requests"] == requests


def test_book_histograms_stay_monotonic_across_restarts():
    book = ModelBook()
    seen = []
    for pid, ttfts in ((1, [0.1]), (1, [0.1, 0.3]), (2, [0.05]), (2, [0.05, 0.05]), (3, [])):
        book.fold("m@0", "m", _report(pid, ttfts))
        seen.append([n for _, n in book.ttft["m"].cumulative()])
    for a, b in zip(seen, seen[1:], strict=False):
        assert all(y >= x for x, y in zip(a, b, strict=True))
    assert book.ttft["m"].count == 4 and book.ttft["m"].total == pytest.approx(0.5)
    assert len(book.ttft["m"].counts) == len(TTFT_BUCKETS) + 1 and len(book.itl["m"].counts) == len(ITL_BUCKETS) + 1


def test_malformed_histogram_reads_as_empty():
    assert Histo.from_dict((1.0,), {"counts": [1, 2, 3], "sum": 1}).count == 0
    assert Histo.from_dict((1.0,), {"counts": [1, -2], "sum": 1}).count == 0
    assert Histo.from_dict((1.0,), {"counts": [1, 2], "sum": 4}).count == 3


# -- history ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prev, cur, dt, want", [
    (ModelTotals(), ModelTotals(), 10, (0.0, 0.0, None)),
    (ModelTotals(10, 100, 1.0, 10), ModelTotals(15, 300, 3.0, 15), 10, (0.5, 20.0, 0.4)),
    (ModelTotals(10, 100, 1.0, 10), ModelTotals(10, 100, 1.0, 10), 5, (0.0, 0.0, None)),
    # totals went down (should not happen): counted from zero, never negative
    (ModelTotals(10, 100, 1.0, 10), ModelTotals(2, 40, 0.4, 2), 10, (0.2, 4.0, 0.2)),
])
def test_interval_point(prev, cur, dt, want):
    p = interval_point(100.0, dt, prev, cur)
    assert (p.requests_per_s, p.tokens_per_s, p.ttft_s) == pytest.approx(want)


def test_history_ring_buffers_keep_the_last_hour():
    h = History(interval_s=10, horizon_s=60)
    assert h.size == 6
    gpu = {"id": "nvidia:0", "name": "P40", "vram_total_mib": 24576, "simulated": False}
    for i in range(10):
        h.sample(1000.0 + 10 * i, {"m": ModelTotals(requests=i, completion_tokens=50 * i, ttft_sum_s=0.2 * i,
                                                     ttft_count=i)},
                 [{**gpu, "vram_used_mib": 100 * i, "utilization_pct": 10.0 * i, "temperature_c": None,
                   "power_w": 120.5}])
    d = h.to_dict()
    m = d["models"]["m"]
    assert m["t"] == [1040.0 + 10 * i for i in range(6)]
    assert m["requests_per_s"] == [0.1] * 6 and m["tokens_per_s"] == [5.0] * 6
    assert m["ttft_s"] == pytest.approx([0.2] * 6)
    g = d["gpus"]["nvidia:0"]
    assert g["name"] == "P40" and g["vram_total_mib"] == 24576
    assert g["vram_used_mib"] == [400.0 + 100 * i for i in range(6)]
    assert g["utilization_pct"][-1] == 90.0 and g["temperature_c"] == [None] * 6 and g["power_w"][0] == 120.5
    json.dumps(d)  # served as JSON as is


def test_history_first_sample_counts_from_zero():
    h = History(interval_s=10)
    h.sample(50.0, {"m": ModelTotals(requests=3, completion_tokens=30, ttft_sum_s=0.3, ttft_count=3)}, [])
    m = h.to_dict()["models"]["m"]
    assert m["requests_per_s"] == [0.3] and m["ttft_s"] == [pytest.approx(0.1)]
    with pytest.raises(ValueError):
        History(interval_s=0)


# -- telemetry -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dev:
    id: str
    vendor: str
    index: int = 0
    pci_bus_id: str | None = None
    name: str = "gpu"

    @property
    def simulated(self) -> bool:
        return self.vendor == "simulated"


def _sysfs(root: Path, bus: str, files: dict[str, str]) -> None:
    dev = root / "bus" / "pci" / "devices" / bus
    for rel, text in files.items():
        (dev / rel).parent.mkdir(parents=True, exist_ok=True)
        (dev / rel).write_text(text + "\n")


# Values as amdgpu writes them: a Polaris card (power1_average), a Vega/MI50 (power1_input only on newer
# kernels), and a card whose hwmon lacks power.
@pytest.mark.parametrize("files, want", [
    ({"gpu_busy_percent": "37", "hwmon/hwmon3/temp1_input": "64000", "hwmon/hwmon3/power1_average": "95123000"},
     GpuTelemetry(37.0, 64.0, 95.123)),
    ({"gpu_busy_percent": "0", "hwmon/hwmon5/temp1_input": "31000", "hwmon/hwmon5/power1_input": "24000000"},
     GpuTelemetry(0.0, 31.0, 24.0)),
    ({"hwmon/hwmon1/temp1_input": "45500"}, GpuTelemetry(None, 45.5, None)),
    ({"gpu_busy_percent": "garbage"}, NONE),
])
def test_sysfs_reader(tmp_path, files, want):
    _sysfs(tmp_path, "0000:03:00.0", files)
    assert read_sysfs(Dev("amd:0", "amd", pci_bus_id="0000:03:00.0"), tmp_path) == want


def test_sysfs_reader_takes_nvml_bus_ids_and_misses_quietly(tmp_path):
    _sysfs(tmp_path, "0000:01:00.0", {"hwmon/hwmon0/temp1_input": "50000"})
    assert read_sysfs(Dev("nvidia:0", "nvidia", pci_bus_id="00000000:01:00.0"), tmp_path).temperature_c == 50.0
    assert read_sysfs(Dev("nvidia:1", "nvidia", pci_bus_id="00000000:02:00.0"), tmp_path) == NONE
    assert read_sysfs(Dev("nvidia:2", "nvidia"), tmp_path) == NONE


def test_telemetry_merges_vendor_and_sysfs_and_survives_errors():
    def vendor(d):
        if d.index == 1:
            raise RuntimeError("GPU is lost")
        return GpuTelemetry(utilization_pct=80.0, temperature_c=None, power_w=200.0)

    t = Telemetry({"nvidia": vendor}, sysfs=lambda d: GpuTelemetry(None, 70.0, 1.0))
    got = t.read_all([Dev("nvidia:0", "nvidia"), Dev("nvidia:1", "nvidia", index=1), Dev("sim:0", "simulated")])
    assert got["nvidia:0"] == GpuTelemetry(80.0, 70.0, 200.0)  # the vendor's figure wins; sysfs fills the gap
    assert got["nvidia:1"] == GpuTelemetry(None, 70.0, 1.0)
    assert got["sim:0"] == NONE
    assert Telemetry({}, sysfs=None).read(Dev("amd:0", "amd")) == NONE


def test_nvml_reader_units(monkeypatch):
    """read_nvml against a stand-in pynvml (no NVIDIA GPU here): mW -> W, and a missing sensor is None."""
    fake = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42, memory=10),
        nvmlDeviceGetTemperature=lambda h, sensor: 71,
        nvmlDeviceGetPowerUsage=lambda h: (_ for _ in ()).throw(RuntimeError("Not Supported")),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert read_nvml(Dev("nvidia:0", "nvidia")) == GpuTelemetry(42.0, 71.0, None)
    fake.nvmlDeviceGetPowerUsage = lambda h: 250500
    assert read_nvml(Dev("nvidia:0", "nvidia")).power_w == 250.5


# -- JSON logs -------------------------------------------------------------------------------------------
def test_json_formatter_fields_extras_and_traceback():
    fmt = JsonFormatter()
    rec = logging.LogRecord("aivailable.node", logging.WARNING, __file__, 1, "model %s: %d ms", ("m", 5), None)
    rec.model = "m"
    out = json.loads(fmt.format(rec))
    assert out["level"] == "WARNING" and out["logger"] == "aivailable.node" and out["msg"] == "model m: 5 ms"
    assert out["model"] == "m" and out["ts"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed\nsecond line", (), sys.exc_info())
    line = fmt.format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["msg"] == "failed\nsecond line" and "ValueError: boom" in obj["exc"]
