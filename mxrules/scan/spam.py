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
The exchange itself (file, size limit, socket, deadline, errors) is
`mxrules.scan.transport`'s, shared with `mxrules.scan.virus`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import IO, Any

from mxrules.scan import Status, Verdict
from mxrules.scan.transport import DeadlineSocket, excerpt, exchange
from mxrules.text import has_controls

__all__ = [
    "RSPAMD_ACTIONS",
    "rspamd_action_status",
    "scan_rspamd",
    "scan_spamd",
]

SIZE_LIMIT_DETAIL = "message over the spam scanner's size limit"


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
    if user is not None and has_controls(user):
        return Verdict("PROCESSING_FAILED", f"{label}: user {user!r} cannot be sent in a header")

    def talk(conn: DeadlineSocket, message: IO[bytes], size: int) -> tuple[bytes, bool]:
        head = [b"CHECK SPAMC/1.5", b"Content-length: %d" % size]
        if user is not None:
            head.append(b"User: " + user.encode())
        conn.send(b"\r\n".join(head) + b"\r\n\r\n")
        # spamd reads exactly Content-length bytes, then answers and closes; it
        # also answers early (and closes) when it rejects the request.
        sent = conn.send_file(message, size, stop_on_close=True)
        if sent:
            # spamd reads the message line by line: a last line without a
            # newline only ends at EOF (spamc half-closes too).
            conn.shutdown_write()
        return conn.receive(), sent

    return exchange(label, address, path, talk, _spamd_verdict, timeout=timeout,
                    max_size=max_size, size_detail=SIZE_LIMIT_DETAIL)


def _spamd_verdict(label: str, answer: bytes) -> Verdict:
    """Verdict from spamd's answer to CHECK (status line, ``Spam:`` header)."""
    if not answer:
        return Verdict("PROCESSING_FAILED", f"{label}: closed the connection without an answer")
    lines = answer.split(b"\r\n")
    status = _SPAMD_STATUS.match(lines[0])
    if status is None:
        return Verdict("PROCESSING_FAILED", f"{label}: unexpected answer {excerpt(answer)}")
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
    return Verdict("PROCESSING_FAILED", f"{label}: no Spam header in {excerpt(answer)}")


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
        if has_controls(value):
            return Verdict("PROCESSING_FAILED", f"{label}: {name} {value!r} cannot be sent")

    def talk(conn: DeadlineSocket, message: IO[bytes], size: int) -> tuple[bytes, bool]:
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
        return conn.receive(), sent

    return exchange(label, address, path, talk, _rspamd_verdict, timeout=timeout,
                    max_size=max_size, size_detail=SIZE_LIMIT_DETAIL)


def _rspamd_verdict(label: str, answer: bytes) -> Verdict:
    """Verdict from rspamd's HTTP answer to /checkv2."""
    try:
        code, body = _http_response(answer)
        result: Any = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError) as exc:
        return Verdict("PROCESSING_FAILED", f"{label}: bad HTTP answer ({exc}): {excerpt(answer)}")
    if code != 200:
        error = result.get("error") if isinstance(result, dict) else None
        reason = error if isinstance(error, str) else excerpt(body)
        return Verdict("PROCESSING_FAILED", f"{label}: HTTP {code}: {reason}")
    if not isinstance(result, dict) or not isinstance(result.get("action"), str):
        return Verdict("PROCESSING_FAILED", f"{label}: no action in {excerpt(body)}")
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
