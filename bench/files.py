"""Peer transfer of a model file over loopback: throughput vs a plain copy, and the bandwidth limit.

Holders are separate processes serving `POST /_cluster/files` (files/serve.py, signed requests); the
fetcher is files/fetch.py in this process, as in a node. Cases, each `--rounds` times (median):
- `copy`: shutil.copyfile of the file, then its sha256 (what a careful operator does by hand);
- `fetch 1 holder` / `fetch 2 holders`: manifest, verified chunks, fsync, whole-file sha256, rename;
- `limit`: a fetch with `--limit-mib-s`, to compare the achieved rate with the limit.
Prints a table and writes bench/results/files.json. Run it under `flock /tmp/aiv-bench.lock`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aivailable.files.fetch import Fetcher, Transfer  # noqa: E402
from aivailable.files.index import sha256_file  # noqa: E402
from bench import harness  # noqa: E402
from bench.harness import free_port  # noqa: E402

SECRET = b"bench-files-secret-0123456789"
HOLDER = r"""
import asyncio, sys, diskcache
from pathlib import Path
from aiohttp import web
from aivailable.files.serve import FILES_PATH, FileServer
path, sha, port, cache = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
server = FileServer("holder" + sys.argv[3], sys.argv[5].encode(), {sha: path}.get, diskcache.Cache(cache))
app = web.Application()
app.router.add_post(FILES_PATH, server.handle)
web.run_app(app, host="127.0.0.1", port=port, print=lambda *a: print("ready", flush=True))
"""


def start_holder(path: Path, sha: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), sha, str(port), str(tmp / f"c{port}"),
                             SECRET.decode()], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc, f"127.0.0.1:{port}"


async def fetch_once(src_sha: str, size: int, holders: dict[str, str], dest: Path, chunk_mib: float,
                     limit: float) -> float:
    for p in dest.glob("*"):
        p.unlink()
    f = Fetcher(node_id="bench", secret=SECRET, fetched_dir=dest, chunk_size=int(chunk_mib * 2**20),
                bandwidth_bps=limit * 2**20)
    t0 = time.perf_counter()
    await f.fetch(Transfer(model="m", sha256=src_sha, size=size), lambda: holders)
    dt = time.perf_counter() - t0
    await f.close()
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", help="GGUF to move (default: the demo Gemma 3 270M)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-mib", type=float, default=8.0)
    ap.add_argument("--limit-mib-s", type=float, default=50.0)
    harness.add_output_args(ap, "files")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="aiv-bench-files-"))
    path = Path(args.file) if args.file else harness.demo_model()
    size = path.stat().st_size
    sha = sha256_file(path)
    procs = []
    try:
        a, addr_a = start_holder(path, sha, tmp)
        b, addr_b = start_holder(path, sha, tmp)
        procs = [a, b]
        dest = tmp / "dest"
        dest.mkdir()
        results: dict[str, list[float]] = {"copy": [], "fetch 1 holder": [], "fetch 2 holders": [], "limit": []}
        asyncio.run(fetch_once(sha, size, {"a": addr_a, "b": addr_b}, dest, args.chunk_mib, 0))  # warm caches
        for _ in range(args.rounds):  # interleaved, so a busy moment of the shared box hits every case alike
            t0 = time.perf_counter()
            shutil.copyfile(path, tmp / "copy.gguf")
            assert hashlib.sha256((tmp / "copy.gguf").read_bytes()).hexdigest() == sha
            results["copy"].append(time.perf_counter() - t0)
            (tmp / "copy.gguf").unlink()
            results["fetch 1 holder"].append(asyncio.run(fetch_once(sha, size, {"a": addr_a}, dest,
                                                                    args.chunk_mib, 0)))
            results["fetch 2 holders"].append(asyncio.run(fetch_once(sha, size, {"a": addr_a, "b": addr_b}, dest,
                                                                     args.chunk_mib, 0)))
        results["limit"].append(asyncio.run(fetch_once(sha, size, {"a": addr_a}, dest, args.chunk_mib,
                                                       args.limit_mib_s)))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    mib = size / 2**20
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"file {path.name}: {mib:.1f} MiB, chunk {args.chunk_mib} MiB, {args.rounds} rounds (median)")
    print(f"{'case':<18}{'seconds':>10}{'MiB/s':>10}{'vs copy':>10}")
    for k, v in med.items():
        print(f"{k:<18}{v:>10.2f}{mib / v:>10.1f}{v / med['copy']:>10.2f}")
    achieved = mib / med["limit"]
    print(f"bandwidth limit {args.limit_mib_s} MiB/s: achieved {achieved:.1f} MiB/s "
          f"({achieved / args.limit_mib_s:.2f}x the limit, verification included)")
    out = {"machine": harness.machine(),
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "label")}
           | {"file": str(path), "size_bytes": size},
           "samples_s": results, "median_s": med,
           "mib_per_s": {k: round(mib / v, 1) for k, v in med.items()},
           "ratio_to_copy": {k: round(v / med["copy"], 2) for k, v in med.items()},
           "limit_achieved_mib_s": round(achieved, 1)}
    print(f"wrote {harness.write_results('files', out, args=args, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
