"""`aivailable keys`: --expires parsing (pure) and the parser/completion wiring."""

from __future__ import annotations

import datetime as dt
from unittest import mock

import pytest

from aivailable import keys_cli
from aivailable.cli import _parser, main
from aivailable.completion import script
from aivailable.errors import ConfigError
from aivailable.keys_cli import parse_expires

NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize("text, at", [
    ("30d", NOW + 30 * 86400), ("12h", NOW + 12 * 3600), ("90m", NOW + 5400), ("45s", NOW + 45), ("2w", NOW + 14 * 86400),
    ("1.5h", NOW + 5400),
    ("2027-01-31", dt.datetime(2027, 1, 31, tzinfo=dt.UTC).timestamp()),              # a date: midnight UTC
    ("2026-12-05T18:00", NOW + 6 * 3600),                                              # no zone: UTC
    ("2026-12-05T18:00+02:00", NOW + 4 * 3600),
])
def test_expires_accepts_dates_datetimes_and_durations(text, at):
    assert parse_expires(text, NOW) == pytest.approx(at)


@pytest.mark.parametrize("text, why", [("2026-12-01", "past"), ("2026-12-05T12:00", "past"), ("0d", "past"),
                                       ("tomorrow", "not a date"), ("30x", "not a date"),
                                       ("99999999999999d", "too far in the future")])
def test_expires_refuses_the_past_and_garbage_naming_the_flag(text, why):
    with pytest.raises(ConfigError) as e:
        parse_expires(text, NOW)
    assert e.value.param == "--expires" and why in e.value.message and e.value.message.startswith("--expires")


def test_keys_commands_parse_and_complete():
    args = _parser().parse_args(["keys", "add", "ci", "--models", "a,b", "--rpm", "5", "--viewer",
                                 "--admin-key", "K", "--url", "http://n1:8000"])
    assert (args.keys_command, args.name, args.models, args.rpm, args.viewer, args.admin_key) == \
        ("add", "ci", "a,b", 5, True, "K")
    assert _parser().parse_args(["status", "--api-key", "V"]).api_key == "V"
    bash = script("bash", _parser())
    assert " keys " in bash and "add list revoke" in bash


def test_keys_list_shows_an_expiry_past_the_year_9999_instead_of_crashing(capsys):
    rec = {"name": "ci", "kind": "user", "models": [], "rpm": 0, "expires": 1e20, "created": NOW,
           "fingerprint": "aiv-0123456789abcdef", "revoked": False, "state": "active", "last_used": {}}
    with mock.patch.object(keys_cli, "request_json", return_value={"keys": [rec]}):
        assert main(["keys", "list", "--admin-key", "K"]) == 0
    assert "far future" in capsys.readouterr().out


def test_add_and_revoke_warn_about_the_nodes_they_did_not_reach_yet(capsys):
    made = {"name": "ci", "key": "aiv-0123456789abcdef-x", "fingerprint": "aiv-0123456789abcdef", "models": [],
            "rpm": 0, "expires": None, "not_yet_on": ["n3"]}
    with mock.patch.object(keys_cli, "request_json", return_value=made):
        assert main(["keys", "add", "ci", "--admin-key", "K"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("aiv-0123456789abcdef-x\n") and "NOT yet on n3" in err
    with mock.patch.object(keys_cli, "request_json", return_value={"name": "ci", "revoked": True,
                                                                   "not_yet_on": []}):
        assert main(["keys", "revoke", "ci", "--admin-key", "K"]) == 0
    out, err = capsys.readouterr()
    assert "revoked on every node" in out and err == ""
