"""`aivailable service install [--user] [--print] [up flags...]`: a systemd unit that runs `aivailable up`.

systemd's defaults break the graceful leave (aivailable/leave.py), so the unit sets:
- `KillMode=mixed`: SIGTERM goes to the node process only; the default (control-group) signals the
  workers too, which would end their requests while the node is still handing its models over. What is
  left when the node exits (or the timeout ends) gets SIGKILL.
- `TimeoutStopSec=` from `stop_timeout_s()`: the hand-over, settle, drain and worker stop times plus a
  margin, above systemd's default of 90 s.
- `Restart=on-failure`: a crash restarts the node, a clean leave (exit 0 after SIGTERM) does not.
- `StateDirectory=aivailable` (system: /var/lib/aivailable, mode 0700), or ~/.local/state/aivailable for
  a user unit; the node's `--state-dir` names the same folder.
- `EnvironmentFile=-...`: the cluster secret and API keys, as AIVAILABLE_CLUSTER_SECRET and
  AIVAILABLE_API_KEYS (mode 0600), never on the command line of the unit, which any user can read. A
  `--cluster-secret` or `--api-key` given to `service install` is moved there.
- `ExecStart=` with this interpreter's absolute path (`sys.executable`: a venv's or pipx's python), so
  the unit runs the installation that wrote it.

`render_unit` and `stop_timeout_s` are pure; `install_command` writes the files (or prints them).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aivailable import leave
from aivailable.engine.manager import ManagerConfig

UNIT_NAME = "aivailable.service"
STOP_MARGIN_S = 30.0
"""On top of the leave's own waits: leaving the gossip cluster, closing file transfers and the state
cache, and a slow machine's scheduling."""
_SECRET_FLAGS = {"--cluster-secret": "AIVAILABLE_CLUSTER_SECRET", "--api-key": "AIVAILABLE_API_KEYS"}


def stop_timeout_s(handover_s: float = leave.HANDOVER_TIMEOUT_S, settle_s: float = leave.SETTLE_S,
                   drain_s: float = leave.DRAIN_GRACE_S, worker_stop_s: float | None = None,
                   margin_s: float = STOP_MARGIN_S) -> int:
    """Seconds systemd must wait after SIGTERM before SIGKILL: hand-over + settle + drain + worker stop
    (SIGTERM to SIGKILL) + margin, rounded up. 60 + 1 + 30 + 10 + 30 = 131 with the defaults."""
    worker = ManagerConfig().stop_grace_s if worker_stop_s is None else worker_stop_s
    return math.ceil(handover_s + settle_s + drain_s + worker + margin_s)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What the unit says. `user_unit`: a `systemctl --user` unit; `run_as`: User= of a system unit."""

    python: str
    up_args: tuple[str, ...]
    user_unit: bool
    state_dir: str
    env_file: str
    run_as: str | None = None


def systemd_quote(arg: str) -> str:
    """One ExecStart word: specifiers (%) and variables ($) escaped, quoted when it has spaces or quotes."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c in arg for c in ' \t\n"\'\\;'):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_unit(spec: ServiceSpec) -> str:
    """The unit file's text."""
    exec_start = " ".join(systemd_quote(a) for a in
                          (spec.python, "-m", "aivailable", "up", "--state-dir", spec.state_dir, *spec.up_args))
    service = [
        "Type=simple",
        f"ExecStart={exec_start}",
        f"EnvironmentFile=-{spec.env_file}",
        "Environment=PYTHONUNBUFFERED=1",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={stop_timeout_s()}",
        "Restart=on-failure",
        "RestartSec=5",
        "LimitNOFILE=65536",
    ]
    if not spec.user_unit:
        service += ["StateDirectory=aivailable", "StateDirectoryMode=0700"]
        if spec.run_as:
            service += [f"User={spec.run_as}", "SupplementaryGroups=video render"]  # /dev/dri, /dev/kfd
    lines = [
        "# Written by `aivailable service install`; run it again to change the flags.",
        "[Unit]",
        "Description=AIvailable LLM serving node",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        *service,
        "",
        "[Install]",
        f"WantedBy={'default.target' if spec.user_unit else 'multi-user.target'}",
    ]
    return "\n".join(lines) + "\n"


