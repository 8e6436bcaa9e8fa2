"""Joining in one step: join tokens (format, damaged pastes), the first node's printed join command,
`aivailable token`, `up --join-token` with real nodes, and nodes of another cluster seen over mDNS."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aivailable import jointoken
from aivailable.config import load_settings
from aivailable.errors import ConfigError
from tests.nodeproc import REPO, free_port, get_json, serving

SECRET = "join-test-secret-0123456789abcdef"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aivailable", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


# -- the token format -----------------------------------------------------------------------------------
def test_token_round_trip_and_wrapped_paste():
    tok = jointoken.encode(["10.0.0.5:8000", "[fd00::2]:8000"], SECRET)
    assert tok.startswith("aiv1:") and SECRET not in tok
    assert jointoken.decode(tok) == (["10.0.0.5:8000", "[fd00::2]:8000"], SECRET)
    wrapped = tok[:20] + "\n  " + tok[20:]
    assert jointoken.decode(wrapped) == (["10.0.0.5:8000", "[fd00::2]:8000"], SECRET)


@pytest.mark.parametrize("damage, says", [
    (lambda t: t[:-3], "incomplete"),
    (lambda t: t[:len(t) // 2], "incomplete"),
    (lambda t: t[:10] + ("A" if t[10] != "A" else "B") + t[11:], "checksum"),
    (lambda t: "aiv2" + t[4:], "not an aivailable join token"),
    (lambda t: "", "not an aivailable join token"),
    (lambda t: t[:-8] + "zzzzzzzz", "checksum"),
])
def test_damaged_tokens_say_what_is_wrong(damage, says):
    tok = jointoken.encode(["10.0.0.5:8000"], SECRET)
    with pytest.raises(ConfigError) as exc:
        jointoken.decode(damage(tok))
    assert says in exc.value.message
    assert exc.value.param == "join_token"


def test_token_with_valid_checksum_but_no_secret_is_refused():
    import base64

    payload = base64.urlsafe_b64encode(b'{"a":["h:1"],"s":""}').decode().rstrip("=")
    with pytest.raises(ConfigError, match="no address or no secret"):
        jointoken.decode(f"aiv1:{payload}:{jointoken._check(payload)}")


def test_apply_sets_seeds_and_keeps_the_secret(tmp_path):
    tok = jointoken.encode(["10.0.0.5:8000", "10.0.0.6:8000"], SECRET)
    state = tmp_path / "state"
    s = load_settings(None, {"state_dir": str(state), "join_token": tok, "join": ["10.0.0.6:8000", "10.0.0.9:1"]}, [])
    out = jointoken.apply(s)
    assert out.node.join == ["10.0.0.6:8000", "10.0.0.9:1", "10.0.0.5:8000"]
    secret_file = state / "cluster_secret"
    assert secret_file.read_text().strip() == SECRET
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    jointoken.apply(s)  # the same token again (a restart): fine
    other = load_settings(None, {"state_dir": str(state), "join_token": jointoken.encode(["h:1"], "x" * 32)}, [])
    with pytest.raises(ConfigError, match="another cluster"):
        jointoken.apply(other)
    both = load_settings(None, {"state_dir": str(state), "join_token": tok, "cluster_secret": SECRET}, [])
    with pytest.raises(ConfigError, match="not both"):
        jointoken.apply(both)


def test_cli_rejects_a_truncated_token_naming_the_flag(tmp_path):
    tok = jointoken.encode(["127.0.0.1:9"], SECRET)
    r = run("up", "--state-dir", str(tmp_path / "s"), "--no-mdns", "--join-token", tok[:-4])
    assert r.returncode == 2
    assert "--join-token" in r.stderr and "incomplete" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "s" / "cluster_secret").exists()


# -- real nodes -----------------------------------------------------------------------------------------
def test_first_node_prints_a_join_command_that_joins_a_second_node(tmp_path):
    with serving(tmp_path, "--simulate-gpu", "a:1000", name="first") as a:
        m = None
        deadline = time.monotonic() + 20
        while m is None and time.monotonic() < deadline:
            m = re.search(r"aivailable up --join-token (\S+)", a.log())
            time.sleep(0.2)
        assert m, a.log()[-3000:]
        printed = m.group(1)
        secret = (a.state_dir / "cluster_secret").read_text().strip()
        assert jointoken.decode(printed) == ([f"127.0.0.1:{a.port}"], secret)
        assert secret not in a.log()

        again = run("token", "--url", a.url, "--state-dir", str(a.state_dir))
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == f"aivailable up --join-token {printed}"
        only = run("token", "--address", "192.0.2.7:8000", "--state-dir", str(a.state_dir), "--token-only")
        assert jointoken.decode(only.stdout.strip()) == (["192.0.2.7:8000"], secret)
        wrong = run("token", "--url", a.url, "--cluster-secret-file", str(_write(tmp_path / "other", "y" * 32)))
        assert wrong.returncode == 1 and "another cluster" in wrong.stderr
        missing = run("token", "--url", a.url, "--state-dir", str(tmp_path / "nowhere"))
        assert missing.returncode == 2 and "no cluster secret" in missing.stderr

        with serving(tmp_path, "--simulate-gpu", "b:1000", "--join-token", printed, name="second") as b:
            deadline = time.monotonic() + 60
            ids = set()
            while time.monotonic() < deadline:
                view = a.cluster()
                ids = {n["id"] for n in view["nodes"] if n["state"] == "alive"}
                if len(ids) == 2:
                    break
                time.sleep(0.5)
            assert len(ids) == 2, b.log()[-3000:]
            assert (b.state_dir / "cluster_secret").read_text().strip() == secret
            assert "Created a new cluster secret" not in b.log()
            # the token from the second node names both members
            seeds = run("token", "--url", b.url, "--state-dir", str(b.state_dir), "--token-only")
            addrs, _ = jointoken.decode(seeds.stdout.strip())
            assert set(addrs) == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_nodes_of_another_cluster_on_mdns_warn_once_and_show_on_the_status_page(tmp_path):
    procs = []
    logs = []
    try:
        for i, (host, secret) in enumerate((("127.0.0.1", "x" * 32), ("127.0.0.2", "y" * 32)), start=1):
            port = free_port(host)
            log_path = tmp_path / f"n{i}.log"
            logs.append(log_path)
            with log_path.open("wb") as f:
                p = subprocess.Popen([sys.executable, "-m", "aivailable", "up", "--host", host, "--port", str(port),
                                      "--state-dir", str(tmp_path / f"s{i}"), "--node-id", f"n{i}",
                                      "--cluster-secret", secret, "--simulate-gpu", f"c{i}:1000"],
                                     stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                     env={**os.environ, "AIVAILABLE_PROFILE": "local", "PYTHONUNBUFFERED": "1"})
            procs.append((p, host, port))
        view = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                view = get_json(f"http://127.0.0.1:{procs[0][2]}/api/cluster")
                if view["foreign_nodes"]:
                    break
            time.sleep(0.5)
        text = logs[0].read_text(errors="replace")
        assert view and view["foreign_nodes"], text[-3000:]
        assert view["foreign_nodes"][0]["node"] == "n2"
        assert view["foreign_nodes"][0]["addr"] == f"127.0.0.2:{procs[1][2]}"
        assert [n["id"] for n in view["nodes"]] == ["n1"]  # not joined
        assert text.count("belongs to another cluster") == 1
        assert "WARNING" in next(ln for ln in text.splitlines() if "belongs to another cluster" in ln)

        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{procs[0][2]}/")
                banner = page.locator("#foreign")
                banner.wait_for(state="visible", timeout=15_000)
                assert "n2" in banner.inner_text() and "another cluster" in banner.inner_text()
            finally:
                browser.close()
        st = run("status", "--url", f"http://127.0.0.1:{procs[0][2]}")
        assert "another cluster" in st.stdout and "n2" in st.stdout
    finally:
        for p, _h, _port in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p, _h, _port in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
