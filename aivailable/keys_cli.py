"""`aivailable keys add|list|revoke`: the cluster's API keys, through a node's admin API (/admin/keys).

The admin key comes from the same flags as `drain` (`--admin-key`, `--admin-key-file`, or derived from
this machine's cluster secret). A new key is printed once: the cluster stores only its salted hash.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
import urllib.parse

from aivailable.admin_cli import key_args, request_json, resolve_key
from aivailable.apikeys.keyset import MAX_EXPIRES
from aivailable.errors import ConfigError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `keys` with its actions on the top-level parser."""
    k = sub.add_parser("keys", help="the cluster's API keys: add, list, revoke (admin key needed)")
    ks = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = ks.add_parser("add", help="make a key (printed once) that works on every node")
    add.add_argument("name", help="the key's name (what `keys list` shows and `keys revoke` takes)")
    add.add_argument("--models", metavar="A,B", help="only these models (default: every model)")
    add.add_argument("--rpm", type=int, default=0, metavar="N",
                     help="requests per minute across the whole cluster (default 0: no limit)")
    add.add_argument("--expires", metavar="DATE",
                     help="when it stops working: 2027-01-31, 2027-01-31T18:00 (UTC unless a zone is given), or "
                          "a duration from now: 30d, 12h, 90m")
    add.add_argument("--viewer", action="store_true",
                     help="a read-only key for the status page, /api/cluster and /metrics (not the OpenAI API)")
    ls = ks.add_parser("list", help="every key (without secrets), revoked and expired ones too")
    ls.add_argument("--json", action="store_true")
    rv = ks.add_parser("revoke", help="stop a key on every node")
    rv.add_argument("name")
    for p in (add, ls, rv):
        p.add_argument("--url", default="http://127.0.0.1:8000", help="a node of the cluster (default %(default)s)")
        key_args(p)


def parse_expires(text: str, now: float) -> float:
    """UTC epoch seconds of `--expires` (ISO date or datetime, UTC without a zone, or a duration such as
    30d); ConfigError naming --expires when it is unreadable or not in the future."""
    text = text.strip()
    m = _DURATION.fullmatch(text)
    if m:
        at = now + float(m.group(1)) * _UNIT_S[m.group(2)]
    else:
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"--expires: {text!r} is not a date (2027-01-31, 2027-01-31T18:00[+02:00]) or a "
                              "duration (30d, 12h, 90m, 45s, 2w)", param="--expires") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        at = when.timestamp()
    if at > MAX_EXPIRES:  # what the node accepts
        raise ConfigError(f"--expires: {text} is too far in the future", param="--expires")
    if at <= now:
        raise ConfigError(f"--expires: {text} is in the past (now {_utc(now)})", param="--expires")
    return at


def _utc(t: float | None) -> str:
    if t is None:
        return "never"
    try:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))
    except (OverflowError, OSError, ValueError):  # a record from a node that accepted any float
        return "never (far future)"


def _warn_not_yet_on(out: dict, done: str) -> bool:
    """Say on stderr which alive nodes the change did not reach yet; True if any."""
    missing = out.get("not_yet_on") or []
    if missing:
        print(f"key {out['name']!r} {done}, but NOT yet on {', '.join(missing)} (not reachable now): they get it "
              "by gossip when they are; the status page's API keys row says \"same on every node\" once they have",
              file=sys.stderr)
    return bool(missing)


def keys_command(args: argparse.Namespace) -> int:
    key = resolve_key(args)
    base = args.url.rstrip("/") + "/admin/keys"
    if args.keys_command == "add":
        models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
        if args.rpm < 0:
            raise ConfigError("--rpm must be 0 or more", param="--rpm")
        body = {"name": args.name, "kind": "viewer" if args.viewer else "user", "models": models, "rpm": args.rpm,
                "expires": parse_expires(args.expires, time.time()) if args.expires else None}
        out = request_json(base, body=body, key=key)
        what = "viewer key" if args.viewer else "API key"
        print(out["key"])
        print(f"# {what} {out['name']!r} ({out['fingerprint']}): models {', '.join(out['models']) or 'all'}, "
              f"rpm {out['rpm'] or 'no limit'}, expires {_utc(out['expires'])}.\n"
              "# Copy it now: it cannot be shown again (the cluster keeps only a salted hash).")
        _warn_not_yet_on(out, "added")
        return 0
    if args.keys_command == "revoke":
        out = request_json(f"{base}/{urllib.parse.quote(args.name, safe='')}", key=key, method="DELETE")
        if not _warn_not_yet_on(out, "revoked"):
            print(f"key {out['name']!r} revoked on every node")
        return 0
    out = request_json(base, key=key)
    if args.json:
        print(json.dumps(out["keys"], indent=2))
        return 0
    rows = [("NAME", "KIND", "STATE", "MODELS", "RPM", "EXPIRES", "LAST USED HERE", "FINGERPRINT")]
    for k in out["keys"]:
        used = max(k["last_used"].values(), default=None)
        rows.append((k["name"], k["kind"], k["state"], ",".join(k["models"]) or "all", str(k["rpm"] or "-"),
                     _utc(k["expires"]), _utc(used) if used else "-", k["fingerprint"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
