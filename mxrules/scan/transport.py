"""The scanners' transport: one exchange with spamd, rspamd or clamd, within one deadline.

Every scanner does the same around its own protocol: open the spooled message,
refuse one over the size limit without sending it, connect to ``"host:port"``
(``"[::1]:783"`` for IPv6) or ``"unix:/path"``, talk within one deadline for the
whole exchange (connect, send, answer), and turn every failure into
``PROCESSING_FAILED`` with a ``detail`` naming the scanner and the reason.
`exchange` does that; each scanner module gives it the protocol's few lines
(`Talk`) and the reading of the answer (`Read`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from mxrules.hostport import split_host_port
from mxrules.scan import Verdict

__all__ = [
    "CHUNK_SIZE",
    "MAX_ANSWER",
    "DeadlineSocket",
    "Read",
    "ScannerError",
    "Talk",
    "excerpt",
    "exchange",
    "open_message",
    "parse_address",
]

CHUNK_SIZE = 128 * 1024
# Answers are small (a status line and a score, rspamd's JSON of symbols, clamd's one
# line); a bound keeps a misbehaving server from filling the milter's memory.
MAX_ANSWER = 4 * 1024 * 1024

# One protocol's side of the exchange: given the connection, the open message and its
# size, send the request and read the answer.  Returns the answer and whether the
# whole message was sent (False: the scanner closed while it was being sent).
Talk = Callable[["DeadlineSocket", IO[bytes], int], tuple[bytes, bool]]
# The verdict from the whole answer, given the label that starts a failure's detail.
Read = Callable[[str, bytes], Verdict]


def exchange(label: str, address: str, path: str, talk: Talk, read: Read, *,
             timeout: float, max_size: int, size_detail: str) -> Verdict:
    """The verdict ``read`` finds in the scanner's answer to ``talk``, or PROCESSING_FAILED.

    ``label`` (``"spamd at host:port"``) starts every failure's detail; a message over
    ``max_size`` bytes is not sent and gives ``size_detail``.  An empty answer goes to
    ``read`` (each protocol words that itself), unless the scanner closed while the
    message was being sent: that is a failure here.
    """
    deadline = time.monotonic() + timeout
    try:
        with open_message(path) as (message, size):
            if size > max_size:
                return Verdict("PROCESSING_FAILED", size_detail)
            with DeadlineSocket(address, deadline, timeout) as conn:
                answer, sent = talk(conn, message, size)
                if not answer and not sent:
                    raise ScannerError("closed the connection while the message was sent")
    except ScannerError as exc:
        return Verdict("PROCESSING_FAILED", f"{label}: {exc}")
    return read(label, answer)



class ScannerError(Exception):
    """A scanner could not be used (down, slow, closed early); becomes PROCESSING_FAILED.

    The message is the reason, worded to follow "<scanner> at <address>: ".
    """


@contextmanager
def open_message(path: str) -> Iterator[tuple[IO[bytes], int]]:
    """The spooled message opened for reading, and its size in bytes."""
    try:
        message = open(path, "rb")  # noqa: SIM115 - closed below, errors become ScannerError
    except OSError as exc:
        raise ScannerError(f"cannot read the message: {exc}") from exc
    with message:
        yield message, os.fstat(message.fileno()).st_size


class DeadlineSocket:
    """A stream socket to a scanner whose every operation ends by one deadline.

    ``address`` is ``"host:port"`` or ``"unix:/path"``; ``deadline`` is a
    ``time.monotonic()`` value; ``timeout`` only words the error.  Every failure is a
    ScannerError.  Names in ``host`` are resolved without the deadline (getaddrinfo
    cannot be interrupted): give scanners by IP address or a name in /etc/hosts.
    """

    def __init__(self, address: str, deadline: float, timeout: float) -> None:
        self.deadline = deadline
        self.timeout = timeout
        self.is_unix = address.startswith("unix:")
        target = parse_address(address)
        try:
            if isinstance(target, str):
                self.sock = self._connect(socket.AF_UNIX, 0, target)
            else:
                self.sock = self._connect_tcp(*target)
        except OSError as exc:
            raise self._error("connect", exc) from exc
        except UnicodeError as exc:  # a host name that IDNA cannot encode
            raise ScannerError(f"bad host name: {exc}") from exc

    def _connect(self, family: int, proto: int, sockaddr: Any) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.settimeout(self._remaining())
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    def _connect_tcp(self, host: str, port: int) -> socket.socket:
        """Try each address of ``host`` in turn, all within the one deadline (unlike
        socket.create_connection, which gives every address the whole timeout)."""
        last: OSError | None = None
        for family, _, proto, _, sockaddr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        ):
            try:
                return self._connect(family, proto, sockaddr)
            except TimeoutError:
                raise  # the deadline is spent: no time for the next address
            except OSError as exc:
                last = exc
        raise last if last is not None else OSError(f"no address for {host}")

    def __enter__(self) -> DeadlineSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ScannerError(f"no answer within {self.timeout:g}s")
        return remaining

    def _error(self, doing: str, exc: OSError) -> ScannerError:
        if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since 3.10
            return ScannerError(f"no answer within {self.timeout:g}s (while trying to {doing})")
        if isinstance(exc, ConnectionRefusedError):
            return ScannerError("connection refused (scanner down?)")
        if isinstance(exc, FileNotFoundError) and self.is_unix:
            return ScannerError("no socket there (scanner down?)")
        reason = exc.strerror or str(exc) or type(exc).__name__
        return ScannerError(f"cannot {doing}: {reason}")

    def send(self, data: bytes) -> None:
        """Send all of ``data`` before the deadline."""
        self.sock.settimeout(self._remaining())
        try:
            self.sock.sendall(data)  # the timeout bounds the whole sendall (Python >= 3.5)
        except OSError as exc:
            raise self._error("send", exc) from exc

    def send_file(
        self,
        message: IO[bytes],
        size: int,
        *,
        frame: bool = False,
        stop_on_close: bool = False,
    ) -> bool:
        """Send ``size`` bytes of ``message`` in chunks, never all of it in memory.

        ``frame`` prefixes every chunk with its length as 4 bytes, big-endian (clamd's
        INSTREAM).  With ``stop_on_close`` a peer that closes or resets the connection
        stops the sending and False is returned, so that the caller can read the answer
        the scanner sent before closing (clamd over StreamMaxLength, an HTTP 413).
        """
        left = size
        while left > 0:
            chunk = message.read(min(CHUNK_SIZE, left))
            if not chunk:
                raise ScannerError(f"the message file ended {left} bytes early")
            left -= len(chunk)
            data = len(chunk).to_bytes(4, "big") + chunk if frame else chunk
            try:
                self.send(data)
            except ScannerError as exc:
                cause = exc.__cause__
                if stop_on_close and isinstance(cause, BrokenPipeError | ConnectionResetError):
                    return False
                raise
        return True

    def shutdown_write(self) -> None:
        """Half-close: the peer reads EOF after what was sent, and can still answer."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._error("end the message", exc) from exc

    def receive(self, *, until: bytes | None = None) -> bytes:
        """Read the answer until the peer closes (or, with ``until``, that byte arrives).

        A peer that resets the connection after answering (it closed with our data
        unread) still gives what it answered.
        """
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                self.sock.settimeout(self._remaining())
                chunk = self.sock.recv(65536)
            except (BrokenPipeError, ConnectionResetError) as exc:
                if chunks:
                    break
                raise self._error("read the answer", exc) from exc
            except OSError as exc:
                raise self._error("read the answer", exc) from exc
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if until is not None and until in chunk:
                break
            if total > MAX_ANSWER:
                raise ScannerError(f"answer longer than {MAX_ANSWER} bytes")
        return b"".join(chunks)


def parse_address(address: str) -> str | tuple[str, int]:
    """``"unix:/path"`` → the path; ``"host:port"`` or ``"[v6]:port"`` → (host, port)."""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path:
            raise ScannerError("no socket path in the address")
        return path
    try:
        return split_host_port(address)
    except ValueError as exc:
        raise ScannerError(f"address is neither host:port nor unix:/path ({exc})") from None


def excerpt(data: bytes, limit: int = 200) -> str:
    """The start of an answer, printable, for a ``detail``."""
    text = data[:limit].decode("utf-8", "replace")
    return repr(text + ("..." if len(data) > limit else ""))
