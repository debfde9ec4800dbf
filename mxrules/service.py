"""What both long-running programs set up the same way: logging and the metrics endpoint.

Log lines are one event each, `event key=value ...`, to stderr (journald adds
the time and the unit).  A value is bare when that is unambiguous, else a JSON
string, so a line splits back into fields without guessing.
"""

from __future__ import annotations

import json
import logging
import sys

from prometheus_client import CollectorRegistry, start_http_server


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
        level=getattr(logging, level.upper(), logging.INFO),
        force=True,
    )


def quote(value: object) -> str:
    """key=value logging: bare when safe, else a JSON string (escapes control bytes)."""
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


def kv(**fields: object) -> str:
    """`k=v k=v` for the fields that have a value (None and "" are left out)."""
    return " ".join(f"{k}={quote(v)}" for k, v in fields.items() if v not in (None, ""))


def serve_metrics(listen: str, registry: CollectorRegistry) -> None:
    if not listen:
        return
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
