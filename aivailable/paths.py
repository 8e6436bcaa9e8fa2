"""Where a node keeps its state and looks for its config file: the XDG base directories, falling back to
~/.local/state and ~/.config (the XDG defaults) when XDG_STATE_HOME / XDG_CONFIG_HOME are unset or not
absolute paths (which the XDG specification says to ignore)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

APP = "aivailable"
CONFIG_NAME = "config.toml"


def _base(env: Mapping[str, str], var: str, fallback: str) -> str:
    value = env.get(var, "")
    return value if os.path.isabs(value) else fallback


def default_state_dir(env: Mapping[str, str] | None = None) -> str:
    """$XDG_STATE_HOME/aivailable, else ~/.local/state/aivailable (unexpanded `~`, as users write it)."""
    return f"{_base(os.environ if env is None else env, 'XDG_STATE_HOME', '~/.local/state').rstrip('/')}/{APP}"


def default_config_file(env: Mapping[str, str] | None = None) -> Path:
    """$XDG_CONFIG_HOME/aivailable/config.toml, else ~/.config/aivailable/config.toml."""
    base = _base(os.environ if env is None else env, "XDG_CONFIG_HOME", "~/.config")
    return Path(base).expanduser() / APP / CONFIG_NAME


def config_file(given: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The config file `up` reads: --config if given, else the default one where it exists, else none."""
    if given:
        return given
    path = default_config_file(env)
    return str(path) if path.is_file() else None
