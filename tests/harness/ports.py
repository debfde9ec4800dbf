"""Loopback port helpers: pick a free port and wait, with a deadline, until a server listens."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

_TCP_LISTEN = "0A"  # socket state code for LISTEN in /proc/net/tcp


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (the kernel picked it).

    A port is never handed out twice in one test run: a caller may not bind it
    before the next caller asks, and the kernel could pick the same one again.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def is_listening(host: str, port: int) -> bool:
    """Tell whether some socket listens on host:port, from the kernel's table (Linux only).

    Unlike a connect probe, the server never sees a session: a milter would otherwise
    be called for a client that connects and leaves at once.
    """
    (addr,) = struct.unpack("=I", socket.inet_aton(host))
    wanted = {f"{addr:08X}:{port:04X}", f"00000000:{port:04X}"}
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    for line in lines:
        fields = line.split()
        if fields[1] in wanted and fields[3] == _TCP_LISTEN:
            return True
    return False


def wait_listening(host: str, port: int, timeout: float = 10.0, *, connect: bool = True) -> None:
    """Block until host:port accepts TCP connections, or raise TimeoutError at the deadline.

    With ``connect=False`` the listen table is read instead of connecting (see is_listening).
    """
    deadline = time.monotonic() + timeout
    last_error = "not listening"
    while True:
        remaining = deadline - time.monotonic()
        if connect:
            try:
                with socket.create_connection((host, port), timeout=max(0.05, min(0.5, remaining))):
                    return
            except OSError as exc:
                last_error = str(exc)
        elif is_listening(host, port):
            return
        if remaining <= 0:
            raise TimeoutError(
                f"nothing accepted connections on {host}:{port} within {timeout:g}s"
                f" (last error: {last_error})"
            )
        time.sleep(min(0.05, max(0.0, remaining)))
