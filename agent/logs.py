"""Log formatting: one record is one line, whatever the message holds.

A model name, a path or a peer's error text can come from someone else (a control-API
caller, a hub listing, a LAN peer). Logged as it is, a newline in it could forge a whole
line ("pull ... finished: ok"). The plain formatter escapes every control character; the
JSON formatter (``shoal agent --log-json``, for journald) escapes by construction.
"""

from __future__ import annotations

import json
import logging
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")


def escape(text: str) -> str:
    """``text`` with control characters (newlines included) written as escapes."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        head, sep, trace = text.partition("\nTraceback")  # our own tracebacks keep their lines
        return escape(head) + (sep + trace if sep else "")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: what journald and log shippers parse without rules."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(verbose: bool) -> None:
    """The process's logging: WARNING (INFO with ``verbose``) to stderr, one line per record."""
    handler = logging.StreamHandler()
    handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
