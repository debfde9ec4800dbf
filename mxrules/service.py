"""What both long-running programs set up the same way: logging and the metrics endpoint.

Log lines are one event each, `event key=value ...`, to stderr (journald adds
the time and the unit).  A value is bare when that is unambiguous, else a JSON
string, so a line splits back into fields without guessing.

Both units are `Type=notify`: each program tells systemd it is ready
(`notify_ready`) once its config is loaded and it serves, so `systemctl start`
returns only then, and a config refused at start fails the start itself.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys

from prometheus_client import CollectorRegistry, start_http_server

from .hostport import split_host_port


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
    host, port = split_host_port(listen, default_host="127.0.0.1")
    start_http_server(port, addr=host, registry=registry)


def notify_ready() -> None:
    """Tell systemd the service is up (sd_notify(3) "READY=1"); nothing outside systemd.

    The protocol is one datagram on the unix socket named in $NOTIFY_SOCKET
    (a leading "@" names an abstract socket).  A failure is logged, not
    raised: the service works all the same, and systemd's start timeout says
    the rest.
    """
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(b"READY=1")
    except OSError as exc:
        logging.getLogger("mxrules").error("cannot tell systemd the service is ready "
                                           "(NOTIFY_SOCKET=%s): %s", path, exc)
