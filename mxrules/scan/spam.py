"""Spam verdicts from SpamAssassin's spamd (SPAMC protocol) or rspamd (HTTP).

SES's spamVerdict: docs/ses-compatibility.md, "Authentication and scans".

Both clients stream the spooled message file (raw, CRLF) to the scanner in chunks,
never holding the whole message in memory, and keep to one deadline for the whole
exchange (connect, send, answer).  They are called from the milter's threads, each
with its own socket, so they share no state.  A scanner that is down, slow, answers
garbage or refuses the message gives ``PROCESSING_FAILED`` with a ``detail`` naming
the scanner and the reason; nothing here raises for a scanner problem, and nothing
here reports PASS without a scanner's answer.

Addresses: ``"host:port"`` (TCP; ``"[::1]:783"`` for IPv6) or ``"unix:/path"``.

The socket helpers at the end (`DeadlineSocket`, `ScannerError`, `open_message`) are
shared with `mxrules.scan.virus`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

from mxrules.scan import Status, Verdict

__all__ = [
    "RSPAMD_ACTIONS",
    "DeadlineSocket",
    "ScannerError",
    "open_message",
    "rspamd_action_status",
    "scan_rspamd",
    "scan_spamd",
]

SIZE_LIMIT_DETAIL = "message over the spam scanner's size limit"

CHUNK_SIZE = 128 * 1024
# Answers are small (a status line and a score, or rspamd's JSON of symbols); a bound
# keeps a misbehaving server from filling the milter's memory.
MAX_ANSWER = 4 * 1024 * 1024


# -- spamd ---------------------------------------------------------------------------------

_SPAMD_STATUS = re.compile(rb"^SPAMD/(?P<version>\d+\.\d+)\s+(?P<code>\d+)\s*(?P<message>.*)$")
_SPAMD_SPAM = re.compile(
    rb"^Spam:\s*(?P<flag>True|False|Yes|No)\s*;\s*(?P<score>-?\d+(?:\.\d+)?)\s*/\s*"
    rb"(?P<threshold>-?\d+(?:\.\d+)?)\s*$",
    re.IGNORECASE,
)


def scan_spamd(
    address: str, path: str, *, timeout: float, max_size: int, user: str | None = None
) -> Verdict:
    """Ask spamd (``CHECK SPAMC/1.5``) whether the message at ``path`` is spam.

    FAIL when spamd says spam, PASS when it says not; ``score`` is spamd's score and
    ``detail`` is ``"score/threshold"`` as spamd wrote them.  A message larger than
    ``max_size`` bytes is not sent (spamc's ``-s`` does the same: scanning huge mail is
    slow and pointless) and gives PROCESSING_FAILED.  ``user`` is sent as spamd's
    ``User`` header (whose preferences spamd applies, unless it runs with ``-x``).
    """
    label = f"spamd at {address}"
    if user is not None and not _header_safe(user):
        return Verdict("PROCESSING_FAILED", f"{label}: user {user!r} cannot be sent in a header")
    deadline = time.monotonic() + timeout
    try:
        with open_message(path) as (message, size):
            if size > max_size:
                return Verdict("PROCESSING_FAILED", SIZE_LIMIT_DETAIL)
            head = [b"CHECK SPAMC/1.5", b"Content-length: %d" % size]
            if user is not None:
                head.append(b"User: " + user.encode())
            with DeadlineSocket(address, deadline, timeout) as conn:
                conn.send(b"\r\n".join(head) + b"\r\n\r\n")
                # spamd reads exactly Content-length bytes, then answers and closes; it
                # also answers early (and closes) when it rejects the request.
                sent = conn.send_file(message, size, stop_on_close=True)
                if sent:
                    # spamd reads the message line by line: a last line without a
                    # newline only ends at EOF (spamc half-closes too).
                    conn.shutdown_write()
                answer = conn.receive()
                if not answer and not sent:
                    raise ScannerError("closed the connection while the message was sent")
    except ScannerError as exc:
        return Verdict("PROCESSING_FAILED", f"{label}: {exc}")
    return _spamd_verdict(label, answer)


def _spamd_verdict(label: str, answer: bytes) -> Verdict:
    """Verdict from spamd's answer to CHECK (status line, ``Spam:`` header)."""
    if not answer:
        return Verdict("PROCESSING_FAILED", f"{label}: closed the connection without an answer")
    lines = answer.split(b"\r\n")
    status = _SPAMD_STATUS.match(lines[0])
    if status is None:
        return Verdict("PROCESSING_FAILED", f"{label}: unexpected answer {_excerpt(answer)}")
    if int(status["code"]) != 0:  # EX_OK; others are sysexits codes (EX_PROTOCOL, ...)
        message = status["message"].decode("utf-8", "replace")
        return Verdict("PROCESSING_FAILED", f"{label}: error {int(status['code'])} {message}")
    for line in lines[1:]:
        if not line:
            break  # end of headers
        spam = _SPAMD_SPAM.match(line)
        if spam is not None:
            score, threshold = spam["score"].decode(), spam["threshold"].decode()
            is_spam = spam["flag"].lower() in (b"true", b"yes")
            return Verdict("FAIL" if is_spam else "PASS", f"{score}/{threshold}", float(score))
    return Verdict("PROCESSING_FAILED", f"{label}: no Spam header in {_excerpt(answer)}")


