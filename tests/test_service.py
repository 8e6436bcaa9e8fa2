"""`aivailable service install`: the systemd unit (rendered, parsed, checked with `systemd-analyze verify`
where that binary exists), the files it writes, and its ExecStart run as systemd would run it: a real
node that leaves cleanly (exit 0, workers gone) when only its main process gets SIGTERM (KillMode=mixed)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aivailable import leave
from aivailable.service import (
    ServiceSpec,
    absolute_paths,
    render_unit,
    split_secrets,
    stop_timeout_s,
    systemd_quote,
)
from tests.nodeproc import REPO, free_port, get_json

SPEC = ServiceSpec(python="/opt/ai/venv/bin/python", up_args=("--model", "m=/models/m.gguf"), user_unit=False,
                   state_dir="/var/lib/aivailable", env_file="/etc/aivailable/aivailable.env")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values, as systemd reads a unit (comments and blank lines skipped)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        key, eq, value = line.partition("=")
        assert section is not None and eq, f"not a key=value line in a section: {line!r}"
        section.setdefault(key, []).append(value)
    return out


def exec_argv(unit: dict) -> list[str]:
    (cmd,) = unit["Service"]["ExecStart"]
    return [a.replace("%%", "%").replace("$$", "$") for a in shlex.split(cmd)]


def test_stop_timeout_covers_the_graceful_leave() -> None:
    assert stop_timeout_s() == 131 == 60 + 1 + 30 + 10 + 30
    assert stop_timeout_s() > leave.HANDOVER_TIMEOUT_S + leave.SETTLE_S + leave.DRAIN_GRACE_S > 90  # systemd's default
    assert stop_timeout_s(handover_s=10, settle_s=0.5, drain_s=5, worker_stop_s=2, margin_s=0) == 18


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [("plain", "plain"), ("a b", '"a b"'), ("50%", "50%%"), ("$HOME", "$$HOME"), ('say "hi"', '"say \\"hi\\""'),
     ("back\\slash", '"back\\\\slash"'), ("", '""')],
)  # fmt: skip
def test_systemd_quote(arg: str, quoted: str) -> None:
    assert systemd_quote(arg) == quoted


def test_secrets_move_out_of_the_command_line() -> None:
    kept, env = split_secrets(["--cluster-secret", "s3", "--api-key=k1", "--port", "8001", "--api-key", "k2"])
    assert kept == ["--port", "8001"]
    assert env == {"AIVAILABLE_CLUSTER_SECRET": "s3", "AIVAILABLE_API_KEYS": "k1,k2"}


def test_relative_paths_become_absolute() -> None:
    got = absolute_paths(["--config", "node.toml", "--cluster-secret-file=s/secret", "--model", "a=m/a.gguf:4096",
                          "--model", "b=/abs/b.gguf", "--model", "c=hf://o/r/c.gguf", "--port", "8000"], Path("/home/u"))
    assert got == ["--config", "/home/u/node.toml", "--cluster-secret-file=/home/u/s/secret", "--model",
                   "a=/home/u/m/a.gguf:4096", "--model", "b=/abs/b.gguf", "--model", "c=hf://o/r/c.gguf", "--port", "8000"]


def test_system_unit_keys() -> None:
    unit = parse_unit(render_unit(SPEC))
    s = unit["Service"]
    assert s["KillMode"] == ["mixed"] and s["Restart"] == ["on-failure"] and s["TimeoutStopSec"] == ["131"]
    assert s["StateDirectory"] == ["aivailable"] and s["EnvironmentFile"] == ["-/etc/aivailable/aivailable.env"]
    assert exec_argv(unit) == ["/opt/ai/venv/bin/python", "-m", "aivailable", "up", "--state-dir", "/var/lib/aivailable",
                               "--model", "m=/models/m.gguf"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"] and "User" not in s
    with_user = parse_unit(render_unit(dataclasses.replace(SPEC, run_as="lab")))
    assert with_user["Service"]["User"] == ["lab"] and with_user["Service"]["SupplementaryGroups"] == ["video render"]


def test_user_unit_keys() -> None:
    spec = ServiceSpec("/home/u/.local/share/pipx/venvs/aivailable/bin/python", ("--port", "8000"), True,
                       "/home/u/.local/state/aivailable", "/home/u/.config/aivailable/aivailable.env")
    unit = parse_unit(render_unit(spec))
    assert "StateDirectory" not in unit["Service"] and unit["Install"]["WantedBy"] == ["default.target"]
    assert exec_argv(unit)[:6] == [spec.python, "-m", "aivailable", "up", "--state-dir", spec.state_dir]


@pytest.mark.parametrize("user_unit", [False, True])
def test_systemd_analyze_verify(tmp_path: Path, user_unit: bool) -> None:
    """systemd's own parser accepts every key (it prints a warning for a bad one, so stderr must be empty)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed; test_system_unit_keys parsed the unit instead")
    spec = ServiceSpec(sys.executable, ("--model", "a b=/m/a b.gguf", "--port", "8000"), user_unit,
                       str(tmp_path / "state"), str(tmp_path / "env"))
    path = tmp_path / "aivailable.service"
    path.write_text(render_unit(spec))
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run_dir), "HOME": str(tmp_path)}
    cmd = [tool, *(["--user"] if user_unit else []), "verify", "--man=no", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    bad = tmp_path / "bad.service"
    bad.write_text(render_unit(spec).replace("KillMode=mixed", "KillMode=sometimes"))
    proc = subprocess.run([*cmd[:-1], str(bad)], capture_output=True, text=True, env=env, timeout=60)
    assert "kill mode" in proc.stderr  # the check would catch a broken key


def _cli(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env |= {"HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "aivailable", "service", *args], capture_output=True, text=True,
                          env=env, cwd=home, timeout=60)


def test_cli_user_install_writes_unit_and_secret_file(tmp_path: Path) -> None:
    proc = _cli(["install", "--user", "--model", "m=m.gguf", "--cluster-secret", "s3cr3t", "--port", "8001"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    unit_path = tmp_path / ".config/systemd/user/aivailable.service"
    env_path = tmp_path / ".config/aivailable/aivailable.env"
    assert f"wrote {unit_path} and {env_path}" in proc.stdout and "systemctl --user enable --now aivailable" in proc.stdout
    text = unit_path.read_text()
    assert "s3cr3t" not in text
    assert exec_argv(parse_unit(text)) == [sys.executable, "-m", "aivailable", "up", "--state-dir",
                                           str(tmp_path / ".local/state/aivailable"), "--model",
                                           f"m={tmp_path}/m.gguf", "--port", "8001"]
    assert env_path.stat().st_mode & 0o777 == 0o600 and "AIVAILABLE_CLUSTER_SECRET=s3cr3t" in env_path.read_text()
    proc = _cli(["install", "--user", "--cluster-secret", "n3w"], tmp_path)  # again: the secret is replaced
    lines = env_path.read_text().splitlines()
    assert proc.returncode == 0 and "AIVAILABLE_CLUSTER_SECRET=n3w" in lines and "AIVAILABLE_CLUSTER_SECRET=s3cr3t" not in lines


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["install", "--print", "--port", "x"], 2, "argument --port: invalid int value: 'x'"),
        (["install", "--print", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
        (["install", "--print", "--state-dir", "/srv"], 2, "--state-dir: the unit sets it"),
        (["install", "--print", "--api-key", "k"], 0, "AIVAILABLE_API_KEYS would be written to"),
        (["bogus"], 2, "invalid choice: 'bogus'"),
    ],
)  # fmt: skip
def test_cli_errors_name_the_flag(tmp_path: Path, args: list[str], code: int, words: str) -> None:
    proc = _cli(args, tmp_path)
    assert proc.returncode == code and words in proc.stderr and "Traceback" not in proc.stderr


def test_print_system_unit(tmp_path: Path) -> None:
    proc = _cli(["install", "--print", "--port", "8001"], tmp_path)
    unit = parse_unit(proc.stdout)
    assert proc.returncode == 0 and unit["Service"]["KillMode"] == ["mixed"]
    assert exec_argv(unit)[-2:] == ["--port", "8001"] and not (tmp_path / ".config").exists()


def test_exec_start_runs_a_node_that_leaves_on_sigterm_to_its_main_process(tmp_path: Path, gemma_path: Path) -> None:
    """What systemd does with the unit: run ExecStart with the EnvironmentFile's variables, and on stop
    send SIGTERM to the main process only (KillMode=mixed). The node stops its own workers and exits 0
    well within TimeoutStopSec."""
    port = free_port()
    args = ["install", "--user", "--host", "127.0.0.1", "--port", str(port), "--no-mdns", "--simulate-gpu", "g:2048",
            "--model", f"gemma={gemma_path}:1024", "--cluster-secret", "unit-test-secret"]
    assert _cli(args, tmp_path).returncode == 0
    unit = parse_unit((tmp_path / ".config/systemd/user/aivailable.service").read_text())
    env_file = unit["Service"]["EnvironmentFile"][0].lstrip("-")
    env = {**os.environ, "PYTHONPATH": str(REPO), "AIVAILABLE_PROFILE": "local"}
    env |= dict(ln.split("=", 1) for ln in Path(env_file).read_text().splitlines() if ln and not ln.startswith("#"))
    env |= dict(e.split("=", 1) for e in unit["Service"]["Environment"])
    log = (tmp_path / "node.log").open("wb")
    proc = subprocess.Popen(exec_argv(unit), cwd="/", env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        ready = False
        while time.monotonic() < deadline and not ready and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                ready = any(m["name"] == "gemma" and m["state"] == "ready"
                            for m in get_json(f"http://127.0.0.1:{port}/api/cluster", timeout=2)["models"])
            time.sleep(0.3)
        assert ready, (tmp_path / "node.log").read_text()[-3000:]
        assert (tmp_path / ".local/state/aivailable/cluster_secret").exists() is False  # the secret came from the env
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert workers, "the node runs its model in a worker process"
        proc.send_signal(signal.SIGTERM)  # KillMode=mixed: the main process only
        assert proc.wait(timeout=stop_timeout_s()) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
