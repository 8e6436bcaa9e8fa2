"""mDNS for real: full nodes in separate network namespaces find each other and form one cluster, no --join."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

from tests.netns import namespaces
from tests.nodeproc import REPO

SECRET = "mdns-test-secret-0123456789abcdef"


def _cluster_from(ns: str, addr: str) -> dict | None:
    code = ("import json,urllib.request;"
            f"print(json.dumps(json.load(urllib.request.urlopen('http://{addr}:8000/api/cluster', timeout=3))))")
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=20)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None


def test_nodes_in_separate_namespaces_form_a_cluster_over_mdns(tmp_path):
    procs: list[subprocess.Popen] = []
    with namespaces(2) as spaces:
        try:
            for i, (ns, _addr) in enumerate(spaces, start=1):
                log = (tmp_path / f"m{i}.log").open("wb")
                cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "aivailable", "up", "--host", "0.0.0.0",
                       "--port", "8000", "--state-dir", str(tmp_path / f"m{i}"), "--simulate-gpu", f"card{i}:1000",
                       "--cluster-secret", SECRET, "--node-id", f"m{i}"]
                procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                              env={**os.environ, "AIVAILABLE_PROFILE": "local"},
                                              start_new_session=True))
            (ns1, addr1), (_ns2, addr2) = spaces
            deadline = time.monotonic() + 30
            view = None
            while time.monotonic() < deadline:
                view = _cluster_from(ns1, addr1)
                if view and {n["id"]: n["state"] for n in view["nodes"]} == {"m1": "alive", "m2": "alive"} \
                        and view["leader"]:
                    break
                time.sleep(0.5)
            logs = "\n".join((tmp_path / f"m{i}.log").read_text(errors="replace")[-2000:] for i in (1, 2))
            assert view is not None, logs
            assert {n["id"]: n["state"] for n in view["nodes"]} == {"m1": "alive", "m2": "alive"}, logs
            assert {n["id"]: n["address"] for n in view["nodes"]} == {"m1": f"{addr1}:8000", "m2": f"{addr2}:8000"}
            assert view["leader"] in ("m1", "m2")
            assert SECRET not in logs
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