# -- rspamd --------------------------------------------------------------------------------

# rspamd's recommended action, as SES's spam verdict.  rspamd itself calls a message
# spam as soon as its action is not "no action" (its legacy /check answer sets is_spam
# for "greylist" as for "add header": checked with rspamd 3.4); SES has PASS/FAIL/GRAY,
# so the actions that only defer the message are GRAY, not FAIL:
#   - "greylist" (score between the greylist and add_header thresholds) and
#     "soft reject" (rspamd wants the MTA to try later: greylisting, rate limits, its
#     own timeout with soft_reject_on_timeout) leave the question open: GRAY.
#   - "add header" and "rewrite subject" (score past add_header / rewrite_subject),
#     "reject", "discard" and the commonly configured custom "quarantine" all mean
#     that rspamd judged the message spam: FAIL.
# Any other action (a custom one) is not guessed at: PROCESSING_FAILED names it.
RSPAMD_ACTIONS: Mapping[str, Status] = {
    "no action": "PASS",
    "greylist": "GRAY",
    "soft reject": "GRAY",
    "add header": "FAIL",
    "rewrite subject": "FAIL",
    "reject": "FAIL",
    "discard": "FAIL",
    "quarantine": "FAIL",
}


def rspamd_action_status(action: str) -> Status | None:
    """SES spam status for an rspamd action (see RSPAMD_ACTIONS), None when unknown."""
    return RSPAMD_ACTIONS.get(action.strip().lower())


def scan_rspamd(
    address: str,
    path: str,
    *,
    timeout: float,
    max_size: int,
    client_ip: str | None = None,
    helo: str | None = None,
    sender: str | None = None,
    recipients: Sequence[str] = (),
    hostname: str | None = None,
    queue_id: str | None = None,
) -> Verdict:
    """Ask rspamd (``POST /checkv2``) for its action on the message at ``path``.

    The status follows `RSPAMD_ACTIONS`; ``score`` is rspamd's score and ``detail`` is
    ``"<action> score/required_score"``.  The SMTP facts go in rspamd's headers: ``IP``,
    ``Helo``, ``From`` (``sender=""``, the null reverse-path, is sent as ``<>``), one
    ``Rcpt`` per recipient, ``Hostname`` and ``Queue-Id``.

    Pass ``hostname``, the client's verified reverse DNS name as the MTA has it (the
    milter's connect hostname, or Postfix's ``{client_name}``), whenever ``client_ip``
    is passed: without it rspamd counts the client as having no rDNS (RDNS_NONE and
    HFILTER_HOSTNAME_UNKNOWN, 3.5 points with the stock scores: alone nearly the
    greylist threshold).  The MTA's words for "no name", ``unknown`` (Postfix) and
    ``[address]`` (libmilter), are not sent: rspamd would take them for a verified name
    and drop those symbols (checked with rspamd 3.4).

    A message larger than ``max_size`` bytes is not sent and gives PROCESSING_FAILED.
    """
    label = f"rspamd at {address}"
    if hostname is not None and (hostname.lower() == "unknown" or hostname.startswith("[")):
        hostname = None
    fields: list[tuple[str, str]] = []
    for name, value in (("IP", client_ip), ("Helo", helo), ("Hostname", hostname)):
        if value is not None:
            fields.append((name, value))
    if sender is not None:
        fields.append(("From", sender or "<>"))
    fields.extend(("Rcpt", rcpt) for rcpt in recipients)
    if queue_id is not None:
        fields.append(("Queue-Id", queue_id))
    for name, value in fields:
        if not _header_safe(value):
            return Verdict("PROCESSING_FAILED", f"{label}: {name} {value!r} cannot be sent")
    deadline = time.monotonic() + timeout
    try:
        with open_message(path) as (message, size):
            if size > max_size:
                return Verdict("PROCESSING_FAILED", SIZE_LIMIT_DETAIL)
            with DeadlineSocket(address, deadline, timeout) as conn:
                host = "localhost" if conn.is_unix else address
                head = [
                    "POST /checkv2 HTTP/1.1",
                    f"Host: {host}",
                    "Connection: close",
                    f"Content-Length: {size}",
                    *(f"{name}: {value}" for name, value in fields),
                ]
                conn.send(("\r\n".join(head) + "\r\n\r\n").encode())
                # rspamd may answer early (413 for a message over its max_message) and
                # close; its answer then says more than the broken pipe.
                sent = conn.send_file(message, size, stop_on_close=True)
                answer = conn.receive()
                if not answer and not sent:
                    raise ScannerError("closed the connection while the message was sent")
    except ScannerError as exc:
        return Verdict("PROCESSING_FAILED", f"{label}: {exc}")
    return _rspamd_verdict(label, answer)


