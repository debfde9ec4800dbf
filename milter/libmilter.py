"""Running libmilter through pymilter, with the socket handled our way.

This does what `Milter.runmilter` does, in the same order, plus what it does
not: the action flags mxrules needs, and the mode of a unix socket set after
libmilter creates it (Postfix, chrooted or not, must be able to reach it).
"""

from __future__ import annotations

import importlib
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

import Milter

from .adapter import MxrulesMilter
from .session import Runtime

# pymilter's C module, by name: static checkers that read this tree would
# otherwise resolve `milter` to our own milter/ folder.
libmilter: Any = importlib.import_module("milter")


def serve(runtime: Runtime, listen: str, timeout: int, socket_mode: str | None,
          listening: Callable[[], None] = lambda: None) -> None:
    """Run libmilter until it is told to stop; `listening` is called once its socket is
    open (connections wait in its backlog until the loop takes them)."""
    MxrulesMilter.runtime = runtime
    Milter.factory = MxrulesMilter
    libmilter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.DELRCPT)
    libmilter.set_connect_callback(Milter.connect_callback)
    libmilter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    libmilter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    libmilter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    libmilter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    libmilter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    libmilter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    libmilter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    libmilter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    libmilter.set_close_callback(Milter.close_callback)
    libmilter.setconn(listen)
    libmilter.settimeout(timeout)
    libmilter.register(
        "mxrules",
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )
    libmilter.opensocket(True)
    path = _unix_path(listen)
    if path and socket_mode:
        os.chmod(path, int(socket_mode, 8))
    port = _inet_port(listen)
    if port is not None:
        _no_delay(port)
    listening()
    libmilter.main()


def _inet_port(listen: str) -> int | None:
    if listen.startswith(("inet:", "inet6:")):
        port = listen.split(":", 1)[1].split("@", 1)[0]
        return int(port) if port.isdigit() else None
    return None


def _no_delay(port: int) -> None:
    """Turn Nagle's algorithm off on libmilter's listening TCP socket.

    libmilter writes each reply and each header change in a small write of its
    own; with Nagle on, every one after the first waits for Postfix's delayed
    ACK (40 ms), which measured 86 ms at end of data for a message with two
    added headers (3 ms over a unix socket).  libmilter gives no handle on its
    sockets, so the listener is found by its port; on Linux, accepted sockets
    inherit TCP_NODELAY from it.
    """
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except (OSError, ValueError):
            continue
        try:
            if (sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        finally:
            sock.detach()  # the fd stays libmilter's


def _unix_path(listen: str) -> str | None:
    for prefix in ("unix:", "local:"):
        if listen.startswith(prefix):
            return listen[len(prefix):]
    return None
