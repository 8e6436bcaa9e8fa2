"""The per-key token bucket (sans-IO) and its configuration."""

from __future__ import annotations

import pytest

from aivailable.api.ratelimit import KeyLimiter, fingerprint
from aivailable.config import load_settings
from aivailable.errors import ConfigError


def test_bucket_grants_burst_then_refills_at_the_rate():
    lim = KeyLimiter(default_rpm=60, burst=2)  # one token a second, two at once
    assert [lim.check("k", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert lim.check("k", 0.0) == pytest.approx(1.0)  # empty: next token in 1 s, nothing taken
    assert lim.check("k", 0.5) == pytest.approx(0.5)
    assert lim.check("k", 1.0) == 0.0
    assert lim.check("k", 100.0) == 0.0 and lim.check("k", 100.0) == 0.0  # refill caps at the burst
    assert lim.check("k", 100.0) > 0
    assert lim.check("other", 100.0) == 0.0  # buckets are per key


def test_default_burst_is_a_minute_and_zero_means_unlimited():
    lim = KeyLimiter(default_rpm=6, overrides={"vip": 0, "slow": 1})
    assert all(lim.check("k", 0.0) == 0.0 for _ in range(6))
    assert lim.check("k", 0.0) == pytest.approx(10.0)
    assert all(lim.check("vip", 0.0) == 0.0 for _ in range(1000))
    assert lim.check("slow", 0.0) == 0.0 and lim.check("slow", 0.0) == pytest.approx(60.0)
    assert all(KeyLimiter().check("k", 0.0) == 0.0 for _ in range(100))


def test_fingerprints_are_keyed_with_the_cluster_secret():
    """A fingerprint shown without authentication (/metrics, /api/cluster) must not let anyone confirm a
    guessed key offline: it is an HMAC with the cluster secret, not a plain hash (issue 20, defect 6)."""
    import hashlib
    import re

    key = "sk-weak-password"
    fp = fingerprint(key, b"secret-one")
    assert re.fullmatch(r"key-[0-9a-f]{8}", fp)
    assert fp == fingerprint(key, b"secret-one")  # the same on every node of the cluster
    assert fp != fingerprint(key, b"secret-two") and fp != fingerprint("sk-other", b"secret-one")
    assert fp[4:] not in hashlib.sha256(key.encode()).hexdigest()


def test_an_override_for_an_unknown_key_names_the_field_not_the_key(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text('[node]\napi_keys = ["sk-a-123"]\n[node.api_key_rpm]\n"sk-typo-456" = 5\n')
    with pytest.raises(ConfigError) as e:
        load_settings(str(cfg), {}, [])
    assert "api_key_rpm entry #1" in e.value.message
    assert "sk-typo-456" not in e.value.message
    cfg.write_text('[node]\nrate_limit_rpm = -1\n')
    with pytest.raises(ConfigError, match="rate_limit_rpm"):
        load_settings(str(cfg), {}, [])
