"""CLI polish: `up` flags generated from NodeConfig (never duplicating hand-written ones), --help examples,
shell completion for bash/zsh/fish, XDG state and config paths."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aivailable import cli, completion, paths
from aivailable.cli_flags import add_generated_flags, generated_values
from aivailable.config import NodeConfig
from tests.nodeproc import REPO, NodeProc, free_port


def run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aivailable", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_node_setting_has_an_up_flag_with_help():
    up = _sub(cli._parser(), "up")
    actions = {a.dest: a for a in up._actions}
    for name in NodeConfig.model_fields:
        assert name in actions, f"NodeConfig.{name} has no `up` flag"
        assert actions[name].help and actions[name].help.strip(), f"--{name} has no help"
    options = [o for a in up._actions for o in a.option_strings]
    assert len(options) == len(set(options))


def test_hand_written_flags_win_and_are_never_duplicated():
    p = argparse.ArgumentParser()
    p.add_argument("--route", dest="routing", choices=("prefix", "p2c"), help="hand-written")
    p.add_argument("--profile", dest="something_else", help="takes the option name")
    p.add_argument("--node-id", dest="node_id")  # no help: filled from the field's docstring
    added = add_generated_flags(p, NodeConfig)
    assert "routing" not in added and "profile" not in added and "node_id" not in added
    assert p._option_string_actions["--route"].help == "hand-written"
    assert "--routing" not in p._option_string_actions
    assert p._option_string_actions["--profile"].dest == "something_else"
    assert "max_body_bytes" in added and "history_interval_s" in added
    # A helper's branch that adds a hand-written flag for a generated field merges cleanly: the generator
    # then leaves that field alone.
    q = argparse.ArgumentParser()
    q.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, metavar="BYTES", help="mine")
    assert "max_body_bytes" not in add_generated_flags(q, NodeConfig)


def test_generated_flag_values_and_tables():
    up_args = cli._parser().parse_args(
        ["up", "--routing", "p2c", "--cors-origins", "http://a:1", "--cors-origins", "http://b:2",
         "--max-body-bytes", "2048", "--api-key", "k1", "--api-key-rpm", "k1=5", "--history-interval-s", "2.5"])
    vals = generated_values(up_args)
    assert vals == {"routing": "p2c", "cors_origins": ["http://a:1", "http://b:2"], "max_body_bytes": 2048,
                    "api_key_rpm": {"k1": "5"}, "history_interval_s": 2.5}
    node = NodeConfig(api_keys=["k1"], **vals)
    assert node.api_key_rpm == {"k1": 5} and node.routing == "p2c" and node.max_body_bytes == 2048


def test_generated_flags_reach_validation_with_the_field_named(tmp_path):
    r = run("up", "--state-dir", str(tmp_path), "--no-mdns", "--max-body-bytes", "10")
    assert r.returncode == 2
    assert "max_body_bytes" in r.stderr and "Traceback" not in r.stderr
    r = run("up", "--state-dir", str(tmp_path), "--no-mdns", "--routing", "nearest")
    assert r.returncode == 2 and "--routing" in r.stderr and "invalid choice" in r.stderr
    r = run("up", "--state-dir", str(tmp_path), "--no-mdns", "--api-key-rpm", "secretkey")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr and "secretkey" not in r.stderr


def test_help_shows_examples():
    top = run("--help")
    assert top.returncode == 0 and "examples:" in top.stdout and "aivailable up --demo" in top.stdout
    up = run("up", "--help")
    assert up.returncode == 0 and "examples:" in up.stdout and "--join-token" in up.stdout
    assert "--history-interval-s" in up.stdout and "--log-format" in up.stdout


def _complete_bash(script: str, words: list[str]) -> list[str]:
    line = " ".join(words)
    prog = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _aivailable; "
            "printf '%s\\n' \"${COMPREPLY[@]}\"")
    r = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [x for x in r.stdout.splitlines() if x]


def test_bash_completion_completes_commands_flags_and_choices(tmp_path):
    r = run("completion", "bash")
    assert r.returncode == 0
    script = r.stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert set(_complete_bash(script, ["aivailable", "st"])) == {"status"}
    assert "token" in _complete_bash(script, ["aivailable", "''"])
    flags = _complete_bash(script, ["aivailable", "up", "--log"])
    assert set(flags) == {"--log-level", "--log-format"}
    assert "--history-interval-s" in _complete_bash(script, ["aivailable", "up", "--hist"])
    assert _complete_bash(script, ["aivailable", "up", "--log-format", "j"]) == ["json"]
    assert _complete_bash(script, ["aivailable", "completion", "f"]) == ["fish"]
    assert "--watch" in _complete_bash(script, ["aivailable", "status", "--w"])


def test_zsh_and_fish_scripts_cover_every_flag():
    parser = cli._parser()
    zsh = completion.zsh(parser)
    fish = completion.fish(parser)
    assert zsh.startswith("#compdef aivailable")
    for a in _sub(parser, "up")._actions:
        for opt in a.option_strings:
            if opt.startswith("--"):
                assert f"{opt}[" in zsh, opt
                assert f"-l {opt[2:]}" in fish, opt
    assert "'*--model[" in zsh  # repeatable
    assert "-l log-format -x -a 'text json'" in fish
    zsh_bin, fish_bin = shutil.which("zsh"), shutil.which("fish")
    if zsh_bin:  # syntax, where the shell is installed (.ci installs both)
        assert subprocess.run([zsh_bin, "-n"], input=zsh, text=True).returncode == 0
    if fish_bin:
        assert subprocess.run([fish_bin, "-n"], input=fish, text=True).returncode == 0
        script = Path(os.environ.get("TMPDIR", "/tmp")) / f"aiv-completion-{os.getpid()}.fish"
        script.write_text(fish)
        try:
            r = subprocess.run([fish_bin, "-c", f"source {script}; complete -C 'aivailable up --log-format '; "
                                "echo ---; complete -C 'aivailable completion '"], capture_output=True, text=True,
                               timeout=30)
        finally:
            script.unlink()
        formats, shells = r.stdout.split("---\n")
        assert [ln.split("\t")[0] for ln in formats.splitlines()] == ["json", "text"]
        assert [ln.split("\t")[0] for ln in shells.splitlines()] == ["bash", "fish", "zsh"]


@pytest.mark.parametrize("env, state, config", [
    ({}, "~/.local/state/aivailable", "~/.config/aivailable/config.toml"),
    ({"XDG_STATE_HOME": "/srv/st", "XDG_CONFIG_HOME": "/etc/xdg"}, "/srv/st/aivailable", "/etc/xdg/aivailable/config.toml"),
    ({"XDG_STATE_HOME": "relative/ignored", "XDG_CONFIG_HOME": ""}, "~/.local/state/aivailable",
     "~/.config/aivailable/config.toml"),
])
def test_xdg_paths(env, state, config):
    assert paths.default_state_dir(env) == state
    assert paths.default_config_file(env) == Path(config).expanduser()


def test_xdg_state_and_config_are_used_by_up(tmp_path):
    """A config file in $XDG_CONFIG_HOME is read without --config; the state goes to $XDG_STATE_HOME."""
    cfg = tmp_path / "cfg" / "aivailable"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text('[node]\nsimulate_gpus = ["xdgcard:1000"]\nmdns = false\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_STATE_HOME": str(tmp_path / "st"),
           "AIVAILABLE_PROFILE": "local", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    log = (tmp_path / "node.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "aivailable", "up", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        node = NodeProc(proc, "127.0.0.1", port, tmp_path / "st" / "aivailable", tmp_path / "node.log")
        node.wait_healthy()
        view = node.cluster()
        assert [g["name"] for g in view["nodes"][0]["gpus"]] == ["xdgcard"]
        assert (tmp_path / "st" / "aivailable" / "node_id").read_text().strip() == view["node_id"]
    finally:
        node.stop()
    # --config replaces the default file
    other = tmp_path / "other.toml"
    other.write_text('[node]\nlog_level = "LOUD"\n')
    r = run("up", "--no-mdns", "--config", str(other), env=env)
    assert r.returncode == 2 and "log_level" in r.stderr
    assert NodeConfig().state_dir == paths.default_state_dir()