def split_secrets(up_args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """`up_args` without --cluster-secret/--api-key, and those values as environment variables."""
    kept: list[str] = []
    env: dict[str, list[str]] = {}
    args = list(up_args)
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag in _SECRET_FLAGS:
            if not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            env.setdefault(_SECRET_FLAGS[flag], []).append(value)
        else:
            kept.append(args[i])
        i += 1
    return kept, {k: ",".join(v) for k, v in env.items()}


_PATH_FLAGS = ("--config", "--cluster-secret-file", "--models-dir")


def absolute_paths(up_args: Sequence[str], cwd: Path) -> list[str]:
    """`up_args` with relative file paths made absolute (the unit runs in /): --config, --cluster-secret-file,
    --models-dir, and the PATH of --model NAME=PATH[:CTX]."""
    out: list[str] = []
    args = list(up_args)
    for i, arg in enumerate(args):
        prev = args[i - 1] if i else ""
        flag, eq, value = arg.partition("=")
        if prev in _PATH_FLAGS:
            arg = str(cwd / Path(arg).expanduser())
        elif eq and flag in _PATH_FLAGS:
            arg = f"{flag}={cwd / Path(value).expanduser()}"
        elif prev == "--model" and "=" in arg:
            name, _, path = arg.partition("=")
            if not path.startswith(("/", "~", "hf://")):
                arg = f"{name}={cwd / path}"
        out.append(arg)
    return out


def _paths(user_unit: bool) -> tuple[Path, str, str]:
    """(unit file, state dir, environment file) for a user or system unit."""
    if user_unit:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state")
        return config / "systemd/user" / UNIT_NAME, str(state / "aivailable"), str(config / "aivailable/aivailable.env")
    return Path("/etc/systemd/system") / UNIT_NAME, "/var/lib/aivailable", "/etc/aivailable/aivailable.env"


def install_command(up_args: Sequence[str], *, user_unit: bool, print_only: bool) -> int:
    """Write (or print) the unit and its environment file; say what to run next. Returns the exit code."""
    unit_path, state_dir, env_file = _paths(user_unit)
    kept, secrets = split_secrets(absolute_paths(up_args, Path.cwd()))
    if any(a == "--state-dir" or a.startswith("--state-dir=") for a in kept):
        print(f"aivailable service install: --state-dir: the unit sets it ({state_dir}); leave it out",
              file=sys.stderr)
        return 2
    run_as = None
    if not user_unit and os.geteuid() != 0:
        print("aivailable service install: a system unit needs root (sudo), or use --user", file=sys.stderr)
        return 1
    if not user_unit:
        run_as = os.environ.get("SUDO_USER") or None  # the admin who ran sudo, whose venv holds the python
    spec = ServiceSpec(sys.executable, tuple(kept), user_unit, state_dir, env_file, run_as)
    text = render_unit(spec)
    if print_only:
        sys.stdout.write(text)
        if secrets:
            print(f"# {', '.join(sorted(secrets))} would be written to {env_file} (mode 0600), not to the unit",
                  file=sys.stderr)
        return 0
    unit_path.parent.mkdir(parents=True, exist_ok=True)
    unit_path.write_text(text)
    env_path = Path(env_file)
    env_path.parent.mkdir(parents=True, exist_ok=True)
    old = env_path.read_text().splitlines() if env_path.exists() else [
        "# Environment of the aivailable service (mode 0600): the cluster secret, API keys.",
        "# AIVAILABLE_CLUSTER_SECRET=...",
    ]
    lines = [ln for ln in old if ln.split("=", 1)[0] not in secrets] + [f"{k}={v}" for k, v in sorted(secrets.items())]
    fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(env_path, 0o600)
    ctl = "systemctl --user" if user_unit else "systemctl"
    print(f"wrote {unit_path} and {env_path}")
    print(f"next: {ctl} daemon-reload && {ctl} enable --now aivailable")
    if user_unit:
        print("      (to keep it running after you log out: loginctl enable-linger $USER)")
    print(f"logs: journalctl {'--user ' if user_unit else ''}-u aivailable -f")
    return 0