def _rspamd_verdict(label: str, answer: bytes) -> Verdict:
    """Verdict from rspamd's HTTP answer to /checkv2."""
    try:
        code, body = _http_response(answer)
        result: Any = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError) as exc:
        return Verdict("PROCESSING_FAILED", f"{label}: bad HTTP answer ({exc}): {_excerpt(answer)}")
    if code != 200:
        error = result.get("error") if isinstance(result, dict) else None
        reason = error if isinstance(error, str) else _excerpt(body)
        return Verdict("PROCESSING_FAILED", f"{label}: HTTP {code}: {reason}")
    if not isinstance(result, dict) or not isinstance(result.get("action"), str):
        return Verdict("PROCESSING_FAILED", f"{label}: no action in {_excerpt(body)}")
    action: str = result["action"]
    score = _number(result.get("score"))
    required = _number(result.get("required_score"))
    scores = f"{score:g}/{required:g}" if score is not None and required is not None else "?"
    status = rspamd_action_status(action)
    if status is None:
        return Verdict(
            "PROCESSING_FAILED", f"{label}: unknown action {action!r}, score {scores}", score
        )
    return Verdict(status, f"{action} {scores}", score)


def _http_response(answer: bytes) -> tuple[int, bytes]:
    """Status code and body of a whole HTTP/1.x response (the server closed after it)."""
    head, separator, body = answer.partition(b"\r\n\r\n")
    if not separator:
        raise ValueError("no end of headers")
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError("no HTTP status line")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = _dechunk(body)
    elif b"content-length" in headers:
        length = int(headers[b"content-length"])
        if len(body) < length:
            raise ValueError(f"body truncated at {len(body)} of {length} bytes")
        body = body[:length]
    return int(parts[1]), body


def _dechunk(body: bytes) -> bytes:
    """Decode an HTTP chunked body (rspamd answers HTTP/1.1 requests with Content-Length,
    but a proxy in front of it may not)."""
    out = bytearray()
    position = 0
    while True:
        end = body.find(b"\r\n", position)
        if end < 0:
            raise ValueError("truncated chunked body")
        length = int(body[position:end].split(b";")[0], 16)
        if length == 0:
            return bytes(out)
        start = end + 2
        if len(body) < start + length:
            raise ValueError("truncated chunked body")
        out += body[start : start + length]
        position = start + length + 2


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# -- shared with mxrules.scan.virus -------------------------------------------------------


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
    host, colon, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ScannerError("address is neither host:port nor unix:/path")
    return host, int(port)


def _header_safe(value: str) -> bool:
    """No control characters: a CR or LF would start a header (or the body) of its own."""
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)


def _excerpt(data: bytes, limit: int = 200) -> str:
    """The start of an answer, printable, for a ``detail``."""
    text = data[:limit].decode("utf-8", "replace")
    return repr(text + ("..." if len(data) > limit else ""))
