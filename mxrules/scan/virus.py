"""Virus verdicts from ClamAV's clamd, over its ``zINSTREAM`` command.

SES's virusVerdict: docs/ses-compatibility.md, "Authentication and scans".

The spooled message (raw, CRLF) is streamed to clamd in length-prefixed chunks, never
whole in memory, within one deadline for the whole exchange.  clamd parses the MIME
structure itself (base64 attachments included), so the raw message is what it must
see.  A clamd that is down, slow, refuses the message (over its StreamMaxLength) or
could not scan all of it gives ``PROCESSING_FAILED``; nothing here raises for a
scanner problem.

Address: ``"host:port"`` (clamd's TCPSocket/TCPAddr) or ``"unix:/path"`` (LocalSocket).
"""

from __future__ import annotations

from typing import IO

from mxrules.scan import Verdict
from mxrules.scan.transport import DeadlineSocket, exchange

__all__ = ["scan_clamd"]

SIZE_LIMIT_DETAIL = "message over the virus scanner's size limit"

# clamd reports a limit it hit (MaxScanSize, MaxFileSize, MaxRecursion, MaxFiles, ...)
# as a "virus" of this family when AlertExceedsMax is on: part of the message was not
# scanned, which is no verdict on it.
_LIMITS_EXCEEDED = "Heuristics.Limits.Exceeded"


def scan_clamd(address: str, path: str, *, timeout: float, max_size: int) -> Verdict:
    """Ask clamd whether the message at ``path`` carries a virus.

    ``stream: OK`` is PASS; ``stream: <signature> FOUND`` is FAIL with the signature
    name as ``detail``.  PROCESSING_FAILED: a message larger than ``max_size`` bytes (not
    sent), clamd's ``INSTREAM size limit exceeded`` (its StreamMaxLength is below the
    message size), any other ``ERROR``, a limit clamd hit while scanning (see
    _LIMITS_EXCEEDED), or clamd down or slow.
    """
    label = f"clamd at {address}"
    return exchange(label, address, path, _instream, _clamd_verdict, timeout=timeout,
                    max_size=max_size, size_detail=SIZE_LIMIT_DETAIL)


def _instream(conn: DeadlineSocket, message: IO[bytes], size: int) -> tuple[bytes, bool]:
    """clamd's side of the exchange: the message streamed in length-prefixed chunks."""
    # The "z" form: NUL-terminated command and answer, so no ambiguity with newlines
    # in a reply.
    conn.send(b"zINSTREAM\0")
    # Past StreamMaxLength clamd answers at once and closes, while we may still be
    # sending: stop then and read that answer.
    sent = conn.send_file(message, size, frame=True, stop_on_close=True)
    if sent:
        conn.send(b"\0\0\0\0")  # a zero-length chunk ends the stream
    return conn.receive(until=b"\0"), sent


def _clamd_verdict(label: str, answer: bytes) -> Verdict:
    """Verdict from clamd's answer to INSTREAM."""
    text = answer.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    if not text:
        return Verdict("PROCESSING_FAILED", f"{label}: closed the connection without an answer")
    if text.endswith("ERROR"):
        if "size limit exceeded" in text:
            return Verdict(
                "PROCESSING_FAILED",
                f"{label}: {text} (the message is over clamd's StreamMaxLength)",
            )
        return Verdict("PROCESSING_FAILED", f"{label}: {text}")
    _, colon, result = text.partition(": ")  # "stream: ..."
    if not colon:
        return Verdict("PROCESSING_FAILED", f"{label}: unexpected answer {text!r}")
    if result == "OK":
        return Verdict("PASS", "OK")
    if result.endswith(" FOUND"):
        signature = result[: -len(" FOUND")].strip()
        if signature.startswith(_LIMITS_EXCEEDED):
            return Verdict(
                "PROCESSING_FAILED", f"{label}: not all of the message was scanned: {signature}"
            )
        return Verdict("FAIL", signature)
    return Verdict("PROCESSING_FAILED", f"{label}: unexpected answer {text!r}")
