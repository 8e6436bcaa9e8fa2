"""Command-line errors name the bad flag or key and exit 2; never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.nodeproc import REPO


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aivailable", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("value", ["nocolon", "gpu:", ":4096", "gpu:-5", "gpu:lots", "gpu:0", "g p u:100"])
def test_bad_simulate_gpu_names_the_flag(tmp_path, value):
    r = run("up", "--state-dir", str(tmp_path), "--no-mdns", "--port", "0", "--simulate-gpu", value)
    assert r.returncode == 2, r.stderr
    assert "--simulate-gpu" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_config_key_and_bad_value(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[node]\nprot = 8000\n")
    r = run("up", "--config", str(cfg), "--state-dir", str(tmp_path))
    assert r.returncode == 2 and "node.prot: unknown key" in r.stderr
    cfg.write_text('[[models]]\nname = "m"\npath = "/x.gguf"\nctx = "big"\n')
    r = run("up", "--config", str(cfg), "--state-dir", str(tmp_path))
    assert r.returncode == 2 and "models[0].ctx" in r.stderr
    cfg.write_text("[node\n")
    r = run("up", "--config", str(cfg), "--state-dir", str(tmp_path))
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    assert "Traceback" not in r.stderr


def test_env_overrides_file_and_flag_overrides_env(tmp_path):
    from aivailable.config import load_settings

    cfg = tmp_path / "c.toml"
    cfg.write_text("[node]\nport = 9001\njoin = ['a:1']\n")
    import os

    old = dict(os.environ)
    try:
        os.environ["AIVAILABLE_PORT"] = "9002"
        os.environ["AIVAILABLE_JOIN"] = "b:2, c:3"
        s = load_settings(str(cfg), {}, [])
        assert s.node.port == 9002 and s.node.join == ["b:2", "c:3"]
        s = load_settings(str(cfg), {"port": 9003}, [])
        assert s.node.port == 9003
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_missing_model_file_and_bad_model_flag(tmp_path):
    r = run("up", "--state-dir", str(tmp_path), "--model", "m=/no/such.gguf", "--simulate-gpu", "g:1000")
    assert r.returncode == 2 and "no such file" in r.stderr and "models[0].path" in r.stderr
    r = run("up", "--state-dir", str(tmp_path), "--model", "justaname")
    assert r.returncode == 2 and "--model" in r.stderr


def test_doctor_runs_and_says_what_is_usable():
    r = run("doctor", "--simulate-gpu", "sim0:4096")
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout.lower() and "sim" in r.stdout
    r = run("doctor", "--simulate-gpu", "bad")
    assert r.returncode == 2 and "--simulate-gpu" in r.stderr


@pytest.mark.parametrize("entry,where", [
    ('sha256 = "xyz"', "models[0].sha256: must be 64 hexadecimal"),
    ('source = "http://example.invalid/m.gguf"', "models[0].source: must be hf://OWNER/REPO/FILE.gguf"),
    ("ctx = 512", "models[0]: model 'm' needs a path, a source (hf://...) or a sha256"),
])
def test_model_file_fields_are_validated(tmp_path, entry, where):
    from aivailable.config import load_settings
    from aivailable.errors import ConfigError

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[models]]\nname = "m"\n{entry}\n')
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), {}, [])
    assert where in err.value.message


def test_file_settings_read_flags_and_defaults(tmp_path):
    from aivailable.config import load_settings

    s = load_settings(None, {"state_dir": str(tmp_path), "bandwidth_mib_s": 2.5, "chunk_mib": 0.5}, [])
    assert s.node.models_path == tmp_path / "models" and s.node.disk_budget_mib == 0
    assert s.node.bandwidth_mib_s == 2.5 and s.node.chunk_mib == 0.5
    sha = "ab" * 32
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[models]]\nname = "m"\nsha256 = "{sha.upper()}"\n')
    assert load_settings(str(cfg), {}, []).models[0].sha256 == sha
    r = run("up", "--state-dir", str(tmp_path), "--no-mdns", "--port", "0", "--chunk-mib", "0.01")
    assert r.returncode == 2 and "chunk_mib" in r.stderr and "Traceback" not in r.stderr
