"""Structured log lines on stderr, where journald picks them up.

Text lines read like ``level=info logger=gossipfld.gossip msg="merged" peer=3fa2.. age=1200``; with
``--log-format json`` each line is one JSON object with the same fields. Extra fields come from the
``extra={"fields": {...}}`` argument of a logging call. No timestamps in text mode when running under
systemd (journald stamps lines itself); JSON lines always carry one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _quote(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "._-:/@+" for c in text):
        return text
    return json.dumps(text)


class TextFormatter(logging.Formatter):
    def __init__(self, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.timestamps:
            parts.append("ts=" + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                         + f".{int(record.msecs):03d}Z")
        parts += [f"level={record.levelname.lower()}", f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        for key, value in getattr(record, "fields", {}).items():
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append("exc=" + _quote(self.formatException(record.exc_info).splitlines()[-1]))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry, default=str)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    under_journald = "JOURNAL_STREAM" in os.environ
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(timestamps=not under_journald))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # python-zeroconf is chatty at INFO about things that are normal on a busy LAN.
    logging.getLogger("zeroconf").setLevel(logging.WARNING)


def fields(**values: object) -> dict[str, dict[str, object]]:
    """``log.info("merged", extra=fields(peer=..., age=...))``."""
    return {"fields": values}
