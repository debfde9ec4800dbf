"""What both long-running programs set up the same way: logging and the metrics endpoint."""

from __future__ import annotations

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


def serve_metrics(listen: str, registry: CollectorRegistry) -> None:
    if not listen:
        return
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
