"""Log line formats of `aivailable up`: text with date and time, or one JSON object per line.

JSON lines carry `ts` (ISO 8601 UTC with milliseconds), `level`, `logger`, `msg` (the formatted message),
`exc` (a traceback, when there is one) and every extra field passed with `log.info(..., extra={...})`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
TEXT_DATEFMT = "%Y-%m-%d %H:%M:%S"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(kind: str) -> logging.Formatter:
    """The formatter for `--log-format` `kind` ("text" or "json")."""
    if kind == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT, datefmt=TEXT_DATEFMT)
